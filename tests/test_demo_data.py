"""`omniweave data build-demo` on a stand-in package root: every record loads through the
demo's OmniModel encoders, and Allison's digit recordings are held out of training."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from omniweave.data import demo_sources as src
from omniweave.data.demo import (
    EVAL_DIGITS,
    SPEECH_REPEATS,
    WORD_MARGIN,
    WORD_SILENCE,
    WORD_SPEEDS,
    build_demo,
)
from omniweave.data.loader import load_samples
from omniweave.data.media import load_image
from omniweave.data.processors import IGNORE_INDEX, load_tokenizer, tokenize_multimodal
from omniweave.data.records import record_texts
from omniweave.data.tokenizers import train_tokenizer
from omniweave.models.omni.model import OmniParts, build_decoders, build_encoders
from omniweave.models.omni.vq import save_vq, train_vq
from omniweave.train.evaluate import prompt_tokens, turn_ends


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("debian")
    digits = root / src.ALLISON / "digits"
    digits.mkdir(parents=True)
    tone = np.sin(np.arange(4000) / 8000 * 2 * np.pi * 300).astype(np.float32) * 0.3
    for name in [*map(str, range(10)), "17", "h-3", "../vm-Cust1", "../demo-instruct"]:
        sf.write(digits / f"{name}.wav", tone, 8000, subtype="PCM_16")
    transcripts = root / src.ALLISON_TRANSCRIPTS
    transcripts.parent.mkdir(parents=True)
    with gzip.open(transcripts, "wt") as f:  # held-out digits, a note and "500" are not trained
        f.write("; title\n\ndigits/3: three\ndigits/17: seventeen\ndigits/h-3: third\n")
        f.write("silence/1: (1 second of silence)\nvm-Cust1: folder 5\ndemo-instruct: dial 500\n")
    fortunes = root / src.FORTUNES
    fortunes.mkdir(parents=True)
    (fortunes / "wisdom").write_text("Look before you leap.\n%\nHaste makes waste.\n")
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:  # "folder five": five is its second half
        patch.setattr(src, "word_aligner", lambda: _halves)
        counts = build_demo(str(out), str(root), fortunes=10, synthesize=False)
    return out, counts


def _halves(audio: np.ndarray, text: str) -> list[tuple[str, int, int]]:
    """A stand-in aligner: each word takes an equal share of the clip."""
    words, share = text.split(), len(audio) // len(text.split())
    return [(word, i * share, (i + 1) * share) for i, word in enumerate(words)]


def _trimmed(clip: np.ndarray) -> np.ndarray:
    """The clip from its first to its last sample louder than 1e-3."""
    loud = np.flatnonzero(np.abs(clip) > 1e-3)
    return clip[loud[0] : loud[-1] + 1]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tasks_and_held_out_split(demo):
    out, counts = demo
    train = len(src.handwritten_digits()[0]) - EVAL_DIGITS
    draw, video = len(range(1, train, 3)), len(range(0, train, 3))
    asr = SPEECH_REPEATS * (1 + len(WORD_SPEEDS))  # the phrase, its word at each speed
    assert counts == {"caption": train, "draw": draw, "video": video, "asr": asr, "text": 2}
    records, prompts = _lines(out / "train.jsonl"), _lines(out / "eval.jsonl")
    speech = {
        r["media"]["audio"][0]: " ".join(m["content"] for m in r["messages"])
        for r in records
        if "audio" in r.get("media", {})
    }
    # one-word prompts are left out; the phrase's digit word is cut out at its aligned span
    assert set(speech.values()) == {"<audio> transcribe: folder five", "<audio> transcribe: five"}
    (phrase,) = (sf.read(out / p)[0] for p, text in speech.items() if text.endswith("folder five"))
    cuts = {
        float(path.rsplit("_x", 1)[1].removesuffix(".wav")): sf.read(out / path)[0]
        for path, text in speech.items()
        if text.endswith(": five")
    }
    assert sorted(cuts) == sorted(WORD_SPEEDS)
    word = _trimmed(phrase[len(phrase) // 2 - WORD_MARGIN :])
    np.testing.assert_allclose(_trimmed(cuts[1.0]), word, atol=1e-4)
    low, high = WORD_SILENCE
    for speed, clip in cuts.items():  # the 300 Hz tone, played faster or slower, in silence
        loud = _trimmed(clip)
        assert len(loud) == pytest.approx(len(word) / speed, abs=2)
        lead = np.flatnonzero(clip)[0]
        assert low <= lead <= high + 1 and low <= len(clip) - lead - len(loud) <= high + 1
        pitch = np.abs(np.fft.rfft(loud)).argmax() * 8000 / len(loud)
        assert pitch == pytest.approx(300 * speed, abs=5), speed
    assert sorted(p["label"] for p in prompts if p["task"] == "asr") == list(range(10))
    assert sum(p["task"] == "caption" for p in prompts) == EVAL_DIGITS
    trained = {path for r in records for paths in r.get("media", {}).values() for path in paths}
    held_out = {path for p in prompts for paths in p.get("media", {}).values() for path in paths}
    assert not trained & held_out
    assert all((out / path).is_file() for path in trained | held_out)


@pytest.fixture(scope="module", params=["compact", "chatml"])
def parts(demo, tmp_path_factory, request):
    """The demo config's encoders and decoder, a tokenizer of the demo records (with the
    demo's compact chat template, and with ChatML), and the records."""
    out, _ = demo
    folder = tmp_path_factory.mktemp("parts")
    records = _lines(out / "train.jsonl")
    texts = (text for r in records for text in record_texts(r))
    train_tokenizer(texts, 600, str(folder / "tok"), chat_template=request.param)
    images = [load_image(str(out / f"images/train/{i:04d}.png"), 1, 2) for i in range(32)]
    vq, _ = train_vq(torch.stack(images), steps=5, codebook_size=64, downsample=1)
    save_vq(vq, str(folder / "vq.pt"))
    with open("configs/omni_demo.yaml") as f:
        omni = yaml.safe_load(f)["model"]["omni"]
    omni["decoders"]["draw"]["tokenizer_path"] = str(folder / "vq.pt")
    encoders = build_encoders(128, omni["encoders"])
    decoders = build_decoders(128, 2120, omni["decoders"])
    tokenizer = load_tokenizer(str(folder / "tok"))
    return OmniParts(*encoders, decoders), tokenizer, records


