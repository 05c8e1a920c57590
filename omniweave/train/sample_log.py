"""What happened to the records a run has read: truncated, dropped, without labels, skipped
as bad. Each rank counts the records it accounts for; the figures are summed over ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from omniweave.data.loader import COUNTS, StepData

NAMES = ("samples_truncated", "samples_dropped", "samples_no_labels", "samples_skipped_bad")
SHOWN = 5  # skipped records named on the console; all are in skipped_samples.txt


class SampleLog:
    def __init__(self, output_dir: str, group, device: torch.device, is_main: bool):
        self.path = os.path.join(output_dir, "skipped_samples.txt")
        self.group, self.device, self.is_main = group, device, is_main
        self.counts = dict.fromkeys(COUNTS, 0)

    def note(self, data: StepData) -> None:
        """Count a step's records; list the skipped ones (and show the first few)."""
        for key, count in data.counts.items():
            self.counts[key] += count
        if not data.skipped:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(f"{reason}\n" for reason in data.skipped))
        shown = self.counts["skipped_bad"] - len(data.skipped)
        for reason in data.skipped[: max(0, SHOWN - shown)]:
            tqdm.write(f"omniweave: skipped {reason}")

    def so_far(self) -> dict[str, int]:
        """The counts over all ranks, as ``metrics.jsonl`` names them (a collective)."""
        counts = torch.tensor([self.counts[key] for key in COUNTS], device=self.device)
        dist.all_reduce(counts, group=self.group)
        return dict(zip(NAMES, counts.tolist(), strict=True))

    def report(self, max_seq_len: int) -> None:
        """One line of what was changed or left out (a collective; rank 0 prints)."""
        changed = {key: n for key, n in self.so_far().items() if n}
        if self.is_main and changed:
            listed = ", ".join(f"{n} {key.removeprefix('samples_')}" for key, n in changed.items())
            print(f"omniweave: samples {listed} (data.max_seq_len={max_seq_len})")
            if changed.get("samples_skipped_bad"):
                print(f"  skipped samples and why: {self.path}")
