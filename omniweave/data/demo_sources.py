"""The real, offline media of the omni demo, one function per source.

Each function reads one source (scikit-learn's digits, a Debian package unpacked
under ``root``, a speech synthesiser on PATH) and returns arrays or (path, text)
pairs; ``demo.py`` writes the media and the JSONL records, and skips (saying so)
the sources that are not installed.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import unicodedata

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLE_RATE = 8000  # every clip is written at telephone rate, like the real recordings
ALLISON = "usr/share/asterisk/sounds/en_US_f_Allison"
ALLISON_TRANSCRIPTS = "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
POCKETSPHINX = "usr/share/pocketsphinx/test/data"
EMOJI_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FORTUNES = "usr/share/games/fortunes"


def handwritten_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled ``load_digits``: 1,797 8x8 images (uint8) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target


def save_png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def save_gif(path: str, frames: list[np.ndarray]) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=120, loop=0)


def motion_clip(digit: np.ndarray, motion: str, frames: int = 6, size: int = 16) -> list:
    """A digit moving on a ``size`` x ``size`` canvas: sliding left/right/up/down or zooming."""
    from PIL import Image

    clip = []
    for t in range(frames):
        canvas = np.zeros((size, size), dtype=np.uint8)
        if motion.startswith("zooming"):
            grow = t / (frames - 1) if motion == "zooming in" else 1 - t / (frames - 1)
            side = int(round(6 + grow * (size - 6)))
            scaled = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR))
            top = (size - side) // 2
            canvas[top : top + side, top : top + side] = scaled
        else:
            shift = round(t * (size - 8) / (frames - 1))
            row, col = {
                "sliding right": (4, shift),
                "sliding left": (4, size - 8 - shift),
                "sliding down": (shift, 4),
                "sliding up": (size - 8 - shift, 4),
            }[motion]
            canvas[row : row + 8, col : col + 8] = digit
        clip.append(canvas)
    return clip


MOTIONS = [
    "sliding left",
    "sliding right",
    "sliding up",
    "sliding down",
    "zooming in",
    "zooming out",
]


def emoji_images(root: str, limit: int) -> list[tuple[str, np.ndarray]]:
    """Noto Color Emoji glyphs rendered with Pillow as 16x16 grayscale, with their Unicode names."""
    from fontTools.ttLib import TTFont
    from PIL import Image, ImageDraw, ImageFont

    path = os.path.join(root, EMOJI_FONT)
    font = ImageFont.truetype(path, 109)  # the bitmap strike of the color font
    with TTFont(path, lazy=True) as ttf:
        codes = sorted(c for c in ttf.getBestCmap() if c >= 0x1F300)
    picked = codes[:: max(1, len(codes) // limit)][:limit]
    images = []
    for code in picked:
        name = unicodedata.name(chr(code), "").lower()
        if not name:
            continue
        canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 255))
        ImageDraw.Draw(canvas).text((0, 0), chr(code), font=font, embedded_color=True)
        gray = canvas.convert("L").resize((16, 16), Image.LANCZOS)
        images.append((name, np.asarray(gray)))
    return images


def read_audio(path: str, raw_rate: int | None = None) -> np.ndarray:
    """A mono float clip at ``SAMPLE_RATE``; ``raw_rate`` for headerless 16-bit files."""
    import torch

    from omniweave.data.media import load_wav, resample

    if raw_rate:
        raw = torch.from_numpy(np.fromfile(path, dtype="<i2").astype(np.float32) / 32768)
        return resample(raw, raw_rate, SAMPLE_RATE).numpy()
    return load_wav(path, SAMPLE_RATE).numpy()


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """``audio`` played ``factor`` times as fast: shorter and higher for a factor above 1."""
    import torch

    from omniweave.data.media import resample

    rate = round(SAMPLE_RATE * factor)
    return resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()


def save_wav(path: str, audio: np.ndarray) -> None:
    import soundfile as sf

    peak = float(np.abs(audio).max()) or 1.0
    sf.write(path, audio / max(peak, 1.0), SAMPLE_RATE, subtype="PCM_16")


def allison_prompts(root: str) -> list[tuple[str, str]]:
    """(wav path, spoken text) of every real Allison prompt whose transcript (the package's
    ``core-sounds-en.txt``) can be spelled as words, except the held-out digit words."""
    listing = os.path.join(root, ALLISON_TRANSCRIPTS)
    if not os.path.isfile(listing):
        return []
    with gzip.open(listing, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    held_out = {f"digits/{d}" for d in range(10)}
    found = []
    for line in lines:
        name, colon, transcript = line.partition(":")
        text = spoken_text(transcript)
        path = os.path.join(root, ALLISON, name.strip() + ".wav")
        if colon and text and name.strip() not in held_out and os.path.isfile(path):
            found.append((path, text))
    return found


def spoken_text(transcript: str) -> str | None:
    """A transcript as lower-case words ("Press 1, then *." -> "press one then star"), or
    None where it is a note ("(1 second of silence)") or has a number read other than digit
    by digit ("dial 500")."""
    if "(" in transcript or re.search(r"\d\d", transcript):
        return None
    spelled = re.sub(r"\d", lambda m: f" {DIGIT_WORDS[int(m.group())]} ", transcript)
    spelled = spelled.replace("*", " star ").replace("#", " pound ")
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", spelled.lower())
    return " ".join(words) or None


def word_aligner():
    """``align(audio, text) -> [(word, start, end)]`` (sample offsets in ``audio`` at
    ``SAMPLE_RATE``) by pocketsphinx's forced alignment with its bundled US-English model, or
    None where pocketsphinx is not installed. Texts it cannot align give ``[]``."""
    try:
        from pocketsphinx import Decoder
    except ImportError:
        return None
    import torch

    from omniweave.data.media import resample

    decoder = Decoder(bestpath=False, loglevel="FATAL")
    hop = SAMPLE_RATE // 100  # its frames are 10 ms

    def align(audio: np.ndarray, text: str) -> list[tuple[str, int, int]]:
        try:
            decoder.set_align_text(text)
        except RuntimeError:  # a word its dictionary lacks
            return []
        wide = resample(torch.from_numpy(audio), SAMPLE_RATE, 16000).numpy()  # its model's rate
        decoder.start_utt()
        pcm = (np.clip(wide, -1, 1) * 32767).astype(np.int16)
        decoder.process_raw(pcm.tobytes(), full_utt=True)
        decoder.end_utt()
        return [
            (re.sub(r"\(\d+\)$", "", s.word), s.start_frame * hop, (s.end_frame + 1) * hop)
            for s in decoder.seg() or []  # None when no path matches the text
            if not s.word.startswith(("<", "["))  # silences and noises
        ]

    return align


def allison_digits(root: str) -> list[tuple[str, int]]:
    """The held-out test set: Allison's real recordings of the ten digit words."""
    base = os.path.join(root, ALLISON, "digits")
    return [
        (os.path.join(base, f"{d}.wav"), d)
        for d in range(10)
        if os.path.isfile(os.path.join(base, f"{d}.wav"))
    ]


