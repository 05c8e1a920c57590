"""A small VQ image tokenizer: images <-> grids of discrete codes.

It is the first stage of image generation: trained on its own (``train_vq``),
then frozen; its codes extend the LM vocabulary so the LM predicts images as
tokens, and ``decode`` turns predicted codes back into pixels. Convolutional
encoder/decoder (each stride-2 stage halves the grid), nearest-codebook
quantisation with a straight-through gradient and a commitment loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VQTokenizer(nn.Module):
    def __init__(
        self,
        channels: int = 1,
        width: int = 64,
        codebook_size: int = 128,
        code_dim: int = 32,
        downsample: int = 1,
        commitment: float = 0.25,
    ):
        super().__init__()
        self.options = dict(
            channels=channels, width=width, codebook_size=codebook_size, code_dim=code_dim,
            downsample=downsample, commitment=commitment,
        )  # fmt: skip
        self.codebook_size, self.commitment = codebook_size, commitment
        self.scale = 2**downsample  # pixels per code along each side
        down = [nn.Conv2d(channels, width, 3, padding=1), nn.GELU()]
        up = [nn.Conv2d(code_dim, width, 3, padding=1), nn.GELU()]
        for _ in range(downsample):
            down += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GELU()]
            up += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.GELU()]
        self.encoder = nn.Sequential(*down, nn.Conv2d(width, code_dim, 1))
        self.decoder = nn.Sequential(*up, nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid())
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1 / codebook_size, 1 / codebook_size)

    def _nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """Code index of each latent vector ``[B, D, h, w] -> [B, h, w]``."""
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        distances = torch.cdist(flat, self.codebook.weight)
        return distances.argmin(dim=1).view(latents.shape[0], *latents.shape[2:])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> codes ``[B, h, w]``."""
        return self._nearest(self.encoder(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w]`` -> images ``[B, C, H, W]`` in [0, 1]."""
        return self.decoder(self.codebook(codes).permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, loss): pixel MSE + codebook loss + commitment x commitment loss."""
        latents = self.encoder(images)
        quantised = self.codebook(self._nearest(latents)).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(quantised, latents.detach())
        commitment_loss = F.mse_loss(latents, quantised.detach())
        straight_through = latents + (quantised - latents).detach()
        reconstruction = self.decoder(straight_through)
        loss = F.mse_loss(reconstruction, images) + codebook_loss
        return reconstruction, loss + self.commitment * commitment_loss


def train_vq(
    images: torch.Tensor,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    **options,
) -> tuple[VQTokenizer, list[float]]:
    """Train a ``VQTokenizer(**options)`` on ``images`` ``[N, C, H, W]``; returns it (in eval
    mode) and the loss per step. Dead codes are re-seeded from random latents."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = VQTokenizer(channels=images.shape[1], **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        _, loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 50 == 49:
            _reseed_dead_codes(model, batch, generator)
    return model.eval(), losses


@torch.no_grad()
def _reseed_dead_codes(model: VQTokenizer, batch: torch.Tensor, generator) -> None:
    latents = model.encoder(batch)
    used = torch.bincount(model._nearest(latents).flatten(), minlength=model.codebook_size)
    dead = (used == 0).nonzero().flatten()
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    if len(dead):
        picks = torch.randint(len(flat), (len(dead),), generator=generator)
        model.codebook.weight[dead] = flat[picks]


def save_vq(model: VQTokenizer, path: str) -> None:
    torch.save({"options": model.options, "state": model.state_dict()}, path)


def load_vq(path: str) -> VQTokenizer:
    """A tokenizer saved by ``save_vq``, frozen, in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = VQTokenizer(**saved["options"])
    model.load_state_dict(saved["state"])
    return model.requires_grad_(False).eval()
