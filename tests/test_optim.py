"""The optimizer step's pieces against independent references."""

import pytest
import torch

from omniweave.train.optim import clip_grad_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_norm_matches_a_float64_reference(dtype):
    torch.manual_seed(0)
    sizes = [(4096, 256), (256,), (768, 256), (0,), (3, 5), (), (2, 0, 3)]
    params = [torch.zeros(size, dtype=dtype, requires_grad=True) for size in sizes]
    for param in params:
        param.grad = (torch.randn(param.shape) * 1e-3).to(dtype)
    reference = torch.cat([p.grad.double().flatten() for p in params]).norm()
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, max_norm=reference.item() / 2)
    # float32 norms of whole tensors are ~1e-5 off
    assert abs(norm.item() - reference.item()) <= 1e-7 * reference.item()
    for param, grad in zip(params, before, strict=True):  # clipped to half
        torch.testing.assert_close(param.grad.double(), grad.double() / 2, rtol=1e-2, atol=0)
