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

from omniweave.distributed.overlap import start_all_to_all, wait_all_to_all

EXPERTS_IMPLEMENTATION = "omniweave_ep"


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


def make_experts_forward(group, grouped: bool = False, chunks: int = 1):
    """The ``ExpertsInterface`` function for the EP ``group`` (None: all experts local).
    ``chunks``: the tokens go in that many consecutive parts, all dispatched at once, so
    the exchange of later parts overlaps the expert compute of earlier ones, and each
    part's results travel back while the next part computes."""
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
        top_k = top_k_index.shape[1]
        tokens = torch.arange(len(top_k_index), device=top_k_index.device)
        parts = [_Part(ids, top_k_index[ids], per_rank * ep) for ids in tokens.tensor_split(chunks)]
        counts = torch.stack([part.counts for part in parts])  # [part, expert]
        counts = counts.view(len(parts), ep, per_rank).transpose(0, 1).contiguous()
        received = counts  # [rank holding / sending, part, local expert]
        if ep > 1:
            received = torch.empty_like(counts)
            dist.all_to_all_single(received, counts, group=group)
        in_flight = []
        for i, part in enumerate(parts):
            part.send, part.receive = counts[:, i].sum(1).tolist(), received[:, i].sum(1).tolist()
            tokens = hidden_states[part.token_of_pair(top_k)]
            in_flight.append(_exchange(tokens, part.send, part.receive, group))
        returning = []
        for i, part in enumerate(parts):
            arrived = _arrive(in_flight[i])
            results = _by_source(arrived, received[:, i], gate_up, down, module.act_fn, grouped)
            returning.append(_exchange(results, part.receive, part.send, group))
        output = torch.zeros_like(hidden_states)
        for part, exchange in zip(parts, returning, strict=True):
            weights = top_k_weights[part.ids].flatten()[part.order].unsqueeze(1)
            returned = _arrive(exchange)
            output = output.index_add(
                0, part.token_of_pair(top_k), returned * weights.to(returned.dtype)
            )
        return output

    return forward


class _Part:
    """One consecutive part of the tokens: its (token, expert) pairs in expert order, i.e.
    grouped by the rank holding the expert, and the pair count per expert."""

    def __init__(self, ids: torch.Tensor, top_k_index: torch.Tensor, num_experts: int):
        experts = top_k_index.flatten()
        self.ids = ids
        self.order = torch.argsort(experts, stable=True)
        self.counts = torch.bincount(experts, minlength=num_experts)
        self.send = self.receive = None

    def token_of_pair(self, top_k: int) -> torch.Tensor:
        return self.ids[self.order // top_k]


def _exchange(rows: torch.Tensor, send: list[int], receive: list[int], group):
    """Start sending ``rows``; ``(rows, None)`` when all experts are local."""
    if group is None or len(send) == 1:
        return rows, None
    return start_all_to_all(rows, group, send, receive)


def _arrive(exchange) -> torch.Tensor:
    rows, pending = exchange
    return rows if pending is None else wait_all_to_all(rows, pending)


def _by_source(arrived, received_counts, gate_up, down, act_fn, grouped) -> torch.Tensor:
    """Run the local experts on rows that arrive grouped by source rank, then expert; the
    results in arrival order."""
    ep, per_rank = received_counts.shape
    local_ids = torch.arange(per_rank, device=arrived.device).repeat(ep)
    arrived_ids = local_ids.repeat_interleave(received_counts.flatten())
    by_expert = torch.argsort(arrived_ids, stable=True)
    computed = local_experts(
        arrived[by_expert], arrived_ids[by_expert], gate_up, down, act_fn, grouped
    )
    results = torch.empty_like(computed)
    results[by_expert] = computed
    return results


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


def apply_expert_parallel(model: nn.Module, group, grouped: bool = False, chunks: int = 1) -> None:
    """Route every fused-experts module through the EP dispatch of ``group`` (None: no EP,
    for the grouped-GEMM compute alone) in ``chunks`` overlapped parts."""
    forward = make_experts_forward(group, grouped, chunks)
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, forward)
    model.config.get_text_config()._experts_implementation = EXPERTS_IMPLEMENTATION
