"""The VQ image tokenizer learns to reconstruct images through its discrete codes."""

from __future__ import annotations

import torch

from omniweave.models.omni.vq import train_vq


def _shapes(n: int) -> torch.Tensor:
    """8x8 images of bars and boxes at random places (a stand-in for small digits)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.zeros(n, 1, 8, 8)
    for image in images:
        row, col = torch.randint(0, 5, (2,), generator=generator).tolist()
        if torch.rand(1, generator=generator) < 0.5:
            image[0, row : row + 3, :] = 1.0
        else:
            image[0, row : row + 4, col : col + 4] = 1.0
    return images


def test_vq_tokenizer_round_trip():
    images = _shapes(256)
    model, losses = train_vq(images, steps=300, codebook_size=32, code_dim=16, width=32)
    assert sum(losses[-20:]) / 20 < 0.25 * sum(losses[:20]) / 20
    codes = model.encode(images[:16])
    assert codes.shape == (16, 4, 4) and codes.dtype == torch.long
    assert int(codes.max()) < 32 and len(codes.unique()) > 4  # several codes in use
    with torch.no_grad():
        error = (model.decode(codes) - images[:16]).abs().mean()
        baseline = (images[:16] - images[:16].mean()).abs().mean()  # predicting the mean
    assert error < 0.5 * baseline, (float(error), float(baseline))
