"""AdamW, learning-rate schedules and gradient clipping that is correct over sharded grads."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(
    model: nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases or norm weights). The fused
    kernel updates every parameter in one pass (on CPU 4x faster than the per-op foreach
    update at 4M parameters, results equal to 1e-7 relative)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"train.lr_schedule '{schedule}': use constant, linear or cosine.")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int, min_ratio: float
) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, schedule, warmup, total, min_ratio))


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, stages=None) -> torch.Tensor:
    """Global L2 norm of all gradients (plain or DTensor, any meshes); clip when max_norm > 0.
    ``stages``: the pipeline's group, whose ranks hold different parameters.

    Partial gradients (tensor parallelism's replicated weights) are summed first. Then
    gradients are grouped by mesh and placements: each group's local sum of squares is
    summed over the mesh dims that shard it, and the groups combine as the root of the total.
    """
    for param in params:  # tensor parallel: a replicated weight's gradient is a partial sum
        grad = param.grad
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            whole = [Replicate() if p.is_partial() else p for p in grad.placements]
            param.grad = grad.redistribute(placements=whole)
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    squares = []
    for key, group in groups.items():
        local = [g.to_local() for g in group] if key else group
        # float64: float32 sums over millions of entries drift by 1e-6 to 1e-5 between layouts (a
        # float32 dot here moved the 700-step omni demo's spoken-digit score from 0.7 to 0.6)
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in local]
        square = torch.stack(norms).square().sum()
        if key:  # sum over the mesh dims that split the gradients; replicas hold copies
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if not placement.is_replicate():  # Shard or FSDP's _StridedShard
                    dist.all_reduce(square, group=mesh.get_group(dim))
        squares.append(square)
    square = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
    if stages is not None:  # every stage holds gradients
        dist.all_reduce(square, group=stages)
    total = square.sqrt().float()
    coefficient = max_norm / (float(total) + 1e-6)
    if max_norm > 0 and coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)
    return total
