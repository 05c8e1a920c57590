"""Sharded training equals the unsharded model trained by a plain PyTorch loop.

The reference below is independent of omniweave's training code: the HF model,
one forward per sample, torch's clip_grad_norm_ and AdamW.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from omniweave.data.processors import load_tokenizer, tokenize_record
from omniweave.data.sources import read_records
from tests.distributed import run_distributed
from tests.models import IN_PROCESS_DATA, TINY, hf_model

STEPS, GLOBAL_BATCH, LR, WARMUP, MAX_LEN = 5, 8, 1e-3, 2, 128


def reference_losses(
    model_path: str, corpus: dict, attn: str = "sdpa", average: str = "tokens", adapt=None
) -> list[tuple[float, float]]:
    """(loss, grad norm) per step: the token-mean loss over each global batch, in file order,
    or with ``average="samples"`` the mean over its samples of each sample's token mean.
    ``adapt(model)``: changes the loaded model first (e.g. freezes it and adds adapters)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=attn
    )
    if adapt:
        adapt(model)
    tokenizer = load_tokenizer(corpus["tokenizer_path"])
    samples = [tokenize_record(r, tokenizer, MAX_LEN) for r in read_records(corpus["train_path"])]
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def factor(step):  # linear warmup, then cosine to 10% of the peak
        if step < WARMUP:
            return (step + 1) / WARMUP
        progress = (step - WARMUP) / (STEPS - WARMUP)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    results = []
    for step in range(STEPS):
        batch = samples[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        count = sum(sum(label != -100 for label in s["labels"][1:]) for s in batch)
        total = 0.0
        for sample in batch:
            input_ids = torch.tensor([sample["input_ids"]])
            targets = torch.tensor(sample["labels"][1:])
            logits = model(input_ids=input_ids).logits[0, :-1]
            loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
            if average == "samples":
                loss = loss / (int((targets != -100).sum()) * len(batch))
            else:
                loss = loss / count
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        results.append((total, norm.item()))
    return results


def _train_runs(runs: list[tuple[str, list[str]]]) -> dict[str, list[tuple[float, float]]]:
    """Train each (name, overrides) in this process group; every rank returns the figures."""
    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    curves = {}
    for name, overrides in runs:
        rows = Trainer(load_config(None, overrides)).run()
        curves[name] = [(row["loss"], row["grad_norm"]) for row in rows]
    return curves


def _overrides(model_path: str, corpus: dict, out: str, **extra) -> list[str]:
    settings = {
        "model.path": model_path,
        "data.train_path": corpus["train_path"],
        "data.tokenizer_path": corpus["tokenizer_path"],
        "data.max_seq_len": MAX_LEN,
        "data.shuffle": False,
        "train.output_dir": out,
        "train.max_steps": STEPS,
        "train.global_batch_size": GLOBAL_BATCH,
        "train.lr": LR,
        "train.warmup_steps": WARMUP,
        "train.lr_schedule": "cosine",
        "train.peak_flops": 1e12,
        **IN_PROCESS_DATA,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
        **extra,
    }
    return [f"--{key}={value}" for key, value in settings.items()]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for family in ("qwen2", "llama"):
        path = tmp_path_factory.mktemp(family)
        hf_model(family, seed=1).save_pretrained(path)
        paths[family] = str(path)
    return paths


def layout_curves(layouts: dict[int, dict], models: dict[str, str], corpus, root) -> dict:
    """Train every layout (``{processes: {name: settings}}``) of every model family, one
    process group per process count; the ranks must agree. Returns ``{"family name": curve}``."""
    curves = {}
    for processes, runs in layouts.items():
        named = [
            (
                f"{family} {name}",
                _overrides(path, corpus, str(root / _folder(family, name)), **extra),
            )
            for family, path in models.items()
            for name, extra in runs.items()
        ]
        per_rank = run_distributed(_train_runs, processes, named)
        assert all(rank == per_rank[0] for rank in per_rank), "ranks disagree"
        curves.update(per_rank[0])
    return curves


def _folder(*parts: str) -> str:
    return re.sub(r"[^\w.-]+", "_", "-".join(parts))


def assert_match_references(curves: dict, models: dict[str, str], corpus) -> None:
    """Each ``"family ..."`` curve equals the plain loop's reference of its family."""
    for family, path in models.items():
        reference = reference_losses(path, corpus)
        for name, curve in curves.items():
            if name.startswith(f"{family} "):
                _assert_close(curve, reference, name)


def _assert_close(curve, reference, label):
    assert len(curve) == len(reference) == STEPS, label
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(curve, reference, strict=True)):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"{label}: loss at step {step + 1}"
        assert norm == pytest.approx(ref_norm, rel=1e-4), f"{label}: grad norm at step {step + 1}"


