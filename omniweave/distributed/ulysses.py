"""Ulysses sequence parallelism, injected through transformers' attention interface.

Each of the ``sp`` ranks of a group holds ``tokens / sp`` consecutive tokens of
the same rows. Around attention, an all-to-all trades that for all tokens of
``heads / sp`` heads, attention runs on whole sequences, and the reverse
all-to-all restores the token split. Everything else in the model is per token
and runs unchanged on the local slice. The attention function is registered
under a new name (``omniweave_<backend>``), so no model file is touched; it also
serves packed rows without SP (``cu_seq_lens_q`` in the forward kwargs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface, PretrainedConfig

from omniweave.ops.attention import causal_attention


class _AllToAll(torch.autograd.Function):
    """Split ``scatter_dim`` over the group, gather ``gather_dim``; backward is the reverse."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Differentiable all-to-all: ``x`` split along ``scatter_dim``, pieces joined along
    ``gather_dim`` in rank order."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def replicate_kv_heads(kv: torch.Tensor, sp: int) -> torch.Tensor:
    """Repeat each key/value head so their count is a multiple of ``sp`` (GQA with fewer KV
    heads than SP ranks); query head ``h`` still meets the copy of its own KV head."""
    heads = kv.shape[1]
    repeats = sp // math.gcd(heads, sp)
    return kv if repeats == 1 else kv.repeat_interleave(repeats, dim=1)


def make_attention(backend: str, group) -> callable:
    """An attention function in transformers' signature: local tokens in, local tokens out."""
    sp = 1 if group is None else dist.get_world_size(group)

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if sp > 1:  # [batch, heads, tokens/sp, dim] -> [batch, heads/sp, tokens, dim]
            key, value = replicate_kv_heads(key, sp), replicate_kv_heads(value, sp)
            query, key, value = (all_to_all(t, 1, 2, group) for t in (query, key, value))
        out = causal_attention(
            query,
            key,
            value,
            backend,
            scaling=scaling,
            dropout=dropout,
            cu_seqlens=kwargs.get("cu_seq_lens_q"),
            sliding_window=sliding_window,
            is_causal=kwargs.get("is_causal", True) is not False,
        )
        if sp > 1:
            out = all_to_all(out, 2, 1, group)
        return out.transpose(1, 2).contiguous(), None

    return attention


def check_heads(config: PretrainedConfig, sp: int) -> None:
    """``sp`` must divide the query heads (KV heads are replicated as needed)."""
    heads = config.get_text_config().num_attention_heads
    if heads % sp:
        raise ValueError(
            f"parallel.sp={sp} must divide the model's {heads} attention heads; choose an sp "
            f"among the divisors of {heads}."
        )


def apply_sequence_attention(model: nn.Module, backend: str, group) -> None:
    """Route the language model's attention through Ulysses (``group``) and per-segment
    packed attention. Only the text config changes: vision/audio towers keep their own."""
    name = f"omniweave_{backend}"
    AttentionInterface.register(name, make_attention(backend, group))
    model.config.get_text_config()._attn_implementation = name


def split_sequence_inputs(module: nn.Module, group) -> None:
    """Hand ``module`` (a decoder stack called with ``inputs_embeds``) only this rank's slice
    of the sequence. Multimodal models build their embeddings over the whole sequence (an
    image's features land wherever its placeholders are) and are split only here."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)

    def hook(_module, args, kwargs):
        assert not args, "the decoder stack is called with keyword arguments"
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].chunk(sp, dim=1)[rank]
        kwargs["position_ids"] = kwargs["position_ids"].chunk(sp, dim=-1)[rank]
        return args, kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)
