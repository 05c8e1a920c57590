"""Modality encoders: each turns its raw inputs into LM-width embeddings (``lm_encode``).

The contract an encoder meets (see ``OmniModel``):
- ``lm_encode(items) -> [tokens, lm_hidden]``: the embeddings of all ``items`` of a
  micro-batch, in order, to be scattered into the placeholder positions;
- ``num_tokens(item) -> int``: how many placeholders an item takes in the text;
- ``dummy_item()``: a tiny input for ranks whose micro-batch has none, so the
  encoder still runs forward and backward and every collective stays matched;
- ``load_item(path)`` (for training from files): one item read from a media file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omniweave.data.media import load_frames, load_image, load_wav


class _Blocks(nn.Module):
    """A small pre-norm transformer over several items at once; items never attend to each
    other (block-diagonal mask), and each layer runs once per call (one FSDP gather)."""

    def __init__(self, width: int, depth: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )

    def forward(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        lengths = torch.tensor([len(x) for x in sequences])
        item = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
        blocked = (item[:, None] != item[None, :]).to(sequences[0].device)  # True = masked
        x = torch.cat(sequences).unsqueeze(0)
        for layer in self.layers:
            x = layer(x, src_mask=blocked)
        return x.squeeze(0)


class VisionEncoder(nn.Module):
    """NaViT-style: an image ``[channels, H, W]`` of any size (multiples of ``patch``) becomes
    its own sequence of patches with factorised row/column position embeddings."""

    def __init__(self, lm_hidden: int, width=64, depth=2, heads=4, patch=4, channels=1, grid=32):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.embed = nn.Linear(channels * patch * patch, width)
        self.rows = nn.Embedding(grid, width)
        self.cols = nn.Embedding(grid, width)
        self.blocks = _Blocks(width, depth, heads)
        self.project = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, lm_hidden))

    def num_tokens(self, image: torch.Tensor) -> int:
        rows, cols = image.shape[1] // self.patch, image.shape[2] // self.patch
        _check_positions("rows x columns of patches", max(rows, cols), self.rows.num_embeddings)
        return rows * cols

    def dummy_item(self) -> torch.Tensor:
        return torch.zeros(self.channels, self.patch, self.patch)

    def load_item(self, path: str) -> torch.Tensor:
        return load_image(path, self.channels, self.patch)

    def lm_encode(self, images: list[torch.Tensor]) -> torch.Tensor:
        sequences = []
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        for image in images:
            c, h, w = image.shape
            p = self.patch
            patches = image.to(device, dtype).reshape(c, h // p, p, w // p, p)
            patches = patches.permute(1, 3, 0, 2, 4)
            rows = torch.arange(h // p, device=device)[:, None].expand(h // p, w // p)
            cols = torch.arange(w // p, device=device)[None, :].expand(h // p, w // p)
            x = self.embed(patches.reshape((h // p) * (w // p), -1))
            sequences.append(x + self.rows(rows.flatten()) + self.cols(cols.flatten()))
        return self.project(self.blocks(sequences))


class VideoEncoder(VisionEncoder):
    """Clips ``[frames, channels, H, W]``: tubelets of ``frames_per_patch`` frames x patch x
    patch (temporal patching), with time/row/column embeddings; frames are cut to a
    multiple of ``frames_per_patch``."""

    def __init__(self, lm_hidden: int, frames_per_patch: int = 2, max_time: int = 64, **options):
        channels = options.get("channels", 1)
        patch = options.get("patch", 4)
        super().__init__(lm_hidden, **options)
        self.frames_per_patch = frames_per_patch
        self.embed = nn.Linear(
            frames_per_patch * channels * patch * patch, self.rows.weight.shape[1]
        )
        self.time = nn.Embedding(max_time, self.rows.weight.shape[1])

    def num_tokens(self, clip: torch.Tensor) -> int:
        steps = clip.shape[0] // self.frames_per_patch
        _check_positions("time steps", steps, self.time.num_embeddings)
        return steps * super().num_tokens(clip[0])

    def dummy_item(self) -> torch.Tensor:
        return torch.zeros(self.frames_per_patch, self.channels, self.patch, self.patch)

    def load_item(self, path: str) -> torch.Tensor:
        return load_frames(path, self.channels, self.patch)

    def lm_encode(self, clips: list[torch.Tensor]) -> torch.Tensor:
        sequences = []
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        f, p = self.frames_per_patch, self.patch
        for clip in clips:
            t, c, h, w = clip.shape
            t, rows, cols = t // f, h // p, w // p
            tubes = clip[: t * f].to(device, dtype).reshape(t, f, c, rows, p, cols, p)
            tubes = tubes.permute(0, 3, 5, 1, 2, 4, 6).reshape(t * rows * cols, -1)
            grid = torch.stack(
                torch.meshgrid(
                    *(torch.arange(n, device=device) for n in (t, rows, cols)), indexing="ij"
                )
            ).reshape(3, -1)
            x = self.embed(tubes) + self.time(grid[0]) + self.rows(grid[1]) + self.cols(grid[2])
            sequences.append(x)
        return self.project(self.blocks(sequences))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` (HTK mel scale)."""

    def mel(hz: float) -> float:
        return 2595 * math.log10(1 + hz / 700)

    edges = torch.linspace(mel(0), mel(sample_rate / 2), n_mels + 2)
    hz = 700 * (10 ** (edges / 2595) - 1)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    low, centre, high = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (freqs - low) / (centre - low)
    falling = (high - freqs) / (high - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0)