def test_fsdp_and_hsdp_match_unsharded_reference(models, corpus, tmp_path):
    layouts = {
        "dp_shard=4": {"parallel.dp_shard": 4, "train.micro_batch_size": 2},
        "dp_shard=4 accumulate 2, as on a GPU (gathered twice, reduced per micro-batch)": {
            "parallel.dp_shard": 4,
            "parallel.reshard_after_forward": True,
            "parallel.accumulate_sharded": True,
            "train.micro_batch_size": 1,
        },
        "dp_replicate=2 x dp_shard=2 accumulate 2, reduced per micro-batch": {
            "parallel.dp_replicate": 2,
            "parallel.dp_shard": 2,
            "parallel.accumulate_sharded": True,
            "train.micro_batch_size": 1,
        },
        "dp_replicate=2 x dp_shard=2": {
            "parallel.dp_replicate": 2,
            "parallel.dp_shard": 2,
            "train.micro_batch_size": 1,
        },
        "dp_replicate=4 (DDP) accumulate 2": {
            "parallel.dp_replicate": 4,
            "parallel.dp_shard": 1,
            "train.micro_batch_size": 1,
        },
    }
    single, sharded = [], []
    for family, path in models.items():
        single.append(
            (
                f"{family} 1 process",
                _overrides(
                    path, corpus, str(tmp_path / family / "single"), **{"train.micro_batch_size": 8}
                ),
            )
        )
        for layout, extra in layouts.items():
            out = str(tmp_path / family / layout.replace(" ", "_"))
            sharded.append((f"{family} {layout}", _overrides(path, corpus, out, **extra)))
    curves = run_distributed(_train_runs, 1, single)[0]
    per_rank = run_distributed(_train_runs, 4, sharded)
    assert all(rank_curves == per_rank[0] for rank_curves in per_rank), "ranks disagree"
    curves.update(per_rank[0])
    assert_match_references(curves, models, corpus)


def test_sequence_parallel_and_packing_match_unsharded_reference(models, corpus, tmp_path):
    """Packed rows of mixed lengths under Ulysses SP (qwen2 has 2 KV heads: sp=4 replicates
    them), with fixed micro-batches and with a token budget, for both CPU backends."""
    two, four = [], []
    for backend in ("sdpa", "eager"):
        for family, path in models.items():
            packed = {"data.packing": True, "model.attn_implementation": backend}

            def run(layout, extra, family=family, path=path, backend=backend, packed=packed):
                out = str(tmp_path / f"{family}-{backend}-{layout}".replace(" ", "_"))
                return (
                    f"{family} {backend} {layout}",
                    _overrides(path, corpus, out, **packed, **extra),
                )

            two.append(run("sp=2", {"parallel.sp": 2, "train.micro_batch_size": 8}))
            four.append(run("sp=4", {"parallel.sp": 4, "train.micro_batch_size": 8}))
            four.append(
                run(
                    "dp_shard=2 x sp=2",
                    {"parallel.dp_shard": 2, "parallel.sp": 2, "train.micro_batch_size": 2},
                )
            )
    budget = {"parallel.dp_shard": 2, "parallel.sp": 2, "data.max_tokens_per_microbatch": 160}
    four.append(
        ("qwen2 sdpa budget", _overrides(models["qwen2"], corpus, str(tmp_path / "b"), **budget))
    )
    hsdp = {"parallel.dp_replicate": 2, "parallel.sp": 2, "data.packing": True}
    four.append(
        ("qwen2 sdpa hsdp x sp", _overrides(models["qwen2"], corpus, str(tmp_path / "h"), **hsdp))
    )
    curves = run_distributed(_train_runs, 2, two)[0]
    per_rank = run_distributed(_train_runs, 4, four)
    assert all(rank_curves == per_rank[0] for rank_curves in per_rank), "ranks disagree"
    curves.update(per_rank[0])
    for backend in ("sdpa", "eager"):
        for family, path in models.items():
            reference = reference_losses(path, corpus, backend)
            for name, curve in curves.items():
                if name.startswith(f"{family} {backend}"):
                    _assert_close(curve, reference, name)


