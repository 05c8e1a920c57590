"""When a run must stop early, agreed by every rank: SIGTERM (preemption), too many NaN/Inf
steps in a row, or a collective that timed out."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from omniweave.distributed.parallel_state import describe_timeout


class TrainingStopped(RuntimeError):
    """The run stopped early; the message says why and what was saved."""

    def __init__(self, message: str, exit_code: int, every_rank: bool = False):
        super().__init__(message)
        self.exit_code, self.every_rank = exit_code, every_rank


class StopConditions:
    """Counts bad steps and catches SIGTERM while a run trains (use as a context manager)."""

    def __init__(self, max_bad_steps: int, device: torch.device):
        self.max_bad_steps, self.device = max_bad_steps, device
        self.bad_steps, self.bad_in_a_row, self.preempted = 0, 0, False

    def __enter__(self) -> StopConditions:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.preempted = True  # acted on after the current step

    def after_step(self, bad: bool) -> tuple[int, str] | None:
        """Count the step; (exit code, why) when the run must stop now, the same on every
        rank (``bad`` is a global figure; the SIGTERM flag is reduced over all ranks)."""
        self.bad_steps += bad
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        if self.max_bad_steps and self.bad_in_a_row >= self.max_bad_steps:
            return 1, (
                f"omniweave: stopped: {self.bad_in_a_row} steps in a row had a NaN/Inf loss or "
                f"gradient norm (train.max_bad_steps={self.max_bad_steps}); their updates were "
                "skipped, so the weights are those of the last good step."
            )
        preempted = torch.tensor(float(self.preempted), device=self.device)
        dist.all_reduce(preempted, op=dist.ReduceOp.MAX)
        if preempted:
            return 128 + signal.SIGTERM, "omniweave: stopped by SIGTERM (preemption)."
        return None


def timeout_stop(
    error: RuntimeError, rank: int, timeout_s: float, step: int
) -> TrainingStopped | None:
    """A TrainingStopped naming the collective when ``error`` is a timeout; else None."""
    operation = describe_timeout(error)
    if operation is None:
        return None
    return TrainingStopped(
        f"omniweave: rank {rank} waited more than parallel.timeout_s={timeout_s:g} s at step "
        f"{step} in {operation}: another rank is hung or died (see its log); the last "
        "checkpoint is intact.",
        1,
        every_rank=True,
    )
