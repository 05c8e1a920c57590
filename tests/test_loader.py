"""Sample loading policies, the sample order and the step batches (one process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from omniweave.config import load_config
from omniweave.data.loader import (
    DataTimeout,
    SampleMaker,
    StepBatches,
    default_workers,
    load_samples,
    prefetched,
    row_multiple,
)
from omniweave.data.order import SampleOrder
from omniweave.data.processors import load_tokenizer
from omniweave.data.sources import index_sources


def test_overlong_policies_are_counted(corpus):
    tokenizer = load_tokenizer(corpus["tokenizer_path"])
    full, counts, _ = load_samples(corpus["train_path"], tokenizer, 10_000, "error")
    assert counts == {"truncated": 0, "dropped_overlong": 0, "no_labels": 0, "skipped_bad": 0}
    longest = max(len(s.input_ids) for s in full)
    limit = longest // 2
    overlong = sum(len(s.input_ids) > limit for s in full)
    truncated, counts, _ = load_samples(corpus["train_path"], tokenizer, limit, "truncate")
    assert counts["truncated"] == overlong and len(truncated) == len(full)
    assert max(len(s.input_ids) for s in truncated) == limit
    kept, counts, _ = load_samples(corpus["train_path"], tokenizer, limit, "drop")
    assert counts["dropped_overlong"] == overlong and len(kept) == len(full) - overlong
    with pytest.raises(ValueError, match="line .* longer than data.max_seq_len"):
        load_samples(corpus["train_path"], tokenizer, limit, "error")


def _batches(corpus, tmp_path, dp: tuple[int, int], **options) -> StepBatches:
    tokenizer = load_tokenizer(corpus["tokenizer_path"])
    sources = index_sources([(corpus["train_path"], 1.0)], str(tmp_path / "index"))
    order = SampleOrder(sources.sizes, sources.weights, 8, seed=3)
    return StepBatches(sources, order, SampleMaker(tokenizer, 64, "truncate"), dp, 0, **options)


def _tokens(batches: list) -> list[tuple]:
    """The samples of micro-batches, as token tuples (a packed row cut at its segments)."""
    return [
        tuple(batch.input_ids[row, start : start + n].tolist())
        for batch in batches
        for row, start, n in batch.segments
    ]


@pytest.mark.parametrize("packing", [False, True])
def test_every_layout_trains_the_same_samples_per_step(corpus, tmp_path, packing):
    """Fixed micro-batches at 1, 2 and 4 ranks, and a token budget at 2 and 4, give each step
    the same samples: the records the order names, each once."""
    tokenizer = load_tokenizer(corpus["tokenizer_path"])
    samples, _, _ = load_samples(corpus["train_path"], tokenizer, 64, "truncate")
    order = SampleOrder([len(samples)], [1.0], 8, seed=3)
    layouts = [(1, {"micro_batch_size": 8}), (2, {"micro_batch_size": 2})]
    layouts += [(4, {"micro_batch_size": 1}), (2, {"budget": (128, "tokens")})]
    layouts += [(4, {"budget": (96, "labels")})]
    for dp, options in layouts:
        ranks = [_batches(corpus, tmp_path, (dp, r), packing=packing, **options) for r in range(dp)]
        for step in range(10):  # over an epoch boundary (64 records, 8 per step)
            expected = sorted(tuple(samples[i].input_ids) for _, i in order.global_batch(step))
            per_rank = [rank.micro_batches(step) for rank in ranks]
            assert len({len(batches) for batches in per_rank}) == 1  # same forward passes
            assert sorted(t for batches in per_rank for t in _tokens(batches)) == expected


def test_order_takes_each_record_once_per_epoch():
    order = SampleOrder([48], [1.0], 8, seed=1)
    stream = [i for step in range(24) for _, i in order.global_batch(step)]  # 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * 48 : (epoch + 1) * 48]) == list(range(48))
    assert stream[:48] != stream[48:96]  # a new permutation per epoch
    plain = SampleOrder([50], [1.0], 8, seed=1, shuffle=False)
    assert [i for step in range(7) for _, i in plain.global_batch(step)] == (list(range(50)) * 2)[
        :56
    ]


def test_mixture_follows_the_weights_and_is_a_function_of_the_step():
    order = SampleOrder([100, 30, 7], [5.0, 3.0, 2.0], 16, seed=4)
    steps = [order.global_batch(step) for step in range(50)]
    for step in range(1, 51):
        taken = [
            sum(s == source for batch in steps[:step] for s, _ in batch) for source in range(3)
        ]
        for source, weight in enumerate([0.5, 0.3, 0.2]):
            assert abs(taken[source] - weight * 16 * step) < 1  # the rounding carried over
    again = SampleOrder([100, 30, 7], [5.0, 3.0, 2.0], 16, seed=4)
    assert [again.global_batch(step) for step in (37, 3, 49)] == [steps[37], steps[3], steps[49]]
    records = [i for batch in steps for s, i in batch if s == 2]
    assert sorted(records[:7]) == list(range(7))  # a small source cycles through its epochs


def test_resume_refuses_another_order_or_changed_data(corpus, tmp_path):
    batches = _batches(corpus, tmp_path, (1, 0))
    saved = batches.state_dict()
    batches.check_resume(saved, allow_changed_sources=False)
    with pytest.raises(ValueError, match="another sample order .*seed: 4 -> 3"):
        batches.check_resume({**saved, "seed": 4}, allow_changed_sources=False)
    edited = {**saved, "sources": [[1.0, [["train.jsonl", 1, 64, 0]]]]}
    with pytest.raises(ValueError, match="data.allow_changed_sources"):
        batches.check_resume(edited, allow_changed_sources=False)
    batches.check_resume(edited, allow_changed_sources=True)


def test_a_bad_record_in_a_worker_is_one_line(corpus, tmp_path):
    lines = Path(corpus["train_path"]).read_text().splitlines()
    lines[5] = '{"text": 7}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    batches = _batches({**corpus, "train_path": str(bad)}, tmp_path, (1, 0), micro_batch_size=8)
    errors = [data.error for data in prefetched(batches, 0, 8, workers=1, prefetch=2)]
    failing = [error for error in errors if error]
    message = f"{bad}, line 6: 'text' must be a string, got int"
    assert failing and all(error == message for error in failing)
    skipping = _batches({**corpus, "train_path": str(bad)}, tmp_path, (1, 0), skip_bad=True)
    skipped = [reason for data in prefetched(skipping, 0, 8, 1, 2) for reason in data.skipped]
    assert skipped == [f"{bad}, line 6: 'text' must be a string, got int"]


class _ParentOfWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, step):
        return os.getppid()


def test_data_workers_are_not_forks_of_the_training_process():
    """A fork of a rank taken while one of its gloo threads holds Python's thread-list lock
    hangs in the child, so workers come from a single-threaded fork server instead."""
    parents = list(prefetched(_ParentOfWorker(), 0, 2, workers=1, prefetch=1))
    assert len(parents) == 2 and os.getpid() not in parents


UNGUARDED_SCRIPT = """
import sys
from omniweave.data.loader import prefetched
from tests.test_loader import _ParentOfWorker

