"""The sample order: which records make up each optimizer step's global batch.

It is a pure function of (seed, step) and the sources' sizes and weights, the same on every
rank and for every layout, so a run resumes at step k on any number of ranks with nothing
but k. Each source is an endless stream of epochs, each epoch a new permutation of its
records; a step takes ``global_batch_size`` records, from each source in proportion to its
weight (its share of every step, the rounding carried over from step to step).
"""

from __future__ import annotations

import numpy as np


class SampleOrder:
    """``global_batch(step)``: (source, record) pairs of one step, over all ranks."""

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.sizes, self.batch, self.seed, self.shuffle = sizes, global_batch_size, seed, shuffle
        self.shares = np.asarray(weights, dtype=np.float64) / sum(weights) * global_batch_size
        self._state = (0, np.zeros(len(sizes)), np.zeros(len(sizes), dtype=np.int64))
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def taken(self, step: int) -> np.ndarray:
        """Records drawn from each source by the steps before ``step``."""
        if len(self.sizes) == 1:
            return np.array([step * self.batch])
        at, credit, taken = self._state
        if step < at:
            at, credit, taken = 0, np.zeros_like(credit), np.zeros_like(taken)
        while at < step:  # each step: the whole shares, the rest to the largest remainders
            credit = credit + self.shares
            counts = np.floor(credit).astype(np.int64)
            extra = np.argsort(counts - credit, kind="stable")[: self.batch - counts.sum()]
            counts[extra] += 1
            credit, taken, at = credit - counts, taken + counts, at + 1
        self._state = (at, credit, taken)
        return taken

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        before = self.taken(step)
        counts = self.taken(step + 1) - before
        refs = []
        for source, (start, count) in enumerate(zip(before, counts, strict=True)):
            for position in range(int(start), int(start + count)):
                epoch, index = divmod(position, self.sizes[source])
                if self.shuffle:
                    index = int(self._permutation(source, epoch)[index])
                refs.append((source, index))
        if self.shuffle:  # sources interleaved within the step
            order = np.random.default_rng([self.seed, step, 1]).permutation(len(refs))
            refs = [refs[i] for i in order]
        return refs

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 2 * len(self.sizes):  # the epochs in use
                self._permutations.pop(next(iter(self._permutations)))
            rng = np.random.default_rng([self.seed, source, epoch])
            self._permutations[key] = rng.permutation(self.sizes[source])
        return self._permutations[key]
