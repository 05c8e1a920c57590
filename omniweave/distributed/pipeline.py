"""Pipeline parallelism (``parallel.pp``): the decoder layers are cut into stages, one per
pipeline rank (or ``parallel.pp_virtual_stages`` per rank, looped, for ``interleaved_1f1b``),
and ``torch.distributed.pipelining`` runs each step's micro-batches through them under the
schedule ``1f1b``, ``gpipe`` or ``interleaved_1f1b``.

A rank keeps the Hugging Face model it built on the meta device but only its own part of it:
the layers of its stages (the others become empty placeholders, so every parameter keeps its
original name and checkpoints reshard to and from any other layout), the embeddings with the
first stage, the final norm and LM head with the last. The instance's ``forward`` is replaced
by the stages': hidden states in and out, token losses out of the last stage.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig

from omniweave.data.processors import IGNORE_INDEX


def check_pipeline(
    config: PretrainedConfig, pp: int, virtual: int, schedule: str, model: nn.Module
) -> None:
    """ValueError, before any process group, for a model the stages cannot cut or a schedule
    that does not match the stages per rank."""
    if (schedule == "interleaved_1f1b") != (virtual > 1):
        raise ValueError(
            f"parallel.pp_schedule={schedule} with parallel.pp_virtual_stages={virtual}: "
            "interleaved_1f1b runs 2 or more stages per rank, 1f1b and gpipe one."
        )
    layers = config.get_text_config().num_hidden_layers
    if pp * virtual > layers:
        split = f"parallel.pp={pp}" + (f" x pp_virtual_stages={virtual}" if virtual > 1 else "")
        raise ValueError(
            f"{split} stages are more than the model's {layers} decoder layers; each stage "
            f"needs at least one: use at most {layers} stages."
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
            f"the {stages} pipeline stages hold "
            f"{', '.join(f'{s / 1e6:.2f}M' for s in sizes)} parameters; the others wait on "
            "the largest (whole layers cannot be split).",
            stacklevel=2,
        )
    return ranges


def rank_stages(rank: int, pp: int, virtual: int) -> list[int]:
    """The stages pipeline rank ``rank`` runs: ``rank``, ``rank + pp``, ... (``virtual`` of
    them; interleaved schedules loop the micro-batches through the ranks that many times)."""
    return [rank + pp * index for index in range(virtual)]


def split_stage(model: nn.Module, rank: int, pp: int, virtual: int = 1) -> dict[int, range]:
    """Keep only pipeline rank ``rank``'s stages of ``model`` (on the meta device; an OmniModel's
    encoders go with the first stage) and give it the stages' forward; returns each of its
    stages' layer indices."""
    foundation = getattr(model, "foundation", model)  # an OmniModel's language model
    base, stages = foundation.model, pp * virtual
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in base.layers]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    front = count(base.embed_tokens) + (count(model.encoders) if model is not foundation else 0)
    ranges = stage_layers(sizes, (front, count(base.norm) + count(foundation.lm_head)), stages)
    owned = {stage: ranges[stage] for stage in rank_stages(rank, pp, virtual)}
    kept = {index for layers in owned.values() for index in layers}
    for index in range(len(base.layers)):
        if index not in kept:
            base.layers[index] = nn.Module()  # no parameters; the others keep their names
    if 0 not in owned:
        base.embed_tokens = None
    if stages - 1 not in owned:
        base.norm = None
        foundation.lm_head = None
    foundation.forward = types.MethodType(_make_forward(owned, stages), foundation)
    if model is not foundation:
        if 0 not in owned:
            model.encoders = nn.ModuleDict()
        model.forward = types.MethodType(_make_omni_forward(next(iter(owned))), model)
    return owned


