"""Expert parallelism: token dispatch, and MoE training at ep=2/4 and with FSDP x SP, against
the unsharded HF model trained by a plain loop (auxiliary load-balancing loss included)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from omniweave.data.processors import load_tokenizer, tokenize_record
from omniweave.data.sources import read_records
from tests.distributed import run_distributed
from tests.models import hf_model
from tests.test_parity import _overrides, _train_runs

STEPS, GLOBAL_BATCH, LR, WARMUP, MAX_LEN = 5, 8, 1e-3, 2, 128


def moe_reference(model_path: str, corpus: dict) -> list[tuple[float, float]]:
    """(loss, grad norm) per step: token-mean CE + coef x the model's own aux loss over all
    tokens of the global batch, one forward per sample (no padding), torch AdamW."""
    import sys

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    aux_loss = sys.modules[type(model).__module__].load_balancing_loss_func
    config = model.config
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

    def factor(step):
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    results = []
    for step in range(STEPS):
        batch = samples[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        count = sum(sum(label != -100 for label in s["labels"][1:]) for s in batch)
        ce, router = 0.0, []
        for sample in batch:
            out = model(input_ids=torch.tensor([sample["input_ids"]]), output_router_logits=True)
            targets = torch.tensor(sample["labels"][1:])
            ce = ce + F.cross_entropy(out.logits[0, :-1], targets, reduction="sum") / count
            router.append(out.router_logits)
        layers = tuple(torch.cat(per_layer) for per_layer in zip(*router, strict=True))
        experts = getattr(config, "num_experts", None) or config.num_local_experts
        aux = aux_loss(layers, experts, config.num_experts_per_tok)
        loss = ce + config.router_aux_loss_coef * aux
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        results.append((loss.item(), norm.item()))
    return results


def test_moe_expert_parallel_matches_unsharded_reference(corpus, tmp_path):
    layouts = {
        "ep=2": {"parallel.ep": 2, "train.micro_batch_size": 2},
        "ep=4": {"parallel.ep": 4, "train.micro_batch_size": 2},
        "dp_shard=2 x sp=2, ep=2": {
            "parallel.ep": 2,
            "parallel.dp_shard": 2,
            "parallel.sp": 2,
            "train.micro_batch_size": 4,
        },
    }
    models, runs = {}, []
    for family in ("qwen3_moe", "qwen3_moe_6x3"):  # 8 experts top-2; 6 experts top-3
        models[family] = str(tmp_path / family)
        hf_model(family, seed=1).save_pretrained(models[family])
        for layout, extra in layouts.items():
            if family == "qwen3_moe_6x3" and extra["parallel.ep"] == 4:
                continue  # 4 does not divide 6 experts
            out = str(tmp_path / f"{family}-{layout}".replace(" ", "_").replace(",", ""))
            extra = {"data.packing": True, **extra}
            runs.append((f"{family} {layout}", _overrides(models[family], corpus, out, **extra)))
    models["olmoe"] = str(tmp_path / "olmoe")
    hf_model("olmoe", seed=1).save_pretrained(models["olmoe"])
    ep2 = {"data.packing": True, **layouts["ep=2"]}
    runs.append(("olmoe ep=2", _overrides(models["olmoe"], corpus, str(tmp_path / "m"), **ep2)))
    grouped = {**ep2, "parallel.grouped_experts": True}
    grouped_out = str(tmp_path / "grouped")
    runs.append(
        ("qwen3_moe ep=2 grouped", _overrides(models["qwen3_moe"], corpus, grouped_out, **grouped))
    )
    chunked = {**ep2, "parallel.ep_chunks": 3}
    chunked_out = str(tmp_path / "chunked")
    runs.append(
        ("qwen3_moe ep=2 chunks=3", _overrides(models["qwen3_moe"], corpus, chunked_out, **chunked))
    )
    per_rank = run_distributed(_train_runs, 4, runs)
    assert all(rank_curves == per_rank[0] for rank_curves in per_rank), "ranks disagree"
    chunks, whole = per_rank[0]["qwen3_moe ep=2 chunks=3"], per_rank[0]["qwen3_moe ep=2"]
    flat = [value for step in chunks for value in step]  # overlapped parts: the same training
    assert flat == pytest.approx([value for step in whole for value in step], rel=1e-6)
    for family, path in models.items():
        reference = moe_reference(path, corpus)
        for name, curve in per_rank[0].items():
            if name.split()[0] != family:
                continue
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
                zip(curve, reference, strict=True)
            ):
                assert loss == pytest.approx(ref_loss, rel=1e-5), f"{name}: loss, step {step + 1}"
                assert norm == pytest.approx(ref_norm, rel=1e-4), f"{name}: norm, step {step + 1}"
    with open(os.path.join(grouped_out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:  # router health is logged: the aux loss and the busiest expert's load
        assert row["aux_loss"] > 0 and row["expert_load_max_over_mean"] >= 1.0


def _dispatch(grouped: bool, starve_rank0: bool = False, chunks: int = 1) -> dict:
    """Rank 1 routes nothing to rank 0's experts, and expert 3 gets no token at all;
    ``starve_rank0``: neither rank does, so rank 0's experts receive no rows. ``chunks``:
    the dispatch in parts (6 tokens in 4: parts of 2, 2, 1 and 1 tokens)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from omniweave.distributed.expert import make_experts_forward

    rank = dist.get_rank()
    model = hf_model("qwen3_moe", seed=2)
    experts = model.model.layers[0].mlp.experts  # 8 experts, the HF eager forward
    generator = torch.Generator().manual_seed(rank)
    hidden = torch.randn(6, 64, generator=generator, requires_grad=True)
    index = torch.tensor([[0, 1], [2, 5], [1, 7], [6, 0], [2, 4], [5, 6]])
    if rank == 1 or starve_rank0:
        index = torch.tensor([[4, 5], [6, 7], [5, 4], [7, 6], [4, 6], [5, 7]])
    weights = torch.rand(6, 2, generator=generator)
    reference = experts(hidden, index, weights)  # unsharded: all 8 experts here
    (reference * torch.arange(64.0)).sum().backward()
    ref_grad = hidden.grad.clone()
    hidden.grad = None
    group = init_device_mesh("cpu", (2,)).get_group()
    local = type(experts)(experts.config)
    with torch.no_grad():
        local.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[rank * 4 : rank * 4 + 4])
        local.down_proj = torch.nn.Parameter(experts.down_proj[rank * 4 : rank * 4 + 4])
    out = make_experts_forward(group, grouped, chunks)(local, hidden, index, weights)
    (out * torch.arange(64.0)).sum().backward()
    return {
        "out": (out - reference).abs().max().item(),
        "grad": (hidden.grad - ref_grad).abs().max().item(),
        "expert_grad": local.gate_up_proj.grad.abs().sum().item(),
    }


