"""Recipes per Hugging Face model family: which modules are blocks and how to shard them.

A recipe is data. ``shard_units`` are module-name globs, each matched module
becoming one FSDP unit (its parameters are gathered together, just in time).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRecipe:
    model_type: str
    block_classes: tuple[str, ...]
    shard_units: tuple[str, ...] = ("model.embed_tokens", "model.layers.*", "lm_head")


RECIPES: dict[str, ModelRecipe] = {
    recipe.model_type: recipe
    for recipe in (
        ModelRecipe("qwen2", ("Qwen2DecoderLayer",)),
        ModelRecipe("llama", ("LlamaDecoderLayer",)),
        ModelRecipe("qwen3", ("Qwen3DecoderLayer",)),
        ModelRecipe("mistral", ("MistralDecoderLayer",)),
        ModelRecipe("qwen3_moe", ("Qwen3MoeDecoderLayer",)),
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
