"""OmniModel: modality encoders in front of a foundation causal LM, composed from outside.

The foundation is an unmodified HF causal LM. Each encoder's ``lm_encode`` output
replaces the embeddings at its placeholder token; then the foundation runs on
``inputs_embeds``. Under Ulysses SP the embeddings are built for the whole
sequence and the decoder stack receives only this rank's slice
(``split_sequence_inputs``), so encoders stay outside SP and see whole items.
"""

from __future__ import annotations

import torch
from torch import nn

from omniweave.models.omni.encoders import ENCODERS

# FSDP units of an OmniModel (globs): encoder blocks, encoders, then the foundation's.
OMNI_SHARD_UNITS = (
    "encoders.*.blocks.layers.*",
    "encoders.*",
    "foundation.model.embed_tokens",
    "foundation.model.layers.*",
    "foundation.lm_head",
)


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
        """``encoders``: modality -> {"type": vision|audio, "placeholder": id, **options}."""
        hidden = foundation.config.get_text_config().hidden_size
        built, placeholders = {}, {}
        for modality, options in encoders.items():
            options = dict(options)
            kind, placeholders[modality] = options.pop("type"), options.pop("placeholder")
            if kind not in ENCODERS:
                raise ValueError(
                    f"encoders.{modality}: unknown type '{kind}'; registered: "
                    f"{', '.join(sorted(ENCODERS))} (add one with register_encoder)."
                )
            built[modality] = ENCODERS[kind](hidden, **options)
        return cls(foundation, built, placeholders)

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
