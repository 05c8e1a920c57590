"""Chunked cross-entropy against the naive loss: values, gradients, and in training."""

from __future__ import annotations

import pytest
import torch

from omniweave.ops.cross_entropy import chunked_cross_entropy, naive_cross_entropy
from tests.distributed import run_distributed
from tests.models import tiny_run_args
from tests.test_parity import _train_runs


def _inputs(dtype, tokens=50, hidden=16, vocab=97):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=generator).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[::7] = -100
    scale = torch.rand(tokens, generator=generator)  # a non-uniform upstream gradient
    return h, w, targets, scale


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [7, 50, 4096])
def test_chunked_matches_naive_in_values_and_gradients(dtype, tolerance, chunk):
    h, w, targets, scale = _inputs(dtype)
    expected = naive_cross_entropy(h, w, targets)
    (expected * scale).sum().backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = chunked_cross_entropy(h, w, targets, chunk)
    (got * scale).sum().backward()
    assert got.dtype == torch.float32 and bool((got[::7] == 0).all())
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    for a, b in zip((h.grad, w.grad), grads, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance)


def test_no_tensor_of_the_logits_size_is_kept_for_backward():
    h, w, targets, _ = _inputs(torch.float32, tokens=64, vocab=1000)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        chunked_cross_entropy(h, w, targets, chunk=8).sum().backward()
    assert max(saved) == w.numel() < 64 * 1000  # the inputs themselves, no [64, 1000] logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        naive_cross_entropy(h, w, targets).sum().backward()
    assert max(saved) >= 64 * 1000  # the reference does keep them: the check can fail


@pytest.mark.parametrize(
    "model,layout", [("qwen2", {"parallel.dp_shard": 2}), ("llama", {"parallel.sp": 2})]
)
def test_training_with_chunked_loss_matches_naive(corpus, tmp_path, model, layout):
    def args(name: str, **settings) -> list[str]:
        return tiny_run_args(corpus, model, str(tmp_path / name), **layout, **settings)

    chunked = {"train.cross_entropy": "chunked", "train.cross_entropy_chunk": 16}
    runs = [("naive", args("naive")), ("chunked", args("chunked", **chunked))]
    curves = run_distributed(_train_runs, 2, runs)[0]
    for (loss, norm), (ref_loss, ref_norm) in zip(curves["chunked"], curves["naive"], strict=True):
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss and abs(norm - ref_norm) <= 1e-5 * ref_norm
