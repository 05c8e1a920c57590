"""Causal attention over whole rows or packed segments, for each backend a user can pick.

Inputs are ``[batch, heads, tokens, head_dim]``; key/value may have fewer heads
(grouped-query attention). With ``cu_seqlens`` (one packed row) every segment
attends only to itself: ``flash_attention_2`` runs its varlen kernel, while
``sdpa`` and ``eager`` loop over segments (on CPU, ``sdpa``'s loop is one operator,
``ops/packed_attention.py``), so no ``[T, T]`` mask is ever built and no cross-sample
block is ever computed.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from omniweave.ops.packed_attention import packed_causal_attention, serves

BACKENDS = ("sdpa", "eager", "flash_attention_2")


def check_backend(backend: str) -> None:
    """ValueError at start-up for an unknown backend or a kernel that is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend '{backend}'; choose one of {BACKENDS}.")
    if backend == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package "
            "(and a GPU); install it or choose sdpa."
        )


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    backend: str,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    sliding_window: int | None = None,
    is_causal: bool = True,
) -> torch.Tensor:
    """Attention output ``[batch, heads, tokens, head_dim]``; segments of ``cu_seqlens``
    (boundaries over the tokens of a batch-1 row) never see each other."""
    if backend == "sdpa" and query.device.type == "cpu" and query.dtype != torch.float32:
        # torch's CPU flash kernel runs its reduced-precision backward through many small
        # oneDNN matmuls: in float32 it is 7x faster (measured: 8 against 57 ms per step)
        low = query.dtype
        query, key, value = (t.float() for t in (query, key, value))
        out = causal_attention(
            query, key, value, backend, scaling, dropout, cu_seqlens, sliding_window, is_causal
        )
        return out.to(low)
    if (
        backend == "sdpa"
        and cu_seqlens is not None
        and serves(query, dropout, sliding_window, is_causal)
    ):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return packed_causal_attention(query, key, value, cu_seqlens, scale)[0]
    if backend == "flash_attention_2":
        return _flash(query, key, value, scaling, dropout, cu_seqlens, sliding_window, is_causal)
    if cu_seqlens is None:
        return _dense(query, key, value, backend, scaling, dropout, sliding_window, is_causal)
    assert query.shape[0] == 1, "packed rows have batch size 1"
    lengths = cu_seqlens.diff().tolist()
    # split, not slices: its backward is one concatenation, where each slice's would be a
    # zero-filled row-sized gradient per segment
    segments = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    parts = [
        _dense(q, k, v, backend, scaling, dropout, sliding_window, is_causal)
        for q, k, v in segments
        if q.shape[2] > 0
    ]
    return torch.cat(parts, dim=2)


def _allowed(length: int, sliding_window: int | None, is_causal: bool, device) -> torch.Tensor:
    """Boolean ``[length, length]``: causal, and within the window when there is one."""
    position = torch.arange(length, device=device)
    distance = position[:, None] - position[None, :]
    allowed = distance >= 0 if is_causal else torch.ones_like(distance, dtype=torch.bool)
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return allowed


def _dense(query, key, value, backend, scaling, dropout, sliding_window, is_causal):
    groups = query.shape[1] // key.shape[1]
    length = query.shape[2]
    if backend == "sdpa":
        mask = None
        if sliding_window is not None and sliding_window < length:
            mask = _allowed(length, sliding_window, is_causal, query.device)
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal and mask is None,
            scale=scaling,
            enable_gqa=groups > 1,
        )
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    allowed = _allowed(length, sliding_window, is_causal, query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value)


def _flash(query, key, value, scaling, dropout, cu_seqlens, sliding_window, is_causal):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    options = dict(dropout_p=dropout, softmax_scale=scaling, causal=is_causal, window_size=window)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [batch, tokens, heads, dim]
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, **options).transpose(1, 2)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, longest, longest, **options)
    return out.unsqueeze(0).transpose(1, 2)
