"""The MoE auxiliary load-balancing loss over all ranks' tokens, with the model's own function.

The loss multiplies per-expert token fractions by mean router probabilities, so it
is not a sum over tokens: averaging per-rank values would change it with the
layout. Instead every rank gathers the router logits of all ranks' real tokens
(padding excluded) and applies the family's ``load_balancing_loss_func``, which
gives the value the unsharded model computes on the same micro-batch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from omniweave.distributed.overlap import all_to_all_rows


def is_moe(model: nn.Module) -> bool:
    return hasattr(model.config.get_text_config(), "router_aux_loss_coef")


class RouterLoss:
    """Aux loss and per-expert token counts of one micro-batch, over the ranks of ``group``."""

    def __init__(self, model: nn.Module, group):
        config = model.config.get_text_config()
        self.loss_function = next(  # FSDP subclasses the model: look through the bases
            sys.modules[cls.__module__].load_balancing_loss_func
            for cls in type(model).__mro__
            if hasattr(sys.modules[cls.__module__], "load_balancing_loss_func")
        )
        self.coefficient = config.router_aux_loss_coef
        self.num_experts = getattr(config, "num_experts", None) or config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.group = group

    def __call__(
        self, router_logits: tuple[torch.Tensor, ...], real: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``router_logits``: per layer ``[local tokens, experts]``; ``real``: flat bool mask of
        the local tokens that are not padding. Returns (aux loss, [layers, experts] counts)."""
        layers = len(router_logits)
        local = torch.cat(router_logits, dim=1)[real.to(router_logits[0].device)]
        gathered = self._gather(local).view(-1, layers, self.num_experts).unbind(1)
        aux = self.loss_function(gathered, self.num_experts, self.top_k)
        with torch.no_grad():
            chosen = torch.stack([g.topk(self.top_k, dim=-1).indices for g in gathered])
            counts = torch.stack(
                [torch.bincount(c.flatten(), minlength=self.num_experts) for c in chosen]
            )
        return aux, counts

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """All ranks' rows, in rank order (differentiable; ranks may hold different counts)."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return local
        world = dist.get_world_size(self.group)
        rows = local.shape[0]
        counts = torch.full((world,), rows, device=local.device)
        dist.all_to_all_single(counts, counts.clone(), group=self.group)  # everyone's count
        return all_to_all_rows(local.repeat(world, 1), [rows] * world, counts.tolist(), self.group)
