"""Tiny random configs of real Hugging Face families, built from config (no downloads)."""

from __future__ import annotations

# Tests whose subject is not the data workers read their data in the training process: a
# worker's fork server costs about 3 s of CPU per rank on 2 cores. The workers' own tests
# (loader, streaming sources, faults, supervision, omni media) keep the default.
IN_PROCESS_DATA = {"data.num_workers": 0}

TINY = {
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
}
TINY["qwen3"] = {**TINY["qwen2"], "model_type": "qwen3", "head_dim": 16}
TINY["qwen3_moe"] = {
    **TINY["qwen3"],
    "model_type": "qwen3_moe",
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.01,
}
TINY["olmoe"] = {
    **TINY["llama"],
    "model_type": "olmoe",
    "intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.01,
}
TINY["qwen3_moe_6x3"] = {**TINY["qwen3_moe"], "num_experts": 6, "num_experts_per_tok": 3}


def hf_model(family: str, seed: int = 0, **overrides):
    """A freshly initialised HF causal LM of a tiny config (fp32, sdpa)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**TINY[family], **overrides}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, param in model.named_parameters():  # HF leaves MoE routers at zero
        if name.endswith("mlp.gate.weight"):
            param.data.normal_(0.0, 0.5)
    return model


IMAGE_TOKEN, VISION_START, VISION_END = 500, 502, 503


def tiny_qwen2_vl(seed: int = 0, image_token: int = IMAGE_TOKEN):
    """A tiny Qwen2-VL (2 text layers with multimodal RoPE, a 1-block vision tower); its
    image, video, vision start and end tokens are ``image_token`` and the next 3 ids, the
    vocabulary ends after them or at 512."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=max(512, image_token + 4),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=image_token,
        video_token_id=image_token + 1,
        vision_start_token_id=image_token + 2,
        vision_end_token_id=image_token + 3,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).float()


AUDIO_TOKEN, OMNI_IMAGE_TOKEN, AUDIO_START, AUDIO_END = 500, 501, 505, 506


def tiny_qwen2_5_omni_thinker(seed: int = 0, audio_token: int = AUDIO_TOKEN):
    """A tiny Qwen2.5-Omni thinker: 1-layer audio and vision towers, 2 text layers (M-RoPE).
    Its special tokens are ``audio_token`` and the next 6 ids (as ``AUDIO_TOKEN``...
    ``AUDIO_END`` are 500...506); the vocabulary ends after them or at 512."""
    shift = audio_token - AUDIO_TOKEN
    import torch
    from transformers import (
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    config = Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=max(512, AUDIO_END + shift + 1), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=4, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
        ),
        audio_config=dict(
            d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
            num_mel_bins=16, output_dim=64, max_source_positions=100, n_window=8,
        ),
        audio_token_id=AUDIO_TOKEN + shift, image_token_id=OMNI_IMAGE_TOKEN + shift,
        video_token_id=504 + shift, vision_start_token_id=VISION_START + shift,
        vision_end_token_id=VISION_END + shift, audio_start_token_id=AUDIO_START + shift,
        audio_end_token_id=AUDIO_END + shift,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2_5OmniThinkerForConditionalGeneration(config).float()


def tiny_run_args(corpus: dict, family: str, out: str, **settings) -> list[str]:
    """CLI overrides of a 3-step run of ``TINY[family]`` on the ``corpus`` fixture's data."""
    import json

    base = {
        "model.config": TINY[family],
        "data.train_path": corpus["train_path"],
        "data.tokenizer_path": corpus["tokenizer_path"],
        "data.max_seq_len": 64,
        "train.output_dir": out,
        "train.max_steps": 3,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.lr": 1e-2,
        "train.peak_flops": 1e12,
        **IN_PROCESS_DATA,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
        **settings,
    }
    return [f"--{key}={json.dumps(value)}" for key, value in base.items()]


def tiny_qwen2_5_vl(seed: int = 0, image_token: int = IMAGE_TOKEN):
    """A tiny Qwen2.5-VL (windowed 1-block vision tower, 2 text layers with M-RoPE); its
    media tokens are ``image_token`` and the next 3 ids, as in ``tiny_qwen2_vl``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=max(512, image_token + 4), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
            fullatt_block_indexes=[0],
        ),
        image_token_id=image_token, video_token_id=image_token + 1,
        vision_start_token_id=image_token + 2, vision_end_token_id=image_token + 3,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).float()
