"""OmniModel (vision + audio encoders in front of a tiny Qwen2): FSDP x Ulysses SP training
equals the unsharded model run sample by sample, including a rank with no image or audio."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniweave.data.processors import IGNORE_INDEX
from tests.distributed import run_distributed
from tests.models import hf_model

IMAGE, AUDIO, STEPS, LR = 500, 501, 5, 1e-3
ENCODERS = {
    "image": {"type": "vision", "placeholder": IMAGE, "width": 32, "heads": 2, "patch": 4},
    "audio": {"type": "audio", "placeholder": AUDIO, "width": 32, "heads": 2, "n_mels": 16},
}


def _model(family: str = "qwen2"):
    from omniweave.models.omni.model import OmniModel

    foundation = hf_model(family, seed=5)
    torch.manual_seed(6)
    return OmniModel.from_config(foundation, ENCODERS)


def _samples(model) -> list[dict]:
    """Text+image, text+audio, text+image+audio, and text only."""
    generator = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(3, 400, (n,), generator=generator).tolist()

    image_a = torch.rand(1, 8, 12, generator=generator)
    image_b = torch.rand(1, 12, 8, generator=generator)
    audio_a = torch.randn(1600, generator=generator)
    audio_b = torch.randn(3200, generator=generator)
    vision, audio = model.encoders["image"], model.encoders["audio"]
    layouts = [
        (text(5) + [IMAGE] * vision.num_tokens(image_a) + text(9), {"image": [image_a]}),
        (text(4) + [AUDIO] * audio.num_tokens(audio_a) + text(7), {"audio": [audio_a]}),
        (
            text(3) + [IMAGE] * vision.num_tokens(image_b) + text(2)
            + [AUDIO] * audio.num_tokens(audio_b) + text(6),
            {"image": [image_b], "audio": [audio_b]},
        ),
        (text(13), {}),
    ]  # fmt: skip
    samples = []
    for ids, media in layouts:
        labels = [IGNORE_INDEX if i in (IMAGE, AUDIO) else i for i in ids]
        samples.append({"input_ids": ids, "labels": labels, "media": media})
    return samples


def _label_count(samples) -> int:
    return sum(sum(label != IGNORE_INDEX for label in s["labels"][1:]) for s in samples)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)


def _reference(family: str) -> list[tuple[float, float]]:
    model = _model(family)
    optimizer = _optimizer(model)
    samples = _samples(model)
    count = _label_count(samples)
    results = []
    for _ in range(STEPS):
        total = 0.0
        for s in samples:
            logits = model(torch.tensor([s["input_ids"]]), s["media"]).logits[0, :-1]
            loss = F.cross_entropy(logits, torch.tensor(s["labels"][1:]), reduction="sum") / count
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        results.append((total, norm.item()))
    return results


def _sharded(family: str, ep: int) -> list[tuple[float, float]]:
    """dp_shard=2 x sp=2 (and ep): data-parallel rank 0 packs three samples with media, rank 1
    holds only the text sample (its encoders run on dummy inputs)."""
    import torch.distributed as dist

    from omniweave.data.loader import Sample
    from omniweave.data.packing import pack_row
    from omniweave.distributed.expert import apply_expert_parallel
    from omniweave.distributed.fsdp import apply_fsdp
    from omniweave.distributed.parallel_state import ParallelState, resolve_degrees
    from omniweave.distributed.plan import shard_parameters
    from omniweave.distributed.ulysses import apply_sequence_attention, split_sequence_inputs
    from omniweave.models.omni.model import ENCODER_UNITS
    from omniweave.models.registry import recipe_for
    from omniweave.train.optim import clip_grad_norm

    state = ParallelState(resolve_degrees(4, dp_shard=2, sp=2, ep=ep), torch.device("cpu"))
    model = _model(family)
    samples = _samples(model)
    count = _label_count(samples)
    expert_units = ()
    if ep > 1:  # the foundation's own expert plan, under the OmniModel's "foundation." prefix
        recipe = recipe_for(family)
        plan = {f"foundation.{glob}": placement for glob, placement in recipe.expert_plan}
        shard_parameters(model, plan, state.ep_mesh)
        apply_expert_parallel(model.foundation, state.ep_mesh.get_group())
        expert_units = tuple(f"foundation.{glob}" for glob in recipe.expert_units)
    units = ENCODER_UNITS + tuple(f"foundation.{u}" for u in recipe_for(family).shard_units)
    apply_fsdp(model, state, units, expert_units=expert_units)
    apply_sequence_attention(model.foundation, "sdpa", state.sp_group)
    split_sequence_inputs(model.foundation.model, state.sp_group)
    optimizer = _optimizer(model)
    mine = samples[:3] if state.dp_rank == 0 else samples[3:]
    batch = pack_row([Sample(s["input_ids"], s["labels"]) for s in mine], pad_id=0, multiple=2)
    media = {m: [x for s in mine for x in s["media"].get(m, [])] for m in ("image", "audio")}
    targets = batch.targets.chunk(2, dim=-1)[state.sp_rank].flatten()
    results = []
    for _ in range(STEPS):
        logits = model(
            batch.input_ids,
            media,
            position_ids=batch.position_ids,
            cu_seq_lens_q=batch.cu_seqlens,
            use_cache=False,
        ).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")
        (loss * 4 / count).backward()  # gradients are averaged over the 4 ranks
        norm = clip_grad_norm(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach() / count
        dist.all_reduce(total)
        results.append((total.item(), float(norm)))
    return results


@pytest.mark.parametrize(("family", "ep"), [("qwen2", 1), ("qwen3_moe", 2)])
def test_omni_model_fsdp_sp_ep_match_unsharded_with_a_rank_without_media(family, ep):
    reference = _reference(family)
    per_rank = run_distributed(_sharded, 4, family, ep)
    assert all(r == per_rank[0] for r in per_rank)
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
        zip(per_rank[0], reference, strict=True)
    ):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at step {step + 1}"
        assert norm == pytest.approx(ref_norm, rel=1e-4), f"grad norm at step {step + 1}"


def test_placeholder_count_mismatch_is_a_clear_error():
    model = _model()
    sample = _samples(model)[0]
    ids = list(sample["input_ids"])
    ids.remove(IMAGE)
    with pytest.raises(ValueError, match="image: 5 placeholder tokens but the encoder gave 6"):
        model(torch.tensor([ids]), sample["media"])


def test_items_beyond_an_encoders_position_embeddings_are_refused():
    from omniweave.models.omni.encoders import AudioEncoder, VideoEncoder, VisionEncoder

    vision = VisionEncoder(8, width=8, depth=1, heads=2, patch=2, grid=4)
    assert vision.num_tokens(torch.zeros(1, 8, 6)) == 12
    with pytest.raises(ValueError, match="5 rows x columns of patches, it has position"):
        vision.num_tokens(torch.zeros(1, 8, 10))
    video = VideoEncoder(8, frames_per_patch=2, max_time=3, width=8, depth=1, heads=2, patch=2)
    assert video.num_tokens(torch.zeros(6, 1, 4, 4)) == 12
    with pytest.raises(ValueError, match="4 time steps"):
        video.num_tokens(torch.zeros(8, 1, 4, 4))
    audio = AudioEncoder(8, width=8, depth=1, heads=2, sample_rate=8000, hop=80)
    assert audio.num_tokens(torch.zeros(8000)) == 26
    with pytest.raises(ValueError, match="1501 audio positions"):
        audio.num_tokens(torch.zeros(80 * 4 * 1500 + 1))
