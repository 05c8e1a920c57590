"""Expert parallelism: each of the ``ep`` ranks of a group holds ``experts / ep`` experts.

transformers 5.x gives fused MoE experts one signature, ``forward(hidden_states,
top_k_index, top_k_weights)``, dispatched through its ``ExpertsInterface``. We
register ``omniweave_ep`` there: it sends every (token, expert) pair to the rank
that holds the expert with ``all_to_all_single`` (split sizes exchanged first),
runs the local experts, sends the results back and applies the routing weights.
The router stays the model's own. Expert weights are DTensors sharded on dim 0
over the ``ep`` mesh; FSDP shards them further over the other FSDP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

EXPERTS_IMPLEMENTATION = "omniweave_ep"


class _AllToAllSplits(torch.autograd.Function):
    """Rows of ``x`` go to ranks in ``send`` sizes; ``receive`` sizes come back. Backward
    is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send: list[int], receive: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = (send, receive), group
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send, receive = ctx.sizes
        out = grad.new_empty((sum(send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send, receive, group=ctx.group)
        return out, None, None, None


def all_to_all_rows(x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of rows with split sizes (zeros allowed)."""
    return _AllToAllSplits.apply(x, send, receive, group)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient (expert weights' FSDP reduction averages
    over ``ep`` times fewer ranks than the rest of the model)."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def local_experts(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_fn,
    grouped: bool,
) -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert id: ``act(gate) * up`` then ``down``."""
    counts = torch.bincount(expert_ids, minlength=gate_up.shape[0])
    if grouped:
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(hidden, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return F.grouped_mm(act_fn(gate) * up, down.transpose(1, 2), offs=offsets)
    outputs = []
    # Experts without rows run too: a rank that receives no tokens must still reach the
    # dispatch all-to-all in backward, as its EP peers do (else they wait on it forever).
    for expert, rows in enumerate(hidden.split(counts.tolist())):
        gate, up = F.linear(rows, gate_up[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(act_fn(gate) * up, down[expert]))
    return torch.cat(outputs)


def make_experts_forward(group, grouped: bool = False):
    """The ``ExpertsInterface`` function for the EP ``group`` (None: all experts local)."""
    ep = 1 if group is None else dist.get_world_size(group)

    def forward(
        module: nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        gate_up, down = module.gate_up_proj, module.down_proj
        if isinstance(gate_up, DTensor):
            gate_up, down = gate_up.to_local(), down.to_local()
        if ep > 1:
            gate_up, down = _ScaleGrad.apply(gate_up, 1 / ep), _ScaleGrad.apply(down, 1 / ep)
        per_rank = gate_up.shape[0]
        num_experts = per_rank * ep
        top_k = top_k_index.shape[1]
        # (token, expert) pairs in expert order, i.e. grouped by the rank holding the expert.
        experts = top_k_index.flatten()
        order = torch.argsort(experts, stable=True)
        counts = torch.bincount(experts, minlength=num_experts)
        received_counts = counts
        if ep > 1:
            received_counts = torch.empty_like(counts)
            dist.all_to_all_single(received_counts, counts, group=group)
        send = counts.view(ep, per_rank).sum(1).tolist()
        received_counts = received_counts.view(ep, per_rank)  # [source rank, local expert]
        receive = received_counts.sum(1).tolist()
        tokens = hidden_states[order // top_k]
        arrived = all_to_all_rows(tokens, send, receive, group) if ep > 1 else tokens
        # Arrived rows are grouped by source rank, then expert: regroup by expert.
        local_ids = torch.arange(per_rank, device=experts.device).repeat(ep)
        arrived_ids = local_ids.repeat_interleave(received_counts.flatten())
        by_expert = torch.argsort(arrived_ids, stable=True)
        computed = local_experts(
            arrived[by_expert], arrived_ids[by_expert], gate_up, down, module.act_fn, grouped
        )
        results = torch.empty_like(computed)
        results[by_expert] = computed
        returned = all_to_all_rows(results, receive, send, group) if ep > 1 else results
        weights = top_k_weights.flatten()[order].unsqueeze(1).to(returned.dtype)
        output = torch.zeros_like(hidden_states)
        return output.index_add(0, order // top_k, returned * weights)

    return forward


def check_experts(config, ep: int) -> None:
    """``ep`` must divide the number of experts (start-up ValueError otherwise)."""
    if ep == 1:
        return
    experts = getattr(config.get_text_config(), "num_experts", None) or getattr(
        config.get_text_config(), "num_local_experts", None
    )
    if not experts:
        raise ValueError(f"parallel.ep={ep} needs a mixture-of-experts model; this one has none.")
    if experts % ep:
        raise ValueError(
            f"parallel.ep={ep} must divide the model's {experts} experts; choose an ep among "
            f"the divisors of {experts}."
        )


def apply_expert_parallel(model: nn.Module, group, grouped: bool = False) -> None:
    """Route every fused-experts module through the EP dispatch of ``group`` (None: no EP,
    for the grouped-GEMM compute alone)."""
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, make_experts_forward(group, grouped))
    model.config.get_text_config()._experts_implementation = EXPERTS_IMPLEMENTATION
