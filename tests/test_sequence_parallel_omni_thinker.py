"""Ulysses SP on Qwen2.5-Omni's thinker: packed audio+text, image+text and text samples with
3-row multimodal RoPE at sp=2, against HF's own model run sample by sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniweave.data.processors import IGNORE_INDEX
from tests.distributed import run_distributed
from tests.models import (
    AUDIO_END,
    AUDIO_START,
    AUDIO_TOKEN,
    OMNI_IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    tiny_qwen2_5_omni_thinker,
)

STEPS, LR, FRAMES = 5, 1e-3, 40


def _samples(model) -> list[dict]:
    """Audio (40 mel frames) + text, image (4x4 patches) + text, and text only."""
    generator = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(3, 490, (n,), generator=generator).tolist()

    _, audio_tokens = model.model.audio_tower._get_feat_extract_output_lengths(
        torch.tensor([FRAMES])
    )
    audio = [AUDIO_START] + [AUDIO_TOKEN] * int(audio_tokens) + [AUDIO_END]
    image = [VISION_START] + [OMNI_IMAGE_TOKEN] * 4 + [VISION_END]
    features = torch.randn(1, 16, FRAMES, generator=generator)
    pixels = torch.randn(16, 3 * 2 * 4 * 4, generator=generator)
    samples = [
        {
            "ids": text(3) + audio + text(8),
            "inputs": {
                "input_features": features,
                "feature_attention_mask": torch.ones(1, FRAMES, dtype=torch.long),
            },
            "rope": {"audio_seqlens": torch.tensor([FRAMES])},
        },
        {
            "ids": text(2) + image + text(9),
            "inputs": {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]])},
            "rope": {"image_grid_thw": torch.tensor([[1, 4, 4]])},
        },
        {"ids": text(11), "inputs": {}, "rope": {}},
    ]
    for sample in samples:
        mark = (AUDIO_TOKEN, OMNI_IMAGE_TOKEN)
        sample["labels"] = [IGNORE_INDEX if i in mark else i for i in sample["ids"]]
    return samples


def _count(samples) -> int:
    return sum(sum(label != IGNORE_INDEX for label in s["labels"][1:]) for s in samples)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)


def _reference() -> list[tuple[float, float]]:
    model = tiny_qwen2_5_omni_thinker(seed=3)
    optimizer = _optimizer(model)
    samples = _samples(model)
    count = _count(samples)
    results = []
    for _ in range(STEPS):
        total = 0.0
        for s in samples:
            ids = torch.tensor([s["ids"]])  # with a mask, as its processor gives: M-RoPE on
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **s["inputs"])
            logits = logits.logits[0, :-1]
            loss = F.cross_entropy(logits, torch.tensor(s["labels"][1:]), reduction="sum") / count
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        results.append((total, norm.item()))
    return results


def _sequence_parallel(sp: int) -> list[tuple[float, float]]:
    import torch.distributed as dist

    from omniweave.data.loader import Sample
    from omniweave.data.packing import pack_row
    from omniweave.distributed.fsdp import apply_fsdp
    from omniweave.distributed.parallel_state import ParallelState, resolve_degrees
    from omniweave.distributed.ulysses import apply_sequence_attention, split_sequence_inputs
    from omniweave.models.registry import recipe_for
    from omniweave.train.optim import clip_grad_norm

    state = ParallelState(resolve_degrees(sp, sp=sp), torch.device("cpu"))
    model = tiny_qwen2_5_omni_thinker(seed=3)
    samples = _samples(model)
    count = _count(samples)
    apply_fsdp(model, state, recipe_for("qwen2_5_omni_thinker").shard_units)
    apply_sequence_attention(model, "sdpa", state.sp_group)
    split_sequence_inputs(model.model.language_model, state.sp_group)
    optimizer = _optimizer(model)
    batch = pack_row([Sample(s["ids"], s["labels"]) for s in samples], pad_id=0, multiple=sp)
    rows = []  # multimodal RoPE per sample (restarting at 0), then plain positions for padding
    for s in samples:
        ids = torch.tensor([s["ids"]])
        positions, _ = model.model.get_rope_index(
            ids, attention_mask=torch.ones_like(ids), **s["rope"]
        )
        rows.append(positions)
    padding = batch.input_ids.shape[1] - sum(len(s["ids"]) for s in samples)
    rows.append(torch.arange(padding).expand(3, 1, padding))
    positions = torch.cat(rows, dim=-1)
    inputs = {key: value for s in samples for key, value in s["inputs"].items()}
    targets = batch.targets.chunk(sp, dim=-1)[state.sp_rank].flatten()
    results = []
    for _ in range(STEPS):
        logits = model(
            input_ids=batch.input_ids,
            position_ids=positions,
            cu_seq_lens_q=batch.cu_seqlens,
            use_cache=False,
            **inputs,
        ).logits
        assert logits.shape[1] == batch.input_ids.shape[1] // sp
        loss = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")
        (loss * sp / count).backward()
        norm = clip_grad_norm(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach() / count
        dist.all_reduce(total)
        results.append((total.item(), float(norm)))
    return results


def test_qwen2_5_omni_thinker_packed_audio_and_image_at_sp2_match_unsharded():
    reference = _reference()
    per_rank = run_distributed(_sequence_parallel, 2, 2)
    assert per_rank[0] == per_rank[1]
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
        zip(per_rank[0], reference, strict=True)
    ):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at step {step + 1}"
        assert norm == pytest.approx(ref_norm, rel=1e-4), f"grad norm at step {step + 1}"
