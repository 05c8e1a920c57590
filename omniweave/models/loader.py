"""Build a Hugging Face causal LM on the meta device, shard it, then fill each rank's shard.

No rank ever materialises the full model: weights come from safetensors slices
(each rank reads only the region it owns) or from a seeded per-parameter init.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from contextlib import ExitStack

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoConfig, PretrainedConfig

from omniweave.distributed.activations import apply_activation_checkpointing
from omniweave.distributed.ddp import apply_ddp, may_leave_parameters_unused, uses_ddp
from omniweave.distributed.expert import apply_expert_parallel
from omniweave.distributed.fsdp import apply_fsdp, needs_fsdp
from omniweave.distributed.parallel_state import ParallelState
from omniweave.distributed.pipeline import split_stage
from omniweave.distributed.plan import shard_parameters
from omniweave.distributed.tensor_parallel import apply_tensor_parallel
from omniweave.models.lora import LoraSettings, adapter_init, add_adapters, base_name, is_adapter
from omniweave.models.omni.model import ENCODER_UNITS, OmniModel
from omniweave.models.registry import model_from_config, recipe_for
from omniweave.ops.kernels import apply_kernels, compile_blocks

Region = list[tuple[int, int]]  # (start, length) per tensor dim


def load_hf_config(path: str | None, inline: dict | None, attn: str) -> PretrainedConfig:
    """The HF config from ``model.path`` or ``model.config``; ValueError when neither is usable."""
    if path and inline:
        raise ValueError("Set either model.path or model.config, not both.")
    if path:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"model.path '{path}' is not a Hugging Face model folder (no config.json there); "
                "point it at a local folder written by save_pretrained, or use model.config."
            )
        config = AutoConfig.from_pretrained(path)
    elif inline:
        fields = dict(inline)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ValueError("model.config needs a 'model_type' (e.g. qwen2, llama, qwen3).")
        config = AutoConfig.for_model(model_type, **fields)
    else:
        raise ValueError(
            "Set model.path (a local HF folder) or model.config (an inline HF config)."
        )
    recipe_for(config.model_type)
    config._attn_implementation = attn
    return config


def build_model(
    config: PretrainedConfig,
    state: ParallelState | None,
    path: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    cpu_offload: bool = False,
    grouped_experts: bool = False,
    omni: dict | None = None,
    activation_checkpointing: tuple[str, int] = ("none", 1),
    ep_chunks: int = 1,
    kernels: tuple[str, bool] = ("torch", False),
    lora: LoraSettings | None = None,
    pp_virtual_stages: int = 1,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Meta-device init, LoRA adapters, the pipeline stage's part, TP, EP, activation
    checkpointing (mode, every k-th block) and FSDP2 (DDP for pure replicas) per the
    family's recipe, then load ``path`` or init from ``seed``; ``state=None``: one plain
    CPU model. ``grouped_experts``: MoE experts compute with one grouped GEMM;
    ``ep_chunks``: EP dispatch in that many overlapped parts. ``omni``: an OmniModel with
    these encoders in front (``path`` then holds the foundation only; ``train_encoders:
    false`` freezes them). ``kernels``: ``train.kernels`` and whether to compile each block.
    ``pp_virtual_stages``: pipeline stages per pipeline rank. ``reshard_after_forward``:
    FSDP's, for every unit."""
    recipe = recipe_for(config.model_type)
    with torch.device("meta"):
        model = foundation = model_from_config(config)
        if lora:
            add_adapters(foundation, lora)
        if omni:
            model = OmniModel.from_config(foundation, omni["encoders"])
            model.encoders.requires_grad_(omni.get("train_encoders", True))
    renamings = checkpoint_renamings(foundation)
    if state is not None and state.degrees.pp > 1:  # this rank's stage only, names kept
        split_stage(model, state.pp_rank, state.degrees.pp, pp_virtual_stages)
    prefix = "foundation." if omni else ""
    units = tuple(prefix + glob for glob in recipe.shard_units)
    if omni:
        units = ENCODER_UNITS + units
    tp_mesh, ep_mesh = (None, None) if state is None else (state.tp_mesh, state.ep_mesh)
    if tp_mesh is not None:
        apply_tensor_parallel(foundation, tp_mesh)
    if ep_mesh is not None:
        plan = {prefix + glob: placement for glob, placement in recipe.expert_plan}
        shard_parameters(model, plan, ep_mesh)
    if ep_mesh is not None or (grouped_experts and recipe.expert_plan):
        group = ep_mesh.get_group() if ep_mesh is not None else None
        apply_expert_parallel(foundation, group, grouped_experts, ep_chunks)
    apply_kernels(foundation, kernels[0])
    apply_activation_checkpointing(foundation, recipe.block_classes, *activation_checkpointing)
    if kernels[1]:
        compile_blocks(foundation, recipe.block_classes)
    ddp = state is not None and uses_ddp(state, dtype, cpu_offload)
    fsdp = state is not None and needs_fsdp(state, dtype, cpu_offload) and not ddp
    if fsdp:
        expert_units = tuple(prefix + glob for glob in recipe.expert_units)
        apply_fsdp(model, state, units, dtype, cpu_offload, expert_units, reshard_after_forward)
    model.to_empty(device="cpu" if cpu_offload or state is None else state.device)
    if not fsdp:
        foundation.tie_weights()  # to_empty breaks tying of unwrapped modules; FSDP keeps it
    _init_buffers(foundation)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    std = getattr(config, "initializer_range", 0.02)
    if path:
        load_safetensors(foundation, path, renamings)
        if omni:
            init_random(model.encoders, seed, std)
    else:
        init_random(model, seed, std)
    if lora:
        init_adapters(foundation, seed)
    if ddp:  # on the filled weights (DDP checks that the replicas agree)
        apply_ddp(model, state, may_leave_parameters_unused(config, bool(omni)))
    model.train()
    return model


