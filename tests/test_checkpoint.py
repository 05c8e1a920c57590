"""Checkpoints: a run resumed from its step-5 checkpoint continues exactly as the run that
went straight on, on the same layout (bitwise) and on another one (within 1e-5)."""

from __future__ import annotations

import json
import os

import pytest

from omniweave.config import load_config
from omniweave.train.checkpoint import resolve_resume
from tests.distributed import run_distributed
from tests.models import IN_PROCESS_DATA, TINY

STEPS, SAVED = 10, 5


def _train(runs: list[list[str]]) -> list[list[float]]:
    from omniweave.train.trainer import Trainer

    return [[row["loss"] for row in Trainer(load_config(None, args)).run()] for args in runs]


def _args(corpus: dict, out: str, model: str, **settings) -> list[str]:
    base = {
        "model.config": TINY[model],
        "data.train_path": corpus["train_path"],
        "data.tokenizer_path": corpus["tokenizer_path"],
        "data.max_seq_len": 64,
        "train.output_dir": out,
        "train.max_steps": STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.lr": 3e-3,
        "train.lr_schedule": "cosine",
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.peak_flops": 1e12,
        **IN_PROCESS_DATA,
        "checkpoint.every_steps": SAVED,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    return [f"--{key}={json.dumps(value)}" for key, value in {**base, **settings}.items()]


def _straight_and_resumed(corpus, root, model, first: dict, then: dict, procs=(4, 4)):
    """Losses of a straight run (``first`` layout, checkpoints every 5 steps) and of a run
    resumed from its step-5 checkpoint (``then`` layout, another output folder)."""
    straight = str(root / "straight")
    (losses,) = run_distributed(_train, procs[0], [_args(corpus, straight, model, **first)])[0]
    saved = os.path.join(straight, "checkpoints", f"step_{SAVED:08d}")
    resume = _args(corpus, str(root / "resumed"), model, **{"checkpoint.resume": saved}, **then)
    (resumed,) = run_distributed(_train, procs[1], [resume])[0]
    return losses, resumed


@pytest.mark.parametrize(
    "model,layout",
    [
        ("qwen2", {"parallel.dp_shard": 2, "parallel.sp": 2}),
        ("qwen3_moe", {"parallel.ep": 2, "checkpoint.async": True}),
    ],
)
def test_resume_on_the_same_layout_is_exact(corpus, tmp_path, model, layout):
    straight, resumed = _straight_and_resumed(corpus, tmp_path, model, layout, layout)
    assert len(straight) == STEPS and resumed == straight[SAVED:]
    names = sorted(os.listdir(tmp_path / "straight" / "checkpoints"))
    assert names == ["latest", f"step_{SAVED:08d}", f"step_{STEPS:08d}"]
    assert resolve_resume("auto", str(tmp_path / "straight")).endswith(f"step_{STEPS:08d}")


@pytest.mark.parametrize(
    "model,first,then,procs",
    [
        ("qwen2", {"parallel.dp_shard": 4}, {"parallel.dp_shard": 2, "parallel.sp": 2}, (4, 4)),
        # One micro-batch per rank in both: the router's aux loss is per micro-batch.
        ("qwen3_moe", {"parallel.ep": 2}, {"parallel.ep": 1, "train.micro_batch_size": 4}, (4, 2)),
    ],
)
def test_resume_on_another_layout(corpus, tmp_path, model, first, then, procs):
    straight, resumed = _straight_and_resumed(corpus, tmp_path, model, first, then, procs)
    for a, b in zip(straight[SAVED:], resumed, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
