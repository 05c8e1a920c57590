"""Faults injected into a 2-process run, and what each cost: whether the run ended on the
straight run's losses with every metrics row once, the seconds it lost (its wall time over
the straight run's, or how long until the job was gone), and how many lines it printed.

A small Qwen2 (hidden 64 x 2 layers) on the fortunes with the benchmarks' tokenizer,
``--nproc 2``, 40 steps of 8 samples, a checkpoint every 5 steps, constant LR. Faults:

- a rank killed (SIGKILL) mid-step at step ~12, under ``--max-restarts 1``;
- a rank killed after writing its shard of the step-10 checkpoint, before the save completed
  (a ``sitecustomize`` hook in the workers), under ``--max-restarts 1``;
- a run stopped at step 20 whose newest checkpoint has a shard cut to half and whose one
  before has lost ``.metadata``, then resumed with ``checkpoint.resume: auto``;
- the launcher's process group killed (SIGKILL) mid-run: seconds until no worker is left;
- a second run started on the output folder of a live one: refused;
- a rank stopped (SIGSTOP) with ``parallel.timeout_s: 5``: seconds until the job ended;
- a bad record deep in the data (past the first records the launcher checks).

    make .data/tokenizer && .venv/bin/python bench/recovery.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from launch import DATA, ROOT, TOKENIZER, write_config

OUT = os.path.join(ROOT, "runs", "bench-recovery")
STEPS = 40
MODEL = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
MODEL |= dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=4096)
HOOK = """
import os, signal
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import torch.distributed.checkpoint as dcp

    save = dcp.save
    def save_then_die(state, checkpoint_id, **kwargs):
        save(state, checkpoint_id=checkpoint_id, **kwargs)
        if "step_00000010" in str(checkpoint_id):
            os.kill(os.getpid(), signal.SIGKILL)
    dcp.save = save_then_die
"""


def config(name: str, **settings) -> tuple[str, str]:
    """A config file for the run ``name`` and its output folder."""
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    values = {
        "model.config": MODEL,
        "data.train_path": settings.pop("data", DATA),
        "data.tokenizer_path": TOKENIZER,
        "data.max_seq_len": 128,
        "train.output_dir": out,
        "train.max_steps": STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.lr_schedule": "constant",
        "train.log_every": 1,
        "train.peak_flops": 1e12,
        "checkpoint.every_steps": 5,
        "checkpoint.keep_last": 0,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    return write_config(f"{out}.yaml", values | settings), out


def start(path: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    omniweave = os.path.join(os.path.dirname(sys.executable), "omniweave")
    return subprocess.Popen(
        [omniweave, "train", path, "--nproc", "2", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )


def rows(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_rows(job: subprocess.Popen, out: str, count: int) -> None:
    while len(rows(out)) < count:
        if job.poll() is not None:
            raise RuntimeError(job.stdout.read())
        time.sleep(0.05)


def processes(path: str) -> list[int]:
    """Live processes whose command line names the config ``path``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                named = path.encode() in f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                live = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            continue
        if named and live:
            found.append(int(pid))
    return found


def rank_pid(path: str, rank: int) -> int:
    for pid in processes(path):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise RuntimeError(f"no rank {rank} of {path}")


def finish(job: subprocess.Popen) -> tuple[int, list[str]]:
    output, _ = job.communicate(timeout=600)
    return job.returncode, [line for line in output.splitlines() if line.strip()]


