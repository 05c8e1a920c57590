"""Evaluation during training: the token-mean loss over a held-out set (``data.eval_path``),
computed sharded like the training step on every layout, without touching the training.

The eval records (the first ``train.eval_max_samples`` of them, or all) are dealt to the
data-parallel ranks (record k to rank k mod dp), tokenized once and collated into
micro-batches of ``train.micro_batch_size`` (packed when training packs); ranks with fewer
get empty ones, so every rank runs the same forwards. Losses are summed in float64.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

from omniweave.data.loader import row_multiple
from omniweave.data.packing import MicroBatch, empty_batch, pack_row, pad_rows
from omniweave.data.shards import index_shard
from omniweave.data.sources import checked_record, source_files


def eval_batches(cfg, state, make, pad_id: int) -> list[MicroBatch]:
    """This rank's eval micro-batches (the same number on every rank)."""
    dp, rank, limit = state.degrees.dp, state.dp_rank, cfg.train.eval_max_samples
    samples, position = [], 0
    with tempfile.TemporaryDirectory() as cache:  # each rank its own index: no write races
        for file in source_files(cfg.data.eval_path):
            shard = index_shard(file, cache)
            for i in range(shard.num_records):
                if limit is not None and position >= limit:
                    break
                position += 1
                if (position - 1) % dp == rank:
                    samples += _eval_sample(cfg, make, shard, i)
    size, multiple = cfg.train.micro_batch_size, row_multiple(cfg, state)
    collate = pack_row if cfg.data.packing else pad_rows
    batches = [
        collate(samples[i : i + size], pad_id, multiple) for i in range(0, len(samples), size)
    ]
    count = torch.tensor(len(batches), device=state.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=state.dp_mesh.get_group())
    return batches + [empty_batch(pad_id, multiple)] * (int(count) - len(batches))


def _eval_sample(cfg, make, shard, i: int) -> list:
    """Record ``i`` of ``shard`` as a sample ([] when dropped, or skipped as bad)."""
    record, problem = checked_record(shard, i)
    sample = None
    if problem is None:
        try:
            sample = make(record, os.path.dirname(os.path.abspath(shard.path)))[0]
        except ValueError as error:
            problem = str(error)
    if problem and cfg.data.on_bad_sample != "skip":
        raise ValueError(f"data.eval_path: {shard.path}, {shard.where(i)}: {problem}")
    return [sample] if sample is not None else []


@torch.no_grad()
def eval_losses(trainer, batches: list[MicroBatch]) -> dict[str, float | None]:
    """``eval_loss`` (and ``eval_loss_<modality>`` for output modalities) over ``batches``,
    global; the model's mode and every RNG are as they were after."""
    state, ranges = trainer.state, trainer.output_ranges
    sums = torch.zeros(len(ranges) + 1, dtype=torch.float64, device=state.device)
    counts = torch.zeros(len(ranges) + 1, dtype=torch.float64, device=state.device)
    devices = [state.device] if state.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        trainer.model.eval()
        try:
            for batch in batches:
                token_losses, targets, _ = trainer._token_loss(batch)
                for slot, modality in enumerate(ranges):
                    sums[slot] += token_losses[trainer._in_range(targets, modality)].double().sum()
                    counts[slot] += int(trainer._in_range(batch.targets, modality).sum())
                sums[-1] += token_losses.double().sum()
                counts[-1] += batch.label_tokens
        finally:
            trainer.model.train()
    dist.all_reduce(sums, group=state.loss_mesh.get_group())
    dist.all_reduce(counts, group=state.dp_mesh.get_group())
    *modality_sums, total = sums.tolist()
    *modality_counts, tokens = counts.tolist()
    losses = {"eval_loss": total / tokens if tokens else None}
    for modality, loss, count in zip(ranges, modality_sums, modality_counts, strict=True):
        losses[f"eval_loss_{modality}"] = loss / count if count else None
    return losses
