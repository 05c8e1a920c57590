"""The model a run trains, set up for its layout: the media parts of an OmniModel or a native
multimodal model, the model built and sharded (FSDP2 or DDP, TP, EP, the pipeline stage),
its loss head, and attention routed through sequence parallelism and packing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from omniweave.config import Config
from omniweave.data.processors import IGNORE_INDEX
from omniweave.distributed.fsdp import gpu_default
from omniweave.distributed.parallel_state import ParallelState
from omniweave.distributed.pipeline import Pipeline
from omniweave.distributed.ulysses import apply_sequence_attention, split_sequence_inputs
from omniweave.models.loader import build_model
from omniweave.models.lora import LoraSettings
from omniweave.models.native import NativeInputs, native_parts
from omniweave.models.omni.model import OmniParts, build_decoders, build_encoders, import_plugins
from omniweave.ops.cross_entropy import install_loss_head, token_cross_entropy


@dataclass
class TrainingModel:
    """What ``build_training_model`` sets up, as the trainer keeps it."""

    model: nn.Module
    foundation: nn.Module  # the language model: an OmniModel's foundation, else ``model``
    omni_parts: OmniParts | None  # media parts of an OmniModel or a native multimodal model
    output_ranges: dict[str, tuple[int, int]]  # each output modality's token ids
    native: NativeInputs | None  # a native multimodal model's media inputs and positions
    loss_head: nn.Module | None  # ``train.cross_entropy: chunked``: the head returns losses
    token_losses: Callable  # (logits, targets) -> per-token losses, when the head gives logits
    pipeline: Pipeline | None  # ``parallel.pp > 1``: this rank's stages and schedule
    lora: LoraSettings | None


def build_training_model(
    cfg: Config,
    hf_config: PretrainedConfig,
    state: ParallelState,
    local: Callable[[torch.Tensor], torch.Tensor],
    ring: Callable[[torch.Tensor], dict],
) -> TrainingModel:
    """The run's model on this rank. ``local`` and ``ring`` give this rank's slice of a
    full-sequence tensor and its ring-attention inputs (for the pipeline's stages)."""
    omni, degrees, t = cfg.model.omni, state.degrees, cfg.train
    omni_parts = native_parts(hf_config, cfg.model.path, cfg.model.processor)
    if omni:
        omni_parts = _omni_parts(omni, hf_config)
    output_ranges = {
        modality: decoder.token_range
        for modality, decoder in (omni_parts.decoders if omni else {}).items()
    }
    lora = LoraSettings.from_config(cfg.model.lora) if cfg.model.lora else None
    model = build_model(
        hf_config,
        state,
        cfg.model.path,
        t.seed,
        cfg.model.dtype,
        cfg.parallel.cpu_offload,
        cfg.parallel.grouped_experts,
        omni,
        (t.activation_checkpointing, t.activation_checkpointing_every),
        ep_chunks=cfg.parallel.ep_chunks,
        kernels=(t.kernels, t.compile),
        lora=lora,
        pp_virtual_stages=cfg.parallel.pp_virtual_stages,
        reshard_after_forward=gpu_default(cfg.parallel.reshard_after_forward, state.device),
    )
    foundation = model.foundation if omni else model
    native = NativeInputs(model, omni_parts) if omni_parts and not omni else None
    loss_head = None
    if t.cross_entropy == "chunked":
        head = foundation.get_output_embeddings()
        loss_head = install_loss_head(head, t.cross_entropy_chunk, IGNORE_INDEX)
    token_losses = token_cross_entropy
    if t.compile and degrees.tp == 1:  # one fused kernel each way (tp: a DTensor loss)
        token_losses = torch.compile(token_cross_entropy, dynamic=True)
    if degrees.sequence > 1 or degrees.tp > 1 or cfg.data.packing:  # tp: masks of local length
        apply_sequence_attention(
            model,
            cfg.model.attn_implementation,
            state.sp_group,
            cfg.parallel.async_ulysses,
            state.cp_group,
        )
    if omni_parts and degrees.sp > 1:  # embeddings are built whole; the stack gets a slice
        stack = model.model.language_model if native else foundation.model
        split_sequence_inputs(stack, state.sp_group)
    pipeline = None
    if degrees.pp > 1:
        p = cfg.parallel
        pipeline = Pipeline(
            model,
            state.pp_rank,
            degrees.pp,
            p.pp_virtual_stages,
            state.pp_group,
            p.pp_schedule,
            state.device,
            local=local,
            sequence_split=(degrees.sequence, degrees.tp),
            ring=ring,
            output_ranges=output_ranges,
        )
    return TrainingModel(
        model, foundation, omni_parts, output_ranges, native, loss_head, token_losses,
        pipeline, lora,
    )  # fmt: skip


def _omni_parts(omni: dict, hf_config: PretrainedConfig) -> OmniParts:
    """An OmniModel's encoders (on the meta device: data loading needs only their token
    counts and file formats) and decoders, from ``model.omni``."""
    import_plugins(omni)
    text_config = hf_config.get_text_config()
    with torch.device("meta"):
        encoders = build_encoders(text_config.hidden_size, omni["encoders"])
    decoders = build_decoders(
        text_config.hidden_size, text_config.vocab_size, omni.get("decoders", {})
    )
    shared = sorted(set(decoders) & set(encoders[0]))
    if shared:
        raise ValueError(
            f"model.omni: {shared} name both an encoder and a decoder; their <markers> "
            "must differ (e.g. 'image' in, 'draw' out)."
        )
    return OmniParts(*encoders, decoders)
