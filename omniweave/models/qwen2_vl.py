"""Qwen2-VL inputs for packed rows: multimodal RoPE position ids computed per sample.

Qwen2-VL gives each image token a (time, height, width) position, and text after
an image continues from the image's extent. Positions are computed for each
sample alone (so they restart per sample) by the model's own ``get_rope_index``
and concatenated; padding continues as plain text positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionTextSample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None  # [patches, channels x temporal x patch^2]
    image_grid_thw: torch.Tensor | None = None  # [images, 3], in patches


def mrope_position_ids(model: nn.Module, samples: list[VisionTextSample], length: int):
    """``[3, 1, length]`` position ids of the samples packed in one row of ``length`` tokens."""
    image_token = model.config.image_token_id
    rows = []
    for sample in samples:
        ids = torch.tensor([sample.input_ids])
        positions, _ = model.model.get_rope_index(
            ids, (ids == image_token).int(), image_grid_thw=sample.image_grid_thw
        )
        rows.append(positions)
    padding = length - sum(row.shape[-1] for row in rows)
    rows.append(torch.arange(padding).expand(3, 1, padding))
    return torch.cat(rows, dim=-1)


def images_of(samples: list[VisionTextSample]) -> dict[str, torch.Tensor]:
    """The ``pixel_values`` / ``image_grid_thw`` model inputs of the samples' images, in order."""
    with_images = [s for s in samples if s.pixel_values is not None]
    if not with_images:
        return {}
    return {
        "pixel_values": torch.cat([s.pixel_values for s in with_images]),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in with_images]),
    }
