"""Communication overlap: async Ulysses and EP dispatch in parts, vs their synchronous paths.

One job of ``--nproc`` gloo processes trains ``bench/moe.py``'s Qwen3-MoE on packed
fortunes rows: at ``sp`` = nproc with the value all-to-all started from the ``v_proj``
hook (``parallel.async_ulysses``) or not, and at ``ep`` = nproc with the dispatch in 1,
2 or 4 parts (``parallel.ep_chunks``). Prints median step times and ratios to each
synchronous path.

    .venv/bin/python bench/overlap.py [--steps N] [--warmup K] [--nproc P]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.moe import DATA, MODEL, TOKENIZER, time_layouts  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layout first")
    parser.add_argument("--nproc", type=int, default=2, help="processes (gloo): the sp and ep")
    parser.add_argument("--batch", type=int, default=32, help="train.global_batch_size")
    parser.add_argument("--budget", type=int, default=2048, help="max_tokens_per_microbatch")
    args = parser.parse_args()
    if not (os.path.isfile(DATA) and os.path.isdir(TOKENIZER)):
        sys.exit(f"bench/overlap.py: {DATA} or {TOKENIZER} is missing; run `make .data/tokenizer`")
    base = [
        f"--model.config={json.dumps(MODEL)}", f"--data.train_path={DATA}",
        f"--data.tokenizer_path={TOKENIZER}", "--data.max_seq_len=512", "--data.packing=true",
        f"--data.max_tokens_per_microbatch={args.budget}",
        f"--train.global_batch_size={args.batch}", "--train.peak_flops=1e12",
        f"--train.max_steps={args.warmup + args.steps}", "--train.output_dir=runs/bench-overlap",
        "--log.progress=false", "--log.tensorboard=false", "--log.plot=false",
    ]  # fmt: skip
    n = args.nproc
    layouts = [
        (f"sp={n} {mode}", [*base, f"--parallel.sp={n}", f"--parallel.async_ulysses={on}"])
        for mode, on in (("sync", "false"), ("async values", "true"))
    ] + [
        (f"ep={n} chunks={c}", [*base, f"--parallel.ep={n}", f"--parallel.ep_chunks={c}"])
        for c in (1, 2, 4)
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    medians = run_distributed(time_layouts, n, layouts, args.steps, args.warmup,
                              timeout=3600)[0]  # fmt: skip
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {n} gloo processes x 1 "
        f"thread; Qwen3-MoE {MODEL['hidden_size']} hidden x {MODEL['num_hidden_layers']} "
        f"layers, {MODEL['num_experts']} experts top-{MODEL['num_experts_per_tok']}; fortunes "
        f"packed, {args.batch} samples/step, {args.budget} tokens/micro-batch; median of "
        f"{args.steps} steps (+{args.warmup})\n"
    )
    print("| layout | step s (median) | vs synchronous |\n| --- | ---: | ---: |")
    for name, seconds in medians.items():
        reference = medians[f"sp={n} sync" if name.startswith("sp") else f"ep={n} chunks=1"]
        print(f"| {name} | {seconds:.3f} | {seconds / reference:.2f} |")


if __name__ == "__main__":
    main()
