"""Audio files through soundfile: PCM widths, float, FLAC, mixed to mono, resampled to the
encoder's rate; an unreadable file is an error naming it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch

from omniweave.data.media import load_item, load_wav, resample


def _tone(rate: int, seconds: float = 0.5, hz: float = 440.0) -> np.ndarray:
    """A sine of a whole number of cycles (the resampler treats a clip as periodic)."""
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)


def test_8khz_16bit_wav_is_resampled_to_16khz(tmp_path):
    path = tmp_path / "tone.wav"
    soundfile.write(path, _tone(8000), 8000, subtype="PCM_16")
    waveform = load_wav(str(path), 16000)
    assert waveform.dtype == torch.float32 and waveform.shape == (8000,)  # twice 4000 samples
    spectrum = torch.fft.rfft(waveform.double()).abs()
    assert int(spectrum.argmax()) * 16000 / len(waveform) == 440.0
    assert torch.allclose(waveform, torch.from_numpy(_tone(16000)).float(), atol=1e-3)


def test_resampling_by_two_keeps_the_samples_and_inverts():
    """Band-limited 2x upsampling interpolates between the samples; downsampling undoes it
    (both need the even-length Nyquist bin halved, then doubled)."""
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    up = resample(noise, 8000, 16000)
    assert up.shape == (2000,) and torch.allclose(up[::2], noise, atol=1e-5)
    assert torch.allclose(resample(up, 16000, 8000), noise, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "subtype", "rate", "atol"),
    [
        ("stereo.wav", "PCM_24", 16000, 1e-6),  # read as is: exact up to 24-bit quantisation
        ("float.wav", "FLOAT", 48000, 1e-5),  # downsampled 3:1
        ("tone.flac", "PCM_16", 22050, 1e-3),  # 22.05 kHz, a rate with no integer ratio
    ],
)
def test_widths_formats_and_channels(tmp_path, name, subtype, rate, atol):
    tone = _tone(rate)
    stereo = np.stack([tone + 0.1, tone - 0.1], axis=1)  # averages to the tone
    soundfile.write(tmp_path / name, stereo, rate, subtype=subtype)
    waveform = load_wav(str(tmp_path / name), 16000)
    assert waveform.shape == (8000,)
    assert torch.allclose(waveform, torch.from_numpy(_tone(16000)).float(), atol=atol)


def test_unreadable_audio_names_the_file(tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"not audio at all")
    encoder = SimpleNamespace(load_item=lambda path: load_wav(path, 16000))
    with pytest.raises(ValueError, match=r"noise.wav: cannot read \(.*Format not recognised"):
        load_item(encoder, str(tmp_path), "noise.wav")
    with pytest.raises(ValueError, match=r"missing.wav: cannot read"):
        load_item(encoder, str(tmp_path), "missing.wav")