with open(sys.argv[1], "a") as runs:
    runs.write("ran\\n")
print(list(prefetched(_ParentOfWorker(), 0, 2, workers=1, prefetch=1)))
"""


def test_a_script_without_a_main_guard_runs_once_not_again_in_its_workers(tmp_path):
    script, runs = tmp_path / "train.py", tmp_path / "runs.txt"
    script.write_text(UNGUARDED_SCRIPT)
    root = str(Path(__file__).parent.parent)
    done = subprocess.run(
        [sys.executable, str(script), str(runs)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert done.returncode == 0, done.stderr
    assert runs.read_text() == "ran\n"


class _Hung(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, step):
        time.sleep(60)  # a worker that never delivers


def test_hung_data_workers_are_a_one_line_error_not_a_hang():
    started = time.monotonic()
    with pytest.raises(DataTimeout) as raised:
        next(prefetched(_Hung(), 0, 4, workers=1, prefetch=1, timeout_s=1.0))
    assert time.monotonic() - started < 30
    assert str(raised.value) == (
        "the data workers delivered no batch for step 1 within parallel.timeout_s=1 s: a worker "
        "is hung (or data.num_workers=0 runs the data path in the training process, where a "
        "hang can be traced)"
    )


@pytest.mark.parametrize(
    ("device", "dtype", "pad", "split", "expected"),
    [
        ("cpu", "bfloat16", None, 1, 64),  # repeating GEMM shapes for oneDNN
        ("cpu", "float32", None, 1, 1),
        ("cuda", "bfloat16", None, 2, 2),
        ("cpu", "bfloat16", 1, 2, 2),
        ("cpu", "float32", 48, 32, 96),  # both the parallel splits and the setting
    ],
)
def test_rows_round_up_to_the_splits_and_the_shape_bucket(device, dtype, pad, split, expected):
    settings = [f"model.dtype={dtype}"] + (
        [] if pad is None else [f"data.pad_to_multiple_of={pad}"]
    )
    cfg = load_config(None, settings)
    state = SimpleNamespace(
        device=torch.device(device), degrees=SimpleNamespace(row_multiple=split)
    )
    assert row_multiple(cfg, state) == expected


@pytest.mark.parametrize(
    ("cores", "ranks", "threads", "gpu", "expected"),
    [
        (2, 2, 1, False, 0),
        (2, 1, 2, False, 0),
        (8, 2, 2, False, 2),
        (96, 8, 1, False, 4),
        (2, 1, 2, True, 1),  # a rank on a GPU computes on one core
        (16, 1, 16, True, 4),
    ],
)
def test_data_workers_default_to_the_cores_no_rank_computes_on(
    monkeypatch, cores, ranks, threads, gpu, expected
):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert default_workers() == expected
