"""MoE step time vs expert parallelism, and grouped GEMM vs a per-expert loop.

One job of ``--nproc`` gloo processes (the same world size for every row) trains a
small Qwen3-MoE on packed fortunes rows with ``ep`` = 1, 2, 4, each with the
experts computed by a per-expert loop and by ``torch.nn.functional.grouped_mm``
(``parallel.grouped_experts``). ep=1 with the loop is transformers' own eager
experts under plain FSDP. Prints median step times and ratios to that baseline.

    .venv/bin/python bench/moe.py [--steps N] [--warmup K] [--nproc P] [--ep 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.distributed launches and gathers the gloo processes

from tests.distributed import run_distributed  # noqa: E402

DATA, TOKENIZER = (os.path.join(ROOT, ".data", n) for n in ("fortunes.jsonl", "tokenizer"))
MODEL = dict(model_type="qwen3_moe", hidden_size=256, num_hidden_layers=2, head_dim=32)
MODEL |= dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
MODEL |= dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256)
MODEL |= dict(max_position_embeddings=2048, router_aux_loss_coef=0.01)


def time_layouts(layouts: list[tuple[str, list[str]]], steps: int, warmup: int) -> dict:
    """Median seconds per optimizer step of each layout (every rank runs every layout)."""
    from transformers.utils import logging as hf_logging

    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    hf_logging.set_verbosity_error()
    medians = {}
    for name, overrides in layouts:
        trainer = Trainer(load_config(None, overrides))
        times = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            trainer.train_step(step)
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times[warmup:])
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layout first")
    parser.add_argument("--nproc", type=int, default=4, help="processes (gloo), all layouts")
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="EP degrees")
    parser.add_argument("--batch", type=int, default=32, help="train.global_batch_size")
    parser.add_argument("--budget", type=int, default=1024, help="max_tokens_per_microbatch")
    args = parser.parse_args()
    if not (os.path.isfile(DATA) and os.path.isdir(TOKENIZER)):
        sys.exit(f"bench/moe.py: {DATA} or {TOKENIZER} is missing; run `make .data/tokenizer`")
    base = [
        f"--model.config={json.dumps(MODEL)}", f"--data.train_path={DATA}",
        f"--data.tokenizer_path={TOKENIZER}", "--data.max_seq_len=256", "--data.packing=true",
        f"--data.max_tokens_per_microbatch={args.budget}",
        f"--train.global_batch_size={args.batch}", "--train.peak_flops=1e12",
        f"--train.max_steps={args.warmup + args.steps}", "--train.output_dir=runs/bench-moe",
        "--log.progress=false", "--log.tensorboard=false", "--log.plot=false",
    ]  # fmt: skip
    layouts = [
        (f"ep={ep} {compute}", [*base, f"--parallel.ep={ep}", f"--parallel.grouped_experts={g}"])
        for ep in args.ep
        for compute, g in (("loop", "false"), ("grouped", "true"))
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    medians = run_distributed(time_layouts, args.nproc, layouts, args.steps, args.warmup,
                              timeout=3600)[0]  # fmt: skip
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.nproc} gloo "
        f"processes x 1 thread; Qwen3-MoE {MODEL['hidden_size']} hidden x "
        f"{MODEL['num_hidden_layers']} layers, {MODEL['num_experts']} experts top-"
        f"{MODEL['num_experts_per_tok']}; fortunes packed, {args.batch} samples/step, "
        f"{args.budget} tokens/micro-batch; median of {args.steps} steps (+{args.warmup})\n"
    )
    print("| layout | step s (median) | vs ep=1 loop |\n| --- | ---: | ---: |")
    reference = medians.get("ep=1 loop") or next(iter(medians.values()))
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {seconds / reference:.2f} |")


if __name__ == "__main__":
    main()