@pytest.mark.parametrize(("grouped", "chunks"), [(False, 1), (True, 1), (False, 4), (True, 4)])
def test_dispatch_equals_unsharded_experts_with_empty_experts(grouped, chunks):
    for result in run_distributed(_dispatch, 2, grouped, False, chunks):
        assert result["out"] < 1e-5 and result["grad"] < 1e-5, result
        assert result["expert_grad"] > 0


@pytest.mark.parametrize(("grouped", "chunks"), [(False, 1), (True, 1), (False, 4)])
def test_dispatch_when_a_rank_receives_no_tokens(grouped, chunks):
    """The starved rank still runs the backward all-to-all its peer waits in (it hung)."""
    starved, busy = run_distributed(_dispatch, 2, grouped, True, chunks, timeout=150)
    for result in (starved, busy):
        assert result["out"] < 1e-5 and result["grad"] < 1e-5, result
    assert starved["expert_grad"] == 0 and busy["expert_grad"] > 0


def _reshard(model_path: str, corpus: dict, root: str) -> dict[str, tuple[float, float]]:
    """Train 2 steps at ep=2 and save with DCP; load at ep=1 and ep=4; step 3 everywhere."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    def trainer(ep: int) -> Trainer:
        extra = {"parallel.ep": ep, "data.packing": True, "train.micro_batch_size": 2}
        return Trainer(load_config(None, _overrides(model_path, corpus, f"{root}/{ep}", **extra)))

    checkpoint = f"{root}/checkpoint"
    saved = trainer(2)
    saved.train_step(0), saved.train_step(1)
    dcp.save(get_model_state_dict(saved.model), checkpoint_id=checkpoint)
    third = saved.train_step(2)
    results = {"ep=2": (third["loss"], third["grad_norm"])}
    for ep in (1, 4):
        loaded = trainer(ep)
        state = get_model_state_dict(loaded.model)
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(loaded.model, state)
        third = loaded.train_step(2)
        results[f"ep={ep}"] = (third["loss"], third["grad_norm"])
    results["not loaded"] = (trainer(4).train_step(2)["loss"], 0.0)
    return results


def test_checkpoint_saved_at_ep2_loads_at_ep1_and_ep4(corpus, tmp_path):
    """Experts are global tensors in DCP state dicts, so the layout can change on load."""
    path = str(tmp_path / "model")
    hf_model("qwen3_moe", seed=1).save_pretrained(path)
    results = run_distributed(_reshard, 4, path, corpus, str(tmp_path))[0]
    assert results["not loaded"][0] != pytest.approx(results["ep=2"][0], rel=1e-3)
    for layout in ("ep=1", "ep=4"):
        assert results[layout][0] == pytest.approx(results["ep=2"][0], rel=1e-5), layout
        assert results[layout][1] == pytest.approx(results["ep=2"][1], rel=1e-4), layout
