"""Per-process state memory and step time of the parallel layouts at 4 processes, one model.

For each layout the Trainer builds the same Qwen2 in 4 gloo processes and trains a few steps
of the fortunes corpus (packed rows, 16 samples a step, one micro-batch per rank); each rank
then adds up the bytes of the tensors it holds itself (its parameter shards, as many bytes of
gradients, which are sharded alike, and the AdamW state). The
table gives the largest rank's figures, the median step time over the steps after the first
and the tokens/s (same samples in every layout). Pipeline layouts train 2 samples per
micro-batch; their bubble is measured as 1 - (time in the stage's forward and backward) /
(time in the pipeline's steps), averaged over ranks, against the schedule's
(pp - 1) / (micro-batches + pp - 1).

    .venv/bin/python bench/parallel.py [--steps N] [--layouts NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.distributed import run_distributed  # noqa: E402

DATA, TOKENIZER = (os.path.join(ROOT, ".data", n) for n in ("fortunes.jsonl", "tokenizer"))
MODEL = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4)
MODEL |= dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
MODEL |= dict(max_position_embeddings=2048, tie_word_embeddings=False)
LAYOUTS = {  # name -> parallel settings, all at 4 processes
    "dp_shard=4": {"parallel.dp_shard": 4},
    "tp=4": {"parallel.tp": 4, "parallel.dp_shard": 1},
    "tp=2 x dp_shard=2": {"parallel.tp": 2},
    "sp=2 x dp_shard=2": {"parallel.sp": 2},
    "cp=2 x dp_shard=2": {"parallel.cp": 2},
    "tp=2 x sp=2": {"parallel.tp": 2, "parallel.sp": 2, "parallel.dp_shard": 1},
    "pp=2 x dp_shard=2": {"parallel.pp": 2, "train.micro_batch_size": 2},
    "pp=4": {"parallel.pp": 4, "parallel.dp_shard": 1, "train.micro_batch_size": 2},
}


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def ranks_per_sample(settings: dict) -> int:
    """The ranks that work on one sample (tp x sp x cp) in a layout of ``LAYOUTS``."""
    return math.prod(settings.get(f"parallel.{axis}", 1) for axis in ("tp", "sp", "cp"))


def _time_pipeline() -> dict:
    """Add up, in this process, the time the pipeline's stages compute (forward and backward
    of each micro-batch) and the time its steps take."""
    from torch.distributed.pipelining.stage import _PipelineStageBase

    from omniweave.distributed.pipeline import Pipeline

    totals = {"busy": 0.0, "step": 0.0}

    def timed(function, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start

        return wrapper

    for name in ("forward_one_chunk", "backward_one_chunk"):
        setattr(_PipelineStageBase, name, timed(getattr(_PipelineStageBase, name), "busy"))
    Pipeline.step = timed(Pipeline.step, "step")
    return totals


def measure(out: str, settings: dict, steps: int) -> dict:
    """This rank's state bytes after ``steps`` steps, and the logged per-step figures."""
    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    base = {
        "model.config": MODEL,
        "data.train_path": DATA,
        "data.tokenizer_path": TOKENIZER,
        "data.max_seq_len": 512,
        "data.packing": True,
        "data.shuffle": False,
        "train.output_dir": out,
        "train.max_steps": steps,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 16 * ranks_per_sample(settings) // 4,  # one per rank
        "train.log_every": 1,
        "train.peak_flops": 1e12,
        "checkpoint.resume": "none",
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    overrides = [f"--{k}={json.dumps(v)}" for k, v in {**base, **settings}.items()]
    pipeline = _time_pipeline() if "parallel.pp" in settings else None
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own report lines
        trainer = Trainer(load_config(None, overrides))
        rows = trainer.run()
    optimizer = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim()]
    parameters = sum(_local_bytes(p) for p in trainer.params)
    return {
        "parameters": parameters,
        "gradients": parameters,  # each gradient is sharded as its parameter (fp32)
        "optimizer": sum(_local_bytes(t) for t in optimizer),
        "step_s": [row["tokens"] / row["tokens_per_s"] for row in rows],
        "tokens": [row["tokens"] for row in rows],
        "loss": rows[0]["loss"],
        "bubble": 1 - pipeline["busy"] / pipeline["step"] if pipeline else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = parser.parse_args()
    if not (os.path.isfile(DATA) and os.path.isdir(TOKENIZER)):
        sys.exit("bench/parallel.py: run `make .data/tokenizer` first (the fortunes corpus).")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(args.layouts):
            ranks = run_distributed(measure, 4, f"{tmp}/{index}", LAYOUTS[name], args.steps)
            largest = max(ranks, key=lambda r: r["parameters"] + r["gradients"] + r["optimizer"])
            rows[name] = largest | {"step_s": ranks[0]["step_s"], "tokens": ranks[0]["tokens"]}
            if ranks[0]["bubble"] is not None:
                rows[name]["bubble"] = statistics.mean(r["bubble"] for r in ranks)
    print(
        f"Qwen2 {MODEL['hidden_size']} hidden x {MODEL['num_hidden_layers']} layers, vocab "
        f"{MODEL['vocab_size']}, fp32; 4 processes on {os.cpu_count()} cores; packed rows of "
        f"16 fortunes a step (max_seq_len 512); {args.steps} steps, the first one not timed.\n"
    )
    print(
        "| layout | parameters MB | gradients MB | optimizer MB | state MB per process | "
        "step s (median) | tokens/s | step-1 loss |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for name, r in rows.items():
        mb = {k: r[k] / 2**20 for k in ("parameters", "gradients", "optimizer")}
        step = statistics.median(r["step_s"][1:])
        tokens = statistics.median(r["tokens"][1:])
        print(
            f"| {name} | {mb['parameters']:.2f} | {mb['gradients']:.2f} | {mb['optimizer']:.2f} "
            f"| {sum(mb.values()):.2f} | {step:.2f} | {tokens / step:,.0f} | {r['loss']:.5f} |"
        )
    pipelines = {name: r for name, r in rows.items() if r.get("bubble") is not None}
    if pipelines:
        print(
            "\npipeline bubble (1f1b): idle share of each stage's step time, mean over ranks\n\n"
            "| layout | micro-batches per step | theory (pp-1)/(m+pp-1) | measured |\n"
            "| --- | ---: | ---: | ---: |"
        )
    for name, r in pipelines.items():
        settings = LAYOUTS[name]
        pp = settings["parallel.pp"]
        dp = 4 // pp
        micro = 16 // (dp * settings["train.micro_batch_size"])
        theory = (pp - 1) / (micro + pp - 1)
        print(f"| {name} | {micro} | {theory:.2f} | {r['bubble']:.2f} |")


if __name__ == "__main__":
    main()
