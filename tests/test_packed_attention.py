"""The packed-attention operator against per-segment ``scaled_dot_product_attention``, and
compiled decoder blocks that keep it in one graph."""

import pytest
import torch
import torch.nn.functional as F

from omniweave.distributed.ulysses import apply_sequence_attention
from omniweave.ops.packed_attention import packed_causal_attention
from tests.models import hf_model


def _reference(query, key, value, lengths, scale):
    parts = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    outputs = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        for q, k, v in parts
        if q.shape[2]
    ]
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_matches_per_segment_sdpa_forward_and_backward(dtype):
    """Grouped-query heads, an empty segment and a one-token one; tokens-first inputs, as
    the model's projections give them."""
    torch.manual_seed(0)
    lengths = [30, 0, 1, 57, 12]
    tokens = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(1, tokens, 8, 16, dtype=dtype).transpose(1, 2)
    key, value = (torch.randn(1, tokens, 4, 16, dtype=dtype).transpose(1, 2) for _ in "kv")
    grad = torch.randn(1, 8, tokens, 16, dtype=dtype)
    results = []
    for attend in (
        lambda q, k, v: packed_causal_attention(q, k, v, cu, 0.3)[0],
        lambda q, k, v: _reference(q, k, v, lengths, 0.3),
    ):
        inputs = [t.detach().requires_grad_() for t in (query, key, value)]
        out = attend(*inputs)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference)
    # The check can fail: one segment over the row is another attention.
    whole = _reference(query, key, value, [tokens], 0.3)
    assert not torch.allclose(results[0][0], whole, atol=1e-2)


def test_packed_attention_passes_torch_library_checks():
    """Fake (meta) shapes and strides, autograd registration and schema, per ``opcheck``."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 17, 24], dtype=torch.int32)
    q = torch.randn(1, 4, 24, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 24, 8, requires_grad=True) for _ in "kv")
    torch.library.opcheck(packed_causal_attention, (q, k, v, cu, 0.35))


def test_compiled_decoder_block_over_packed_rows_is_one_graph():
    """``fullgraph=True`` raises at any graph break: the segment loop's lengths stay inside
    the operator. The compiled block's outputs and gradients match the eager block's."""
    torch._dynamo.reset()
    model = hf_model("qwen2", seed=1)
    apply_sequence_attention(model, "sdpa", group=None)
    block = model.model.layers[0]
    cu = torch.tensor([0, 9, 30, 41], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in cu.diff().tolist()])[None]
    hidden = torch.randn(1, 41, model.config.hidden_size)
    rotary = model.model.rotary_emb(hidden, positions)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    results = []
    for run in (block, compiled):
        x = hidden.clone().requires_grad_()
        out = run(x, position_embeddings=rotary, position_ids=positions, cu_seq_lens_q=cu)
        out = out[0] if isinstance(out, tuple) else out
        results.append((out, *torch.autograd.grad(out.square().sum(), [x])))
    for compiled_result, eager_result in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled_result, eager_result, rtol=1e-4, atol=1e-5)
