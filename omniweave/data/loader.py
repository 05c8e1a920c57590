"""Distributed, resumable text batches: tokenized samples, global-batch sampling, padding.

Sampling is a pure function of (seed, step): step k of epoch e takes the k-th
global batch of the epoch's permutation, split across data-parallel ranks. So any
layout with the same ``global_batch_size`` trains on the same samples per step,
and resuming at step k needs no state but k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniweave.data.processors import tokenize_record
from omniweave.data.records import read_records

IGNORE_INDEX = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def load_samples(
    path: str, tokenizer, max_seq_len: int, on_overlong: str
) -> tuple[list[Sample], dict[str, int]]:
    """Read and tokenize every record; apply the over-long policy (truncate, drop, error).

    Returns the samples and the counts of what was changed or left out, for reporting:
    ``truncated``, ``dropped_overlong`` and ``no_labels`` (nothing left to learn from).
    """
    samples = []
    counts = {"truncated": 0, "dropped_overlong": 0, "no_labels": 0}
    for number, record in enumerate(read_records(path), start=1):
        tokens = tokenize_record(record, tokenizer, max_seq_len + 1)
        if len(tokens["input_ids"]) > max_seq_len:
            if on_overlong == "error":
                raise ValueError(
                    f"{path}: record {number} is longer than data.max_seq_len={max_seq_len} "
                    "tokens; raise max_seq_len or set data.on_overlong to truncate or drop."
                )
            if on_overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
            tokens = {key: value[:max_seq_len] for key, value in tokens.items()}
        if any(label != IGNORE_INDEX for label in tokens["labels"][1:]):
            samples.append(Sample(tokens["input_ids"], tokens["labels"]))
        else:
            counts["no_labels"] += 1
    return samples, counts


class GlobalBatchSampler:
    """Per optimizer step, this data-parallel rank's micro-batches of sample indices."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int,
        dp_rank: int,
        seed: int,
        shuffle: bool = True,
    ):
        per_step = micro_batch_size * dp_size
        if global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not a multiple of "
                f"train.micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}; "
                f"use a multiple of {per_step}."
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"The data set has {num_samples} usable samples, fewer than one global batch "
                f"(train.global_batch_size={global_batch_size}); lower the batch size or add data."
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.accumulation = global_batch_size // per_step
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_samples // global_batch_size

    def global_batch(self, step: int) -> list[int]:
        """Sample indices of optimizer step ``step`` over all ranks (the last partial batch of
        an epoch is dropped)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        start = index * self.global_batch_size
        return order[start : start + self.global_batch_size]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's share of step ``step``, split into ``accumulation`` micro-batches."""
        mine = self.global_batch(step)[self.dp_rank :: self.dp_size]
        size = self.micro_batch_size
        return [mine[i * size : (i + 1) * size] for i in range(self.accumulation)]


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; ``targets`` are the labels shifted left by one."""
    length = max(len(sample.input_ids) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        targets[row, : n - 1] = torch.tensor(sample.labels[1:])
    return {"input_ids": input_ids, "targets": targets}
