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


def check_ring(config, cp: int) -> None:
    """ValueError for a model with sliding-window attention: the ring's blocks attend causally
    to the whole sample."""
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or []
    if "sliding_attention" in layer_types or (
        not layer_types and getattr(text, "sliding_window", None)
    ):
        raise ValueError(
            f"parallel.cp={cp}: {text.model_type}'s sliding-window attention is not what ring "
            "attention computes (causal over the whole sample); use parallel.sp for its long "
            "sequences."
        )


def balanced_slice(t: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """``rank``'s share of ``t`` along its last dim: chunks ``rank`` and ``2cp - 1 - rank`` of
    ``2 x cp`` (the last dim must divide by ``2 x cp``)."""
    chunks = t.chunk(2 * cp, dim=-1)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=-1)


def ring_inputs(position_ids: torch.Tensor, cp: int, rank: int, device) -> dict:
    """The keyword arguments ring attention reads from each layer's call, for ``rank``'s
    tokens of rows whose position ids are ``position_ids`` ``[rows, width]``: each token's
    position in its row and its sample's index in the row (a sample starts where the
    position ids restart at 0). Passed with the call, they are the ones activation
    checkpointing's recompute and a pipeline's later backward see."""
    rows, width = position_ids.shape
    positions = torch.arange(width).expand(rows, width)
    samples = (position_ids.cpu() == 0).cumsum(-1)
    return {
        "ring_positions": balanced_slice(positions, cp, rank).to(device),
        "ring_samples": balanced_slice(samples, cp, rank).to(device),
    }


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
    x = x.contiguous()
    received = torch.empty_like(x)
    send_to = dist.get_global_rank(group, (rank + direction) % size)
    receive_from = dist.get_global_rank(group, (rank - direction) % size)
    requests = dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, x, send_to, group),
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
    positions: torch.Tensor,
    samples: torch.Tensor,
    group,
    scaling: float,
) -> torch.Tensor:
    """Causal attention ``[rows, heads, tokens/cp, dim]`` over the whole rows held by the
    ``group``'s ranks (KV heads already repeated to the query heads); ``positions`` and
    ``samples`` ``[rows, tokens/cp]``: this rank's tokens' (see ``ring_inputs``). On CPU each
    block runs the fused flash kernel and the backward recomputes blocks (memory ~ tokens/cp
    per rank); elsewhere the blocks are plain differentiable tensor ops (scores kept for the
    backward)."""
    if query.device.type == "cpu":
        return _RingFlash.apply(query, key, value, positions, samples, group, scaling)
    return _ring_by_autograd(query, key, value, positions, samples, group, scaling)


def _merge(out, lse, block_out, block_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """The running (output, log-sum-exp) with one more block's folded in (online softmax)."""
    if out is None:
        return block_out, block_lse
    merged = torch.logaddexp(lse, block_lse)
    return out * torch.exp(lse - merged) + block_out * torch.exp(block_lse - merged), merged


def _visible(q_pos, q_sample, k_pos, k_sample) -> torch.Tensor:
    """``[rows, 1, queries, keys]``: key at or before the query, in the same sample."""
    return (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & (
        k_sample[:, None, None, :] == q_sample[:, None, :, None]
    )


def _bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))


class _RingFlash(torch.autograd.Function):
    """Ring attention with the CPU flash kernel per block: the forward merges each block's
    output and log-sum-exp; the backward passes the blocks around again and runs the kernel's
    backward with the merged output and log-sum-exp (which gives each block's exact share),
    the key/value gradients travelling with their blocks back to their owners."""

    @staticmethod
    def forward(ctx, query, key, value, q_pos, q_sample, group, scaling):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        # the kernel reads strided inputs wrongly (torch 2.13): contiguous copies only
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        k, v, k_pos, k_sample = key, value, q_pos, q_sample
        out = lse = None
        for step in range(dist.get_world_size(group)):
            if step:
                k, v = _shift(k, group, +1), _shift(v, group, +1)
                k_pos, k_sample = _shift(k_pos, group, +1), _shift(k_sample, group, +1)
            visible = _visible(q_pos, q_sample, k_pos, k_sample)
            block_out, block_lse = flash(
                query, k, v, 0.0, False, attn_mask=_bias(visible, query.dtype), scale=scaling
            )
            block_out = torch.nan_to_num(block_out.float())  # rows with no visible key: 0
            block_lse = block_lse.masked_fill(~visible.any(-1), float("-inf"))[..., None]
            out, lse = _merge(out, lse, block_out, block_lse)
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse[..., 0], q_pos, q_sample)
        ctx.group, ctx.scaling = group, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        query, k, v, out, lse, q_pos, q_sample = ctx.saved_tensors
        group, grad_out = ctx.group, grad_out.contiguous()
        k_pos, k_sample = q_pos, q_sample
        grad_q = torch.zeros_like(query, dtype=torch.float32)
        grad_k = torch.zeros_like(k, dtype=torch.float32)
        grad_v = torch.zeros_like(v, dtype=torch.float32)
        for step in range(dist.get_world_size(group)):
            if step:  # the block and the gradient gathered for it so far move on together
                k, v = _shift(k, group, +1), _shift(v, group, +1)
                grad_k, grad_v = _shift(grad_k, group, +1), _shift(grad_v, group, +1)
                k_pos, k_sample = _shift(k_pos, group, +1), _shift(k_sample, group, +1)
            bias = _bias(_visible(q_pos, q_sample, k_pos, k_sample), query.dtype)
            dq, dk, dv = backward(
                grad_out, query, k, v, out, lse, 0.0, False, attn_mask=bias, scale=ctx.scaling
            )
            grad_q += dq
            grad_k += dk
            grad_v += dv
        grad_k, grad_v = _shift(grad_k, group, +1), _shift(grad_v, group, +1)  # to the owners
        cast = query.dtype
        return grad_q.to(cast), grad_k.to(cast), grad_v.to(cast), None, None, None, None


def _ring_by_autograd(query, key, value, q_pos, q_sample, group, scaling) -> torch.Tensor:
    """The same attention in plain tensor ops, differentiated by autograd."""
    size = dist.get_world_size(group)
    k_pos, k_sample = q_pos, q_sample
    q = query.float() * scaling
    out, lse = None, None
    for step in range(size):
        if step:
            key, value = _RingShift.apply(key, group), _RingShift.apply(value, group)
            k_pos, k_sample = _shift(k_pos, group, +1), _shift(k_sample, group, +1)
        visible = _visible(q_pos, q_sample, k_pos, k_sample)
        scores = (q @ key.float().transpose(-1, -2)).masked_fill(~visible, MASKED)
        block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        block_out = torch.softmax(scores, dim=-1) @ value.float()
        out, lse = _merge(out, lse, block_out, block_lse)
    return out.to(query.dtype)