def test_sample_mean_loss_matches_unsharded_reference(models, corpus, tmp_path):
    """``train.loss_average: samples`` in padded rows, packed rows under SP, and a token budget
    (samples split over micro-batches and ranks), against the plain loop's sample mean."""
    path = models["qwen2"]
    layouts = {
        "dp_shard=4 accumulate 2": {"parallel.dp_shard": 4, "train.micro_batch_size": 1},
        "dp_shard=2 x sp=2 packed": {
            "parallel.dp_shard": 2,
            "parallel.sp": 2,
            "data.packing": True,
            "train.micro_batch_size": 2,
        },
        "budget": {
            "parallel.dp_shard": 2,
            "parallel.sp": 2,
            "data.packing": True,
            "data.max_tokens_per_microbatch": 160,
        },
    }
    runs = [
        (name, _overrides(path, corpus, str(tmp_path / str(index)), **extra))
        for index, (name, extra) in enumerate(layouts.items())
    ]
    for _, overrides in runs:
        overrides.append("--train.loss_average=samples")
    per_rank = run_distributed(_train_runs, 4, runs)
    assert all(rank_curves == per_rank[0] for rank_curves in per_rank), "ranks disagree"
    reference = reference_losses(path, corpus, average="samples")
    token_mean = reference_losses(path, corpus)
    # The two averages differ (at random init mostly in the gradient, 18% at step 1).
    assert abs(reference[0][1] - token_mean[0][1]) > 0.05 * token_mean[0][1], "no difference"
    for name, curve in per_rank[0].items():
        _assert_close(curve, reference, name)


def test_ranks_hold_unequal_token_counts(corpus):
    """The parity data really gives data-parallel ranks different numbers of tokens."""
    from omniweave.data.loader import load_samples
    from omniweave.data.order import SampleOrder

    samples, _, _ = load_samples(
        corpus["train_path"], load_tokenizer(corpus["tokenizer_path"]), MAX_LEN, "truncate"
    )
    step = [
        i for _, i in SampleOrder([len(samples)], [1.0], GLOBAL_BATCH, 0, False).global_batch(0)
    ]
    counts = [sum(len(samples[i].input_ids) for i in step[rank::4]) for rank in range(4)]
    assert max(counts) > 1.5 * min(counts), counts


def resume_args(corpus: dict, out: str, **settings) -> list[str]:
    """6 steps of a tiny Llama (``model.config`` overrides it) with a checkpoint every 3."""
    base = {
        "model.config": TINY["llama"],
        "data.train_path": corpus["train_path"],
        "data.tokenizer_path": corpus["tokenizer_path"],
        "data.max_seq_len": 64,
        "train.output_dir": out,
        "train.max_steps": 6,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.lr": 3e-3,
        "train.peak_flops": 1e12,
        **IN_PROCESS_DATA,
        "checkpoint.every_steps": 3,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    return [f"--{key}={json.dumps(value)}" for key, value in {**base, **settings}.items()]


def _losses(runs: list[list[str]]) -> list[list[float]]:
    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    return [[row["loss"] for row in Trainer(load_config(None, args)).run()] for args in runs]


def assert_checkpoints_reshard(
    layouts: tuple[dict, dict], corpus: dict, root, processes: int, **settings
) -> None:
    """A step-3 checkpoint of each of the two layouts resumes on the other and continues the
    straight run's losses within 1e-5 (``settings``: common to all runs)."""
    first, second = layouts
    runs = []
    for a, b, name in ((first, second, "forward"), (second, first, "back")):
        straight = str(root / name / "straight")
        resumed = resume_args(
            corpus,
            str(root / name / "resumed"),
            **settings,
            **b,
            **{"checkpoint.resume": f"{straight}/checkpoints/step_00000003"},
        )
        runs.append((resume_args(corpus, straight, **settings, **a), resumed))
    straight = run_distributed(_losses, processes, [a for a, _ in runs])[0]
    resumed = run_distributed(_losses, processes, [b for _, b in runs])[0]
    for losses, continued in zip(straight, resumed, strict=True):
        assert len(continued) == 3
        for a, b in zip(losses[3:], continued, strict=True):
            assert abs(a - b) <= 1e-5 * abs(a), (losses, continued)


def test_ddp_and_fsdp_checkpoints_reshard(corpus, tmp_path):
    """A pure-replica (DDP) checkpoint resumes under FSDP and the reverse."""
    layouts = ({"parallel.dp_replicate": 2, "parallel.dp_shard": 1}, {"parallel.dp_shard": 2})
    assert_checkpoints_reshard(layouts, corpus, tmp_path, 2)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_ddp_skips_the_unused_parameter_search_only_where_every_parameter_is_used(family):
    """DDP skips its per-step search for unused parameters on plain language models, whose
    every parameter gets a gradient from any step (here: one token), and keeps it for MoE
    and omni models, which can leave experts or encoders out of a step."""
    from transformers import AutoConfig

    from omniweave.distributed.ddp import may_leave_parameters_unused

    model = hf_model(family)
    model(input_ids=torch.tensor([[3]]), labels=torch.tensor([[3]])).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert not may_leave_parameters_unused(model.config, omni=False)
    assert may_leave_parameters_unused(model.config, omni=True)
    assert may_leave_parameters_unused(hf_model("qwen3_moe").config, omni=False)
    vision_language = AutoConfig.for_model("qwen2_vl")  # towers idle in a text-only step
    assert may_leave_parameters_unused(vision_language, omni=False)
