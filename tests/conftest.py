"""Shared fixtures: a small generated corpus and a tokenizer trained on it."""

from __future__ import annotations

import json
import random

import pytest
import torch

torch.set_num_threads(1)

WORDS = [
    "the",
    "a",
    "model",
    "learns",
    "shards",
    "of",
    "every",
    "layer",
    "while",
    "ranks",
    "exchange",
    "gradients",
    "over",
    "gloo",
    "and",
    "tokens",
    "flow",
    "through",
    "attention",
    "blocks",
    "into",
    "logits",
    "that",
    "meet",
    "their",
    "labels",
    "at",
    "the",
    "loss",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, str]:
    """64 text records of very uneven lengths (3 to ~90 words) and a 512-token BPE."""
    from omniweave.data.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    texts = []
    for index in range(64):
        length = rng.choice([3, 5, 8, 13, 40, 90]) + index % 4
        texts.append(" ".join(rng.choice(WORDS) for _ in range(length)))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    tokenizer = root / "tokenizer"
    train_tokenizer(texts, vocab_size=512, out_dir=str(tokenizer))
    return {"train_path": str(data), "tokenizer_path": str(tokenizer)}
