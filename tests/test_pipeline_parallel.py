"""Pipeline parallelism (``parallel.pp``): the unmodified HF model cut into stages trains the
curve of the plain model in a plain PyTorch loop under each schedule (1F1B, GPipe, interleaved
1F1B), padded and packed, with FSDP, with tensor parallelism, with Ulysses and with ring
attention (activation checkpointing recomputes each micro-batch with its own ring layout); its
checkpoints resume from ``pp=2 x tp=2`` on ``dp_shard=4`` and the reverse; the stages are
balanced by parameter count; mistakes are one-line errors."""

from __future__ import annotations

import pytest

from omniweave.config import load_config
from omniweave.distributed.pipeline import stage_layers
from tests.models import TINY, hf_model
from tests.test_parity import (
    assert_checkpoints_reshard,
    assert_match_references,
    layout_curves,
    resume_args,
)

UNTIED = {"tie_word_embeddings": False}  # pp refuses tied embeddings (first and last stage)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = {}
    # qwen2: GQA (4 heads, 2 KV heads); llama with 5 layers: stages of unequal layer counts
    for family, layers in (("qwen2", 4), ("llama", 5)):
        paths[family] = str(tmp_path_factory.mktemp(family))
        model = hf_model(family, seed=1, num_hidden_layers=layers, **UNTIED)
        model.save_pretrained(paths[family])
    return paths


def test_pipeline_matches_the_unsharded_reference(models, corpus, tmp_path):
    layouts = {
        2: {
            "pp=2 1f1b": {"parallel.pp": 2, "train.micro_batch_size": 2},
            "pp=2 gpipe packed": {
                "parallel.pp": 2,
                "parallel.pp_schedule": "gpipe",
                "data.packing": True,
                "train.micro_batch_size": 2,
            },
            "pp=2 interleaved, 2 stages per rank": {
                "parallel.pp": 2,
                "parallel.pp_schedule": "interleaved_1f1b",
                "parallel.pp_virtual_stages": 2,
                "train.micro_batch_size": 1,
            },
        },
        4: {
            "pp=2 x dp_shard=2 packed under a token budget, checkpointed": {
                "parallel.pp": 2,
                "parallel.dp_shard": 2,
                "data.packing": True,
                "data.max_tokens_per_microbatch": 128,
                "train.activation_checkpointing": "full",
            },
            "pp=2 x sp=2 packed": {
                "parallel.pp": 2,
                "parallel.sp": 2,
                "parallel.dp_shard": 1,
                "data.packing": True,
                "train.micro_batch_size": 2,
            },
            "pp=2 x cp=2 packed, checkpointed": {
                "parallel.pp": 2,
                "parallel.cp": 2,
                "parallel.dp_shard": 1,
                "data.packing": True,
                "train.micro_batch_size": 2,
                "train.activation_checkpointing": "full",
            },
            "pp=2 x cp=2 padded, gpipe": {
                "parallel.pp": 2,
                "parallel.cp": 2,
                "parallel.dp_shard": 1,
                "parallel.pp_schedule": "gpipe",
                "train.micro_batch_size": 2,
            },
            "pp=2 x tp=2 packed": {
                "parallel.pp": 2,
                "parallel.tp": 2,
                "parallel.dp_shard": 1,
                "data.packing": True,
                "train.micro_batch_size": 2,
            },
        },
    }
    curves = layout_curves(layouts, models, corpus, tmp_path)
    assert_match_references(curves, models, corpus)


def test_checkpoints_reshard_between_pipeline_with_tensor_parallel_and_fsdp(corpus, tmp_path):
    layouts = (
        {"parallel.pp": 2, "parallel.tp": 2, "parallel.dp_shard": 1},
        {"parallel.dp_shard": 4},
    )
    model = {"model.config": {**TINY["llama"], "num_hidden_layers": 4, **UNTIED}}
    assert_checkpoints_reshard(layouts, corpus, tmp_path, 4, **model)


def test_stages_are_balanced_by_parameter_count():
    # the embeddings and the head weigh two layers each: 8 layers cut in 4 stages
    ranges = stage_layers([1] * 8, (2, 2), 4)
    assert [len(r) for r in ranges] == [1, 3, 3, 1]
    assert [r.start for r in ranges] == [0, 1, 4, 7]
    with pytest.warns(UserWarning, match="wait on the largest"):
        stage_layers([1, 1, 1], (0, 0), 2)  # 2 and 1 layers


def test_pipeline_mistakes_are_one_line_errors(corpus, tmp_path):
    from omniweave.train.checks import validate

    def error(world: int, config: dict | None = None, **settings) -> str:
        config = config or {**TINY["llama"], **UNTIED}
        args = resume_args(corpus, str(tmp_path / "x"), **{"model.config": config}, **settings)
        with pytest.raises(ValueError) as caught:
            validate(load_config(None, args), world)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "more than the model's 2 decoder layers" in error(4, **{"parallel.pp": 4})
    interleaved = {"parallel.pp": 2, "parallel.pp_schedule": "interleaved_1f1b"}
    assert "2 or more stages per rank" in error(2, **interleaved)
    assert "pp_virtual_stages=2 stages are more" in error(
        2, **interleaved, **{"parallel.pp_virtual_stages": 2}
    )
    assert "tied" in error(2, TINY["qwen2"], **{"parallel.pp": 2})
    assert "not yet with expert parallelism" in error(4, **{"parallel.pp": 2, "parallel.ep": 2})
    assert "mixture-of-experts" in error(2, {**TINY["qwen3_moe"], **UNTIED}, **{"parallel.pp": 2})
    assert "chunked" in error(2, **{"parallel.pp": 2, "train.cross_entropy": "chunked"})
