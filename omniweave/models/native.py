"""Hugging Face multimodal models trained as shipped: Qwen2-VL.

A record's ``<image>`` marker becomes the processor's token layout,
``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``,
and the image itself the image processor's ``pixel_values`` / ``image_grid_thw``.
Per micro-batch, ``NativeInputs`` gives the model its pixels and the multimodal
RoPE positions of every sample (computed per sample, so they restart in a packed
row), and keeps the vision tower in step across ranks: a rank whose micro-batch
has no image runs the tower on a dummy image, times zero, so the FSDP collectives
of every rank match and the gradients equal the unsharded run's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from omniweave.data.media import load_image_file
from omniweave.models.omni.model import OmniParts

NATIVE_FAMILIES = ("qwen2_vl",)


@dataclass
class ImageItem:
    pixel_values: torch.Tensor  # [patches, channels x temporal x patch^2]
    grid_thw: torch.Tensor  # [1, 3]: the image in patches (time, height, width)


class Qwen2VLImages:
    """Reads image files into the model's inputs with the HF image processor (PIL backend):
    ``preprocessor_config.json`` of ``model.path`` if it has one, else the vision config's
    patch sizes with ``options`` (e.g. ``size: {shortest_edge: 3136, longest_edge: 50176}``,
    the fewest and most pixels an image is resized to)."""

    def __init__(self, config, path: str | None, options: dict):
        from transformers import Qwen2VLImageProcessorPil

        vision = config.vision_config
        if path and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            self.processor = Qwen2VLImageProcessorPil.from_pretrained(path, **options)
        else:
            self.processor = Qwen2VLImageProcessorPil(
                patch_size=vision.patch_size,
                merge_size=vision.spatial_merge_size,
                temporal_patch_size=vision.temporal_patch_size,
                **options,
            )
        self.merge = vision.spatial_merge_size

    def load_item(self, path: str) -> ImageItem:
        out = self.processor(images=[load_image_file(path)], return_tensors="pt")
        return ImageItem(out["pixel_values"], out["image_grid_thw"])

    def num_tokens(self, item: ImageItem) -> int:
        return int(item.grid_thw.prod()) // self.merge**2


def native_parts(config, path: str | None, options: dict | None) -> OmniParts | None:
    """What data loading needs of a native multimodal model; None for a text-only family."""
    if config.model_type not in NATIVE_FAMILIES:
        return None
    return OmniParts(
        {"image": Qwen2VLImages(config, path, options or {})},
        {"image": config.image_token_id},
        brackets={"image": ([config.vision_start_token_id], [config.vision_end_token_id])},
    )


class NativeInputs:
    """The model inputs of a micro-batch beyond its token ids, for a native model."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = model.config
        self.image_token = config.image_token_id
        vision = config.vision_config
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        merge = self.merge = vision.spatial_merge_size
        self.dummy = ImageItem(
            torch.zeros(merge * merge, patch_dim), torch.tensor([[1, merge, merge]])
        )
        keep_in_step(model.model.visual, model.model.language_model, self._dummy_pass)

    def __call__(self, input_ids: torch.Tensor, segments: list[tuple[int, int, int]], images):
        """``pixel_values``, ``image_grid_thw`` and ``position_ids`` ``[3, rows, tokens]``.
        ``segments``: (row, start, length) of each sample, in order; the rest is padding."""
        grids = [item.grid_thw for item in images]
        device = input_ids.device
        positions = torch.arange(input_ids.shape[1], device=device).expand(3, *input_ids.shape)
        positions = positions.clone()
        used = 0
        for row, start, length in segments:
            ids = input_ids[row : row + 1, start : start + length]
            mask = (ids == self.image_token).int()
            count, tokens = 0, int(mask.sum())
            while tokens > 0:
                tokens -= int(grids[used + count].prod()) // self.merge**2
                count += 1
            thw = torch.cat(grids[used : used + count]) if count else None
            rope, _ = self.model.model.get_rope_index(ids, mask, image_grid_thw=thw)
            positions[:, row, start : start + length] = rope[:, 0]
            used += count
        inputs = {"position_ids": positions}
        if images:
            inputs["pixel_values"] = torch.cat([item.pixel_values for item in images]).to(device)
            inputs["image_grid_thw"] = torch.cat(grids).to(device)
        return inputs

    def _dummy_pass(self) -> torch.Tensor:
        device = self.model.get_input_embeddings().weight.device
        return self.model.model.visual(
            self.dummy.pixel_values.to(device), grid_thw=self.dummy.grid_thw.to(device)
        ).pooler_output


def keep_in_step(tower: nn.Module, stack: nn.Module, dummy_pass) -> None:
    """Make ``tower`` run once in every forward that reaches ``stack``: where it did not run,
    ``dummy_pass()`` runs it and its output enters ``stack``'s inputs times zero (so the
    backward pass reaches the tower too)."""
    ran = [False]

    def mark(*_):
        ran[0] = True

    def before_stack(_module, args, kwargs):
        if not ran[0]:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + 0.0 * dummy_pass().sum()
        ran[0] = False
        return args, kwargs

    tower.register_forward_hook(mark)
    stack.register_forward_pre_hook(before_stack, with_kwargs=True)
