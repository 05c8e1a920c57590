"""Fuzzing load_samples with hypothesis: JSONL files that mix valid records with malformed
ones (bad JSON or UTF-8, wrong shapes, unreadable or wrongly shaped media, over-long texts).

Under ``on_bad_sample: error`` the only failure is a ValueError naming the file, the line and
why; under ``skip`` nothing raises, and every non-blank line is a sample, a counted skip whose
reason names its line, or a counted drop.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from omniweave.data.loader import load_samples
from omniweave.data.media import load_item
from omniweave.data.processors import load_tokenizer
from omniweave.data.records import ROLES
from omniweave.models.omni.model import OmniParts, build_encoders

MAX_SEQ_LEN = 256
ENCODERS = {
    "image": {"type": "vision", "placeholder": 600, "patch": 2, "grid": 16},
    "audio": {"type": "audio", "placeholder": 601, "sample_rate": 8000, "hop": 80},
    "video": {"type": "video", "placeholder": 602, "patch": 2},
}
WORDS = ["the", "model", "learns", "every", "layer", "while", "tokens", "flow", "a"]
LONG = " ".join(WORDS * 40)  # 360 words: at least one token each, over MAX_SEQ_LEN
JSON_BLANK = b" \t\r"  # what a blank line may hold (besides its newline)
NO_ENCODERS = "has media but the model has no encoders"
UNREADABLE = "cannot read"


def _png(size: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (size, size), 128).save(out, format="PNG")
    return out.getvalue()


def _gif(frames: int) -> bytes:
    out = io.BytesIO()
    images = [Image.new("L", (4, 4), 255 * (i % 2)) for i in range(frames)]
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:])
    return out.getvalue()


def _wav(samples: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(samples), 8000, format="WAV", subtype="PCM_16")
    return out.getvalue()


GIF = _gif(2)
VALID = {"image": _png(8), "audio": _wav(400), "video": GIF}  # 16, 2 and 4 tokens
# Too small for their encoder: under one patch, no samples, under one tubelet of 2 frames.
TINY = {"image": _png(1), "audio": _wav(0), "video": _png(8)}
OTHER = {"image": VALID["audio"], "audio": VALID["image"], "video": VALID["audio"]}
BOMB = GIF[:6] + b"\xff\xff\xff\xff" + GIF[10:]  # a GIF header claiming 65535 x 65535 pixels
FILES = {"valid": VALID, "tiny": TINY, "other": OTHER, "bomb": dict.fromkeys(VALID, BOMB)}


@dataclass(frozen=True)
class Line:
    """A generated line, the media files it refers to, and what loading it must do.

    ``schema``: why validation rejects it (a regex), None if it passes. ``with_encoders`` and
    ``without``: ``(outcome, reason regex)`` once tokenized with or without encoders, the
    outcome "ok", "fail" or "maybe" (corrupted media, which may still read).
    """

    raw: bytes
    schema: str | None = None
    with_encoders: tuple[str, str] = ("ok", "")
    without: tuple[str, str] = ("ok", "")
    long: bool = False
    files: tuple[tuple[str, bytes], ...] = ()

    def outcome(self, with_encoders: bool) -> tuple[str, str]:
        return self.with_encoders if with_encoders else self.without


def _dump(record) -> bytes:
    return json.dumps(record).encode()


noise = st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=12)
words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join)
# A text that starts a new token after any prompt (which ends with a word): no merge.
texts = st.builds(lambda w, n: " " + w + n, words, noise)
prompts = st.builds(lambda n, w: n + " " + w, noise, words)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | noise,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(noise, inner, max_size=3),
    max_leaves=6,
)
non_strings = json_values.filter(lambda value: not isinstance(value, str))
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": noise})
assistant = st.fixed_dictionaries({"role": st.just("assistant"), "content": noise})
messages = st.builds(lambda head, last: [*head, last], st.lists(message, max_size=2), assistant)


@st.composite
def good_lines(draw) -> Line:
    """A valid text or messages record; over-long when its text is ``LONG``."""
    long = draw(st.booleans())
    text = draw(texts) + " " + LONG if long else draw(texts)
    kind = draw(st.sampled_from(["text", "prompt", "messages"]))
    if kind == "messages":
        chat = draw(messages)
        if long:
            chat[-1]["content"] = LONG
        return Line(_dump({"messages": chat}), long=long)
    record = {"text": text, **({"prompt": draw(prompts)} if kind == "prompt" else {})}
    return Line(_dump(record), long=long)


@st.composite
def merging_lines(draw) -> Line:
    """Any prompt and text: the text tokenizer rejects them if they merge into one token."""
    record = {"prompt": draw(noise), "text": draw(noise.filter(str.strip))}
    return Line(_dump(record), without=("maybe", "merge into one token"))


MEDIA_KINDS = ["valid", "missing", "garbage", "corrupt", "tiny", "other", "bomb", "folder"]


@st.composite
def media_item(draw, modality: str) -> tuple[str, str, tuple[tuple[str, bytes], ...]]:
    """``(path, outcome, files)`` of one media reference."""
    kind = draw(st.sampled_from(MEDIA_KINDS))
    if kind == "missing":
        return "missing.bin", "fail", ()
    if kind == "folder":
        return ".", "fail", ()
    if kind == "corrupt":  # truncated, or a few bytes overwritten
        data = bytearray(VALID[modality])
        if draw(st.booleans()):
            del data[draw(st.integers(1, len(data) - 1)) :]
        for _ in range(draw(st.integers(0, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data, outcome = bytes(data), "maybe"
    elif kind == "garbage":
        data, outcome = b"garbage!" + draw(st.binary(max_size=32)), "fail"
    else:
        data, outcome = FILES[kind][modality], "ok" if kind == "valid" else "fail"
    name = hashlib.sha1(data).hexdigest()[:16] + ".bin"
    return name, outcome, ((name, data),)


@st.composite
def media_lines(draw) -> Line:
    """A text or messages record with media: each item valid, missing, unreadable or wrongly
    shaped; optionally with one marker too many, one item without marker, or an unknown modality."""
    modalities = draw(st.lists(st.sampled_from(sorted(ENCODERS)), min_size=1, max_size=3))
    items = [draw(media_item(modality)) for modality in modalities]
    media: dict[str, list[str]] = {}
    for modality, (path, _, _) in zip(modalities, items, strict=True):
        media.setdefault(modality, []).append(path)
    markers = [f"<{modality}>" for modality in modalities]
    outcomes = {outcome for _, outcome, _ in items}
    outcome = "fail" if "fail" in outcomes else "maybe" if "maybe" in outcomes else "ok"
    reasons = [] if outcome == "ok" else [f"{UNREADABLE}|no tokens|longer than"]
    defect = draw(st.sampled_from(["none", "marker", "unmarked", "unknown"]))
    if defect == "marker":
        markers.append(markers[-1])
        outcome, reasons = "fail", [*reasons, r"more <\w+> markers than media files"]
    elif defect == "unmarked":
        markers.pop()
        outcome, reasons = "fail", [*reasons, "media without a <marker>"]
    elif defect == "unknown":  # checked before any file is read
        media["smell"] = [items[0][0]]
        markers.append("<smell>")
        outcome, reasons = "fail", ["media of unknown modality"]
    split = draw(st.integers(0, len(markers)))
    prompt, text = (
        " ".join([*markers[:split], draw(words)]),
        " ".join(["", draw(words), *markers[split:]]),
    )
    if draw(st.booleans()):
        turns = [{"role": "user", "content": prompt}] if split else []
        record = {"messages": [*turns, {"role": "assistant", "content": text}], "media": media}
    else:
        record = {"text": text, "media": media, **({"prompt": prompt} if split else {})}
    files = tuple(file for _, _, item_files in items for file in item_files)
    outcomes = (outcome, "|".join(reasons))
    return Line(_dump(record), with_encoders=outcomes, without=("fail", NO_ENCODERS), files=files)


def _invalid_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return True
    return False


def _not_paths(value) -> bool:
    return not (isinstance(value, list) and all(isinstance(path, str) for path in value))


line_text = st.text(st.characters(codec="utf-8", exclude_characters="\n"), min_size=1)
depth = st.integers(3_000, 20_000)
digits = st.integers(4_400, 6_000)
surrogate = st.sampled_from(["\ud800", "\udfff", "x\udc00y"])
spaces = st.text(st.sampled_from("\x0b\x0c\x1c\x1f\x85\xa0\u2028\u3000"), min_size=1)
empty = st.text(st.sampled_from(" \t\n\r\x0b\u00a0\u3000"), max_size=4)
bad_role = st.one_of(non_strings, noise.filter(lambda role: role not in ROLES))
no_dict = json_values.filter(lambda value: not isinstance(value, dict))
fields = ("text", "messages", "media")
MALFORMED = [
    (
        line_text.map(str.encode)
        .filter(lambda raw: raw.strip(JSON_BLANK))
        .filter(lambda raw: _invalid_json(raw.decode())),
        "invalid JSON",
    ),
    (st.binary(max_size=16).map(lambda raw: b"\xff" + raw.replace(b"\n", b"")), "UTF-8"),
    (spaces.map(str.encode), "invalid JSON"),  # white to str.strip, not to JSON
    (depth.map(lambda n: b"[" * n + b"]" * n), "invalid JSON"),
    (depth.map(lambda n: b'{"text": ' + b'{"a": ' * n), "invalid JSON"),
    (digits.map(lambda n: b'{"text": ' + b"7" * n + b"}"), "invalid JSON"),
    (surrogate.map(lambda s: _dump({"text": " the " + s})), "surrogate"),
    (
        surrogate.map(lambda s: _dump({"messages": [{"role": "assistant", "content": s}]})),
        "surrogate",
    ),
    (no_dict.map(_dump), "expected a JSON object"),
    (
        st.dictionaries(noise.filter(lambda key: key not in fields), json_values).map(_dump),
        "needs a 'text' string or a 'messages' list",
    ),
    (empty.map(lambda text: _dump({"text": text})), "'text' is empty"),
    (
        non_strings.filter(lambda value: value is not None).map(lambda v: _dump({"text": v})),
        "'text' must be a string",
    ),
    (
        non_strings.map(lambda value: _dump({"text": " the", "prompt": value})),
        "'prompt' must be a string",
    ),
    (messages.map(lambda chat: _dump({"text": " the", "messages": chat})), "has both"),
    (messages.map(lambda chat: _dump({"prompt": "", "messages": chat})), "'prompt' goes with"),
    (
        json_values.filter(
            lambda value: value is not None and not (isinstance(value, list) and value)
        ).map(lambda value: _dump({"messages": value})),
        "'messages' must be a non-empty list",
    ),
    (
        st.builds(lambda chat, value: _dump({"messages": [*chat, value]}), messages, no_dict),
        r"messages\[\d\] must be an object",
    ),
    (
        bad_role.map(lambda role: _dump({"messages": [{"role": role, "content": "x"}]})),
        r"messages\[0\]\.role must be one of",
    ),
    (
        non_strings.map(lambda c: _dump({"messages": [{"role": "assistant", "content": c}]})),
        r"messages\[0\]\.content must be a string",
    ),
    (
        st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": noise}),
            min_size=1,
        ).map(lambda chat: _dump({"messages": chat})),
        "no assistant message",
    ),
    (
        no_dict.filter(lambda value: value is not None).map(
            lambda media: _dump({"text": " the", "media": media})
        ),
        "'media' must map",
    ),
    (
        st.dictionaries(noise, json_values.filter(_not_paths), min_size=1).map(
            lambda media: _dump({"text": " the", "media": media})
        ),
        "'media' must map",
    ),
    (
        st.just(_dump({"media": {}})),
        "'media' must map",
    ),
]
malformed_lines = st.sampled_from(MALFORMED).flatmap(
    lambda case: case[0].map(lambda raw: Line(raw, schema=case[1]))
)
blank_lines = st.binary(max_size=3).map(lambda raw: Line(bytes(JSON_BLANK[b % 3] for b in raw)))
# Weighted kinds of line (st.one_of would flatten the malformed cases into as many choices).
KINDS = [blank_lines, good_lines(), merging_lines(), *[media_lines()] * 3, *[malformed_lines] * 2]
any_lines = st.sampled_from(KINDS).flatmap(lambda kind: kind)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return load_tokenizer(corpus["tokenizer_path"])


@pytest.fixture(scope="module")
def omni():
    """The encoders on the meta device: data loading needs only token counts and readers."""
    with torch.device("meta"):
        return OmniParts(*build_encoders(32, ENCODERS))


def _write(folder: str, lines: list[Line]) -> str:
    for line in lines:
        for name, data in line.files:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "wb") as f:
        f.write(b"".join(line.raw + b"\n" for line in lines))
    return path


def _located(path: str, message: str) -> tuple[int, str]:
    """The line number and reason of an error or skip message about ``path``."""
    match = re.fullmatch(re.escape(path) + r", line (\d+): (.+)", message, re.DOTALL)
    assert match, message
    return int(match[1]), match[2]


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(
    lines=st.lists(any_lines, min_size=1, max_size=8),
    with_encoders=st.booleans(),
    on_overlong=st.sampled_from(["truncate", "drop", "error"]),
)
def test_malformed_records_fail_by_line_or_are_counted(
    tokenizer, omni, lines, with_encoders, on_overlong
):
    numbered = {n: line for n, line in enumerate(lines, start=1) if line.raw.strip(JSON_BLANK)}
    outcomes = {n: line.outcome(with_encoders) for n, line in numbered.items()}
    schema_bad = [n for n, line in numbered.items() if line.schema]
    parts = omni if with_encoders else None
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, lines)

        # on_bad_sample: error -- the first bad line fails, validation (the schema) first.
        certain = {n for n, (outcome, _) in outcomes.items() if outcome == "fail"}
        if on_overlong == "error":
            certain |= {n for n, line in numbered.items() if line.long}
        failing = certain | {n for n, (outcome, _) in outcomes.items() if outcome == "maybe"}
        try:
            load_samples(path, tokenizer, MAX_SEQ_LEN, on_overlong, parts)
        except ValueError as error:
            if not numbered:
                assert str(error) == f"{path}: no records"
            else:
                number, reason = _located(path, str(error))
                if schema_bad:
                    assert number == schema_bad[0]
                    assert re.search(numbered[number].schema, reason), reason
                else:
                    assert number in failing and number <= min(certain, default=number)
                    long = numbered[number].long
                    expected = "longer than data.max_seq_len" if long else outcomes[number][1]
                    assert re.search(expected, reason), reason
        else:
            assert numbered and not schema_bad and not certain

        # on_bad_sample: skip -- every bad line is a skip that names its line.
        if len(schema_bad) == len(numbered):
            with pytest.raises(ValueError) as error:
                load_samples(path, tokenizer, MAX_SEQ_LEN, "drop", parts, skip_bad=True)
            first = (
                f" ({len(schema_bad)} bad, the first: {path}, line {schema_bad[0]}: "
                if schema_bad
                else ""
            )
            assert str(error.value).startswith(f"{path}: no records{first}")
            return
        overlong = "drop" if on_overlong == "error" else on_overlong
        samples, counts, skipped = load_samples(
            path, tokenizer, MAX_SEQ_LEN, overlong, parts, skip_bad=True
        )
    located = dict(_located(path, message) for message in skipped)
    assert counts["skipped_bad"] == len(skipped) == len(located)
    bad = set(schema_bad) | {n for n in numbered if outcomes[n][0] == "fail"}
    maybe = {n for n in numbered if outcomes[n][0] == "maybe"}
    assert bad <= set(located) <= bad | maybe
    for number, reason in located.items():
        expected = numbered[number].schema or outcomes[number][1]
        assert re.search(expected, reason), reason
    kept = len(samples) + counts["dropped_overlong"] + counts["no_labels"]
    assert kept + len(skipped) == len(numbered)
    long = sum(numbered[n].long for n in numbered if n not in located)
    assert counts["truncated"] + counts["dropped_overlong"] >= long
    for sample in samples:
        assert len(sample.labels) == len(sample.input_ids) <= MAX_SEQ_LEN


@pytest.mark.parametrize("modality", sorted(ENCODERS))
def test_every_cut_or_zeroed_byte_of_a_media_file_reads_or_is_a_value_error(
    omni, tmp_path, modality
):
    """Pillow's parsers raise many kinds of error on a damaged file; each must be a ValueError."""
    data = {**VALID, "audio": _wav(40)}[modality]  # a short clip: its header is what matters
    damaged = [data[:cut] for cut in range(len(data))]
    damaged += [
        data[:i] + bytes([value]) + data[i + 1 :] for i in range(len(data)) for value in (0, 1)
    ]
    path = tmp_path / "damaged.bin"
    for variant in damaged:
        path.write_bytes(variant)
        try:
            load_item(omni.encoders[modality], str(tmp_path), path.name)
        except ValueError as error:
            assert str(error).startswith(f"{path}: cannot read ("), error
