"""OmniModel: modality encoders in front of a foundation causal LM, composed from outside.

The foundation is an unmodified HF causal LM. Each encoder's ``lm_encode`` output
replaces the embeddings at its placeholder token; then the foundation runs on
``inputs_embeds``. Under Ulysses SP the embeddings are built for the whole
sequence and the decoder stack receives only this rank's slice
(``split_sequence_inputs``), so encoders stay outside SP and see whole items.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from omniweave.models.omni.decoders import DECODERS
from omniweave.models.omni.encoders import ENCODERS

ENCODER_UNITS = ("encoders.*.blocks.layers.*", "encoders.*")  # FSDP units (globs)


@dataclass
class OmniParts:
    """What data loading needs of an OmniModel config: encoders (for token counts and file
    formats), their placeholder ids, and the output decoders (which tokenize targets).
    ``brackets``: ids put before and after an item's placeholders, per modality (a native
    model's layout, e.g. Qwen2-VL's vision start and end tokens)."""

    encoders: dict[str, nn.Module]
    placeholders: dict[str, int]
    decoders: dict[str, nn.Module] = field(default_factory=dict)
    brackets: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)


def import_plugins(omni: dict) -> None:
    """Import the modules of ``model.omni.plugins`` (they register encoder classes)."""
    for module in omni.get("plugins", []):
        importlib.import_module(module)


def build_decoders(lm_hidden: int, vocab_size: int, decoders: dict[str, dict]) -> dict:
    """``decoders``: modality -> {"type": image, **options}; tokens must fit the vocabulary."""
    built = {}
    for modality, options in decoders.items():
        options = dict(options)
        kind = options.pop("type", None)
        if kind not in DECODERS:
            raise ValueError(
                f"model.omni.decoders.{modality}: unknown type {kind!r}; "
                f"choose one of {', '.join(sorted(DECODERS))}."
            )
        built[modality] = DECODERS[kind](lm_hidden, **options)
        high = built[modality].token_range[1]
        if high > vocab_size:
            raise ValueError(
                f"model.omni.decoders.{modality} uses token ids up to {high - 1}, beyond the "
                f"model's vocabulary of {vocab_size}; raise vocab_size or lower code_offset."
            )
    return built


def build_encoders(
    lm_hidden: int, encoders: dict[str, dict]
) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """``encoders``: modality -> {"type": vision|audio|registered, "placeholder": token id,
    **options}. Returns the encoders and the placeholder id of each modality."""
    built, placeholders = {}, {}
    for modality, options in encoders.items():
        options = dict(options)
        kind, placeholder = options.pop("type", None), options.pop("placeholder", None)
        if kind not in ENCODERS or not isinstance(placeholder, int):
            raise ValueError(
                f"model.omni.encoders.{modality} needs a 'type' among "
                f"{', '.join(sorted(ENCODERS))} (add more with register_encoder) and an integer "
                f"'placeholder' token id; got type={kind!r}, placeholder={placeholder!r}."
            )
        placeholders[modality] = placeholder
        built[modality] = ENCODERS[kind](lm_hidden, **options)
    return built, placeholders


class OmniModel(nn.Module):
    """``encoders``: modality name -> encoder; ``placeholders``: modality -> token id."""

    def __init__(
        self, foundation: nn.Module, encoders: dict[str, nn.Module], placeholders: dict[str, int]
    ):
        super().__init__()
        self.foundation = foundation
        self.encoders = nn.ModuleDict(encoders)
        self.placeholders = dict(placeholders)
        self.config = foundation.config

    @classmethod
    def from_config(cls, foundation: nn.Module, encoders: dict[str, dict]) -> OmniModel:
        """Encoders built by ``build_encoders`` in front of ``foundation``."""
        hidden = foundation.config.get_text_config().hidden_size
        return cls(foundation, *build_encoders(hidden, encoders))

    def get_input_embeddings(self) -> nn.Module:
        return self.foundation.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.foundation.get_output_embeddings()

    def embed(self, input_ids: torch.Tensor, media: dict[str, list]) -> torch.Tensor:
        """Token embeddings with every encoder's output at its placeholders. An encoder with
        no items here runs on a dummy item whose output is multiplied by zero."""
        embeds = self.foundation.get_input_embeddings()(input_ids)
        for modality, encoder in self.encoders.items():
            items = media.get(modality) or []
            if not items:
                dummy = encoder.lm_encode([encoder.dummy_item()])
                embeds = embeds + 0.0 * dummy.sum()
                continue
            features = encoder.lm_encode(items).to(embeds.dtype)
            mask = (input_ids == self.placeholders[modality]).unsqueeze(-1)
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(
                    f"{modality}: {int(mask.sum())} placeholder tokens but the encoder gave "
                    f"{features.shape[0]} embeddings; each item needs encoder.num_tokens(item)."
                )
            embeds = embeds.masked_scatter(mask, features)
        return embeds

    def forward(self, input_ids: torch.Tensor, media: dict[str, list] | None = None, **kwargs):
        return self.foundation(inputs_embeds=self.embed(input_ids, media or {}), **kwargs)
