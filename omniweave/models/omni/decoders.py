"""Output modalities: an image decoder whose discrete codes are ordinary LM tokens.

A frozen VQ tokenizer (``vq.py``) turns a target image into ``h x w`` codes; code
``c`` is vocabulary id ``code_offset + c``, so the foundation embeds and predicts
image tokens with its own embedding table and head (the vocabulary must be sized
for them). The contract, next to the encoders':
- ``lm_encode(items) -> list[list[int]]``: teacher-forcing token ids per item;
- ``num_tokens(item)``, ``load_item(path)``: as for encoders;
- ``lm_head(logits)``: the logits restricted to this modality's tokens;
- ``lm_generate(model, prompt_ids)``: a generated item, decoded to pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omniweave.data.media import load_image
from omniweave.models.omni.vq import load_vq


class ImageDecoder(nn.Module):
    def __init__(self, lm_hidden: int, tokenizer_path: str, code_offset: int, grid=(4, 4)):
        super().__init__()
        self.vq = load_vq(tokenizer_path)
        self.code_offset, self.grid = code_offset, tuple(grid)
        self.channels = self.vq.options["channels"]
        self.codebook_size = self.vq.codebook_size

    @property
    def token_range(self) -> tuple[int, int]:
        return self.code_offset, self.code_offset + self.codebook_size

    def num_tokens(self, image: torch.Tensor) -> int:
        return (image.shape[1] // self.vq.scale) * (image.shape[2] // self.vq.scale)

    def load_item(self, path: str) -> torch.Tensor:
        return load_image(path, self.channels, self.vq.scale)

    @torch.no_grad()
    def lm_encode(self, images: list[torch.Tensor]) -> list[list[int]]:
        return [
            (self.vq.encode(image[None]).flatten() + self.code_offset).tolist() for image in images
        ]

    def lm_head(self, logits: torch.Tensor) -> torch.Tensor:
        low, high = self.token_range
        return logits[..., low:high]

    @torch.no_grad()
    def lm_generate(self, model: nn.Module, prompt_ids: list[int]) -> torch.Tensor:
        """Greedy decoding of ``grid`` codes after ``prompt_ids``; ``[channels, H, W]`` pixels."""
        device = next(model.parameters()).device
        low = self.code_offset
        ids = greedy_decode(
            model,
            {"input_ids": torch.tensor([prompt_ids], device=device)},
            self.grid[0] * self.grid[1],
            lambda logits: low + int(self.lm_head(logits).argmax()),
        )
        grid = torch.tensor(ids, device=self.vq.codebook.weight.device) - low
        return self.vq.decode(grid.view(1, *self.grid))[0]


@torch.no_grad()
def greedy_decode(lm: nn.Module, inputs: dict, steps: int, choose: Callable) -> list[int]:
    """Up to ``steps`` token ids decoded one at a time with a KV cache. ``lm(**inputs)`` gives
    HF causal-LM logits; ``choose(last_logits)`` picks the next id, or None to stop."""
    chosen, cache = [], None
    for _ in range(steps):
        out = lm(**inputs, cache=cache, use_cache=True)
        token = choose(out.logits[0, -1])
        if token is None:
            break
        chosen.append(token)
        cache = out.cache
        inputs = {"input_ids": torch.tensor([[token]], device=out.logits.device)}
    return chosen


DECODERS: dict[str, type[nn.Module]] = {"image": ImageDecoder}
