"""Training on every kind of source: each trains alike at 1 and 2 processes, and a run on a
sharded source saved at 2 processes and resumed at 4 continues the straight run."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omniweave.config import load_config
from tests.distributed import run_distributed
from tests.models import TINY

STEPS, SAVED = 6, 3


def _train(runs: list[list[str]]) -> list[list[float]]:
    from omniweave.train.trainer import Trainer

    return [[row["loss"] for row in Trainer(load_config(None, args)).run()] for args in runs]


def _args(corpus: dict, data: dict, out: str, **settings) -> list[str]:
    base = {
        "model.config": TINY["qwen2"],
        "data.tokenizer_path": corpus["tokenizer_path"],
        "data.max_seq_len": 64,
        **data,
        "train.output_dir": out,
        "train.max_steps": STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.lr": 3e-3,
        "train.log_every": 1,
        "train.peak_flops": 1e12,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    return [f"--{key}={json.dumps(value)}" for key, value in {**base, **settings}.items()]


@pytest.fixture(scope="module")
def sources(corpus, tmp_path_factory) -> dict[str, dict]:
    """The corpus's texts as each kind of source, as ``data.*`` settings."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    with open(corpus["train_path"]) as f:
        texts = [json.loads(line)["text"] for line in f]
    shards = root / "shards"
    shards.mkdir()
    for part in range(3):
        with gzip.open(shards / f"part-{part}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[part::3])
    alpaca = [{"instruction": t.split()[0], "input": "", "output": t} for t in texts]
    (root / "alpaca.json").write_text(json.dumps(alpaca, indent=1))
    with open(root / "sharegpt.jsonl", "w") as f:
        for t in texts:
            turns = [{"from": "human", "value": t[:9]}, {"from": "gpt", "value": t}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    pq.write_table(pa.table({"text": texts}), root / "train.parquet", row_group_size=16)
    datasets.Dataset.from_list([{"text": t} for t in texts]).save_to_disk(root / "arrow")
    mix = [{"path": str(shards), "weight": 3}, {"path": str(root / "alpaca.json"), "weight": 1}]
    return {
        "gz directory": {"data.train_path": str(shards)},
        "glob": {"data.train_path": str(shards / "part-*.jsonl.gz")},
        "alpaca json": {"data.train_path": str(root / "alpaca.json")},
        "sharegpt": {"data.train_path": str(root / "sharegpt.jsonl")},
        "parquet": {"data.train_path": str(root / "train.parquet")},
        "datasets": {"data.train_path": str(root / "arrow")},
        "mixture": {"data.sources": mix},
    }


def test_every_source_kind_trains_alike_at_1_and_2_processes(corpus, sources, tmp_path):
    runs = {
        procs: [
            _args(corpus, data, str(tmp_path / f"{procs}-{name.replace(' ', '_')}"))
            for name, data in sources.items()
        ]
        for procs in (1, 2)
    }
    one = run_distributed(_train, 1, runs[1])[0]
    two = run_distributed(_train, 2, runs[2])[0]
    for name, a, b in zip(sources, one, two, strict=True):
        assert len(a) == STEPS and a == pytest.approx(b, rel=1e-5), name
    directory, glob = one[0], one[1]
    assert directory == glob  # the same shards in the same order
    assert one[0] != pytest.approx(one[2], rel=1e-3)  # alpaca's prompts are not learned


def test_resume_at_4_processes_on_a_sharded_source_continues_the_straight_run(
    corpus, sources, tmp_path
):
    data = {
        **sources["gz directory"],
        "data.packing": True,
        "data.max_tokens_per_microbatch": 96,
        "checkpoint.every_steps": SAVED,
    }
    straight = _args(corpus, data, str(tmp_path / "straight"))
    (losses,) = run_distributed(_train, 2, [straight])[0]
    saved = os.path.join(tmp_path, "straight", "checkpoints", f"step_{SAVED:08d}")
    resumed_args = _args(corpus, data, str(tmp_path / "resumed"), **{"checkpoint.resume": saved})
    (resumed,) = run_distributed(_train, 4, [resumed_args])[0]
    assert len(resumed) == STEPS - SAVED
    for a, b in zip(losses[SAVED:], resumed, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
