"""Causal attention over the segments of a packed row on CPU, as one custom operator.

Each segment runs torch's CPU flash-attention kernel (grouped-query heads included), the
same kernel ``scaled_dot_product_attention`` picks there, and backward runs its backward
kernel on the saved output and log-sum-exp: nothing is recomputed. Being one operator,
opaque to ``torch.compile``, the segment loop (which needs the lengths as Python ints) does
not break a compiled decoder block's graph.

Results are laid out ``[batch, tokens, heads, dim]`` in memory and shaped ``[batch, heads,
tokens, dim]``, as the kernel writes each segment's: joining them is one copy, and the
attention output's transpose back to tokens-first is free.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _segments(cu_seqlens: Tensor, *tensors: Tensor):
    """Each non-empty segment's slices of ``tensors`` (empty ones would crash the kernel)."""
    lengths = cu_seqlens.diff().tolist()
    parts = zip(*(t.split(lengths, dim=2) for t in tensors), strict=True)
    return [part for part, length in zip(parts, lengths, strict=True) if length > 0]


def _joined(parts: list[Tensor]) -> Tensor:
    """Segments' results (``[batch, heads, length, ...]``, any strides) joined along the
    tokens, laid out tokens-first: one copy."""
    return torch.cat([part.transpose(1, 2) for part in parts], dim=1).transpose(1, 2)


def _tokens_first(t: Tensor) -> Tensor:
    """``t`` ([batch, heads, tokens, dim]) with tokens-first memory, copied only if needed."""
    if t.transpose(1, 2).is_contiguous():
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_tokens_first(like: Tensor) -> Tensor:
    batch, heads, tokens, dim = like.shape
    return like.new_empty(batch, tokens, heads, dim).transpose(1, 2)


@torch.library.custom_op("omniweave::packed_causal_attention", mutates_args=())
def packed_causal_attention(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Output ``[1, heads, tokens, dim]`` and log-sum-exp ``[1, heads, tokens]`` (float32) of
    causal attention within each segment of ``cu_seqlens`` (boundaries, from 0 to tokens)."""
    outputs, lse = zip(
        *(
            _FORWARD(q, k, v, 0.0, True, scale=scale)
            for q, k, v in _segments(cu_seqlens, query, key, value)
        ),
        strict=True,
    )
    return _joined(outputs), torch.cat(lse, dim=2).contiguous()


@packed_causal_attention.register_fake
def _(query, key, value, cu_seqlens, scale):
    return _empty_tokens_first(query), query.new_empty(query.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("omniweave::packed_causal_attention_backward", mutates_args=())
def packed_causal_attention_backward(
    grad: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    output: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of query, key and value, each segment from its saved output and lse."""
    parts = _segments(cu_seqlens, grad, query, key, value, output, lse)
    grads = zip(*(_BACKWARD(*segment, 0.0, True, scale=scale) for segment in parts), strict=True)
    return tuple(_joined(g) for g in grads)


@packed_causal_attention_backward.register_fake
def _(grad, query, key, value, output, lse, cu_seqlens, scale):
    return tuple(_empty_tokens_first(t) for t in (query, key, value))


def _save(ctx, inputs, output) -> None:
    query, key, value, cu_seqlens, scale = inputs
    ctx.save_for_backward(query, key, value, *output, cu_seqlens)
    ctx.scale = scale


def _backward(ctx, grad, _lse_grad):
    query, key, value, output, lse, cu_seqlens = ctx.saved_tensors
    grads = packed_causal_attention_backward(
        _tokens_first(grad), query, key, value, output, lse, cu_seqlens, ctx.scale
    )
    return *grads, None, None


packed_causal_attention.register_autograd(_backward, setup_context=_save)


def serves(query: Tensor, dropout: float, sliding_window: int | None, is_causal: bool) -> bool:
    """Whether the operator computes this call: CPU, causal, no dropout or window."""
    plain = dropout == 0.0 and sliding_window is None and is_causal
    return plain and query.device.type == "cpu" and query.dtype in DTYPES
