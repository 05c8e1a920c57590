"""Sample loading policies and the global-batch sampler."""

from __future__ import annotations

import pytest

from omniweave.data.loader import GlobalBatchSampler, load_samples
from omniweave.data.processors import load_tokenizer


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


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_layout_trains_the_same_samples_per_step(shuffle):
    def step_samples(dp_size, micro):
        samplers = [
            GlobalBatchSampler(50, 8, micro, dp_size, r, 3, shuffle) for r in range(dp_size)
        ]
        return [
            sorted(i for s in samplers for mb in s.micro_batches(step) for i in mb)
            for step in range(12)
        ]

    reference = step_samples(1, 8)
    assert step_samples(4, 1) == step_samples(2, 2) == reference
    epoch = sorted(i for step in reference[:6] for i in step)
    assert len(set(epoch)) == len(epoch) == 48  # no sample twice within an epoch
    assert (reference[6] != reference[0]) == shuffle  # a new permutation per epoch


def test_sampler_rejects_uneven_batches():
    with pytest.raises(ValueError, match="not a multiple of"):
        GlobalBatchSampler(50, 6, 1, 4, 0, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8, 1, 4, 0, 0)
