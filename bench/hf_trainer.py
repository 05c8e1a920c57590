"""OmniWeave vs Hugging Face ``Trainer`` on a length-skewed corpus (Debian fortunes), one
process each: the same model and weights, the same samples in the same order per step, the
same optimizer settings. HF pads each batch to its longest sample (its default collator);
OmniWeave packs the step's samples into rows under a token budget. Prints effective
(non-padding) tokens/s, their ratio (target >= 1.5), both loss curves' largest gap and
OmniWeave's "CPU MFU" (model FLOPs/s over the measured GEMM FLOP/s), and draws the curves
overlaid (``--plot``).

One process, because accelerate's FSDP does not run on CPU: under ``torchrun`` with 2 gloo
processes, ``TrainingArguments(use_cpu=True, fsdp="full_shard", fsdp_config={"fsdp_version":
2})`` trains a ``DistributedDataParallel`` model (``DistributedType.MULTI_CPU``; checked with
transformers 5.24, accelerate 1.15), so no sharded HF run exists to compare against.

    make .data/tokenizer && .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/hf_trainer.py [--steps N] [--warmup K] [--batch B] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from launch import DATA, HF_OPTIMIZER, MAX_LEN, MODEL, ROOT, TOKENIZER

sys.path.insert(0, ROOT)

BUDGET = 2048


def omniweave_run(model_dir: str, out: str, steps: int, batch: int) -> tuple:
    """Losses, step seconds and non-padding tokens per step of OmniWeave (packed rows), the
    sample indices of each step, and the tokenized samples."""
    from omniweave.config import load_config
    from omniweave.data.loader import load_samples
    from omniweave.train.trainer import Trainer

    settings = {
        "model.path": model_dir,
        "data.train_path": DATA,
        "data.tokenizer_path": TOKENIZER,
        "data.max_seq_len": MAX_LEN,
        "data.packing": True,
        "data.max_tokens_per_microbatch": BUDGET,
        "train.output_dir": out,
        "train.max_steps": steps,
        "train.global_batch_size": batch,
        "train.lr": 1e-3,
        "train.lr_schedule": "constant",
        "train.weight_decay": 0.0,
        "checkpoint.resume": "none",
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    cfg = load_config(None, [f"--{k}={json.dumps(v)}" for k, v in settings.items()])
    trainer = Trainer(cfg)
    losses, seconds, tokens, mfu = [], [], [], []
    for step in range(steps):
        start = time.perf_counter()
        result = trainer.train_step(step)
        seconds.append(time.perf_counter() - start)
        losses.append(result["loss"])
        tokens.append(result["step_tokens"])
        mfu.append(trainer.mfu(result["flops"], seconds[-1]))
    order = [[i for _, i in trainer.batches.order.global_batch(step)] for step in range(steps)]
    samples, _, _ = load_samples(DATA, trainer.tokenizer, MAX_LEN, "truncate")  # record order
    return losses, seconds, tokens, order, samples, (mfu, trainer.mfu.peak)


def hf_run(model_dir: str, out: str, samples, order, batch: int) -> tuple[list, list]:
    """Losses and step seconds of HF ``Trainer`` on the same samples, step by step."""
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    ordered = [
        {"input_ids": samples[i].input_ids, "labels": samples[i].input_ids}
        for step in order
        for i in step
    ]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    padding = DataCollatorWithPadding(tokenizer)

    def collate(features):
        labels = [f.pop("labels") for f in features]
        padded = padding(features)
        longest = padded["input_ids"].shape[1]
        padded["labels"] = torch.tensor([row + [-100] * (longest - len(row)) for row in labels])
        return padded

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds, self.losses, self._start = [], [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()
    arguments = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=len(order),
        **HF_OPTIMIZER,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = InOrder(
        model=model, args=arguments, train_dataset=ordered, data_collator=collate, callbacks=[clock]
    )
    trainer.remove_callback(PrinterCallback)  # one dict per step otherwise
    trainer.train()
    return clock.losses, clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--plot", default=os.path.join(ROOT, "runs", "bench", "hf_trainer_loss.png")
    )
    args = parser.parse_args()
    if not (os.path.isfile(DATA) and os.path.isdir(TOKENIZER)):
        sys.exit("bench/hf_trainer.py: run `make .data/tokenizer` first (the fortunes corpus).")
    torch.set_num_threads(args.threads)
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        fields = dict(MODEL)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(f"{tmp}/model")
        ours, our_s, tokens, order, samples, (mfu, peak) = omniweave_run(
            f"{tmp}/model", f"{tmp}/ow", args.steps, args.batch
        )
        theirs, their_s = hf_run(f"{tmp}/model", f"{tmp}/hf", samples, order, args.batch)
    timed = slice(args.warmup, None)
    ours_rate, theirs_rate = (_rate(tokens[timed], secs[timed]) for secs in (our_s, their_s))
    gap = max(abs(a - b) / b for a, b in zip(ours, theirs, strict=True))
    print(
        f"{args.steps} steps of {args.batch} fortunes (max_seq_len {MAX_LEN}), 1 process, "
        f"{args.threads} threads; median over steps {args.warmup + 1}-{args.steps}\n"
    )
    print("| trainer | effective tokens/s | s/step | loss at the end |")
    print("| --- | ---: | ---: | ---: |")
    for name, r, secs, loss in (
        ("HF Trainer (padded batches)", theirs_rate, their_s, theirs),
        ("OmniWeave (packed, budget 2048)", ours_rate, our_s, ours),
    ):
        print(f"| {name} | {r:,.0f} | {statistics.median(secs[timed]):.3f} | {loss[-1]:.4f} |")
    print(f"\nOmniWeave / HF effective tokens/s: {ours_rate / theirs_rate:.2f}x (target >= 1.5)")
    print(f"largest relative gap between the loss curves: {gap:.2e}")
    print(
        f"CPU MFU of OmniWeave (model FLOPs/s over this machine's measured GEMM "
        f"{peak / 1e9:.1f} GFLOP/s): {statistics.median(mfu[timed]):.1%}"
    )
    _plot(ours, theirs, args.plot)
    print(f"loss curves: {args.plot}")


def _rate(tokens: list[int], seconds: list[float]) -> float:
    """Median non-padding tokens per second over the steps."""
    return statistics.median(t / s for t, s in zip(tokens, seconds, strict=True))


def _plot(ours: list[float], theirs: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(ours) + 1)
    ax.plot(steps, theirs, label="HF Trainer", linewidth=3, alpha=0.5)
    ax.plot(steps, ours, label="OmniWeave", linestyle="--")
    ax.set(xlabel="step", ylabel="loss", title="Same samples per step, same init")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