def _init_buffers(model: nn.Module) -> None:
    """Recompute the buffers that ``to_empty`` left uninitialised (rotary frequencies,
    sinusoidal position tables) by the family's own init, module by module."""
    for module in model.modules():
        if any(b is not None for b in module._buffers.values()) and not module._parameters:
            model._init_weights(module)


def local_region(param: torch.Tensor) -> Region:
    """The (start, length) per dim of the global tensor this rank holds."""
    if not isinstance(param, DTensor):
        return [(0, size) for size in param.shape]
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return list(zip(offset, shape, strict=True))


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def checkpoint_files(path: str) -> dict[str, str]:
    """Map each tensor name to its safetensors file (single file or sharded with an index)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"No model.safetensors or model.safetensors.index.json in '{path}'.")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def checkpoint_renamings(model: nn.Module) -> list:
    """HF's renamings of checkpoint names to ``model``'s (e.g. Qwen2-VL files keep
    ``visual.*`` and ``model.layers.*``; the model has ``model.visual.*`` and
    ``model.language_model.layers.*``). Taken before FSDP, which renames the classes."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


@torch.no_grad()
def load_safetensors(model: nn.Module, path: str, renamings: list = ()) -> None:
    """Copy each parameter's local region from the checkpoint, reading nothing else.

    Fused expert weights (``experts.gate_up_proj`` / ``experts.down_proj``) are also
    read from HF's per-expert layout (``experts.{e}.gate_proj.weight``...), one
    expert at a time, only for the experts this rank holds.
    """
    from transformers.core_model_loading import apply_renamings

    stored = checkpoint_files(path)
    original = {apply_renamings(key, renamings): key for key in stored}  # model's -> file's
    files = {name: stored[key] for name, key in original.items()}
    params = {base_name(n): p for n, p in model.named_parameters() if not is_adapter(n)}
    pieces = {name: _pieces(name, param.shape, files) for name, param in params.items()}
    missing = sorted(name for name, found in pieces.items() if found is None)
    if missing:
        raise ValueError(f"Checkpoint '{path}' lacks {len(missing)} weights, e.g. {missing[:3]}.")
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def read(key: str, index: tuple[slice, ...]) -> torch.Tensor:
            if files[key] not in handles:
                handles[files[key]] = stack.enter_context(safe_open(files[key], "pt"))
            return handles[files[key]].get_slice(original[key])[index]

        for name, param in params.items():
            region = local_region(param)
            _local(param).copy_(_read_region(region, pieces[name], read))


Piece = tuple[str, int, int, int]  # (checkpoint key, expert, first row, rows) of a fused tensor


def _pieces(name: str, shape: torch.Size, files: dict[str, str]) -> list[Piece] | None:
    """Where a parameter's data lives: itself, or per-expert tensors; None if nowhere."""
    if name in files:
        return [(name, -1, 0, shape[0])]
    prefix, _, fused = name.rpartition(".")
    parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.get(fused)
    if parts is None or len(shape) != 3:
        return None
    rows = shape[1] // len(parts)
    pieces = [
        (f"{prefix}.{expert}.{part}.weight", expert, i * rows, rows)
        for expert in range(shape[0])
        for i, part in enumerate(parts)
    ]
    return pieces if all(key in files for key, *_ in pieces) else None


def _read_region(region: Region, pieces: list[Piece], read) -> torch.Tensor:
    """The region of a tensor assembled from its pieces (see ``_pieces``)."""
    index = tuple(slice(start, start + length) for start, length in region)
    if pieces[0][1] == -1:
        return read(pieces[0][0], index)
    (e0, ne), (r0, nr), (c0, nc) = region
    experts = []
    for expert in range(e0, e0 + ne):
        rows = []
        for key, owner, first, count in pieces:
            lo, hi = max(r0, first), min(r0 + nr, first + count)
            if owner == expert and lo < hi:
                rows.append(read(key, (slice(lo - first, hi - first), slice(c0, c0 + nc))))
        experts.append(torch.cat(rows))
    return torch.stack(experts) if experts else torch.empty(0, nr, nc)


@torch.no_grad()
def init_random(model: nn.Module, seed: int, std: float) -> None:
    """HF-style init (normal weights, zero biases, unit norms), identical for every layout.

    Each parameter draws from its own generator seeded by ``seed`` and its name,
    so a sharded rank gets exactly its slice of what one process would draw. LoRA adapters
    are left to ``init_adapters``; the weights they adapt draw as unadapted ones would.
    """
    for name, param, module in _params_with_modules(model):
        if is_adapter(name):
            continue
        name = base_name(name)
        full = torch.empty(param.shape, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if name.endswith("bias"):
            full.zero_()
        elif param.ndim == 1:
            full.fill_(1.0)
        else:
            full.normal_(0.0, std, generator=generator)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                full[module.padding_idx] = 0
        index = tuple(slice(start, start + length) for start, length in local_region(param))
        _local(param).copy_(full[index])


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Each LoRA adapter weight of ``model`` set to this rank's region of ``adapter_init``."""
    for name, param in model.named_parameters():
        if is_adapter(name):
            index = tuple(slice(start, start + n) for start, n in local_region(param))
            _local(param).copy_(adapter_init(name, param.shape, seed)[index])


def _params_with_modules(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, nn.Module]]:
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{param_name}".lstrip("."), param, module
