"""Chunked cross-entropy: the LM head and the loss together, a chunk of tokens at a time, so
the ``[tokens, vocab]`` logits (fp32: 4 bytes x 151,936 per token for Qwen) never exist whole,
in forward or backward (each chunk's logits are recomputed there). Gradients are those of
``F.cross_entropy(hidden @ weight.T, targets, reduction="none")``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int):
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_normalisers = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = (hidden[part] @ weight.T).float()
            log_normalisers[part] = torch.logsumexp(logits, dim=-1)
            target = targets[part]
            picked = logits.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
            losses[part] = torch.where(target != ignore_index, log_normalisers[part] - picked, 0.0)
        ctx.save_for_backward(hidden, weight, targets, log_normalisers)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, log_normalisers = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            logits = (hidden[part] @ weight.T).float()
            target = targets[part]
            valid = target != ctx.ignore_index
            # d loss / d logits = softmax - one_hot(target), per token times its output grad
            grad = torch.exp(logits - log_normalisers[part][:, None])
            rows = torch.arange(grad.shape[0], device=grad.device)[valid]
            grad[rows, target[valid]] -= 1.0
            grad *= torch.where(valid, grad_losses[part], 0.0)[:, None]
            grad = grad.to(hidden.dtype)
            grad_hidden[part] = grad @ weight
            grad_weight += grad.T @ hidden[part]
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 512,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token losses (0 where ``targets == ignore_index``) of ``hidden`` ``[tokens, H]``
    through an LM head of ``weight`` ``[vocab, H]``."""
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index)


def naive_cross_entropy(hidden, weight, targets, ignore_index: int = -100) -> torch.Tensor:
    """The reference: whole fp32 logits, then ``F.cross_entropy``."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


def install_loss_head(lm_head: nn.Linear, chunk: int, ignore_index: int = -100) -> nn.Linear:
    """Make ``lm_head`` return per-token losses ``[batch, seq]`` of ``lm_head.targets``
    (set before each forward) instead of logits: the model's own forward then hands back
    the losses as its ``logits``. FSDP gathers the weight for this forward as for any."""
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
