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

from omniweave.distributed.overlap import Pending, start_all_to_all, wait_all_to_all
from omniweave.distributed.ring import ring_attention
from omniweave.ops.attention import causal_attention


def start_heads_to_tokens(x: torch.Tensor, group) -> tuple[torch.Tensor, Pending]:
    """Launch the exchange ``[batch, heads, tokens/sp, dim] -> [batch, heads/sp, tokens, dim]``."""
    size = dist.get_world_size(group)
    return start_all_to_all(torch.stack(x.chunk(size, dim=1)), group)


def wait_heads_to_tokens(buffer: torch.Tensor, pending: Pending) -> torch.Tensor:
    return torch.cat(wait_all_to_all(buffer, pending).unbind(0), dim=2)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Differentiable all-to-all: ``x`` split along ``scatter_dim``, pieces joined along
    ``gather_dim`` in rank order."""
    size = dist.get_world_size(group)
    received = wait_all_to_all(*start_all_to_all(torch.stack(x.chunk(size, scatter_dim)), group))
    return torch.cat(received.unbind(0), dim=gather_dim)


def replicate_kv_heads(kv: torch.Tensor, sp: int) -> torch.Tensor:
    """Repeat each key/value head so their count is a multiple of ``sp`` (GQA with fewer KV
    heads than SP ranks); query head ``h`` still meets the copy of its own KV head."""
    heads = kv.shape[1]
    repeats = sp // math.gcd(heads, sp)
    return kv if repeats == 1 else kv.repeat_interleave(repeats, dim=1)


def make_attention(backend: str, group, prefetched: dict | None = None, ring=None) -> callable:
    """An attention function in transformers' signature: local tokens in, local tokens out.
    Q, K and V are exchanged concurrently; ``prefetched`` maps an attention module to its
    value exchange already in flight (``prefetch_values``). ``ring``: the group of ring
    context parallelism, which then attends across the ring's ranks (the layer's call
    carries ``ring_inputs``)."""
    sp = 1 if group is None else dist.get_world_size(group)
    prefetched = {} if prefetched is None else prefetched

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
            in_flight = prefetched.pop(module, None)
            if in_flight is None:
                in_flight = start_heads_to_tokens(replicate_kv_heads(value, sp), group)
            started = [
                start_heads_to_tokens(query, group),
                start_heads_to_tokens(replicate_kv_heads(key, sp), group),
                in_flight,
            ]
            query, key, value = (wait_heads_to_tokens(*exchange) for exchange in started)
        if ring is not None:
            repeats = query.shape[1] // key.shape[1]  # GQA: each query head meets its KV head
            key, value = (x.repeat_interleave(repeats, dim=1) for x in (key, value))
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            positions, samples = kwargs["ring_positions"], kwargs["ring_samples"]
            out = ring_attention(query, key, value, positions, samples, ring, scale)
            if sp > 1:
                out = all_to_all(out, 2, 1, group)
            return out.transpose(1, 2).contiguous(), None
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


def check_heads(config: PretrainedConfig, sp: int, tp: int = 1) -> None:
    """``sp`` must divide each tensor-parallel rank's query heads (KV heads are replicated as
    needed)."""
    heads = config.get_text_config().num_attention_heads
    if heads % (sp * tp):
        split = f"parallel.sp={sp} x parallel.tp={tp}" if tp > 1 else f"parallel.sp={sp}"
        raise ValueError(
            f"{split} must divide the model's {heads} attention heads; choose degrees whose "
            f"product divides {heads}."
        )


def apply_sequence_attention(
    model: nn.Module, backend: str, group, async_values: bool = True, ring=None
) -> None:
    """Route the language model's attention through Ulysses (``group``), per-segment packed
    attention and, with ``ring`` (a group), ring attention across context-parallel ranks.
    Only the text config changes: vision/audio towers keep their own. ``async_values``:
    start each value exchange as soon as its projection is done."""
    name = f"omniweave_{backend}"
    prefetched = {}
    if group is not None and dist.get_world_size(group) > 1 and async_values:
        prefetch_values(model, group, prefetched)
    AttentionInterface.register(name, make_attention(backend, group, prefetched, ring))
    model.config.get_text_config()._attn_implementation = name


def prefetch_values(model: nn.Module, group, prefetched: dict) -> int:
    """A forward hook on each language-model attention's ``v_proj`` launches the value
    all-to-all there (keyed by attention module in ``prefetched``), so it overlaps the
    query/key norms and RoPE. The families we support use the projection's output as the
    values unchanged. Returns the number of hooked layers."""
    sp = dist.get_world_size(group)
    text_config = model.config.get_text_config()
    hooked = 0
    for attention in model.modules():
        projection = getattr(attention, "v_proj", None)
        language = getattr(attention, "config", None) is text_config
        if not language or projection is None or not hasattr(attention, "head_dim"):
            continue  # vision/audio towers attend on their own, outside Ulysses

        def start(_projection, _args, output, attention=attention):
            values = output.view(*output.shape[:2], -1, attention.head_dim).transpose(1, 2)
            prefetched[attention] = start_heads_to_tokens(replicate_kv_heads(values, sp), group)

        projection.register_forward_hook(start)
        hooked += 1
    return hooked


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
