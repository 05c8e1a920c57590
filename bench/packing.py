"""Padded vs packed micro-batches on the fortunes corpus (very skewed sample lengths).

Two single-process Trainers on the same small Qwen2 (same seed, so the same weights),
the same samples per step (same global batch) and the same max_seq_len: (a) fixed-size
micro-batches padded to their longest sample, (b) packed rows under a token budget.
The sides take turns, one step each in ABBA order, so machine drift hits both alike.
Prints non-padding fraction, effective tokens/s (median) and micro-batches per step
(target: >= 98% non-padding when packed), then attention alone on one packed row:
per-segment ``causal_attention`` vs one sdpa call with a [T, T] block-diagonal mask.

    .venv/bin/python bench/packing.py [--steps N] [--warmup K] [--threads T] [--budget B]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from omniweave.config import load_config
from omniweave.data.loader import load_samples
from omniweave.ops.attention import causal_attention
from omniweave.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA, TOKENIZER = (os.path.join(ROOT, ".data", n) for n in ("fortunes.jsonl", "tokenizer"))
MODEL = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4)
MODEL |= dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=4096)
MODEL |= dict(max_position_embeddings=2048, tie_word_embeddings=True)


def build_trainer(args: argparse.Namespace, packed: bool) -> Trainer:
    """A Trainer on the fortunes corpus: padded fixed-size or packed token-budget batches."""
    batching = (
        ["--data.packing=true", f"--data.max_tokens_per_microbatch={args.budget}"]
        if packed
        else [f"--train.micro_batch_size={args.micro_batch}"]
    )
    overrides = [
        f"--model.config={json.dumps(MODEL)}", f"--data.train_path={DATA}",
        f"--data.tokenizer_path={TOKENIZER}", f"--data.max_seq_len={args.max_seq_len}",
        f"--train.global_batch_size={args.batch}", f"--train.seed={args.seed}",
        f"--train.max_steps={args.warmup + args.steps}", "--train.lr_schedule=constant",
        "--train.peak_flops=1e12", "--train.output_dir=runs/bench-packing",
        "--log.progress=false", "--log.tensorboard=false", "--log.plot=false", *batching,
    ]  # fmt: skip
    return Trainer(load_config(None, overrides))


def compare_training(
    args: argparse.Namespace,
) -> tuple[dict[str, list[dict]], list[float], list[int]]:
    """Per-step figures of both sides (after warm-up), their first losses, the corpus lengths."""
    sides = {"padded": build_trainer(args, False), "packed": build_trainer(args, True)}
    rows: dict[str, list[dict]] = {name: [] for name in sides}
    for i, step in enumerate(range(args.warmup + args.steps)):
        order = list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]
        for name, trainer in order:
            start = time.perf_counter()
            result = trainer.train_step(step)
            elapsed = time.perf_counter() - start
            batches = trainer.batches.micro_batches(step)
            row_tokens = sum(b.input_ids.numel() for b in batches)
            result |= dict(tokens_per_s=result["step_tokens"] / elapsed, seconds=elapsed)
            result |= dict(micro_batches=len(batches), row_tokens=row_tokens / len(batches))
            rows[name].append(result)
    # Same weights and samples => the same loss (a check that we compare like with like).
    first = [rows[name][0]["loss"] for name in sides]
    assert abs(first[0] - first[1]) < 1e-4 * abs(first[0]), first
    trainer = sides["packed"]
    samples, _, _ = load_samples(DATA, trainer.tokenizer, args.max_seq_len, "truncate")
    lengths = [len(s.input_ids) for s in samples]
    return {name: r[args.warmup :] for name, r in rows.items()}, first, lengths


def segment_lengths(lengths: list[int], total: int, rng: random.Random) -> list[int]:
    """Sample lengths drawn from the corpus until they fill ``total`` tokens (last one cut)."""
    segments: list[int] = []
    while sum(segments) < total:
        segments.append(min(rng.choice(lengths), total - sum(segments)))
    return segments


def block_causal_mask(segments: list[int]) -> torch.Tensor:
    """Boolean [T, T]: token i sees token j when both are in one segment and j <= i."""
    ids = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(segments))
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    return causal & (ids[:, None] == ids[None, :])


def compare_attention(args: argparse.Namespace, lengths: list[int]) -> tuple[dict, list[int]]:
    """Forward+backward ms of per-segment attention and of one masked sdpa call (ABBA order)."""
    segments = segment_lengths(lengths, args.attn_tokens, random.Random(args.seed))
    cu_seqlens = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    mask = block_causal_mask(segments)  # built once, outside the timing (favours this side)
    torch.manual_seed(args.seed)
    shape = (1, args.heads, args.attn_tokens, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    sides: dict[str, Callable[[], torch.Tensor]] = {
        "per-segment causal_attention": lambda: causal_attention(
            q, k, v, "sdpa", cu_seqlens=cu_seqlens
        ),
        "one sdpa call, [T, T] mask": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask
        ),
    }
    outputs = [fn().detach() for fn in sides.values()]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.attn_warmup + args.attn_repeats):
        for name, fn in list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]:
            start = time.perf_counter()
            fn().backward(grad)
            if i >= args.attn_warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
            q.grad = k.grad = v.grad = None
    return times, segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--steps", type=int, default=5, help="timed steps per side")
    add("--warmup", type=int, default=2, help="untimed steps per side first")
    add("--threads", type=int, default=2, help="torch.set_num_threads")
    add("--batch", type=int, default=64, help="train.global_batch_size (samples per step)")
    add("--micro-batch", type=int, default=8, help="train.micro_batch_size of the padded side")
    add("--budget", type=int, default=2048, help="data.max_tokens_per_microbatch when packed")
    add("--max-seq-len", type=int, default=512, help="data.max_seq_len (longer ones truncated)")
    add("--seed", type=int, default=0, help="train.seed, and the attention inputs' seed")
    add("--attn-tokens", type=int, default=2048, help="tokens in the packed attention row")
    add("--heads", type=int, default=4, help="attention heads (attention table)")
    add("--head-dim", type=int, default=64, help="head dim (attention table)")
    add("--attn-repeats", type=int, default=10, help="timed attention repeats per side")
    add("--attn-warmup", type=int, default=2, help="untimed attention repeats per side")
    args = parser.parse_args()
    if not (os.path.isfile(DATA) and os.path.isdir(TOKENIZER)):
        sys.exit(f"bench/packing.py: {DATA} or {TOKENIZER} is missing; run `make .data/tokenizer`")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    rows, first_losses, lengths = compare_training(args)
    times, segments = compare_attention(args, lengths)

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"arguments: {vars(args)}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; corpus {len(lengths)} samples, tokens per sample "
        f"median {statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.1f}, "
        f"max {max(lengths)}; Qwen2 {MODEL['hidden_size']} hidden x "
        f"{MODEL['num_hidden_layers']} layers; {args.steps} timed steps (+{args.warmup} warmup); "
        f"first loss padded {first_losses[0]:.4f} vs packed {first_losses[1]:.4f}\n"
    )
    print(
        "| batching | non-padding | tokens/s (median) | step s (median) | micro-batches/step "
        "| row tokens/micro-batch |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    median = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for name, rs in rows.items()
    }
    labels = {
        "padded": f"padded, micro_batch_size={args.micro_batch}",
        "packed": f"packed, max_tokens_per_microbatch={args.budget}",
    }
    for name, m in median.items():
        non_padding = sum(r["step_tokens"] for r in rows[name]) / sum(
            r["step_tokens"] / r["non_padding"] for r in rows[name]
        )
        print(
            f"| {labels[name]} | {non_padding:.1%} | {m['tokens_per_s']:,.0f} | "
            f"{m['seconds']:.2f} | {m['micro_batches']:g} | {m['row_tokens']:,.0f} |"
        )
    ratio = median["packed"]["tokens_per_s"] / median["padded"]["tokens_per_s"]
    packed_np = min(r["non_padding"] for r in rows["packed"])
    verdict = "OK" if packed_np >= 0.98 else "under target"
    print(f"\ntokens/s packed/padded (medians): {ratio:.2f}x")
    print(f"packed non-padding, worst step: {packed_np:.1%}: {verdict} (target >= 98%)\n")

    print(
        f"attention alone, fp32 forward+backward: one packed row of {args.attn_tokens} tokens, "
        f"{len(segments)} segments drawn from the corpus lengths (longest {max(segments)}), "
        f"{args.heads} heads x {args.head_dim}; {args.attn_repeats} timed repeats "
        f"(+{args.attn_warmup} warmup)\n"
    )
    print("| attention | median (ms) | min (ms) |\n| --- | ---: | ---: |")
    for name, ms in times.items():
        print(f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f} |")
    per_segment, masked = (statistics.median(ms) for ms in times.values())
    print(f"\nspeed-up per-segment vs masked (medians): {masked / per_segment:.2f}x")


if __name__ == "__main__":
    main()
