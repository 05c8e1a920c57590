"""A 2-node launch (two ``torchrun --nnodes 2`` on this machine, meeting through a c10d
rendezvous) trains the same curve as the single-node run of the same layout: here a
pipeline whose two stages may sit on different nodes, each stage FSDP-sharded over two
ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.distributed import _free_port
from tests.models import TINY

STEPS = 4


def _config(tmp_path, corpus, name: str) -> str:
    model = {**TINY["llama"], "num_hidden_layers": 4, "tie_word_embeddings": False}
    config = {
        "model": {"config": model},
        "data": {**corpus, "max_seq_len": 64, "packing": True},
        "parallel": {"pp": 2, "dp_shard": 2},
        "train": {
            "output_dir": str(tmp_path / name),
            "max_steps": STEPS,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "log_every": 1,
            "peak_flops": 1e12,
        },
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _losses(run: str) -> list[float]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return [row["loss"] for row in rows]


def test_two_nodes_train_like_one(tmp_path, corpus):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = _config(tmp_path, corpus, "single")
    command = [sys.executable, "-m", "omniweave.cli", "train", single, "--nproc", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stdout + done.stderr

    nodes = _config(tmp_path, corpus, "nodes")
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2"]
    launch += ["--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=two-nodes"]
    launch += ["-m", "omniweave.cli", "train", nodes]
    agents = [
        subprocess.Popen(
            launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        for _ in range(2)
    ]
    for agent in agents:
        output, _ = agent.communicate(timeout=600)
        assert agent.returncode == 0, output

    straight, spread = _losses(str(tmp_path / "single")), _losses(str(tmp_path / "nodes"))
    for a, b in zip(straight, spread, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (straight, spread)
