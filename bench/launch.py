"""Shared by the benchmarks: a saved model, `omniweave train` runs launched and watched from
outside (their metrics rows, step times and the memory of their process tree)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA, TOKENIZER = (os.path.join(ROOT, ".data", n) for n in ("fortunes.jsonl", "tokenizer"))
MODEL = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4)
MODEL |= dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
MODEL |= dict(max_position_embeddings=1024, tie_word_embeddings=True)
MAX_LEN, BATCH = 512, 16
# OmniWeave's optimizer settings in these benchmarks, as HF TrainingArguments (AdamW betas are
# OmniWeave's defaults; the rest is set on its side by omniweave_settings).
HF_OPTIMIZER = dict(
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.95,
    max_grad_norm=1.0,
)  # data.max_seq_len and samples per step, unless a benchmark says


def save_model(path: str, **overrides) -> str:
    """A randomly initialised Qwen2 (seed 0) as an HF folder, so every run starts alike."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = MODEL | overrides
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def write_config(path: str, settings: dict) -> str:
    """A YAML config from ``{"section.key": value}``."""
    import yaml

    tree: dict = {}
    for key, value in settings.items():
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = value
    with open(path, "w") as f:
        yaml.safe_dump(tree, f, sort_keys=False)
    return path


def omniweave_settings(model: str, data: str, out: str, steps: int) -> dict:
    """The settings both benchmarks share: packed rows, constant LR, logging every step."""
    return {
        "model.path": model,
        "data.train_path": data,
        "data.tokenizer_path": TOKENIZER,
        "data.max_seq_len": MAX_LEN,
        "data.packing": True,
        "train.output_dir": out,
        "train.max_steps": steps,
        "train.global_batch_size": BATCH,
        "train.lr": 1e-3,
        "train.lr_schedule": "constant",
        "train.weight_decay": 0.0,
        "train.log_every": 1,
        "train.peak_flops": 1e12,  # no GEMM measurement at start-up
        "checkpoint.resume": "none",
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }


def parse_sets(pairs: list[str]) -> dict:
    """``--set data.num_workers=0`` arguments as settings (values parsed as YAML)."""
    import yaml

    return {key: yaml.safe_load(value) for key, value in (p.split("=", 1) for p in pairs)}


def tree_rss(pid: int) -> dict[int, int]:
    """Resident bytes of ``pid`` and each of its descendants (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_rss(pid)
    rss = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                rss[p.pid] = p.memory_info().rss
    return rss


def _proc_tree_rss(pid: int) -> dict[int, int]:
    rss, todo, page = {}, [pid], os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/statm") as f:
                rss[p] = int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return rss


def step_tokens(rows: list[dict]) -> list[int]:
    """Each logged step's tokens (``log_every: 1``; ``tokens`` is a running total)."""
    totals = [r["tokens"] for r in rows]
    return [b - a for a, b in zip([0, *totals[:-1]], totals, strict=True)]


def step_seconds(rows: list[dict]) -> list[float]:
    """Each logged step's time: its tokens over its tokens/s."""
    return [t / r["tokens_per_s"] for t, r in zip(step_tokens(rows), rows, strict=True)]


def launch(command: list[str], env: dict, log: str, metrics: str | None = None) -> dict:
    """Run ``command`` to its end, polling its process tree's memory and, where given, when
    ``metrics`` (a ``metrics.jsonl``) got its first row. Returns the exit code, the rows,
    ``error`` (a line of the log, or None), ``start`` and ``first_row`` (epoch seconds),
    ``peak_process_gb`` (the largest process) and ``peak_tree_gb`` (all of them at once)."""
    peak_each = peak_tree = 0
    first_row = None
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            rss = tree_rss(proc.pid)
            peak_each = max(peak_each, *rss.values(), 0)
            peak_tree = max(peak_tree, sum(rss.values()))
            if metrics and first_row is None and os.path.isfile(metrics):
                stamp = os.path.getmtime(metrics)
                rows = _rows(metrics)
                if rows:  # written at the end of the last row's step: go back to the first's
                    first_row = stamp - sum(step_seconds(rows)[1:])
            time.sleep(0.1)
    result = dict(code=proc.returncode, start=start, first_row=first_row, error=None)
    result |= dict(peak_process_gb=peak_each / 1e9, peak_tree_gb=peak_tree / 1e9)
    result["rows"] = _rows(metrics) if metrics and os.path.isfile(metrics) else []
    if proc.returncode:
        result["error"] = error_line(log, proc.returncode)
    return result


def run_omniweave(name: str, settings: dict, nproc: int, threads: int) -> dict:
    """``omniweave train`` on ``settings`` in a fresh ``train.output_dir`` (see ``launch``)."""
    out = settings["train.output_dir"]
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    config = write_config(f"{out}.yaml", settings)
    omniweave = os.path.join(os.path.dirname(sys.executable), "omniweave")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [omniweave, "train", config, "--nproc", str(nproc)]
    print(f"bench: {name}: {shlex.join(command)}", file=sys.stderr, flush=True)
    return launch(command, env, f"{out}.log", os.path.join(out, "metrics.jsonl"))


def error_line(log: str, code: int) -> str:
    """The first error a failed run printed (for a table cell)."""
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    pattern = re.compile(r"^(omniweave: error|[\w.]*(Error|Exception)\b:?)")
    found = [line for line in lines if pattern.match(line) and "ChildFailedError" not in line]
    line = (found or lines or ["no output"])[0]
    return f"exit {code}: {line[:150]}".replace("|", "/")


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]
