"""The checks of a run config that need no process group, so that a user mistake fails at
once, with one message, on every rank alike (and in ``omniweave train --nproc`` before
torchrun starts)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

from omniweave.config import Config
from omniweave.data.processors import load_tokenizer
from omniweave.data.sources import check_sources, source_specs
from omniweave.distributed.expert import check_experts
from omniweave.distributed.parallel_state import Degrees, resolve_degrees
from omniweave.distributed.pipeline import check_pipeline
from omniweave.distributed.ring import check_ring
from omniweave.distributed.tensor_parallel import check_tensor_parallel
from omniweave.distributed.ulysses import check_heads
from omniweave.models.loader import load_hf_config
from omniweave.models.lora import LoraSettings, target_names
from omniweave.models.native import NATIVE_FAMILIES
from omniweave.models.registry import model_from_config
from omniweave.ops.attention import check_backend
from omniweave.ops.kernels import check_kernels
from omniweave.train.checkpoint import resolve_resume
from omniweave.train.router import is_moe


def validate(cfg: Config, world_size: int) -> tuple[Degrees, PretrainedConfig, Any]:
    """Every check that needs no process group: a user mistake fails here, on each rank alike."""
    p = cfg.parallel
    degrees = resolve_degrees(world_size, p.dp_replicate, p.dp_shard, p.sp, p.ep, p.tp, p.cp, p.pp)
    check_backend(cfg.model.attn_implementation)
    check_kernels(cfg.train.kernels)
    resolve_resume(cfg.checkpoint.resume, cfg.train.output_dir)  # a wrong folder fails here
    hf_config = load_hf_config(cfg.model.path, cfg.model.config, cfg.model.attn_implementation)
    native = hf_config.model_type in NATIVE_FAMILIES
    if native and cfg.model.omni:
        raise ValueError(
            f"model.omni: a {hf_config.model_type} model has its own vision tower, which "
            "reads the records' media; drop model.omni."
        )
    if cfg.model.processor and not native:
        raise ValueError(
            "model.processor applies only to native multimodal models "
            f"({', '.join(NATIVE_FAMILIES)}); drop it."
        )
    if cfg.model.lora is not None:
        check_lora(cfg.model.lora, hf_config)
    train_encoders = (cfg.model.omni or {}).get("train_encoders", True)
    if not isinstance(train_encoders, bool):
        raise ValueError(f"model.omni.train_encoders={train_encoders!r}: use true or false.")
    check_heads(hf_config, degrees.sp, degrees.tp)
    if degrees.tp > 1 and (native or cfg.model.omni or cfg.model.lora):
        raise ValueError(
            f"parallel.tp={degrees.tp} does not compose with multimodal models or model.lora "
            "yet; use parallel.tp=1 (FSDP, Ulysses and EP do)."
        )
    if degrees.cp > 1 and (native or cfg.model.omni):
        raise ValueError(
            f"parallel.cp={degrees.cp} does not compose with multimodal models yet; use "
            "parallel.sp for their long sequences."
        )
    if degrees.cp > 1:
        check_ring(hf_config, degrees.cp)
    if degrees.pp > 1:
        check_pipeline_run(cfg, hf_config, degrees.pp, native)
    if degrees.tp > 1:
        with torch.device("meta"):
            check_tensor_parallel(model_from_config(hf_config), degrees.tp)
    check_experts(hf_config, degrees.ep)
    budget = cfg.data.max_tokens_per_microbatch
    if budget is not None and budget < cfg.data.max_seq_len:
        raise ValueError(
            f"data.max_tokens_per_microbatch={budget} is below data.max_seq_len="
            f"{cfg.data.max_seq_len}: the longest sample would fit no micro-batch; raise the "
            "budget or lower max_seq_len."
        )
    skip_bad = cfg.data.on_bad_sample == "skip"
    check_sources(source_specs(cfg.data), skip_bad)
    if cfg.data.eval_path:
        check_sources([(cfg.data.eval_path, 1.0)], skip_bad)
    t = cfg.train
    if budget is None and t.global_batch_size % (t.micro_batch_size * degrees.dp):
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {degrees.dp}; "
            f"use a multiple of {t.micro_batch_size * degrees.dp}."
        )
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    return degrees, hf_config, tokenizer


def check_lora(entry: dict, hf_config: PretrainedConfig) -> LoraSettings:
    """``model.lora``'s settings, its targets checked against the model (built on the meta
    device: no memory, no weights)."""
    settings = LoraSettings.from_config(entry)
    with torch.device("meta"):
        target_names(model_from_config(hf_config), settings.target_modules)
    return settings


def check_pipeline_run(cfg: Config, hf_config: PretrainedConfig, pp: int, native: bool) -> None:
    """What ``parallel.pp`` does not serve yet, in one line each; then the model's cut."""
    t = cfg.train
    with torch.device("meta"):
        model = model_from_config(hf_config)
    unsupported = {
        "native multimodal models (an OmniModel pipelines)": native,
        "parallel.sp for an OmniModel": bool(cfg.model.omni) and cfg.parallel.sp > 1,
        "model.lora": cfg.model.lora is not None,
        "train.cross_entropy=chunked": t.cross_entropy == "chunked",
        "data.eval_path": bool(cfg.data.eval_path),
        "train.save_final and export_hf_at_end (export a checkpoint instead)": (
            t.save_final or t.export_hf_at_end
        ),
        "mixture-of-experts models": is_moe(model),
    }
    for what, used in unsupported.items():
        if used:
            raise ValueError(f"parallel.pp={pp} does not compose with {what} yet; use pp=1.")
    p = cfg.parallel
    check_pipeline(hf_config, pp, p.pp_virtual_stages, p.pp_schedule, model)
