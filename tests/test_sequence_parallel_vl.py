"""Ulysses SP on a multimodal model: Qwen2-VL with packed text+image rows and 3-row
multimodal RoPE positions, at sp=2, against the unsharded model run sample by sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniweave.data.processors import IGNORE_INDEX
from omniweave.models.qwen2_vl import VisionTextSample
from tests.distributed import run_distributed
from tests.models import IMAGE_TOKEN, VISION_END, VISION_START, tiny_qwen2_vl

STEPS, LR = 5, 1e-3


def _samples() -> list[VisionTextSample]:
    """Text + one 4x6-patch image, text only, text + one 4x4-patch image (2x2 merge)."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for lead, grid, tail in (
        ([10, 11, 12], (1, 4, 6), 7),
        ([30] * 9, None, 0),
        ([40], (1, 4, 4), 12),
    ):
        ids = list(lead)
        pixels = thw = None
        if grid:
            ids += (
                [VISION_START] + [IMAGE_TOKEN] * (grid[0] * grid[1] * grid[2] // 4) + [VISION_END]
            )
            pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 4 * 4, generator=generator)
            thw = torch.tensor([grid])
        ids += torch.randint(3, 500, (tail,), generator=generator).tolist()
        labels = [IGNORE_INDEX if i == IMAGE_TOKEN else i for i in ids]
        samples.append(VisionTextSample(ids, labels, pixels, thw))
    return samples


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)


def _reference() -> list[tuple[float, float]]:
    """The HF model as shipped, one sample per forward with its pixels, no packing."""
    model = tiny_qwen2_vl(seed=4)
    optimizer = _optimizer(model)
    samples = _samples()
    count = sum(sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in samples)
    results = []
    for _ in range(STEPS):
        total = 0.0
        for s in samples:
            ids = torch.tensor([s.input_ids])
            images = {} if s.pixel_values is None else {
                "pixel_values": s.pixel_values, "image_grid_thw": s.image_grid_thw
            }  # fmt: skip
            logits = model(
                input_ids=ids, mm_token_type_ids=(ids == IMAGE_TOKEN).int(), **images
            ).logits[0, :-1]
            loss = F.cross_entropy(logits, torch.tensor(s.labels[1:]), reduction="sum") / count
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        results.append((total, norm.item()))
    return results


def _sequence_parallel(sp: int) -> list[tuple[float, float]]:
    import torch.distributed as dist

    from omniweave.data.packing import pack_row
    from omniweave.distributed.fsdp import apply_fsdp
    from omniweave.distributed.parallel_state import ParallelState, resolve_degrees
    from omniweave.distributed.ulysses import apply_sequence_attention, split_sequence_inputs
    from omniweave.models.qwen2_vl import images_of, mrope_position_ids
    from omniweave.models.registry import recipe_for
    from omniweave.train.optim import clip_grad_norm

    state = ParallelState(resolve_degrees(sp, sp=sp), torch.device("cpu"))
    model = tiny_qwen2_vl(seed=4)
    apply_fsdp(model, state, recipe_for("qwen2_vl").shard_units)
    apply_sequence_attention(model, "sdpa", state.sp_group)
    split_sequence_inputs(model.model.language_model, state.sp_group)
    optimizer = _optimizer(model)
    samples = _samples()
    batch = pack_row(samples, pad_id=0, multiple=sp)
    positions = mrope_position_ids(model, samples, batch.input_ids.shape[1])
    assert positions.shape[0] == 3
    targets = batch.targets.chunk(sp, dim=-1)[state.sp_rank].flatten()
    results = []
    for _ in range(STEPS):
        logits = model(
            input_ids=batch.input_ids,
            position_ids=positions,
            cu_seq_lens_q=batch.cu_seqlens,
            use_cache=False,
            **images_of(samples),
        ).logits
        assert logits.shape[1] == batch.input_ids.shape[1] // sp  # each rank holds its slice
        loss = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")
        (loss * sp / batch.label_tokens).backward()  # gradients are averaged over sp ranks
        norm = clip_grad_norm(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach() / batch.label_tokens
        dist.all_reduce(total)
        results.append((total.item(), float(norm)))
    return results


def test_qwen2_vl_packed_text_and_images_at_sp2_match_unsharded():
    reference = _reference()
    per_rank = run_distributed(_sequence_parallel, 2, 2)
    assert per_rank[0] == per_rank[1]
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
        zip(per_rank[0], reference, strict=True)
    ):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at step {step + 1}"
        assert norm == pytest.approx(ref_norm, rel=1e-4), f"grad norm at step {step + 1}"
