"""Damaged checkpoints: the manifest catches a missing, truncated or altered file; resuming
with ``auto`` falls back to the newest intact checkpoint and ends on the straight run's
losses; an explicit damaged checkpoint is a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from omniweave.train.manifest import record_folder, verify
from tests.test_faults import _config, _losses

CONSTANT = ["--train.lr_schedule=constant", "--train.warmup_steps=0"]


def test_verify_names_what_is_wrong(tmp_path):
    folder = tmp_path / "step_00000005"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(os.urandom(5000))
    (folder / ".metadata").write_bytes(b"metadata")
    assert verify(str(folder)) == "no manifest.json: its save never finished"
    record_folder(str(folder))
    assert verify(str(folder)) is None
    data = bytearray((folder / "__0_0.distcp").read_bytes())
    data[1234] ^= 1  # same size, one bit flipped: only the checksum sees it
    (folder / "__0_0.distcp").write_bytes(bytes(data))
    assert verify(str(folder), checksums=False) is None
    assert verify(str(folder)) == "__0_0.distcp does not match its checksum"
    (folder / "__0_0.distcp").write_bytes(bytes(data[:2500]))
    assert verify(str(folder)) == "__0_0.distcp has 2,500 bytes, 5,000 were written"
    (folder / ".metadata").unlink()
    assert verify(str(folder)) == ".metadata is missing"


def _omniweave(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "omniweave.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    """A 2-process run of 30 steps (constant LR) and its losses."""
    tmp_path = tmp_path_factory.mktemp("straight")
    result = _omniweave("train", _config(tmp_path, corpus, "run"), "--nproc", "2", *CONSTANT)
    assert result.returncode == 0, result.stderr
    return _losses(str(tmp_path / "run"))


def test_damaged_checkpoints_are_set_aside_and_the_run_resumes_from_an_intact_one(
    tmp_path, corpus, straight
):
    config = _config(tmp_path, corpus, "run", keep_last=3)
    first = _omniweave("train", config, "--nproc", "2", *CONSTANT, "--train.max_steps=20")
    assert first.returncode == 0, first.stderr
    run, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["latest", *(f"step_{s:08d}" for s in (10, 15, 20))]
    shard = folder / "step_00000020" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    (folder / "step_00000015" / ".metadata").unlink()
    listed = _omniweave("checkpoint", "verify", str(run))
    assert listed.returncode == 1, listed.stdout + listed.stderr
    assert "1 intact, 2 damaged" in listed.stdout and "20 (latest)" in listed.stdout

    resumed = _omniweave("train", config, "--nproc", "2", *CONSTANT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {folder / 'step_00000020'} is damaged (__1_0.distcp has" in resumed.stdout
    assert f"{folder / 'step_00000015'} is damaged (.metadata is missing)" in resumed.stdout
    assert f"resumed from {folder / 'step_00000010'} at step 10" in resumed.stdout
    assert _losses(str(run)) == straight  # nothing lost: no row missing, doubled or changed
    kept = ["latest", "step_00000015.damaged", "step_00000020.damaged"]
    kept += [f"step_{s:08d}" for s in (20, 25, 30)]
    assert sorted(os.listdir(folder)) == sorted(kept)
    assert _omniweave("checkpoint", "verify", str(run)).returncode == 0


RANK_1_DIES_DURING_A_SAVE = """
import os, signal
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import torch.distributed.checkpoint as dcp

    save = dcp.save
    def save_then_die(state, checkpoint_id, **kwargs):
        save(state, checkpoint_id=checkpoint_id, **kwargs)
        if "step_00000010" in str(checkpoint_id):  # its shard written, the save not complete
            os.kill(os.getpid(), signal.SIGKILL)
    dcp.save = save_then_die
"""


def test_a_rank_killed_during_a_save_is_restarted_and_loses_nothing(tmp_path, corpus, straight):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_1_DIES_DURING_A_SAVE)
    config = _config(tmp_path, corpus, "run")
    command = [sys.executable, "-m", "omniweave.cli", "train", config, "--nproc", "2"]
    command += [*CONSTANT, "--max-restarts", "1"]
    environment = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{os.getcwd()}")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "a worker failed; restarting all" in result.stdout
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step_00000005'}" in result.stdout
    assert _losses(str(tmp_path / "run")) == straight
    print(f"killed during a save: {time.monotonic() - started:.1f} s in all, nothing lost")


def test_an_explicit_damaged_checkpoint_is_a_one_line_error(tmp_path, corpus):
    config = _config(tmp_path, corpus, "run")
    first = _omniweave("train", config, "--parallel.dp_shard=1", "--train.max_steps=5")
    assert first.returncode == 0, first.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000005"
    (checkpoint / "__0_0.distcp").unlink()
    again = _omniweave(
        "train", config, "--parallel.dp_shard=1", f"--checkpoint.resume={checkpoint}"
    )
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"omniweave: error: checkpoint.resume: '{checkpoint}' is damaged or incomplete "
        "(__0_0.distcp is missing); `omniweave checkpoint verify RUN` lists the intact ones, "
        "or use 'auto'."
    ]
