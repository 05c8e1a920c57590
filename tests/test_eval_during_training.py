"""Evaluation during training: ``eval_loss`` is the held-out set's token-mean loss, the same
on every layout and with or without packing, equal to the plain model's at the start, and
the training curve is the same with evaluation on or off."""

from __future__ import annotations

import json

import torch

from omniweave.config import load_config
from tests.distributed import run_distributed
from tests.models import IN_PROCESS_DATA, TINY

STEPS = 3


def _rows(args: list[str]) -> list[dict]:
    from omniweave.train.trainer import Trainer

    return Trainer(load_config(None, args)).run()


def _args(corpus: dict, out: str, **settings) -> list[str]:
    base = {
        "model.config": TINY["qwen2"],
        "data.train_path": corpus["train_path"],
        "data.eval_path": corpus["train_path"],
        "data.tokenizer_path": corpus["tokenizer_path"],
        "data.max_seq_len": 64,
        "train.output_dir": out,
        "train.max_steps": STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.lr": 3e-3,
        "train.eval_every": 1,
        "train.eval_max_samples": 37,  # not a multiple of the ranks or micro-batches
        "train.log_every": 2,
        "train.peak_flops": 1e12,
        **IN_PROCESS_DATA,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    return [f"--{key}={json.dumps(value)}" for key, value in {**base, **settings}.items()]


def _both(first: list[str], second: list[str]) -> tuple[list[dict], list[dict]]:
    return _rows(first), _rows(second)


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_eval_loss_is_the_same_on_every_layout_and_with_packing(corpus, tmp_path):
    reference = _rows(_args(corpus, str(tmp_path / "one"), **{"parallel.dp_shard": 1}))
    assert [row["step"] for row in reference] == [1, 2, 3]  # every eval step logged
    eval_losses = [row["eval_loss"] for row in reference]
    assert len(set(eval_losses)) == 3  # it follows the training
    layouts = [
        (2, {}),
        (2, {"data.packing": True}),
        (4, {"parallel.sp": 2, "data.packing": True}),
    ]
    for procs, settings in layouts:
        out = str(tmp_path / f"{procs}-{len(settings)}")
        rows = run_distributed(_rows, procs, _args(corpus, out, **settings))[0]
        for row, expected in zip(rows, reference, strict=True):
            assert _close(row["eval_loss"], expected["eval_loss"], 1e-6), (procs, settings)
            assert _close(row["loss"], expected["loss"], 1e-5), (procs, settings)


def test_evaluation_leaves_the_training_curve_as_it_was(corpus, tmp_path):
    dropout = {"model.config": TINY["qwen2"] | {"attention_dropout": 0.3}, "train.log_every": 1}
    on = _args(corpus, str(tmp_path / "on"), **dropout)  # training draws random numbers
    off = _args(corpus, str(tmp_path / "off"), **dropout, **{"data.eval_path": None})
    with_eval, without = run_distributed(_both, 2, on, off)[0]
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]
    assert [r["grad_norm"] for r in with_eval] == [r["grad_norm"] for r in without]
    assert all("eval_loss" not in r for r in without)


def test_eval_loss_before_training_is_the_plain_models(corpus, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from omniweave.data.loader import load_samples
    from omniweave.data.processors import IGNORE_INDEX, load_tokenizer

    fields = dict(TINY["qwen2"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    frozen = {"model.path": str(tmp_path / "model"), "model.config": None, "train.lr": 1e-30}
    frozen |= {"train.max_steps": 1, "train.eval_max_samples": None}  # every record
    row = _rows(_args(corpus, str(tmp_path / "run"), **frozen))[0]
    tokenizer = load_tokenizer(corpus["tokenizer_path"])
    samples = load_samples(corpus["train_path"], tokenizer, 64, "truncate")[0]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(torch.tensor([sample.input_ids])).logits[0, :-1]
            targets = torch.tensor(sample.labels[1:])
            loss = torch.nn.functional.cross_entropy(
                logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total, tokens = total + float(loss), tokens + int((targets != IGNORE_INDEX).sum())
    assert _close(row["eval_loss"], total / tokens, 1e-5)