def outcome(out: str, straight: list[float]) -> str:
    losses = [row["loss"] for row in rows(out)]
    steps = [row["step"] for row in rows(out)]
    ok = steps == list(range(1, STEPS + 1)) and losses == straight
    return "same losses, every row once" if ok else f"DIFFERENT ({len(steps)} rows)"


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    table = []
    path, out = config("straight")
    began = time.monotonic()
    code, _ = finish(start(path))
    base = time.monotonic() - began
    assert code == 0, f"the straight run failed: {OUT}/straight"
    straight = [row["loss"] for row in rows(out)]

    path, out = config("kill-mid-step")
    began = time.monotonic()
    job = start(path, "--max-restarts", "1")
    wait_rows(job, out, 12)
    os.kill(rank_pid(path, 1), signal.SIGKILL)
    code, lines = finish(job)
    table.append(("rank SIGKILL mid-step (step 12)", code, outcome(out, straight),
                  f"{time.monotonic() - began - base:+.1f} (vs straight)", len(lines)))  # fmt: skip

    path, out = config("kill-mid-save")
    hook = os.path.join(OUT, "hook")
    os.makedirs(hook, exist_ok=True)
    with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
        f.write(HOOK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([hook, ROOT]))
    began = time.monotonic()
    code, lines = finish(start(path, "--max-restarts", "1", env=env))
    table.append(("rank SIGKILL during the step-10 save", code, outcome(out, straight),
                  f"{time.monotonic() - began - base:+.1f} (vs straight)", len(lines)))  # fmt: skip

    path, out = config("damaged")
    began = time.monotonic()
    finish(start(path, "--train.max_steps=20"))
    checkpoints = os.path.join(out, "checkpoints")
    shard = os.path.join(checkpoints, "step_00000020", "__1_0.distcp")
    os.truncate(shard, os.path.getsize(shard) // 2)
    os.remove(os.path.join(checkpoints, "step_00000015", ".metadata"))
    code, lines = finish(start(path))
    table.append(("newest checkpoint cut short, the one before without .metadata", code,
                  outcome(out, straight), f"{time.monotonic() - began - base:+.1f} (vs straight, "
                  "a second start-up included)", len(lines)))  # fmt: skip

    path, out = config("launcher-killed", **{"train.max_steps": 100000})
    job = start(path)
    wait_rows(job, out, 5)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed = time.monotonic()
    while processes(path):
        time.sleep(0.05)
    table.append(("launcher's process group SIGKILLed", "-9", "no worker left",
                  f"{time.monotonic() - killed:.1f} until no worker", 0))  # fmt: skip

    path, out = config("busy", **{"train.max_steps": 100000})
    job = start(path)
    wait_rows(job, out, 2)
    began = time.monotonic()
    code, lines = finish(start(path))
    refused = time.monotonic() - began
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    table.append(("second run on a busy output folder", code, "refused, first run untouched",
                  f"{refused:.1f} to refuse", len(lines)))  # fmt: skip

    path, out = config("stopped", **{"train.max_steps": 100000, "parallel.timeout_s": 5})
    job = start(path)
    wait_rows(job, out, 5)
    os.kill(rank_pid(path, 1), signal.SIGSTOP)
    stopped = time.monotonic()
    code, lines = finish(job)
    left = len(processes(path))
    table.append(("rank SIGSTOPped, parallel.timeout_s 5", code,
                  f"one-line stop, {left} processes left",
                  f"{time.monotonic() - stopped:.1f} until the job ended", len(lines)))  # fmt: skip

    bad = os.path.join(OUT, "late-bad-record.jsonl")
    with open(DATA) as f:
        head = [next(f) for _ in range(500)]
    with open(bad, "w") as f:
        f.writelines(head + ['{"text": 5}\n'] + head)
    path, out = config("bad-record", data=bad, **{"data.shuffle": False, "train.max_steps": 80})
    code, lines = finish(start(path))
    table.append(("bad record at line 501", code, lines[-1][:60] + "...", "-", len(lines)))

    print(f"{STEPS} steps, 2 processes; the straight run took {base:.1f} s\n")
    print("| fault | exit | outcome | seconds lost | lines printed |")
    print("| --- | ---: | --- | ---: | ---: |")
    for fault, code, result, seconds, printed in table:
        print(f"| {fault} | {code} | {result} | {seconds} | {printed} |")


if __name__ == "__main__":
    main()
