"""Framework overhead: OmniWeave's single-process step time vs a minimal hand-written loop.

Both sides train the same small Qwen2 (saved once, so the weights are identical) on the
same batch of fixed-length samples; the sides take turns, one step each in ABBA order,
so machine drift hits both alike. Prints a markdown table of median and min step times
and the ratio omniweave/raw (target: <= 1.05).

    .venv/bin/python bench/overhead.py [--steps N] [--warmup K] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config
from transformers.utils import logging as hf_logging

from omniweave.config import load_config
from omniweave.data.packing import MicroBatch
from omniweave.data.processors import IGNORE_INDEX
from omniweave.data.tokenizers import train_tokenizer
from omniweave.train.trainer import Trainer

MODEL = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
MODEL |= dict(intermediate_size=1408, vocab_size=8192, tie_word_embeddings=False)
LR, BETAS, WEIGHT_DECAY, EPS = 3e-4, (0.9, 0.95), 0.1, 1e-8


def make_inputs(tmp: str, batch: int, seq_len: int) -> tuple[str, str, str]:
    """Save a random Qwen2, a tokenizer and ``batch`` records longer than ``seq_len`` tokens."""
    torch.manual_seed(0)
    config = Qwen2Config(**MODEL, attn_implementation="sdpa")
    model_dir, tok_dir, data = (os.path.join(tmp, n) for n in ("model", "tok", "train.jsonl"))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    rng = random.Random(0)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)
    ]
    texts = [" ".join(rng.choices(words, k=4 * seq_len)) for _ in range(200)]
    train_tokenizer(texts, 4096, tok_dir)
    with open(data, "w") as f:  # exactly one global batch: every step sees the same samples
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:batch])
    return model_dir, tok_dir, data


class RawLoop:
    """The minimal PyTorch loop: forward, summed CE / label tokens, backward, clip, AdamW."""

    def __init__(self, model_dir: str, batch: MicroBatch):
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [  # same decay split as OmniWeave (matrices only), same hyperparameters
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
        self.input_ids, self.targets = batch.input_ids, batch.targets
        self.n_labels = int((self.targets != IGNORE_INDEX).sum())

    def train_step(self, step: int) -> float:
        logits = self.model(input_ids=self.input_ids, use_cache=False).logits
        flat_logits, flat_targets = logits.float().flatten(0, 1), self.targets.flatten()
        token_loss = F.cross_entropy(
            flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss = token_loss / self.n_labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def timed_ms(side, step: int) -> float:
    """Wall-clock milliseconds of one ``side.train_step(step)``."""
    start = time.perf_counter()
    side.train_step(step)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    tmp = tempfile.TemporaryDirectory(prefix="omniweave-overhead-")
    model_dir, tok_dir, data = make_inputs(tmp.name, args.batch, args.seq_len)

    overrides = [
        f"--model.path={model_dir}", f"--data.train_path={data}",
        f"--data.tokenizer_path={tok_dir}", f"--data.max_seq_len={args.seq_len}",
        "--data.shuffle=false", "--data.on_overlong=truncate",
        f"--train.global_batch_size={args.batch}", f"--train.micro_batch_size={args.batch}",
        f"--train.lr={LR}", f"--train.adam_betas={list(BETAS)}",
        f"--train.weight_decay={WEIGHT_DECAY}",
        "--train.lr_schedule=constant", "--train.max_grad_norm=1.0", "--train.peak_flops=1e12",
        f"--train.max_steps={args.warmup + args.steps}", f"--train.output_dir={tmp.name}/run",
        "--log.progress=false", "--log.tensorboard=false", "--log.plot=false",
    ]  # fmt: skip
    omni = Trainer(load_config(None, overrides))
    (batch,) = omni.batches.micro_batches(0)
    assert batch.input_ids.shape == (args.batch, args.seq_len), batch.input_ids.shape
    raw = RawLoop(model_dir, batch)

    # Same weights, same batch => same first loss (a check that we compare like with like).
    first_omni, first_raw = omni.train_step(0)["loss"], raw.train_step(0)
    assert abs(first_omni - first_raw) < 1e-4 * abs(first_raw), (first_omni, first_raw)
    for step in range(1, args.warmup):
        omni.train_step(step), raw.train_step(step)
    # One step each, in ABBA order: slow drift and the first-of-pair position hit both alike.
    times: dict[str, list[float]] = {"omniweave": [], "raw": []}
    for i, step in enumerate(range(args.warmup, args.warmup + args.steps)):
        sides = [("omniweave", omni), ("raw", raw)]
        for name, side in sides if i % 2 == 0 else sides[::-1]:
            times[name].append(timed_ms(side, step))

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; "
        f"Qwen2 {sum(p.numel() for p in raw.model.parameters()) / 1e6:.1f}M params, "
        f"batch {args.batch} x {args.seq_len} tokens, "
        f"{args.steps} timed steps (+{args.warmup} warmup), "
        f"first loss {first_omni:.4f} vs {first_raw:.4f}\n"
    )
    omni_ms, raw_ms = times["omniweave"], times["raw"]
    ratio = statistics.median(omni_ms) / statistics.median(raw_ms)
    paired = statistics.median([o / r for o, r in zip(omni_ms, raw_ms, strict=True)])
    print("| loop | median step (ms) | min step (ms) |\n| --- | ---: | ---: |")
    for name, ms in times.items():
        print(f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f} |")
    print(f"| ratio omniweave/raw | {ratio:.3f} | {min(omni_ms) / min(raw_ms):.3f} |")
    verdict = "OK" if ratio <= 1.05 else "over target"
    print(f"\nratio of medians {ratio:.3f}: {verdict} (target <= 1.05)")
    print(f"median of per-pair ratios {paired:.3f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
