"""Peak memory of one training step: activation checkpointing at a long sequence, and
chunked vs naive cross-entropy at Qwen's vocabulary (151,936).

Each variant runs in a fresh process; its figure is the growth of the process's peak RSS
over what the model and inputs took before the step (CPU), or CUDA's peak allocation.

    .venv/bin/python bench/memory.py [--seq 4096] [--vocab 151936] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def checkpointing_step(mode: str, seq: int) -> float:
    """MB a forward+backward of an 8-layer Qwen2 on one ``seq``-token row adds to the peak."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from omniweave.distributed.activations import apply_activation_checkpointing
    from omniweave.models.registry import recipe_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.for_model(
        "qwen2", hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
        max_position_embeddings=seq, attn_implementation="sdpa",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).to(device)
    apply_activation_checkpointing(model, recipe_for("qwen2").block_classes, mode)
    ids = torch.randint(0, 4096, (1, seq), device=device)
    before = _peak_mb()
    model(ids, use_cache=False).logits.float().logsumexp(-1).sum().backward()
    return _peak_mb() - before


def cross_entropy_step(kind: str, tokens: int, vocab: int, hidden: int = 256) -> float:
    """MB the LM head + loss (forward and backward) of ``tokens`` tokens adds to the peak."""
    from omniweave.ops.cross_entropy import chunked_cross_entropy, naive_cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    before = _peak_mb()
    if kind == "chunked":
        losses = chunked_cross_entropy(h, w, targets, chunk=512)
    else:
        losses = naive_cross_entropy(h, w, targets)
    losses.sum().backward()
    return _peak_mb() - before


def _in_fresh_process(function: str, *args) -> float:
    code = (
        f"import json, sys; sys.path.insert(0, {ROOT!r}); from bench.memory import {function}; "
        f"print(json.dumps({function}(*{list(args)!r})))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    device = "CUDA peak allocated" if torch.cuda.is_available() else "CPU peak RSS growth"
    print(f"Peak memory of one step ({device}), MB\n")
    print(f"Activation checkpointing, 8-layer Qwen2 (hidden 256), one row of {args.seq} tokens")
    print("| mode | MB | vs none |\n| --- | ---: | ---: |")
    rows = {
        m: _in_fresh_process("checkpointing_step", m, args.seq)
        for m in ("none", "full", "mlp", "attention")
    }
    for mode, mb in rows.items():
        print(f"| {mode} | {mb:,.0f} | {mb / rows['none']:.2f} |")
    print(f"\nLM head + cross-entropy, {args.tokens} tokens, hidden 256, vocab {args.vocab:,}")
    print("| loss | MB | vs naive |\n| --- | ---: | ---: |")
    rows = {
        k: _in_fresh_process("cross_entropy_step", k, args.tokens, args.vocab)
        for k in ("naive", "chunked")
    }
    for kind, mb in rows.items():
        print(f"| {kind} | {mb:,.0f} | {mb / rows['naive']:.2f} |")


if __name__ == "__main__":
    main()
