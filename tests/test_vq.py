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


def test_train_vq_command_writes_a_loadable_tokenizer(tmp_path):
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from omniweave.models.omni.vq import load_vq

    for index, image in enumerate(_shapes(32)):
        Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(tmp_path / f"{index}.png")
    out = tmp_path / "vq.pt"
    command = [sys.executable, "-m", "omniweave.cli", "data", "train-vq", str(tmp_path)]
    command += ["--out", str(out), "--steps", "30", "--codebook-size", "16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "VQ tokenizer on 32 images" in result.stdout
    codes = load_vq(str(out)).encode(_shapes(4))
    assert codes.shape == (4, 4, 4) and int(codes.max()) < 16
