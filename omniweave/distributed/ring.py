"""Ring context parallelism (``parallel.cp``): each of ``cp`` ranks holds ``1/cp`` of every
row, and attention passes the key/value blocks around the ring, merging each block's
partial softmax into a running one (online softmax), forward and backward.

Rows are cut into ``2 x cp`` chunks and rank ``r`` holds chunks ``r`` and ``2cp - 1 - r``, so
under a causal mask every rank does the same work. Each token carries its position in the
row and its sample's index (packed rows), and the mask is computed from those, so attention
stays causal and inside each sample whatever the chunk layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MASKED = -1e30  # finite: a block with no visible key weighs exp(-1e30) = 0, never NaN


def balanced_slice(t: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """``rank``'s share of ``t`` along its last dim: chunks ``rank`` and ``2cp - 1 - rank`` of
    ``2 x cp`` (the last dim must divide by ``2 x cp``)."""
    chunks = t.chunk(2 * cp, dim=-1)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=-1)


def row_layout(width: int, cu_seqlens: torch.Tensor | None, rows: int) -> tuple:
    """(position in the row, sample index) of every token of ``rows`` rows of ``width``
    tokens; ``cu_seqlens``: the packed samples' boundaries in the flattened rows."""
    positions = torch.arange(rows * width).view(rows, width)
    if cu_seqlens is None:
        return positions % width, torch.zeros(rows, width, dtype=torch.long)
    starts = torch.zeros(rows * width, dtype=torch.long)
    starts[cu_seqlens[1:-1].long()] = 1
    return positions % width, starts.cumsum(0).view(rows, width)


class RingLayout:
    """Where this rank's tokens sit in their rows, set by the trainer before each forward:
    ``positions`` and ``samples`` ``[rows, tokens/cp]``."""

    positions: torch.Tensor
    samples: torch.Tensor


class _RingShift(torch.autograd.Function):
    """Send to the next rank of the ring and receive from the previous one; the gradient
    travels the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _shift(x, group, +1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shift(grad.contiguous(), ctx.group, -1), None


def _shift(x: torch.Tensor, group, direction: int) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    received = torch.empty_like(x)
    send_to = dist.get_global_rank(group, (rank + direction) % size)
    receive_from = dist.get_global_rank(group, (rank - direction) % size)
    requests = dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, x.contiguous(), send_to, group),
            dist.P2POp(dist.irecv, received, receive_from, group),
        ]
    )
    for request in requests:
        request.wait()
    return received


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: RingLayout,
    group,
    scaling: float,
) -> torch.Tensor:
    """Causal attention ``[rows, heads, tokens/cp, dim]`` over the whole rows held by the
    ``group``'s ranks (KV heads already repeated to the query heads)."""
    size = dist.get_world_size(group)
    q_pos, q_sample = layout.positions, layout.samples
    k_pos, k_sample = q_pos, q_sample
    q = query.float() * scaling
    out, lse = None, None
    for step in range(size):
        if step:
            key, value = _RingShift.apply(key, group), _RingShift.apply(value, group)
            k_pos, k_sample = _shift(k_pos, group, +1), _shift(k_sample, group, +1)
        visible = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & (
            k_sample[:, None, None, :] == q_sample[:, None, :, None]
        )
        scores = (q @ key.float().transpose(-1, -2)).masked_fill(~visible, MASKED)
        block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        block_out = torch.softmax(scores, dim=-1) @ value.float()
        if out is None:
            out, lse = block_out, block_lse
        else:
            merged = torch.logaddexp(lse, block_lse)
            out = out * torch.exp(lse - merged) + block_out * torch.exp(block_lse - merged)
            lse = merged
    return out.to(query.dtype)
