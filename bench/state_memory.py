"""Per-process memory of parameters + gradients + AdamW state vs world size (FSDP2).

For world sizes 1, 2, 4 (gloo processes, ``dp_shard`` = world size) the Trainer builds a
small Qwen2 and takes one step; each rank then adds up the bytes of the tensors it holds
itself: its parameter shards, their gradients (kept for the count) and the optimizer's
state. Prints the largest rank's figure and its ratio to one process (target at 4: <= 0.3).

    .venv/bin/python bench/state_memory.py [--worlds 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.distributed import run_distributed  # noqa: E402

DATA, TOKENIZER = (os.path.join(ROOT, ".data", n) for n in ("fortunes.jsonl", "tokenizer"))
MODEL = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4)
MODEL |= dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
MODEL |= dict(max_position_embeddings=512, tie_word_embeddings=False)


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def state_bytes(out: str) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state after one step."""
    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    settings = {
        "model.config": MODEL,
        "data.train_path": DATA,
        "data.tokenizer_path": TOKENIZER,
        "data.max_seq_len": 128,
        "train.output_dir": out,
        "train.max_steps": 1,
        "train.global_batch_size": 4,
        "train.peak_flops": 1e12,
        "checkpoint.resume": "none",
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    trainer = Trainer(load_config(None, [f"--{k}={json.dumps(v)}" for k, v in settings.items()]))
    trainer.optimizer.zero_grad = lambda set_to_none=True: None  # keep this step's gradients
    trainer.train_step(0)
    params = trainer.params
    optimizer = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim()]
    return {
        "parameters": sum(_local_bytes(p) for p in params),
        "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(t) for t in optimizer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    if not (os.path.isfile(DATA) and os.path.isdir(TOKENIZER)):
        sys.exit("bench/state_memory.py: run `make .data/tokenizer` first (the fortunes corpus).")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            ranks = run_distributed(state_bytes, world, f"{tmp}/w{world}")
            rows[world] = max(ranks, key=lambda r: sum(r.values()))
    base = sum(rows[args.worlds[0]].values())
    print("Parameters + gradients + AdamW state per process (largest rank), FSDP2 over all")
    print("| processes | parameters MB | gradients MB | optimizer MB | total MB | vs 1 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for world, parts in rows.items():
        mb = {k: v / 2**20 for k, v in parts.items()}
        total = sum(parts.values())
        print(
            f"| {world} | {mb['parameters']:.2f} | {mb['gradients']:.2f} | {mb['optimizer']:.2f} "
            f"| {total / 2**20:.2f} | {total / base:.2f} |"
        )


if __name__ == "__main__":
    main()
