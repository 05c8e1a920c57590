"""FSDP2 / HSDP: shard a plain model's units over the sharding mesh, from outside."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from omniweave.distributed.parallel_state import ParallelState
from omniweave.distributed.plan import matches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIXIN_METHODS = ("lm_encode", "lm_embed", "lm_head", "lm_generate")  # OmniModel parts


def needs_fsdp(state: ParallelState, dtype: str, cpu_offload: bool) -> bool:
    """One fp32 process with nothing to offload trains the plain model: no wrapper overhead."""
    return state.is_distributed or dtype != "float32" or cpu_offload


def gpu_default(setting: bool | None, device: torch.device) -> bool:
    """``parallel.reshard_after_forward`` or ``parallel.accumulate_sharded``: as set, else
    true on a GPU and false on CPU. On a GPU, FSDP's all-gathers and reduce-scatters run on
    their own streams, overlapped with compute, and device memory is scarce: free each unit's
    gathered weights after its forward, and reduce-scatter every micro-batch's gradients into
    the shards. On CPU, gloo's collectives block the step, so hold the gathered weights until
    the backward (one all-gather per unit and micro-batch, not two: 14% more tokens/s at 2
    processes on the scaling bench's model) and the whole fp32 gradients until the step's
    last micro-batch (one reduce-scatter per unit and step)."""
    return device.type != "cpu" if setting is None else setting


def sync_gradients(model: nn.Module, last: bool, sharded: bool) -> None:
    """Before a micro-batch's backward: whether its gradients are averaged now (the step's
    ``last``, or each one of an FSDP model that accumulates ``sharded``). DDP holds whole
    gradients anyway, so it averages at the last only."""
    if sharded and isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last)  # HSDP's replicas: once per step
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP or DDP
        model.set_requires_gradient_sync(last)


def apply_fsdp(
    model: nn.Module,
    state: ParallelState,
    shard_units: tuple[str, ...],
    dtype: str = "float32",
    cpu_offload: bool = False,
    expert_units: tuple[str, ...] = (),
    reshard_after_forward: bool = True,
) -> None:
    """Wrap each module matching ``shard_units`` (children before parents), then the root.

    Tied input/output embeddings must live in one unit, so when they are tied
    neither is wrapped on its own and the root holds them. ``expert_units`` are
    sharded over the ranks that hold the same experts (their weights are already
    DTensors on the ``ep`` axis). ``reshard_after_forward=False`` keeps each unit's
    gathered weights from its forward to its backward (ZeRO-2 style).
    """
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else None
    kwargs = dict(
        mesh=state.sharding_mesh,
        mp_policy=policy,
        offload_policy=offload or OffloadPolicy(),
        reshard_after_forward=reshard_after_forward,
    )
    tied = _tied_module_names(model)
    for name, module in reversed(list(model.named_modules())):
        if name and name not in tied and any(matches(name, glob) for glob in expert_units):
            fully_shard(module, **{**kwargs, "mesh": state.expert_sharding_mesh})
        elif name and name not in tied and any(matches(name, glob) for glob in shard_units):
            fully_shard(module, **kwargs)
            for method in MIXIN_METHODS:  # called instead of forward: gather params for them too
                if hasattr(module, method):
                    register_fsdp_forward_method(module, method)
    fully_shard(model, **kwargs)


def _tied_module_names(model: nn.Module) -> set[str]:
    """Names of modules whose parameters are shared with another module."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    return {name for names in owners.values() if len(set(names)) > 1 for name in names}
