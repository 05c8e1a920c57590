"""Media files of multimodal records: images and clips (Pillow) and audio (soundfile), as tensors.

Encoders read their items with a ``load_item(path)`` method; these are the
readers of the built-in ones.

A record ``{"text": "a <image> of a digit", "media": {"image": ["digit.png"]}}``
puts each item where its ``<modality>`` marker is; paths are relative to the
data file. A missing or unreadable file is an error naming the file and record.
"""

from __future__ import annotations

import os
import struct
from contextlib import contextmanager

import numpy as np
import soundfile
import torch


def load_image(path: str, channels: int, patch: int) -> torch.Tensor:
    """``[channels, H, W]`` floats in [0, 1], cropped to multiples of ``patch``."""
    from PIL import Image

    with _malformed_image(), Image.open(path) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    tensor = torch.from_numpy(_crop(array, patch) / 255.0)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def load_image_file(path: str):
    """An RGB PIL image, read whole (for a Hugging Face image processor)."""
    from PIL import Image

    with _malformed_image(), Image.open(path) as image:
        return image.convert("RGB")


def load_frames(path: str, channels: int, patch: int) -> torch.Tensor:
    """``[frames, channels, H, W]`` of an animated image (GIF, APNG, WebP) in [0, 1]."""
    from PIL import Image, ImageSequence

    frames = []
    with _malformed_image(), Image.open(path) as clip:
        for frame in ImageSequence.Iterator(clip):
            array = np.asarray(frame.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
            frames.append(_crop(array, patch))
    tensor = torch.from_numpy(np.stack(frames) / 255.0)
    return tensor.unsqueeze(1) if channels == 1 else tensor.permute(0, 3, 1, 2).contiguous()


def load_frame_files(path: str) -> tuple[list, float | None]:
    """The RGB PIL frames of an animated image and its seconds per frame (the mean frame
    duration; None where the file gives none), for a Hugging Face processor."""
    from PIL import Image, ImageSequence

    frames, durations = [], []
    with _malformed_image(), Image.open(path) as clip:
        for frame in ImageSequence.Iterator(clip):
            frames.append(frame.convert("RGB"))
            durations.append(frame.info.get("duration", 0))
    seconds = sum(durations) / len(durations) / 1000
    return frames, seconds or None


@contextmanager
def _malformed_image():
    """Make a ValueError of what Pillow's parsers raise on a damaged file besides OSError
    (``Image.open`` catches the same while identifying one) and of DecompressionBombError
    (a header of over 179M pixels)."""
    from PIL.Image import DecompressionBombError

    try:
        yield
    except (SyntaxError, IndexError, struct.error, DecompressionBombError) as error:
        raise ValueError(f"malformed image ({type(error).__name__}: {error})") from None


def _crop(array: np.ndarray, patch: int) -> np.ndarray:
    array = array[: array.shape[0] // patch * patch, : array.shape[1] // patch * patch]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image smaller than one {patch}x{patch} patch")
    return array


def load_wav(path: str, sample_rate: int) -> torch.Tensor:
    """Mono float waveform at ``sample_rate`` of any file soundfile reads (WAV of any PCM width
    or float, FLAC, OGG...): channels are averaged, other rates resampled."""
    frames, rate = soundfile.read(path, dtype="float32", always_2d=True)
    if frames.shape[0] == 0:
        raise ValueError("no audio samples")
    return resample(torch.from_numpy(frames.mean(axis=1)), rate, sample_rate)


def resample(waveform: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Band-limited resampling by FFT, as ``scipy.signal.resample``: the spectrum is cut at the
    lower of the two Nyquist frequencies (an ideal low-pass) and transformed back at the new
    length. The clip counts as periodic, so its first and last few samples may ring slightly."""
    if rate == target:
        return waveform
    length = max(1, round(waveform.shape[-1] * target / rate))
    shorter = min(length, waveform.shape[-1])
    spectrum = torch.fft.rfft(waveform.double(), norm="forward")[: shorter // 2 + 1]
    if shorter % 2 == 0:  # the shorter clip's Nyquist bin counts once, the others twice
        spectrum[-1] *= 2.0 if length < waveform.shape[-1] else 0.5
    return torch.fft.irfft(spectrum, n=length, norm="forward").to(waveform.dtype)


def load_item(encoder, base_dir: str, path: str) -> torch.Tensor:
    """Load one media file with the encoder's own ``load_item(path)``."""
    full = os.path.join(base_dir, path)
    try:
        return encoder.load_item(full)
    except (OSError, ValueError, EOFError, soundfile.SoundFileError) as error:
        raise ValueError(f"{full}: cannot read ({error})") from None
