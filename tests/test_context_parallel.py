"""Ring context parallelism (``parallel.cp``): every row split over the ring's ranks in
load-balanced chunks trains the curve of the unsharded model in a plain PyTorch loop, padded
and packed (attention kept inside each sample), alone, with Ulysses inside the ring, and on
rows far longer than Ulysses could split (4 ranks x 4 heads x 8 tokens = 128 < a packed row),
with tensor parallelism inside each ring rank and with MoE experts split over the ring."""

from __future__ import annotations

import json

import pytest
import torch

from omniweave.distributed.ring import balanced_slice, ring_inputs
from tests.distributed import run_distributed
from tests.models import TINY, hf_model
from tests.test_parity import (
    _assert_close,
    _overrides,
    _train_runs,
    assert_match_references,
    layout_curves,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for family in ("qwen2", "llama"):
        paths[family] = str(tmp_path_factory.mktemp(family))
        hf_model(family, seed=1).save_pretrained(paths[family])
    return paths


def test_balanced_slices_cover_the_row_once_with_equal_causal_work():
    row = torch.arange(48)
    slices = [balanced_slice(row, 4, rank) for rank in range(4)]
    assert sorted(torch.cat(slices).tolist()) == row.tolist()
    work = [int((s + 1).sum()) for s in slices]  # a causal query at position p sees p + 1 keys
    assert len(set(work)) == 1, work


def _ring_against_whole_attention(cp: int) -> dict[str, float]:
    """Largest differences of each ring implementation's output and Q/K/V gradients from
    plain attention over the whole row (this rank's tokens), for three packed samples."""
    import torch.distributed as dist

    from omniweave.distributed import ring

    torch.manual_seed(0)
    rank, width = dist.get_rank(), 8 * cp
    q, k, v = (torch.randn(1, 2, width, 4) for _ in range(3))
    lengths = (3, 8, width - 11)  # three packed samples
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    whole_row = ring_inputs(position_ids, 1, 0, "cpu")
    position, sample = whole_row["ring_positions"], whole_row["ring_samples"]
    mine = ring.balanced_slice(torch.arange(width), cp, rank)
    weights = torch.randn(1, 2, width, 4, generator=torch.Generator().manual_seed(1))

    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    visible = ring._visible(position, sample, position, sample)
    scores = (whole[0] @ whole[1].transpose(-1, -2) * 0.5).masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, -1) @ whole[2]
    (out * weights).sum().backward()  # every rank's share of the loss
    expected = [out.detach()[:, :, mine], *(x.grad[:, :, mine] for x in whole)]

    layout = ring_inputs(position_ids, cp, rank, "cpu")
    errors = {}
    for name in ("flash", "autograd"):
        local = [x[:, :, mine].transpose(-1, -2).contiguous().transpose(-1, -2) for x in (q, k, v)]
        local = [x.requires_grad_() for x in local]  # strided, as attention gets them
        run = ring._RingFlash.apply if name == "flash" else ring._ring_by_autograd
        got = run(*local, layout["ring_positions"], layout["ring_samples"], dist.group.WORLD, 0.5)
        (got * weights[:, :, mine]).sum().backward()
        results = [got.detach(), *(x.grad for x in local)]
        errors[name] = max(
            float((a - b).abs().max()) for a, b in zip(results, expected, strict=True)
        )
    return errors


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_and_its_gradients_equal_whole_row_attention(cp):
    for rank_errors in run_distributed(_ring_against_whole_attention, cp, cp):
        assert all(error < 1e-5 for error in rank_errors.values()), rank_errors


def test_ring_attention_trains_like_the_unsharded_reference(models, corpus, tmp_path):
    packed = {"data.packing": True}
    layouts = {
        2: {
            "cp=2": {"parallel.cp": 2, "train.micro_batch_size": 4},
            "cp=2 packed": {"parallel.cp": 2, **packed, "train.micro_batch_size": 8},
        },
        4: {
            "sp=2 x cp=2 packed": {"parallel.cp": 2, "parallel.sp": 2, **packed},
            "cp=4 packed": {"parallel.cp": 4, **packed, "train.micro_batch_size": 8},
            "cp=2 x dp_shard=2": {"parallel.cp": 2, "parallel.dp_shard": 2},
            "cp=2 x tp=2 packed": {"parallel.cp": 2, "parallel.tp": 2, **packed},
        },
    }
    four = {4: layouts.pop(4)}  # one family is enough for the 4-process layouts
    curves = layout_curves(layouts, models, corpus, tmp_path)
    curves |= layout_curves(four, {"qwen2": models["qwen2"]}, corpus, tmp_path)
    assert_match_references(curves, models, corpus)


def test_ring_attention_with_expert_parallel_experts_matches_the_moe_reference(corpus, tmp_path):
    """A Qwen3-MoE with its 8 experts split over the ring's 2 ranks (cp=2 x ep=2), the router's
    aux loss over all tokens of the step as in the reference."""
    from tests.test_expert_parallel import moe_reference

    path = str(tmp_path / "moe")
    hf_model("qwen3_moe", seed=1).save_pretrained(path)
    layout = {"parallel.cp": 2, "parallel.ep": 2, "data.packing": True, "train.micro_batch_size": 8}
    run = ("cp=2 x ep=2", _overrides(path, corpus, str(tmp_path / "run"), **layout))
    per_rank = run_distributed(_train_runs, 2, [run])
    assert per_rank[0] == per_rank[1], "ranks disagree"
    _assert_close(per_rank[0]["cp=2 x ep=2"], moe_reference(path, corpus), "cp=2 x ep=2")


@pytest.mark.parametrize(
    "family,extra",
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
        ("llama", {"model_type": "mistral", "sliding_window": 16}),
    ],
)
def test_ring_refuses_sliding_window_attention(corpus, tmp_path, family, extra):
    from omniweave.config import load_config
    from omniweave.train.checks import validate

    config = {**TINY[family], **extra}
    args = _overrides("", corpus, str(tmp_path), **{"parallel.cp": 2})
    args = [a for a in args if not a.startswith("--model.path")]
    args.append(f"--model.config={json.dumps(config)}")
    with pytest.raises(ValueError, match="sliding-window") as caught:
        validate(load_config(None, args), 2)
    assert "\n" not in str(caught.value)
