"""Unsharded weights of a trained model in one safetensors file (for evaluation and
inference in a single process), gathered from whatever layout it was trained on."""

from __future__ import annotations

import contextlib
import logging
import os

from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from omniweave.models.lora import adapter_scaling, base_name, is_adapter, merge_adapters

WEIGHTS = "model.safetensors"


def gather_full_state(model: nn.Module) -> dict:
    """Every parameter and buffer whole (FSDP and EP shards gathered), on CPU, for rank 0,
    named as in the plain model (LoRA adapters merged into their weights). Collective:
    every rank calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    with _quiet_redistribution():
        state = get_model_state_dict(model, options=options)
    scaling = adapter_scaling(model)
    return state if scaling is None else merge_adapters(state, scaling)


@contextlib.contextmanager
def _quiet_redistribution():
    """DTensor warns that a weight sharded over two mesh dims (FSDP over EP) takes two
    all-gathers to make whole: expected for a one-off gather, so not shown to the user."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_full_weights(model: nn.Module, folder: str, is_main: bool) -> str:
    """Gather every parameter (FSDP and EP shards) to CPU on rank 0 and write ``folder/WEIGHTS``.
    Collective: every rank calls it."""
    state = gather_full_state(model)
    path = os.path.join(folder, WEIGHTS)
    if is_main:
        os.makedirs(folder, exist_ok=True)
        unique = {base_name(n) for n, _ in model.named_parameters() if not is_adapter(n)}
        unique |= {name for name, _ in model.named_buffers()}
        tensors = {name: t.contiguous() for name, t in state.items() if name in unique}
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def load_full_weights(model: nn.Module, folder: str) -> None:
    """Load ``folder/WEIGHTS`` into an unsharded model; every weight must be there."""
    state = load_file(os.path.join(folder, WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{folder}: weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )


def _is_tied(model: nn.Module, name: str) -> bool:
    """A missing entry that shares its storage with one that was loaded (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(
        other is target for other_name, other in params.items() if other_name != name
    )
