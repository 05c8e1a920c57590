"""Recipes per Hugging Face model family: which modules are blocks and how to shard them.

A recipe is data. ``shard_units`` are module-name globs, each matched module
becoming one FSDP unit (its parameters are gathered together, just in time).
``expert_plan`` maps expert parameters to their placement on the ``ep`` mesh
axis; ``expert_units`` are the modules holding them (FSDP units of their own,
sharded over the FSDP ranks that hold the same experts). ``model_class`` names the
``transformers`` class that builds the model from its config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import Placement, Shard

EXPERTS = "model.layers.*.mlp.experts"
FUSED_EXPERTS_PLAN = ((f"{EXPERTS}.gate_up_proj", Shard(0)), (f"{EXPERTS}.down_proj", Shard(0)))


@dataclass(frozen=True)
class ModelRecipe:
    model_type: str
    block_classes: tuple[str, ...]
    shard_units: tuple[str, ...] = ("model.embed_tokens", "model.layers.*", "lm_head")
    expert_plan: tuple[tuple[str, Placement], ...] = ()
    expert_units: tuple[str, ...] = ()
    model_class: str = "AutoModelForCausalLM"


def _moe(model_type: str, block: str) -> ModelRecipe:
    return ModelRecipe(
        model_type, (block,), expert_plan=FUSED_EXPERTS_PLAN, expert_units=(EXPERTS,)
    )


RECIPES: dict[str, ModelRecipe] = {
    recipe.model_type: recipe
    for recipe in (
        ModelRecipe("qwen2", ("Qwen2DecoderLayer",)),
        ModelRecipe("llama", ("LlamaDecoderLayer",)),
        ModelRecipe("qwen3", ("Qwen3DecoderLayer",)),
        ModelRecipe("mistral", ("MistralDecoderLayer",)),
        _moe("qwen3_moe", "Qwen3MoeDecoderLayer"),
        _moe("olmoe", "OlmoeDecoderLayer"),
        ModelRecipe(
            "qwen2_5_omni_thinker",
            ("Qwen2_5OmniDecoderLayer", "Qwen2_5OmniVisionBlock", "Qwen2_5OmniAudioEncoderLayer"),
            (
                "model.audio_tower.layers.*",
                "model.audio_tower",
                "model.visual.blocks.*",
                "model.visual",
                "model.language_model.embed_tokens",
                "model.language_model.layers.*",
                "lm_head",
            ),
            model_class="Qwen2_5OmniThinkerForConditionalGeneration",
        ),
        ModelRecipe(
            "qwen2_vl",
            ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"),
            (
                "model.visual.blocks.*",
                "model.visual",
                "model.language_model.embed_tokens",
                "model.language_model.layers.*",
                "lm_head",
            ),
            model_class="AutoModelForImageTextToText",
        ),
        ModelRecipe(
            "qwen2_5_vl",
            ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
            (
                "model.visual.blocks.*",
                "model.visual",
                "model.language_model.embed_tokens",
                "model.language_model.layers.*",
                "lm_head",
            ),
            model_class="AutoModelForImageTextToText",
        ),
    )
}


def recipe_for(model_type: str) -> ModelRecipe:
    """The recipe of a model family; a ValueError lists the supported ones."""
    try:
        return RECIPES[model_type]
    except KeyError:
        supported = ", ".join(sorted(RECIPES))
        raise ValueError(
            f"model_type '{model_type}' has no recipe in omniweave.models.registry; "
            f"supported families: {supported}."
        ) from None


def model_class(model_type: str) -> type:
    """The ``transformers`` class (or auto class) that builds a family's models."""
    import transformers

    return getattr(transformers, recipe_for(model_type).model_class)


def model_from_config(config) -> nn.Module:
    """A randomly initialised fp32 model of ``config``, built by its family's class."""
    cls = model_class(config.model_type)
    build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
    return build(config, dtype=torch.float32)
