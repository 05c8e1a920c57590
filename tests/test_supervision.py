"""The processes of a run: killing the launcher leaves no worker behind, one run per output
folder, errors found inside the workers reach the user as one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.test_faults import _config, _worker

LAUNCH = [sys.executable, "-m", "omniweave.cli", "train"]
MARK = "OMNIWEAVE_TEST_CONFIG"  # in the environment of every process a test run starts


def _marked(config: str) -> dict:
    return {**os.environ, MARK: config}


def _start(config: str, *extra: str) -> subprocess.Popen:
    """``omniweave train CONFIG --nproc 2`` in a session of its own (a job's process group)."""
    return subprocess.Popen(
        [*LAUNCH, config, "--nproc", "2", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=_marked(config),
    )


def _wait_for_rows(job: subprocess.Popen, metrics, rows: int) -> None:
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= rows):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)


def _processes_of(config: str) -> list[int]:
    """Live processes (not zombies) of the run of ``config``: ranks, data workers, their
    fork server (the environment names it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environment = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{MARK}={config}".encode() in environment and state != "Z":
            found.append(int(pid))
    return found


def test_killing_the_launcher_stops_every_worker(tmp_path, corpus):
    config = _config(tmp_path, corpus, "run")
    job = _start(config, "--train.max_steps=100000")
    _wait_for_rows(job, tmp_path / "run" / "metrics.jsonl", 12)
    assert {_worker(config, 0), _worker(config, 1)} <= set(_processes_of(config))
    os.killpg(job.pid, signal.SIGKILL)  # as a scheduler does; workers have sessions of their own
    job.wait()
    killed = time.monotonic()
    while _processes_of(config) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    assert not _processes_of(config), f"alive 10 s after the launcher: {_processes_of(config)}"


def test_killing_a_plain_torchrun_stops_its_workers(tmp_path, corpus):
    config = _config(tmp_path, corpus, "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "omniweave.cli", "train", config, "--train.max_steps=100000"]
    job = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_marked(config)
    )
    _wait_for_rows(job, tmp_path / "run" / "metrics.jsonl", 12)
    job.kill()  # torchrun alone: its workers run in sessions of their own
    job.wait()
    killed = time.monotonic()
    while _processes_of(config) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    assert not _processes_of(config), f"alive 10 s after torchrun: {_processes_of(config)}"


def test_a_second_run_on_a_busy_output_folder_is_refused_and_a_dead_ones_lock_taken_over(
    tmp_path, corpus
):
    config = _config(tmp_path, corpus, "run")
    first = _start(config, "--train.max_steps=100000")
    _wait_for_rows(first, tmp_path / "run" / "metrics.jsonl", 6)  # step 5 saved
    for extra in (["--nproc", "2"], ["--parallel.dp_shard=1"]):
        second = subprocess.run([*LAUNCH, config, *extra], capture_output=True, text=True)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"omniweave: error: train.output_dir '{tmp_path / 'run'}' is in use by another run "
            f"(host {os.uname().nodename}, pid {first.pid}); wait for it to end, stop it, or "
            "choose another output_dir."
        ]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    while _processes_of(config):
        time.sleep(0.1)
    third = subprocess.run(
        [*LAUNCH, config, "--parallel.dp_shard=1", "--train.max_steps=12"],
        capture_output=True,
        text=True,
    )
    assert third.returncode == 0, third.stderr
    assert f"from host {os.uname().nodename}, pid {first.pid}, which is no longer running" in (
        third.stdout
    )
    assert "resumed from" in third.stdout  # the dead run's checkpoint


def test_errors_inside_the_workers_are_one_line(tmp_path, corpus):
    config = _config(tmp_path, corpus, "run")
    (tmp_path / "a_file").write_text("")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with open(corpus["train_path"]) as f:
        lines = f.readlines()
    late = tmp_path / "late.jsonl"  # a bad record past the first ones the launcher checks
    late.write_text("".join(lines * 3) + '{"text": 5}\n' + "".join(lines))
    cases = [
        ([f"--train.output_dir={tmp_path / 'a_file'}"], "is a file; give a folder."),
        ([f"--data.train_path={latin}"], f"{latin}, line 1: not valid UTF-8"),
        ([f"--data.train_path={late}", "--data.shuffle=false", "--train.max_steps=60"],
         f"{late}, line {3 * len(lines) + 1}: 'text' must be a string, got int"),
    ]  # fmt: skip
    for extra, expected in cases:
        result = subprocess.run(
            [*LAUNCH, config, "--nproc", "2", *extra], capture_output=True, text=True
        )
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("omniweave: error: ") and expected in result.stderr
    logs = tmp_path / "run" / "logs"  # the worker-side one: tracebacks kept for a look
    assert "Traceback" in (logs / "error_rank0.txt").read_text()


def test_a_stopped_rank_past_the_timeout_is_one_line_and_nothing_is_left(tmp_path, corpus):
    config = _config(tmp_path, corpus, "run")
    job = _start(config, "--train.max_steps=100000", "--parallel.timeout_s=4")
    _wait_for_rows(job, tmp_path / "run" / "metrics.jsonl", 3)
    os.kill(_worker(config, 1), signal.SIGSTOP)
    _, error = job.communicate(timeout=300)
    assert job.returncode == 1, error
    assert len(error.splitlines()) == 1, error
    assert "omniweave: rank 0 waited more than parallel.timeout_s=4 s at step" in error
    where = r"at step \d+ in \w+ \(called from \S+/omniweave/\S+\.py:\d+ in \w+\): another rank"
    assert re.search(where, error), error  # the collective, and the line of ours that waited
    assert not _processes_of(config)


def test_sigterm_to_the_launcher_checkpoints_and_stops_in_one_line(tmp_path, corpus):
    from omniweave.train.checkpoint import resolve_resume

    config = _config(tmp_path, corpus, "run")
    job = _start(config, "--train.max_steps=100000")
    _wait_for_rows(job, tmp_path / "run" / "metrics.jsonl", 7)
    job.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler's preemption notice
    _, error = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, error
    assert len(error.splitlines()) == 1, error
    saved = resolve_resume("auto", str(tmp_path / "run"))
    step = int(saved[-8:])
    assert (
        error == f"omniweave: stopped by SIGTERM (preemption). Checkpoint of step {step}: {saved}\n"
    )
    assert not _processes_of(config)
