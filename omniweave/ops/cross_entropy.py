"""Chunked cross-entropy: the LM head and the loss together, a chunk of tokens at a time, so
the ``[tokens, vocab]`` logits (fp32: 4 bytes x 151,936 per token for Qwen) never exist whole,
in forward or backward (each chunk's logits are recomputed there). Gradients are those of
``F.cross_entropy(hidden @ weight.T, targets, reduction="none")``.

Under tensor parallelism the head's weight is split over the vocabulary: each rank computes
its part of every chunk's logits, and the log-normaliser and the target's logit are reduced
over the ranks (a max, then one sum), so no rank holds more than ``chunk x vocab / tp``."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from omniweave.data.processors import IGNORE_INDEX


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int, group, offset: int):
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_normalisers = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = (hidden[part] @ weight.T).float()
            target = targets[part] - offset  # the target's column in this rank's logits
            mine = (target >= 0) & (target < logits.shape[1])
            picked = logits.gather(1, target.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
            top = logits.max(dim=-1).values
            if group is not None:
                dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
            sums = torch.stack(
                [torch.exp(logits - top[:, None]).sum(-1), torch.where(mine, picked, 0.0)]
            )
            if group is not None:  # the whole vocabulary's sum of exponentials; the target's logit
                dist.all_reduce(sums, group=group)
            log_normalisers[part] = top + torch.log(sums[0])
            valid = targets[part] != ignore_index
            losses[part] = torch.where(valid, log_normalisers[part] - sums[1], 0.0)
        ctx.save_for_backward(hidden, weight, targets, log_normalisers)
        ctx.chunk, ctx.ignore_index, ctx.offset = chunk, ignore_index, offset
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, log_normalisers = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            logits = (hidden[part] @ weight.T).float()
            valid = targets[part] != ctx.ignore_index
            target = targets[part] - ctx.offset
            mine = valid & (target >= 0) & (target < logits.shape[1])
            # d loss / d logits = softmax - one_hot(target), per token times its output grad
            grad = torch.exp(logits - log_normalisers[part][:, None])
            rows = torch.arange(grad.shape[0], device=grad.device)[mine]
            grad[rows, target[mine]] -= 1.0
            grad *= torch.where(valid, grad_losses[part], 0.0)[:, None]
            grad = grad.to(hidden.dtype)
            grad_hidden[part] = grad @ weight  # tp: this rank's part of the vocabulary's sum
            grad_weight += grad.T @ hidden[part]
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 512,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token losses (0 where ``targets == ignore_index``) of ``hidden`` ``[tokens, H]``
    through an LM head of ``weight`` ``[vocab, H]``. A ``weight`` split over the vocabulary
    (a DTensor sharded on dim 0 over a 1-D mesh) takes ``hidden`` whole on every rank
    (replicated) and gives every rank the same losses."""
    if not isinstance(weight, DTensor):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index, None, 0)
    mesh = weight.device_mesh
    local = weight.to_local()
    offset = mesh.get_local_rank() * local.shape[0]
    if isinstance(hidden, DTensor):  # its gradient here is this rank's part of a sum over tp
        hidden = hidden.to_local(grad_placements=[Partial()])
    group = mesh.get_group()
    return _ChunkedCrossEntropy.apply(hidden, local, targets, chunk, ignore_index, group, offset)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token losses (fp32, 0 at ``IGNORE_INDEX``) of logits ``[rows, tokens, vocab]``
    against flat ``targets``: the trainer's loss when the LM head returns logits."""
    flat = logits.float().flatten(0, 1)
    return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="none")


def naive_cross_entropy(hidden, weight, targets, ignore_index: int = -100) -> torch.Tensor:
    """The reference: whole fp32 logits, then ``F.cross_entropy``."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


def install_loss_head(lm_head: nn.Linear, chunk: int, ignore_index: int = -100) -> nn.Linear:
    """Make ``lm_head`` return per-token losses ``[batch, seq]`` of ``lm_head.targets``
    (set before each forward) instead of logits: the model's own forward then hands back
    the losses as its ``logits``. FSDP gathers the weight for this forward as for any;
    tensor parallelism hands it the whole sequence and its part of the vocabulary."""
    if not isinstance(lm_head, nn.Linear) or lm_head.bias is not None:
        raise ValueError(
            "train.cross_entropy=chunked needs an LM head that is a Linear without bias."
        )

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        losses = chunked_cross_entropy(flat, lm_head.weight, lm_head.targets, chunk, ignore_index)
        return losses.view(hidden.shape[:-1])

    lm_head.forward = forward
    lm_head.targets = None
    return lm_head
