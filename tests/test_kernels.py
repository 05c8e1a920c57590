"""Kernel options against the reference implementations: per-block ``torch.compile``
trains like eager; liger-kernel's fused ops (CUDA only) match the torch ops."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from omniweave.ops.kernels import apply_kernels, check_kernels, compile_blocks
from tests.distributed import run_distributed
from tests.models import hf_model, tiny_run_args
from tests.test_parity import _train_runs


def test_compiled_blocks_train_like_eager(corpus, tmp_path):
    """dp_shard=2: FSDP2 around compiled blocks, packed rows of varying lengths."""
    runs = {
        name: tiny_run_args(
            corpus, "qwen3", str(tmp_path / name), **{"data.packing": True, "train.compile": on}
        )
        for name, on in (("eager", False), ("compiled", True))
    }
    curves = run_distributed(_train_runs, 2, list(runs.items()), timeout=600)[0]
    for (loss, norm), (ref_loss, ref_norm) in zip(curves["compiled"], curves["eager"], strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-4)


def test_compile_blocks_keeps_parameter_names():
    model = hf_model("qwen2")
    names = [name for name, _ in model.named_parameters()]
    assert compile_blocks(model, ("Qwen2DecoderLayer",)) == model.config.num_hidden_layers
    assert [name for name, _ in model.named_parameters()] == names


@pytest.mark.skipif(
    torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None,
    reason="liger runs here",
)
def test_liger_without_a_gpu_or_the_package_is_a_clear_error():
    with pytest.raises(ValueError, match="train.kernels=liger"):
        check_kernels("liger")


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="needs a CUDA GPU and liger-kernel",
)
@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_liger_kernels_match_the_torch_ops(family):
    reference, fused = (hf_model(family, seed=5).cuda() for _ in range(2))
    apply_kernels(fused, "liger")
    ids = torch.randint(0, 512, (2, 48), device="cuda", generator=None)
    outputs = []
    for model in (reference, fused):
        logits = model(input_ids=ids, use_cache=False).logits
        logits.square().mean().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = outputs
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)
