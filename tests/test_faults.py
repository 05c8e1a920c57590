"""Faults: a rank killed mid-run under ``--max-restarts`` comes back and the run ends as the
uninterrupted one; a job killed while a checkpoint is being written keeps ``latest``."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
import yaml

from omniweave.train.checkpoint import resolve_resume
from tests.models import TINY

STEPS = 30


def _config(tmp_path, corpus, name: str, **checkpoint) -> str:
    config = {
        "model": {"config": TINY["qwen2"]},
        "data": {**corpus, "max_seq_len": 64},
        "parallel": {"dp_shard": 2},
        "train": {
            "output_dir": str(tmp_path / name),
            "max_steps": STEPS,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "lr_schedule": "cosine",
            "warmup_steps": 2,
            "log_every": 1,
            "peak_flops": 1e12,
        },
        "checkpoint": {"every_steps": 5, **checkpoint},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _losses(run: str, steps: int = STEPS) -> list[float]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    return [row["loss"] for row in rows]


def _train(config: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "omniweave.cli", "train", config, "--nproc", "2", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _worker(config: str, rank: int) -> int:
    """The pid of the torchrun worker of ``rank`` training ``config``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if config.encode() in args and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} worker of {config}")


def test_killed_rank_restarts_and_resumes(tmp_path, corpus):
    straight = _train(_config(tmp_path, corpus, "straight"))
    output, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, output
    config = _config(tmp_path, corpus, "killed", keep_last=2)
    job = _train(config, "--max-restarts", "1")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 7):
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
        time.sleep(0.05)
    os.kill(_worker(config, 1), signal.SIGKILL)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output
    assert "resumed from" in output and "step_00000005" in output, output
    assert "leaked" not in output, output  # the resource tracker's warning after the kill
    assert _losses(str(tmp_path / "killed")) == _losses(str(tmp_path / "straight"))
    kept = sorted(os.listdir(tmp_path / "killed" / "checkpoints"))
    assert kept == ["latest", "step_00000025", "step_00000030"]  # checkpoint.keep_last: 2


ONE_PROCESS = "--parallel.dp_shard=1"
KILL_DURING_SAVE = """
import os, signal, sys
import torch.distributed.checkpoint as dcp
from omniweave.cli import main

save = dcp.save
def save_then_die(state, checkpoint_id, **kwargs):
    save(state, checkpoint_id=checkpoint_id, **kwargs)
    if "step_00000010" in str(checkpoint_id):  # written, not yet renamed nor in `latest`
        os.kill(os.getpid(), signal.SIGKILL)
dcp.save = save_then_die
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path, corpus):
    config = _config(tmp_path, corpus, "run")
    script = tmp_path / "kill_during_save.py"
    script.write_text(textwrap.dedent(KILL_DURING_SAVE))
    killed = subprocess.run(
        [sys.executable, str(script), config, ONE_PROCESS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    run = tmp_path / "run"
    assert sorted(os.listdir(run / "checkpoints")) == [
        "latest",
        "step_00000005",
        "step_00000010.tmp",
    ]
    assert resolve_resume("auto", str(run)).endswith("step_00000005")
    resumed = subprocess.run(
        [sys.executable, "-m", "omniweave.cli", "train", config, ONE_PROCESS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "step_00000005" in resumed.stdout
    assert len(_losses(str(run))) == STEPS
    assert not (run / "checkpoints" / "step_00000010.tmp").exists()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, corpus):
    one = ["--parallel.dp_shard=1", "--train.max_steps=200"]
    straight = subprocess.run(
        [sys.executable, "-m", "omniweave.cli", "train", _config(tmp_path, corpus, "a"), *one],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr
    config = _config(tmp_path, corpus, "b")
    command = [sys.executable, "-m", "omniweave.cli", "train", config, *one]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "b" / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert job.poll() is None, job.stderr.read()
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    _, error = job.communicate(timeout=600)
    assert job.returncode == 128 + signal.SIGTERM, error
    assert "stopped by SIGTERM" in error
    stopped_at = resolve_resume("auto", str(tmp_path / "b"))
    assert not stopped_at.endswith("step_00000200")  # stopped early, on a step of its own
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {stopped_at}" in resumed.stdout
    assert _losses(str(tmp_path / "b"), 200) == _losses(str(tmp_path / "a"), 200)


def _poisoned_run(args: list[str], poisoned: set[int]) -> tuple[str | None, dict, list[dict]]:
    """Train with a NaN loss at the ``poisoned`` steps (0-based); returns the stop message,
    the full weights at the end and the metrics rows."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from omniweave.config import load_config
    from omniweave.train.control import TrainingStopped
    from omniweave.train.trainer import Trainer

    trainer = Trainer(load_config(None, args))
    token_loss, train_step, current = trainer._token_loss, trainer.train_step, [0]

    def step(index: int, batches=None) -> dict:
        current[0] = index
        return train_step(index, batches)

    def loss(batch):
        losses, targets, router_logits = token_loss(batch)
        return losses * (float("nan") if current[0] in poisoned else 1.0), targets, router_logits

    trainer.train_step, trainer._token_loss = step, loss
    try:
        trainer.run()
        stopped = None
    except TrainingStopped as error:
        stopped = str(error)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(trainer.model, options=options)
    with open(os.path.join(trainer.cfg.train.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return stopped, weights, rows


def _overrides(tmp_path, corpus, name: str, **settings) -> list[str]:
    with open(_config(tmp_path, corpus, name)) as f:
        config = yaml.safe_load(f)
    flat = {
        f"{section}.{key}": value for section, keys in config.items() for key, value in keys.items()
    }
    flat.update({"train.lr_schedule": "constant", "train.warmup_steps": 0, **settings})
    return [f"--{key}={json.dumps(value)}" for key, value in flat.items()]


def test_nan_steps_are_skipped_and_too_many_stop_the_run_with_a_good_checkpoint(tmp_path, corpus):
    from tests.distributed import run_distributed

    two_steps = _overrides(tmp_path, corpus, "clean", **{"train.max_steps": 2})
    (_, reference, _) = run_distributed(_poisoned_run, 2, two_steps, set())[0]
    stops = _overrides(tmp_path, corpus, "stops", **{"train.max_bad_steps": 2})
    stopped, weights, rows = run_distributed(_poisoned_run, 2, stops, {2, 3})[0]
    assert "2 steps in a row had a NaN/Inf loss" in stopped and "step_00000004" in stopped
    assert [row["skipped_steps"] for row in rows] == [0, 0, 1, 2]
    assert all(math.isnan(row["loss"]) == (row["step"] in (3, 4)) for row in rows)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
    assert resolve_resume("auto", str(tmp_path / "stops")).endswith("step_00000004")
    goes_on = _overrides(tmp_path, corpus, "goes_on", **{"train.max_steps": 6})
    stopped, _, rows = run_distributed(_poisoned_run, 2, goes_on, {1})[0]
    assert stopped is None and rows[-1]["skipped_steps"] == 1 and len(rows) == 6