def pocketsphinx_utterances(root: str) -> list[tuple[str, str, int | None]]:
    """(path, transcript, raw sample rate or None) of pocketsphinx's transcribed test speech."""
    base = os.path.join(root, POCKETSPHINX)
    found = []
    for folder, listing in (("cards", "cards.transcription"), ("librivox", "transcription")):
        listing = os.path.join(base, folder, listing)
        if not os.path.isfile(listing):
            continue
        with open(listing) as f:
            lines = f.read().splitlines()
        for line in lines:
            words, _, file_id = line.rpartition("(")
            text = " ".join(w for w in words.split() if w not in ("<s>", "</s>"))
            found.append((os.path.join(base, folder, file_id.strip(" )") + ".wav"), text, None))
    goforward = os.path.join(base, "goforward.raw")
    if os.path.isfile(goforward):
        found.append((goforward, "go forward ten meters", 16000))
    digits = os.path.join(base, "tidigits", "dhd.2934z.raw")
    if os.path.isfile(digits):
        found.append((digits, "two nine three four zero", 16000))
    return [item for item in found if os.path.isfile(item[0])]


def synthesizers() -> dict[str, list[list[str]]]:
    """Installed speech synthesisers and, per voice, the command that speaks ``{text}`` into
    ``{out}`` (espeak-ng in varied voices, speeds and pitches; flite; festival)."""
    rng = np.random.default_rng(0)
    found = {}
    if shutil.which("espeak-ng"):
        accents = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
        variants = ["", "+f1", "+f2", "+f3", "+f4", "+f5", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6"]
        found["espeak-ng"] = [
            [
                "espeak-ng",
                "-v",
                rng.choice(accents) + rng.choice(variants),
                "-s",
                str(rng.integers(110, 200)),
                "-p",
                str(rng.integers(15, 85)),
                "-w",
                "{out}",
                "{text}",
            ]
            for _ in range(24)
        ]
    if shutil.which("flite"):
        found["flite"] = [
            [
                "flite",
                "-voice",
                voice,
                "--setf",
                f"duration_stretch={stretch:.2f}",
                "-t",
                "{text}",
                "-o",
                "{out}",
            ]
            for voice in ("kal", "kal16", "awb", "rms", "slt")
            for stretch in rng.uniform(0.8, 1.3, 5)
        ]
    if shutil.which("text2wave"):
        found["festival"] = [
            [
                "text2wave",
                "-eval",
                f"(begin (voice_{voice}) (Parameter.set 'Duration_Stretch {stretch:.2f}))",
                "-o",
                "{out}",
                "{textfile}",
            ]
            for voice in ("kal_diphone", "ked_diphone")
            for stretch in rng.uniform(0.85, 1.2, 4)
        ]
    return found


def speak(command: list[str], text: str, out: str) -> np.ndarray:
    """Run one synthesiser command; the clip at ``SAMPLE_RATE``."""
    textfile = out + ".txt"
    with open(textfile, "w") as f:
        f.write(text + "\n")
    args = [
        a.replace("{out}", out).replace("{text}", text).replace("{textfile}", textfile)
        for a in command
    ]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    audio = read_audio(out)
    os.remove(textfile)
    os.remove(out)
    return audio


def fortunes(root: str, limit: int, max_chars: int = 200) -> list[str]:
    """Short quotes of Debian's ``fortunes`` files."""
    from omniweave.data.corpora import read_fortunes

    folder = os.path.join(root, FORTUNES)
    quotes = [q for q in read_fortunes([folder]) if len(q) <= max_chars]
    return quotes[:: max(1, len(quotes) // limit)][:limit]