def test_records_load_with_the_demo_encoders(demo, parts):
    out, _ = demo
    omni, tokenizer, records = parts
    samples, counts, skipped = load_samples(str(out / "train.jsonl"), tokenizer, 256, "error", omni)
    assert len(samples) == len(records) and not skipped and not any(counts.values())


@pytest.mark.parametrize("task", ["caption", "draw", "asr"])
def test_eval_prompts_are_the_unlabelled_start_of_training_conversations(demo, parts, task):
    out, _ = demo
    omni, tokenizer, records = parts
    training = [r for r in records if r["task"] == task]
    asked = {r["messages"][0]["content"] for r in training}
    held_out = [p for p in _lines(out / "eval.jsonl") if p["task"] == task]
    assert held_out and all(
        p["messages"] == [{"role": "user", "content": p["messages"][0]["content"]}]
        for p in held_out
    )
    assert {p["messages"][0]["content"] for p in held_out} <= asked
    record = training[0]
    sample = tokenize_multimodal(record, tokenizer, omni, str(out))
    user = record["messages"][0]["content"]
    media = {m: paths for m, paths in record["media"].items() if f"<{m}>" in user}
    prompt, _ = prompt_tokens(
        {"messages": record["messages"][:1], "media": media}, tokenizer, omni, str(out)
    )
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids[: len(prompt)] == prompt
    assert set(labels[: len(prompt)]) == {IGNORE_INDEX}
    learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert learned == list(range(len(prompt), learned[-1] + 1))  # the answer follows the prompt
    assert ids[learned[-1]] in turn_ends(tokenizer)  # and ends where generation stops


def test_word_aligner_refuses_words_it_cannot_spell():
    align = src.word_aligner()
    if align is None:
        pytest.skip("pocketsphinx is not installed")
    assert align(np.zeros(8000, np.float32), "qzxv blorf") == []


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_word_aligner_finds_spoken_words_in_order(tmp_path):
    align = src.word_aligner()
    if align is None:
        pytest.skip("pocketsphinx is not installed")
    command = ["espeak-ng", "-v", "en-us", "-s", "130", "-w", "{out}", "{text}"]
    text = "press five to leave a message"
    audio = src.speak(command, text, str(tmp_path / "speech.wav"))
    words = align(audio, text)
    assert [word for word, _, _ in words] == text.split()
    ends = [0] + [edge for _, start, end in words for edge in (start, end)]
    assert ends == sorted(ends) and ends[-1] <= len(audio) + 80
    assert all(end - start >= 400 for _, start, end in words)  # each word at least 50 ms
