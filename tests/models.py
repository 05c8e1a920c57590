"""Tiny random configs of real Hugging Face families, built from config (no downloads)."""

from __future__ import annotations

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


def hf_model(family: str, seed: int = 0, **overrides):
    """A freshly initialised HF causal LM of a tiny config (fp32, sdpa)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**TINY[family], **overrides}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