def _make_forward(owned: dict[int, range], stages: int):
    def forward(self, x, position_ids, row_positions, targets, weights, stage=None, **ring):
        """A stage (the rank's only one by default): token ids or embeddings (first) or
        hidden states in; hidden states out, or from the last stage each token's
        cross-entropy times its weight, and unweighted, ``[rows, tokens, 2]``. Inputs are
        this rank's slice of the rows (ring, Ulysses); ``row_positions``: the whole rows';
        ``ring``: the micro-batch's ``ring_inputs``, handed to every layer."""
        stage = next(iter(owned)) if stage is None else stage
        base = self.model
        hidden = base.embed_tokens(x) if stage == 0 and not x.is_floating_point() else x
        extra = dict(ring)
        if row_positions.shape[0] == 1:  # a packed row: samples start where positions restart
            starts = torch.nonzero(row_positions[0] == 0).flatten()
            end = torch.tensor([row_positions.shape[1]], device=starts.device)
            extra["cu_seq_lens_q"] = torch.cat([starts, end]).int()
        position_embeddings = base.rotary_emb(hidden, position_ids)
        for index in owned[stage]:
            hidden = base.layers[index](
                hidden,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=False,
                **extra,
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        if stage < stages - 1:
            return hidden
        logits = self.lm_head(base.norm(hidden)).float()  # tp: split over the vocabulary
        losses = F.cross_entropy(  # tp: under loss_parallel, on the split logits
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        if isinstance(losses, DTensor):
            losses = losses.to_local()
        losses = losses.view_as(weights)
        return torch.stack([losses * weights, losses], dim=-1)

    return forward


def _make_omni_forward(only_stage: int):
    def forward(
        self, x, position_ids, row_positions, targets, weights, micro_batch, stage=None, **ring
    ):
        """An OmniModel's stage: the first embeds the tokens and its micro-batch's media
        (``pipeline_media[micro_batch]``, set for the step by ``Pipeline``), then the
        language model's stage runs."""
        stage = only_stage if stage is None else stage
        if stage == 0:
            x = self.embed(x, self.pipeline_media[int(micro_batch[0])])
        return self.foundation(
            x, position_ids, row_positions, targets, weights, stage=stage, **ring
        )

    return forward


class _StageView(nn.Module):
    """One of a rank's several stages: calls the rank's model (an FSDP root, whose hooks must
    run) for that stage. The model is not registered as a child: the view holds no state."""

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.__dict__["root"], self.stage = model, stage

    def forward(self, *args, **kwargs):
        return self.root(*args, stage=self.stage, **kwargs)


def _padded(batch, rows: int, width: int, by_sample: bool) -> tuple:
    """(input ids, positions, targets, loss weights) of ``batch`` padded to ``[rows, width]``
    with token 0, which no sample attends to and nothing learns; a packed row's padding is a
    segment of its own (positions from 0), as in ``pack_row``. Weights at each target: 1 / its
    sample's targets (``by_sample``), else 1."""
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
    """Runs one rank's stages of the model over a step's micro-batches under a schedule.

    Every micro-batch of a step is padded to one shape (the schedules send fixed-size
    activations); a new shape or micro-batch count builds new stages and a new schedule."""

    def __init__(
        self,
        model: nn.Module,
        rank: int,
        pp: int,
        virtual: int,
        group,
        schedule: str,
        device: torch.device,
        local=None,
        sequence_split: tuple[int, int] = (1, 1),
        output_ranges: dict[str, tuple[int, int]] | None = None,
        ring=None,
    ):
        """``local``: this rank's slice of a whole row's tensor (ring, Ulysses), on the
        device; ``sequence_split``: (cp x sp, tp), the ranks the inputs and then the
        activations between stages are split over along the sequence; ``output_ranges``:
        token-id ranges of an OmniModel's output modalities, whose token losses are summed
        apart; ``ring``: the ``ring_inputs`` of whole rows' position ids (ring context
        parallelism)."""
        self.model, self.pp, self.virtual = model, pp, virtual
        self.local = local or (lambda t: t.to(device))
        self.sequence_split, self.ring = sequence_split, ring or (lambda _positions: {})
        self.output_ranges = list((output_ranges or {}).values())
        self.media = hasattr(model, "encoders")  # an OmniModel: its first stage reads media
        self.stage_indices = rank_stages(rank, pp, virtual)
        self.group, self.schedule_name = group, schedule
        self.device = device
        self.hidden_size = model.config.get_text_config().hidden_size
        self._key, self._built = None, None
        self.token_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        # each output modality's token-loss sum, then all tokens' (unweighted)
        sums = len(self.output_ranges) + 1
        self.output_sums = torch.zeros(sums, dtype=torch.float64, device=self.device)
        self.scale = 1.0

    def _stage(self, index: int, rows: int, width: int, dtype: torch.dtype):
        from torch.distributed.pipelining import PipelineStage

        last = self.pp * self.virtual - 1
        sequence, tp = self.sequence_split
        shape = (rows, width // sequence // tp, self.hidden_size)  # gradients flow back
        hidden = torch.empty(shape, dtype=dtype, device=self.device, requires_grad=True)
        ids = torch.empty(rows, width // sequence, dtype=torch.long, device=self.device)
        losses = torch.empty(rows, width // sequence, 2, device=self.device)
        module = self.model if self.virtual == 1 else _StageView(self.model, index)
        return PipelineStage(
            module,
            index,
            self.pp * self.virtual,
            self.device,
            input_args=(ids if index == 0 else hidden,),
            output_args=(losses if index == last else hidden,),
            input_grads=(None if index == 0 else hidden,),
            output_grads=(None if index == last else hidden,),
            group=self.group,
        )

    def _schedule(self, count: int, rows: int, width: int, dtype: torch.dtype):
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleLoopedBFS,
        )

        key = (count, rows, width, dtype)
        if key == self._key:
            return self._built
        stages = [self._stage(index, rows, width, dtype) for index in self.stage_indices]
        options = dict(loss_fn=self._loss, scale_grads=False)
        if self.virtual > 1:
            rounds = max(1, count // self.pp)
            # interleaved 1F1B needs the micro-batches in whole rounds; looped BFS runs any
            kind = ScheduleInterleaved1F1B if count % rounds == 0 else ScheduleLoopedBFS
            schedule = kind(stages, count, **options)
        else:
            kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[self.schedule_name]
            if count < self.pp:  # 1F1B needs a micro-batch per stage; GPipe runs any count
                kind = ScheduleGPipe
            schedule = kind(stages[0], count, **options)
        self._key, self._built = key, schedule  # one shape at a time: the old buffers go
        return schedule

    def _loss(self, losses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss from the last stage's (weighted, plain) token losses."""
        total, plain = losses[..., 0].sum(), losses[..., 1].detach().double()
        self.token_loss_sum += total.detach().double()
        for slot, (low, high) in enumerate(self.output_ranges):
            self.output_sums[slot] += plain[(targets >= low) & (targets < high)].sum()
        self.output_sums[-1] += plain.sum()
        return total * self.scale

    def step(
        self, batches: list, scale: float, dtype: torch.dtype, by_sample: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of all ``batches``, each micro-batch's loss times ``scale``;
        returns the sum of their weighted token losses and the output modalities' sums (see
        ``output_sums``), on the last stage's rank (0 elsewhere)."""
        rows = max(b.input_ids.shape[0] for b in batches)
        width = max(b.input_ids.shape[1] for b in batches)
        parts = [_padded(b, rows, width, by_sample) for b in batches]
        ids, positions, targets, weights = (
            torch.cat(column) for column in zip(*parts, strict=True)
        )
        row_positions = positions.to(self.device)
        ring = self.ring(positions)
        ids, positions, targets, weights = map(self.local, (ids, positions, targets, weights))
        self.scale = scale
        self.token_loss_sum.zero_()
        self.output_sums.zero_()
        schedule = self._schedule(len(batches), rows, width, dtype)
        args = (ids,) if 0 in self.stage_indices else ()
        kwargs = {"position_ids": positions, "row_positions": row_positions}
        kwargs |= {"targets": targets, "weights": weights, **ring}
        if self.media:  # each micro-batch's index, to find its media
            self.model.pipeline_media = [batch.media for batch in batches]
            index = torch.arange(len(batches), device=self.device).repeat_interleave(rows)
            kwargs["micro_batch"] = index
        schedule.step(*args, target=targets, **kwargs)
        return self.token_loss_sum.clone(), self.output_sums.clone()
