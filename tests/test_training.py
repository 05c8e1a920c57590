"""A training run's outputs, precision and offload options, and layout-independent init."""

from __future__ import annotations

import json
import os

import pytest

from omniweave.config import load_config
from tests.distributed import run_distributed
from tests.models import IN_PROCESS_DATA, TINY, hf_model

KEYS = {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu", "peak_mem_gb"}


def _train(runs: dict[str, list[str]]) -> dict[str, list[float]]:
    from omniweave.train.trainer import Trainer

    return {
        name: [row["loss"] for row in Trainer(load_config(None, overrides)).run()]
        for name, overrides in runs.items()
    }


def _args(corpus: dict, out: str, **settings) -> list[str]:
    base = {
        "data.train_path": corpus["train_path"],
        "data.tokenizer_path": corpus["tokenizer_path"],
        "data.max_seq_len": 64,
        "train.output_dir": out,
        "train.max_steps": 4,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.lr": 1e-3,
        "train.peak_flops": 1e12,
        **IN_PROCESS_DATA,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    return [f"--{key}={json.dumps(value)}" for key, value in {**base, **settings}.items()]


@pytest.fixture(scope="module")
def curves(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = root / "model"
    hf_model("qwen2", seed=2).save_pretrained(model)
    path = {"model.path": str(model)}
    random_init = {"model.config": TINY["qwen2"], "train.seed": 5}
    logged = {"log.tensorboard": True, "log.plot": True}
    two = {
        "fp32": _args(corpus, str(root / "fp32"), **path, **logged),
        "offload": _args(corpus, str(root / "off"), **path, **{"parallel.cpu_offload": True}),
        "bf16": _args(corpus, str(root / "bf16"), **path, **{"model.dtype": "bfloat16"}),
        "random init": _args(corpus, str(root / "init2"), **random_init),
    }
    short = {"data.max_seq_len": 16, **random_init}
    packed = {"data.packing": True, "data.max_tokens_per_microbatch": 64}
    one = {
        "random init": _args(corpus, str(root / "init1"), **random_init),
        "drop": _args(corpus, str(root / "drop"), **short, **{"data.on_overlong": "drop"}),
        "truncate": _args(corpus, str(root / "truncate"), **short, **packed),
    }
    return {
        "root": root,
        "two": run_distributed(_train, 2, two)[0],
        "one": run_distributed(_train, 1, one)[0],
    }


def test_outputs(curves):
    out = curves["root"] / "fp32"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row.keys() >= KEYS
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["peak_mem_gb"] > 0
    assert [row["loss"] for row in rows] == curves["two"]["fp32"]
    assert all(a["tokens"] < b["tokens"] for a, b in zip(rows, rows[1:], strict=False))
    resolved = load_config(str(out / "config.yaml"))
    assert resolved.train.output_dir == str(out) and resolved.train.max_steps == 4
    assert (out / "loss.png").stat().st_size > 1000
    assert any(name.startswith("events.out") for name in os.listdir(out / "tensorboard"))


def test_cpu_offload_is_exact(curves):
    assert curves["two"]["offload"] == pytest.approx(curves["two"]["fp32"], rel=1e-5)


def test_bf16_mixed_precision_is_close_but_applied(curves):
    fp32, bf16 = curves["two"]["fp32"], curves["two"]["bf16"]
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != pytest.approx(fp32, rel=1e-6)


def test_random_init_is_layout_independent(curves):
    assert curves["two"]["random init"] == pytest.approx(curves["one"]["random init"], rel=1e-5)
    assert curves["two"]["random init"] != pytest.approx(curves["two"]["fp32"], rel=1e-3)


def test_overlong_samples_are_counted_in_metrics(curves, corpus):
    """Each row counts the over-long records among those its run has read so far."""
    from omniweave.data.loader import load_samples
    from omniweave.data.order import SampleOrder
    from omniweave.data.processors import load_tokenizer

    tokenizer = load_tokenizer(corpus["tokenizer_path"])
    samples, _, _ = load_samples(corpus["train_path"], tokenizer, 10_000, "error")
    overlong = [len(sample.input_ids) > 16 for sample in samples]
    order = SampleOrder([len(samples)], [1.0], 4, seed=5)

    def rows(name):
        text = (curves["root"] / name / "metrics.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    def expected(row):
        return sum(overlong[i] for step in range(row["step"]) for _, i in order.global_batch(step))

    assert expected(rows("drop")[-1]) > 0
    for row in rows("drop"):
        assert (row["samples_dropped"], row["samples_truncated"]) == (expected(row), 0)
    for row in rows("truncate"):  # packed under a 64-token budget
        assert (row["samples_dropped"], row["samples_truncated"]) == (0, expected(row))
        assert row["non_padding"] == 1.0
