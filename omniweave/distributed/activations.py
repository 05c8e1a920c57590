"""Activation memory, from outside the model: recompute chosen blocks in backward instead of
keeping their activations (torch's composable ``checkpoint``: hooks, no wrapper, so parameter
names stay as they are), and keep what autograd saves in host memory (``save_on_cpu``)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed._composable import checkpoint

# Which submodule of a decoder block is its attention / its MLP, by the families' names.
PARTS = {"attention": ("self_attn", "attention", "attn"), "mlp": ("mlp", "feed_forward")}


def apply_activation_checkpointing(
    model: nn.Module, block_classes: tuple[str, ...], mode: str, every: int = 1
) -> int:
    """Checkpoint every ``every``-th block (a module whose class is in ``block_classes``):
    the whole block (``mode="full"``) or only its ``attention`` / ``mlp``. Returns how many
    modules were checkpointed. Apply before FSDP."""
    if mode == "none":
        return 0
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    chosen = [block if mode == "full" else _part(block, mode) for block in blocks[::every]]
    for module in chosen:
        checkpoint(module)
    return len(chosen)


def _part(block: nn.Module, part: str) -> nn.Module:
    for name in PARTS[part]:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise ValueError(
        f"train.activation_checkpointing={part}: {type(block).__name__} has no "
        f"{' / '.join(PARTS[part])} submodule; use full."
    )


def offload_activations(enabled: bool):
    """A context in which autograd keeps saved tensors in host memory (pinned with CUDA);
    on a CPU-only machine they are there already, so it changes nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
