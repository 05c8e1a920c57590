"""Tensor parallelism (``parallel.tp``): DTensor's ``parallelize_module`` on the unmodified
Hugging Face model, from the family's own ``base_model_tp_plan``.

Between blocks the activations are split along the sequence (sequence-parallel norms); each
attention and MLP gathers the whole sequence at its entry, computes its share of the heads or
of the hidden units (column-wise projections), and its row-wise output projection
reduce-scatters back to a sequence split. The embedding is split over the vocabulary; the LM
head's logits stay split over the vocabulary, and the loss is computed on them in place
(``loss_parallel``), or chunk by chunk with the head (``train.cross_entropy: chunked``), so
full logits never exist on any rank.

Mixture-of-experts blocks stay whole on every rank and run on the rank's own slice of the
sequence (tokens are routed one by one; with ``ep`` the experts are split over the ``ep``
ranks as without TP); their gradients are summed over ``tp`` after the backward
(``token_local_parameters``).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from omniweave.distributed.plan import matches

# transformers' plan styles we apply: column- and row-wise linears, and per-head norms inside
# attention (a replicated weight; its input split over the heads, dim 2 of [b, s, heads, d])
STYLES = ("colwise", "rowwise", "replicated_with_grad_allreduce")


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """``tp`` must divide the attention heads, the KV heads and the vocabulary, and the family's
    plan must split every weight of its blocks but the norms (``model``: on the meta device).
    A ValueError saying what to change."""
    text = model.config.get_text_config()
    plan = getattr(text, "base_model_tp_plan", None) or {}
    unsupported = sorted({style for style in plan.values() if style not in STYLES})
    if not plan or unsupported:
        raise ValueError(
            f"parallel.tp={tp}: transformers has no tensor-parallel plan of the kinds we apply "
            f"({', '.join(STYLES)}) for {text.model_type} (it has {unsupported or 'none'}); use "
            "parallel.tp=1 for it."
        )
    sizes = {
        "attention heads": text.num_attention_heads,
        "key/value heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "vocabulary entries": text.vocab_size,
    }
    for what, size in sizes.items():
        if size % tp:
            raise ValueError(
                f"parallel.tp={tp} must divide the model's {size} {what}; choose a tp that "
                "divides the attention heads, the key/value heads and the vocabulary."
            )
    stack = model.get_decoder()
    covered = [*plan, *_norms(stack)]
    sparse = [f"{name}." for name in _sparse_blocks(stack)]  # on each rank's own tokens
    left = [
        name
        for name, _ in stack.named_parameters()
        if name.startswith("layers.")
        and not any(matches(name.rsplit(".", 1)[0], glob) for glob in covered)
        and not name.startswith(tuple(sparse))
    ]
    if left:
        raise ValueError(
            f"parallel.tp={tp}: {text.model_type}'s plan leaves {left[:2]} whole inside the "
            "blocks (their gradients would miss the other ranks' heads); use parallel.tp=1."
        )


def _sparse_blocks(stack: nn.Module) -> list[str]:
    """The stack's mixture-of-experts blocks (a router and experts)."""
    return [name for name, m in stack.named_modules() if name.endswith(".mlp") and _sparse(m)]


def _sparse(module: nn.Module) -> bool:
    return hasattr(module, "experts")


def token_local_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that each tensor-parallel rank applies to its own slice of the sequence
    (mixture-of-experts blocks: tokens are routed independently), whole on every rank: their
    gradients are partial sums, to be summed over ``tp``."""
    stack = model.get_decoder()
    return [p for name in _sparse_blocks(stack) for p in stack.get_submodule(name).parameters()]


def sum_gradients(params: list[nn.Parameter], group) -> None:
    """Sum each parameter's (local) gradient over ``group``, in place."""
    for param in params:
        if param.grad is not None:
            grad = param.grad
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)


def _norms(stack: nn.Module) -> list[str]:
    """The stack's block and final norms: they run on the sequence split."""
    return [
        name for name, _ in stack.named_modules() if name.endswith("layernorm") or name == "norm"
    ]


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Split ``model`` (a causal LM on the meta device, checked by ``check_tensor_parallel``)
    over ``mesh`` by its family's plan."""
    config = model.config.get_text_config()
    stack = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is stack)
    layer_plan = {glob: _style(style) for glob, style in config.base_model_tp_plan.items()}
    layer_plan |= dict.fromkeys(_norms(stack), SequenceParallel())
    whole = {"hidden_states": Replicate()}
    for name, module in stack.named_modules():
        if name.endswith("self_attn"):  # called with hidden_states=...: gather the sequence
            layer_plan[name] = PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts=whole,
                use_local_output=True,
            )
        elif name.endswith(".mlp") and _sparse(module):  # experts: the rank's own tokens
            layer_plan[name] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True
            )
        elif name.endswith(".mlp"):  # called with the hidden states alone
            layer_plan[name] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
    plan = {f"{prefix}.{glob}": style for glob, style in layer_plan.items()}
    # a pipeline stage has the embedding only first and the LM head only last
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is not None:
        plan[f"{prefix}.embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1)
        )
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    parallelize_module(model, mesh, plan)
    if head is not None:
        split_vocabulary_head(head, mesh)
    if tied:  # both split the vocabulary (dim 0): one parameter again
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def split_vocabulary_head(head: nn.Linear, mesh: DeviceMesh) -> None:
    """The LM head split over the vocabulary: its weight sharded on dim 0, its input (the
    final norm's sequence split) gathered whole. Its logits come out split over the
    vocabulary, for ``loss_parallel``; a chunked loss head (``install_loss_head``) reads the
    same weight and input and returns its per-token losses as they are."""

    def split_weight(_name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if module is head:
            weight = distribute_tensor(module.weight, mesh, [Shard(0)])
            module.register_parameter("weight", nn.Parameter(weight, module.weight.requires_grad))

    def gather_sequence(_module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        hidden, *rest = inputs
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, mesh, [Shard(1)], run_check=False)
        return (hidden.redistribute(placements=[Replicate()]), *rest)

    distribute_module(head, mesh, split_weight, input_fn=gather_sequence)


def _style(style: str):
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel(output_layouts=Shard(1))  # reduce-scatter to the sequence split
    return SequenceParallel(sequence_dim=2, use_local_output=True)  # a per-head norm
