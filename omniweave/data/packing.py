"""Micro-batches: padded rows or packed rows, and token-budget dynamic batching.

A packed row concatenates samples; position ids restart at 0 per sample and
``cu_seqlens`` marks the boundaries, so attention stays inside each sample.
Targets are shifted inside each sample before concatenation (no sample predicts
the next one's first token). Rows are padded to a multiple of the SP degree;
padding is never a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omniweave.data.processors import IGNORE_INDEX


@dataclass
class MicroBatch:
    """Model inputs of one forward/backward, for the whole sequence (before any SP split)."""

    input_ids: torch.Tensor  # [rows, tokens]
    targets: torch.Tensor  # [rows, tokens], IGNORE_INDEX where nothing is predicted
    position_ids: torch.Tensor  # [rows, tokens]
    cu_seqlens: torch.Tensor | None  # [segments + 1] for a packed row, else None
    lengths: list[int]  # real (non-padding) tokens per sample
    media: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # in placeholder order

    @property
    def label_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def _targets_per_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's number of targets (a packed row's padding segment counts as a sample
        without targets), and each token's sample index, ``[rows, tokens]``."""
        labelled = self.targets != IGNORE_INDEX
        if self.cu_seqlens is None:  # one sample per row
            sample = torch.arange(labelled.shape[0]).unsqueeze(1).expand_as(labelled)
        else:
            sizes = self.cu_seqlens.diff().long()
            sample = torch.repeat_interleave(torch.arange(len(sizes)), sizes).unsqueeze(0)
        counts = torch.zeros(int(sample.max()) + 1)
        return counts.index_add_(0, sample.flatten(), labelled.flatten().float()), sample

    @property
    def sample_weights(self) -> torch.Tensor:
        """Float ``[rows, tokens]``: 1 / its sample's number of targets at each target, else 0
        (a sample-mean loss weighs every sample alike, however many targets it has)."""
        counts, sample = self._targets_per_sample()
        return (self.targets != IGNORE_INDEX) / counts[sample].clamp(min=1)

    @property
    def labelled_samples(self) -> int:
        """Samples with at least one target."""
        return int((self._targets_per_sample()[0] > 0).sum())

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """(row, start, length) of each sample, in order."""
        if self.cu_seqlens is None:
            return [(row, 0, n) for row, n in enumerate(self.lengths)]
        starts = self.cu_seqlens[: len(self.lengths)].tolist()
        return [(0, start, n) for start, n in zip(starts, self.lengths, strict=True)]

    @property
    def real(self) -> torch.Tensor:
        """Bool ``[rows, tokens]``: True for sample tokens, False for padding."""
        position = torch.arange(self.input_ids.shape[1])
        if self.cu_seqlens is not None:
            return (position < sum(self.lengths)).unsqueeze(0)
        return position.unsqueeze(0) < torch.tensor(self.lengths).unsqueeze(1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _shifted(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE_INDEX]


def pad_rows(samples: list, pad_id: int, multiple: int = 1) -> MicroBatch:
    """One row per sample, right-padded to the longest (rounded up to ``multiple``)."""
    length = _round_up(max(len(s.input_ids) for s in samples), multiple)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        targets[row, :n] = torch.tensor(_shifted(sample.labels))
    position_ids = torch.arange(length).expand(len(samples), length).clone()
    lengths = [len(s.input_ids) for s in samples]
    return MicroBatch(input_ids, targets, position_ids, None, lengths, _media(samples))


def pack_row(samples: list, pad_id: int, multiple: int = 1) -> MicroBatch:
    """All samples in one row; trailing padding (to ``multiple``) is a segment of its own."""
    input_ids, targets, positions, bounds = [], [], [], [0]
    for sample in samples:
        n = len(sample.input_ids)
        input_ids += sample.input_ids
        targets += _shifted(sample.labels)
        positions += range(n)
        bounds.append(bounds[-1] + n)
    padding = _round_up(max(len(input_ids), 1), multiple) - len(input_ids)
    if padding:
        input_ids += [pad_id] * padding
        targets += [IGNORE_INDEX] * padding
        positions += range(padding)
        bounds.append(bounds[-1] + padding)
    return MicroBatch(
        torch.tensor([input_ids], dtype=torch.long),
        torch.tensor([targets], dtype=torch.long),
        torch.tensor([positions], dtype=torch.long),
        torch.tensor(bounds, dtype=torch.int32),
        [len(s.input_ids) for s in samples],
        _media(samples),
    )


def _media(samples: list) -> dict[str, list[torch.Tensor]]:
    """The samples' media items per modality, in the order their placeholders appear."""
    media: dict[str, list[torch.Tensor]] = {}
    for sample in samples:
        for modality, items in (getattr(sample, "media", None) or {}).items():
            media.setdefault(modality, []).extend(items)
    return media


def empty_batch(pad_id: int, multiple: int = 1) -> MicroBatch:
    """Padding only: keeps a rank's collectives in step when it has no samples left."""
    return pack_row([], pad_id, multiple)


def first_fit(costs: list[int], budget: int, packed: bool) -> list[list[int]]:
    """Bins of item indices, longest first, each into the first bin it fits.

    A packed bin costs the sum of its lengths; a padded bin costs rows x longest.
    """
    bins: list[list[int]] = []
    loads: list[tuple[int, int]] = []  # (sum, longest) per bin
    for item in sorted(range(len(costs)), key=lambda i: -costs[i]):
        cost = costs[item]
        for b, (total, longest) in enumerate(loads):
            new = total + cost if packed else (len(bins[b]) + 1) * max(longest, cost)
            if new <= budget:
                bins[b].append(item)
                loads[b] = (total + cost, max(longest, cost))
                break
        else:
            bins.append([item])
            loads.append((cost, cost))
    return bins


def balanced_micro_batches(
    costs: list[int], work: list[float], dp_size: int, budget: int, packed: bool
) -> list[list[list[int]]]:
    """Each data-parallel rank's micro-batches (lists of item positions) of one global batch
    under a per-micro-batch token budget.

    Items go to ranks first, heaviest ``work`` first, each to the least-loaded rank, so the
    loads end within one item of equal; then each rank packs its items under ``budget``
    (``costs``) and ranks with fewer micro-batches than the busiest get empty ones for the
    difference. It is a pure function of its arguments, so every rank computes the same plan.
    """
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    loads = [0.0] * dp_size
    for item in sorted(range(len(costs)), key=lambda i: -work[i]):
        rank = loads.index(min(loads))
        shares[rank].append(item)
        loads[rank] += work[item]
    plans = [
        [[share[i] for i in part] for part in first_fit([costs[i] for i in share], budget, packed)]
        for share in shares
    ]
    most = max(1, *(len(plan) for plan in plans))  # a step of dropped samples still runs
    return [plan + [[] for _ in range(most - len(plan))] for plan in plans]
