"""Activation checkpointing and offload: fewer saved activations, the same training."""

from __future__ import annotations

import pytest
import torch

from omniweave.distributed.activations import apply_activation_checkpointing
from omniweave.models.registry import recipe_for
from tests.distributed import run_distributed
from tests.models import hf_model, tiny_run_args
from tests.test_parity import _train_runs


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward during one forward of ``model``."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids).logits.sum().backward()
    return total


@pytest.mark.parametrize("mode,every", [("full", 1), ("full", 2), ("attention", 1), ("mlp", 1)])
def test_checkpointed_blocks_keep_fewer_activations_and_the_same_gradients(mode, every):
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    plain, checkpointed = hf_model("qwen2", seed=1), hf_model("qwen2", seed=1)
    blocks = recipe_for("qwen2").block_classes
    count = apply_activation_checkpointing(checkpointed, blocks, mode, every)
    assert count == len(checkpointed.model.layers[::every])
    assert _saved_bytes(checkpointed, ids) < _saved_bytes(plain, ids)
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize(
    "model,layout,variants",
    [
        (
            "qwen2",
            {"parallel.sp": 2},
            [
                {"train.activation_checkpointing": "full", "train.activation_offload": True},
                {
                    "train.activation_checkpointing": "attention",
                    "train.activation_checkpointing_every": 2,
                },
            ],
        ),
        ("qwen3_moe", {"parallel.ep": 2}, [{"train.activation_checkpointing": "mlp"}]),
    ],
)
def test_training_with_checkpointing_matches_training_without(
    corpus, tmp_path, model, layout, variants
):
    def args(name: str, **settings) -> list[str]:
        return tiny_run_args(corpus, model, str(tmp_path / name), **layout, **settings)

    runs = {"plain": args("plain")}
    runs.update({f"variant{i}": args(f"variant{i}", **v) for i, v in enumerate(variants)})
    curves = run_distributed(_train_runs, 2, list(runs.items()))[0]
    for name in runs:
        for (loss, norm), (ref_loss, ref_norm) in zip(curves[name], curves["plain"], strict=True):
            assert (
                abs(loss - ref_loss) <= 1e-6 * ref_loss and abs(norm - ref_norm) <= 1e-6 * ref_norm
            )
