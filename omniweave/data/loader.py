"""Distributed, resumable text batches: tokenized samples, global-batch sampling, padding.

Sampling is a pure function of (seed, step): step k of epoch e takes the k-th
global batch of the epoch's permutation, split across data-parallel ranks. So any
layout with the same ``global_batch_size`` trains on the same samples per step,
and resuming at step k needs no state but k.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from omniweave.data.packing import MicroBatch, budget_micro_batches, empty_batch, pack_row, pad_rows
from omniweave.data.processors import IGNORE_INDEX, tokenize_multimodal, tokenize_record
from omniweave.data.records import located_records


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[torch.Tensor]] | None = None  # per modality, in text order


def load_samples(
    path: str, tokenizer, max_seq_len: int, on_overlong: str, omni=None, skip_bad: bool = False
) -> tuple[list[Sample], dict[str, int], list[str]]:
    """Read and tokenize every record; apply the over-long policy (truncate, drop, error).

    ``omni`` (an OmniModel's ``OmniParts``) enables media records; a
    multimodal sample is truncated only where no placeholder is lost, else dropped.
    ``skip_bad`` leaves out malformed records and unreadable media instead of failing.
    Returns the samples, the counts of what was changed or left out (``truncated``,
    ``dropped_overlong``, ``no_labels``: nothing left to learn from, ``skipped_bad``)
    and the reason of each skip (file, line and why).
    """
    samples = []
    records, skipped = located_records(path, skip_bad)
    base_dir = os.path.dirname(os.path.abspath(path))
    counts = {"truncated": 0, "dropped_overlong": 0, "no_labels": 0}
    for where, record in records:
        try:
            if record.get("media") and omni is None:
                raise ValueError("has media but the model has no encoders (model.omni)")
            if omni is not None:
                tokens = tokenize_multimodal(record, tokenizer, omni, base_dir)
            else:
                tokens = tokenize_record(record, tokenizer, max_seq_len + 1)
        except ValueError as error:
            if not skip_bad:
                raise ValueError(f"{path}, {where}: {error}") from None
            skipped.append(f"{path}, {where}: {error}")
            continue
        media = tokens.pop("media", None)
        if len(tokens["input_ids"]) > max_seq_len:
            if on_overlong == "error":
                raise ValueError(
                    f"{path}, {where}: longer than data.max_seq_len={max_seq_len} "
                    "tokens; raise max_seq_len or set data.on_overlong to truncate or drop."
                )
            cut = {key: value[:max_seq_len] for key, value in tokens.items()}
            lost = omni is not None and any(
                tokens["input_ids"][max_seq_len:].count(mark) for mark in omni.placeholders.values()
            )
            if on_overlong == "drop" or lost:
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
            tokens = cut
        if any(label != IGNORE_INDEX for label in tokens["labels"][1:]):
            samples.append(Sample(tokens["input_ids"], tokens["labels"], media))
        else:
            counts["no_labels"] += 1
    counts["skipped_bad"] = len(skipped)
    return samples, counts, skipped


class GlobalBatchSampler:
    """Sample indices per optimizer step: the global batch, and this rank's share of it."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int | None,
        dp_size: int,
        dp_rank: int,
        seed: int,
        shuffle: bool = True,
    ):
        if micro_batch_size is not None and global_batch_size % (micro_batch_size * dp_size):
            per_step = micro_batch_size * dp_size
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
        """This rank's share of step ``step`` in micro-batches of ``micro_batch_size``."""
        mine = self.global_batch(step)[self.dp_rank :: self.dp_size]
        size = self.micro_batch_size
        return [mine[i : i + size] for i in range(0, len(mine), size)]


class TrainBatches:
    """This rank's micro-batches, step after step: fixed sample counts or a token budget,
    padded or packed rows, each a multiple of ``multiple`` (the SP degree) long.

    Its whole state is the next step: the shuffle order, buffer and split are pure
    functions of (seed, step), so a restored state continues exactly, on any number
    of data-parallel ranks.
    """

    def __init__(
        self,
        samples: list[Sample],
        sampler: GlobalBatchSampler,
        pad_id: int,
        packing: bool = False,
        max_tokens: int | None = None,
        budget_counts: str = "tokens",
        multiple: int = 1,
    ):
        self.samples, self.sampler, self.pad_id = samples, sampler, pad_id
        self.packing, self.max_tokens, self.budget_counts = packing, max_tokens, budget_counts
        self.multiple = multiple
        self.step = 0

    def __next__(self) -> list[MicroBatch]:
        batches = self.micro_batches(self.step)
        self.step += 1
        return batches

    def __iter__(self):
        return self

    def micro_batches(self, step: int) -> list[MicroBatch]:
        if self.max_tokens is None:
            plan = self.sampler.micro_batches(step)
        else:
            indices = self.sampler.global_batch(step)
            costs = [self._cost(self.samples[i]) for i in indices]
            plan = budget_micro_batches(
                indices,
                costs,
                self.sampler.dp_size,
                self.sampler.dp_rank,
                self.max_tokens,
                self.packing,
            )
        collate = pack_row if self.packing else pad_rows
        return [
            collate([self.samples[i] for i in part], self.pad_id, self.multiple)
            if part
            else empty_batch(self.pad_id, self.multiple)
            for part in plan
        ]

    def _cost(self, sample: Sample) -> int:
        if self.budget_counts == "labels":
            return sum(label != IGNORE_INDEX for label in sample.labels[1:])
        return len(sample.input_ids)

    def state_dict(self) -> dict:
        s = self.sampler
        return {
            "step": self.step,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "num_samples": s.num_samples,
            "global_batch_size": s.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; ValueError if it describes another sample order."""
        mine = self.state_dict()
        changed = [key for key in mine if key != "step" and state.get(key) != mine[key]]
        if changed:
            details = ", ".join(f"{key}: {state.get(key)} -> {mine[key]}" for key in changed)
            raise ValueError(
                f"The saved data-loader state follows another sample order ({details}); "
                "resume with the same data, seed and train.global_batch_size."
            )
        self.step = state["step"]