class AudioEncoder(nn.Module):
    """Whisper-style: log-mel (``torch.stft``) -> two stride-2 convolutions -> transformer.
    ``normalize``: floor each clip's log-mel 60 dB below its peak and remove each band's mean
    (the recording channel and level), which helps recognise voices unlike the training ones."""

    def __init__(
        self,
        lm_hidden: int,
        width=64,
        depth=2,
        heads=4,
        sample_rate=16000,
        n_mels=40,
        hop=160,
        normalize=False,
    ):
        super().__init__()
        self.n_fft, self.hop, self.sample_rate = 400, hop, sample_rate
        self.normalize = normalize
        self.register_buffer(
            "filters", mel_filterbank(sample_rate, self.n_fft, n_mels), persistent=False
        )
        self.conv1 = nn.Conv1d(n_mels, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.position = nn.Embedding(1500, width)
        self.blocks = _Blocks(width, depth, heads)
        self.project = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, lm_hidden))

    def reset_buffers(self) -> None:
        """Recompute the mel filters (after building on the meta device)."""
        self.filters = mel_filterbank(self.sample_rate, self.n_fft, self.filters.shape[0]).to(
            self.conv1.weight.device
        )

    def num_tokens(self, waveform: torch.Tensor) -> int:
        frames = waveform.shape[-1] // self.hop + 1
        tokens = ((frames - 1) // 2) // 2 + 1
        _check_positions("audio positions", tokens, self.position.num_embeddings)
        return tokens

    def dummy_item(self) -> torch.Tensor:
        return torch.zeros(self.n_fft)

    def load_item(self, path: str) -> torch.Tensor:
        return load_wav(path, self.sample_rate)

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(self.n_fft, device=waveform.device)
        spectrum = torch.stft(
            waveform, self.n_fft, self.hop, window=window, center=True, return_complex=True
        )
        power = spectrum.abs() ** 2  # [freqs, frames]
        mel = torch.log10(torch.clamp(self.filters.to(power.device) @ power, min=1e-10))
        if self.normalize:  # 60 dB below the loudest bin, then zero mean per band
            mel = torch.maximum(mel, mel.max() - 6)
            mel = mel - mel.mean(dim=1, keepdim=True)
        return mel

    def lm_encode(self, waveforms: list[torch.Tensor]) -> torch.Tensor:
        sequences = []
        for waveform in waveforms:
            weight = self.conv1.weight  # features in float32, then the weights' dtype (bf16)
            x = self.log_mel(waveform.to(weight.device)).to(weight.dtype).unsqueeze(0)
            x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).squeeze(0).transpose(0, 1)
            sequences.append(x + self.position(torch.arange(x.shape[0], device=x.device)))
        return self.project(self.blocks(sequences))


def _check_positions(what: str, needed: int, available: int) -> None:
    """ValueError when an item needs more position embeddings than the encoder has."""
    if needed > available:
        raise ValueError(
            f"too large for the encoder: {needed} {what}, it has position embeddings for "
            f"{available} (shrink or cut the item, or enlarge the encoder's config)"
        )


ENCODERS: dict[str, type[nn.Module]] = {
    "vision": VisionEncoder,
    "video": VideoEncoder,
    "audio": AudioEncoder,
}


def register_encoder(name: str, encoder_class: type[nn.Module]) -> None:
    """Make ``encoder_class`` available as ``{"type": name}`` in an OmniModel's encoders.

    Its constructor takes the LM width first, then the options of its config entry.
    """
    missing = [
        m for m in ("lm_encode", "num_tokens", "dummy_item") if not hasattr(encoder_class, m)
    ]
    if missing:
        raise ValueError(f"encoder class {encoder_class.__name__} lacks {', '.join(missing)}.")
    ENCODERS[name] = encoder_class
