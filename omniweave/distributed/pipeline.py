"""Pipeline parallelism (``parallel.pp``): the decoder layers are cut into ``pp`` stages, one
per pipeline rank, and ``torch.distributed.pipelining`` runs each step's micro-batches through
them under a schedule (``1f1b`` or ``gpipe``).

A rank keeps the Hugging Face model it built on the meta device but only its own part of it:
the layers of its stage (the others become empty placeholders, so every parameter keeps its
original name and checkpoints reshard to and from any other layout), the embeddings on the
first stage, the final norm and LM head on the last. The instance's ``forward`` is replaced by
the stage's: hidden states in and out, token losses out of the last stage.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from omniweave.data.processors import IGNORE_INDEX

SCHEDULES = ("1f1b", "gpipe")


def check_pipeline(config: PretrainedConfig, pp: int, model: nn.Module) -> None:
    """ValueError, before any process group, for a model ``pp`` stages cannot cut."""
    layers = config.get_text_config().num_hidden_layers
    if pp > layers:
        raise ValueError(
            f"parallel.pp={pp} is more than the model's {layers} decoder layers; each stage "
            f"needs at least one: use parallel.pp <= {layers}."
        )
    base = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or not all(hasattr(base, p) for p in parts) or not hasattr(model, "lm_head"):
        raise ValueError(
            f"parallel.pp: a {config.model_type} model is not a decoder stack this pipeline "
            "can cut (model.embed_tokens, layers, norm, rotary_emb and lm_head)."
        )
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        raise ValueError(
            "parallel.pp with tied input and output embeddings: the first and the last stage "
            "would each hold the same matrix; untie them (tie_word_embeddings: false) or use "
            "parallel.pp=1."
        )


def stage_layers(layer_sizes: list[int], head_sizes: tuple[int, int], stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, that minimise the largest stage's parameter
    count; ``head_sizes``: the parameters the first (embeddings) and last (norm, LM head)
    stage carry besides their layers. Warns when the stages differ by more than 10%."""
    n = len(layer_sizes)
    prefix = [0]
    for size in layer_sizes:
        prefix.append(prefix[-1] + size)

    def cost(start: int, end: int, stage: int) -> int:
        extra = (head_sizes[0] if stage == 0 else 0) + (head_sizes[1] if stage == stages - 1 else 0)
        return prefix[end] - prefix[start] + extra

    # best[s][i]: the smallest largest-stage cost of layers[:i] cut into s + 1 stages
    best = [[float("inf")] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, i, 0)
    for s in range(1, stages):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                worst = max(best[s - 1][j], cost(j, i, s))
                if worst < best[s][i]:
                    best[s][i], cut[s][i] = worst, j
    bounds, end = [], n
    for s in range(stages - 1, 0, -1):
        bounds.append(cut[s][end])
        end = cut[s][end]
    edges = [0, *reversed(bounds), n]
    ranges = [range(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    sizes = [cost(r.start, r.stop, s) for s, r in enumerate(ranges)]
    if max(sizes) > 1.1 * min(sizes):
        warnings.warn(
            f"parallel.pp={stages}: stages hold {', '.join(f'{s / 1e6:.2f}M' for s in sizes)} "
            "parameters; the others wait on the largest (whole layers cannot be split).",
            stacklevel=2,
        )
    return ranges


def split_stage(model: nn.Module, stage: int, stages: int) -> range:
    """Keep only ``stage``'s part of ``model`` (on the meta device) and give it the stage's
    forward; returns the stage's layer indices."""
    base = model.model
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in base.layers]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    heads = (count(base.embed_tokens), count(base.norm) + count(model.lm_head))
    owned = stage_layers(sizes, heads, stages)[stage]
    for index in range(len(base.layers)):
        if index not in owned:
            base.layers[index] = nn.Module()  # no parameters; the others keep their names
    if stage > 0:
        base.embed_tokens = None
    if stage < stages - 1:
        base.norm = None
        model.lm_head = None
    model.forward = types.MethodType(_make_forward(owned), model)
    return owned


def _make_forward(owned: range):
    def forward(self, x, position_ids, targets, weights):
        """The stage: token ids (first) or hidden states in; hidden states out, or from the
        last stage each token's cross-entropy times its weight (0 where no target)."""
        base = self.model
        hidden = base.embed_tokens(x) if base.embed_tokens is not None else x
        extra = {}
        if position_ids.shape[0] == 1:  # a packed row: samples start where positions restart
            starts = torch.nonzero(position_ids[0] == 0).flatten()
            end = torch.tensor([position_ids.shape[1]], device=starts.device)
            extra["cu_seq_lens_q"] = torch.cat([starts, end]).int()
        position_embeddings = base.rotary_emb(hidden, position_ids)
        for index in owned:
            hidden = base.layers[index](
                hidden,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=False,
                **extra,
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        if self.lm_head is None:
            return hidden
        logits = self.lm_head(base.norm(hidden)).float()
        losses = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        return losses.view_as(weights) * weights

    return forward


def _padded(batch, rows: int, width: int, by_sample: bool) -> tuple:
    """(input ids, positions, targets, loss weights) of ``batch`` padded to ``[rows, width]``
    (token 0: padding is never attended to from a sample, nor learned);
    a packed row's padding is a segment of its own (positions from 0), as in ``pack_row``.
    Weights: 1 / its sample's targets (``by_sample``), else 1, at each target."""
    have_rows, have_width = batch.input_ids.shape
    ids = torch.zeros(rows, width, dtype=torch.long)
    targets = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(rows, width)
    positions = torch.arange(width).repeat(rows, 1)
    ids[:have_rows, :have_width] = batch.input_ids
    targets[:have_rows, :have_width] = batch.targets
    labelled = (batch.targets != IGNORE_INDEX).float()
    weights[:have_rows, :have_width] = batch.sample_weights if by_sample else labelled
    positions[:have_rows, :have_width] = batch.position_ids
    if have_rows == 1 and width > have_width:
        positions[0, have_width:] = torch.arange(width - have_width)
    return ids, positions, targets, weights


class Pipeline:
    """Runs one rank's stage of the model over a step's micro-batches under a schedule.

    Every micro-batch of a step is padded to one shape (the schedules send fixed-size
    activations); a new shape or micro-batch count builds a new stage and schedule."""

    def __init__(self, model: nn.Module, stage: int, stages: int, group, schedule: str, device):
        self.model, self.stage, self.stages = model, stage, stages
        self.group, self.schedule_name, self.device = group, schedule, device
        self.hidden_size = model.config.get_text_config().hidden_size
        self._key, self._built = None, None
        self.token_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.scale = 1.0

    def _schedule(self, count: int, rows: int, width: int, dtype: torch.dtype):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        key = (count, rows, width, dtype)
        if key != self._key:  # one shape at a time: the old stage's buffers are freed
            shape = (rows, width, self.hidden_size)  # requires grad: the gradient flows back
            hidden = torch.empty(shape, dtype=dtype, device=self.device, requires_grad=True)
            first, last = self.stage == 0, self.stage == self.stages - 1
            ids = torch.empty(rows, width, dtype=torch.long, device=self.device)
            losses = torch.empty(rows, width, device=self.device)
            stage = PipelineStage(
                self.model,
                self.stage,
                self.stages,
                self.device,
                input_args=(ids if first else hidden,),
                output_args=(losses if last else hidden,),
                input_grads=(None if first else hidden,),
                output_grads=(None if last else hidden,),
                group=self.group,
            )
            kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[self.schedule_name]
            if count < self.stages:  # 1F1B needs a micro-batch per stage; GPipe runs any count
                kind = ScheduleGPipe
            self._key, self._built = key, kind(stage, count, loss_fn=self._loss, scale_grads=False)
        return self._built

    def _loss(self, weighted_losses: torch.Tensor, _target) -> torch.Tensor:
        total = weighted_losses.sum()
        self.token_loss_sum += total.detach().double()
        return total * self.scale

    def step(
        self, batches: list, scale: float, dtype: torch.dtype, by_sample: bool
    ) -> torch.Tensor:
        """Forward and backward of all ``batches``, each micro-batch's loss times ``scale``;
        returns the sum of their weighted token losses on the last stage (0 elsewhere)."""
        rows = max(b.input_ids.shape[0] for b in batches)
        width = max(b.input_ids.shape[1] for b in batches)
        parts = [_padded(b, rows, width, by_sample) for b in batches]
        ids, positions, targets, weights = (
            torch.cat(column).to(self.device) for column in zip(*parts, strict=True)
        )
        self.scale = scale
        self.token_loss_sum.zero_()
        schedule = self._schedule(len(batches), rows, width, dtype)
        args = (ids,) if self.stage == 0 else ()
        kwargs = {"position_ids": positions, "targets": targets, "weights": weights}
        schedule.step(*args, target=targets, **kwargs)
        return self.token_loss_sum.clone()
