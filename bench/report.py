"""``omniweave bench``: run every benchmark of ``bench/`` on this machine, one after another,
and write their tables, the machine and the commands to ``docs/benchmarks.md`` (plots to
``docs/benchmarks/``). Each script also runs alone; see its docstring.

    .venv/bin/python bench/report.py [--only NAME ...] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, script and arguments, what it answers)
BENCHMARKS = [
    ("hf_trainer", ["hf_trainer.py"], "OmniWeave vs Hugging Face Trainer; CPU MFU"),
    ("overhead", ["overhead.py"], "single-process overhead vs a raw PyTorch loop"),
    ("state_memory", ["state_memory.py"], "parameters + gradients + optimizer vs world size"),
    ("memory", ["memory.py"], "activation checkpointing and chunked cross-entropy"),
    ("long_context", ["long_context.py"], "longest trainable sequence vs sp and cp"),
    ("parallel", ["parallel.py"], "state memory and step time per layout at 4 processes"),
    ("packing", ["packing.py"], "padded vs packed micro-batches"),
    ("moe", ["moe.py"], "MoE step time vs ep; grouped GEMM vs loop"),
    ("overlap", ["overlap.py"], "async Ulysses and EP dispatch in parts vs synchronous"),
    ("scaling", ["scaling.py"], "tokens/s at 1, 2, 4 processes: fixed, budget, replicas; HF DDP"),
    ("data_scale", ["data_scale.py"], "1M-record corpus: start, memory, data wait; streaming"),
    ("recovery", ["recovery.py"], "injected faults: what each lost and how long it took"),
]


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical cores{memory}, {gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {platform.platform()}"
    )


def run(script: list[str]) -> tuple[str, float]:
    """The script's standard output (its tables) and its wall time."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script[0]), *script[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")),
    )
    seconds = time.perf_counter() - start
    if result.returncode:
        return f"failed (exit {result.returncode}):\n\n```\n{result.stderr[-2000:]}\n```", seconds
    return result.stdout.strip(), seconds


def _kept_sections(path: str) -> dict[str, str]:
    """The sections of an earlier report, by benchmark name (``--only`` replaces just its own)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        text = f.read()
    dated = re.search(r"measured on this machine, (\d{4}-\d\d-\d\d)", text)  # older reports
    sections = {}
    for part in text.split("\n## ")[1:]:
        if dated:  # "`command` (48 s)" -> "`command` (48 s, date)"
            part = re.sub(r"^(`[^`]*` \(\d+ s)\)", rf"\1, {dated[1]})", part, flags=re.M)
        sections[part.split(":", 1)[0]] = "## " + part.strip()
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in BENCHMARKS])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = parser.parse_args()
    chosen = [b for b in BENCHMARKS if not args.only or b[0] in args.only]
    sections = _kept_sections(args.out) if args.only else {}
    for name, script, question in chosen:
        print(f"bench: {name} ({question}) ...", flush=True)
        output, seconds = run(script)
        command = " ".join([".venv/bin/python", f"bench/{script[0]}", *script[1:]])
        sections[name] = (
            f"## {name}: {question}\n\n`{command}` ({seconds:.0f} s, {time.strftime('%Y-%m-%d')})"
            "\n\n"
            + "\n".join(line for line in output.splitlines() if not line.startswith("loss curves:"))
        )
    plots = os.path.join(os.path.dirname(args.out), "benchmarks")
    curve = os.path.join(ROOT, "runs", "bench", "hf_trainer_loss.png")
    if os.path.isfile(curve) and any(name == "hf_trainer" for name, _, _ in chosen):
        os.makedirs(plots, exist_ok=True)
        shutil.copy(curve, os.path.join(plots, "hf_trainer_loss.png"))
        sections["hf_trainer"] += "\n\n![loss curves](benchmarks/hf_trainer_loss.png)"
    text = (
        "# Benchmarks\n\nWritten by `omniweave bench` (`bench/report.py`); figures as measured "
        f"on this machine (each section gives its date).\n\nMachine: {machine()}.\n\n"
        + "\n\n".join(sections[name] for name, _, _ in BENCHMARKS if name in sections)
        + "\n"
    )
    with open(args.out, "w") as f:
        f.write(text)
    print(f"bench: {args.out}")


if __name__ == "__main__":
    main()
