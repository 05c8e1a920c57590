"""Tensor parallelism (``parallel.tp``): the unmodified HF model split by its own plan trains
the curve of the plain model in a plain PyTorch loop, alone, under FSDP and with Ulysses,
padded and packed, with the vocabulary-parallel loss on whole logits or chunk by chunk
(``train.cross_entropy: chunked``); its checkpoints resume on a layout without tensor
parallelism and the reverse."""

from __future__ import annotations

import pytest

from omniweave.config import load_config
from tests.distributed import run_distributed
from tests.models import TINY, hf_model
from tests.test_parity import (
    assert_checkpoints_reshard,
    assert_match_references,
    layout_curves,
    resume_args,
)

CHUNKED = {"train.cross_entropy": "chunked", "train.cross_entropy_chunk": 16}  # several chunks


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for family in ("qwen2", "llama"):  # qwen2: GQA (4 heads, 2 KV heads), tied embeddings
        paths[family] = str(tmp_path_factory.mktemp(family))
        hf_model(family, seed=1).save_pretrained(paths[family])
    return paths


def test_tensor_parallel_matches_the_unsharded_reference(models, corpus, tmp_path):
    layouts = {
        2: {
            "tp=2": {"parallel.tp": 2, "train.micro_batch_size": 4},
            "tp=2 packed": {"parallel.tp": 2, "data.packing": True, "train.micro_batch_size": 8},
            "tp=2 chunked loss": {"parallel.tp": 2, **CHUNKED, "train.micro_batch_size": 4},
        },
        4: {
            "tp=2 x dp_shard=2": {"parallel.tp": 2, "parallel.dp_shard": 2},
            "tp=2 x sp=2 packed": {"parallel.tp": 2, "parallel.sp": 2, "data.packing": True},
            "tp=2 x dp_shard=2 packed, checkpointed": {
                "parallel.tp": 2,
                "parallel.dp_shard": 2,
                "data.packing": True,
                "train.activation_checkpointing": "full",
            },
            "tp=2 x dp_shard=2 packed, chunked loss": {
                "parallel.tp": 2,
                "parallel.dp_shard": 2,
                "data.packing": True,
                **CHUNKED,
            },
        },
    }
    curves = layout_curves(layouts, models, corpus, tmp_path)
    assert_match_references(curves, models, corpus)


def test_checkpoints_reshard_between_tensor_parallel_and_fsdp(corpus, tmp_path):
    layouts = ({"parallel.tp": 2, "parallel.dp_shard": 2}, {"parallel.dp_shard": 4})
    assert_checkpoints_reshard(layouts, corpus, tmp_path, 4)


def test_tensor_parallel_mistakes_are_one_line_errors(corpus, tmp_path):
    from omniweave.train.checks import validate

    def error(world: int, model: str = "llama", **settings) -> str:
        cfg = load_config(
            None,
            resume_args(corpus, str(tmp_path / "x"), **{"model.config": TINY[model]}, **settings),
        )
        with pytest.raises(ValueError) as caught:
            validate(cfg, world)
        return str(caught.value)

    assert "must divide the model's 4 attention heads" in error(3, **{"parallel.tp": 3})
    assert "sp=2 x parallel.tp=4 must divide" in error(8, **{"parallel.tp": 4, "parallel.sp": 2})
    assert "olmoe" in error(2, "olmoe", **{"parallel.tp": 2})  # a plan of other styles


def test_tensor_parallel_with_expert_parallel_experts_matches_the_moe_reference(corpus, tmp_path):
    """A Qwen3-MoE at tp=2 x ep=2: attention split over tp, each MoE block on its rank's slice of
    the sequence with the 8 experts split over ep; the router's aux loss over all tokens of the
    step as in the reference."""
    from tests.test_expert_parallel import moe_reference
    from tests.test_parity import _assert_close, _overrides, _train_runs

    path = str(tmp_path / "moe")
    hf_model("qwen3_moe", seed=1).save_pretrained(path)
    layout = {"parallel.tp": 2, "parallel.ep": 2, "data.packing": True}
    layout["train.micro_batch_size"] = 4  # one micro-batch a rank: the aux loss over the step
    run = ("tp=2 x ep=2", _overrides(path, corpus, str(tmp_path / "run"), **layout))
    per_rank = run_distributed(_train_runs, 4, [run])
    assert all(rank == per_rank[0] for rank in per_rank), "ranks disagree"
    _assert_close(per_rank[0]["tp=2 x ep=2"], moe_reference(path, corpus), "tp=2 x ep=2")
