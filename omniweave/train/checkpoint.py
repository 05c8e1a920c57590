"""Distributed checkpoints (DCP) that reshard: save atomically, keep the last few, resume.

``OUTPUT/checkpoints/step_00000010/`` holds the model and optimizer state as DCP files (keyed
by parameter name with global shapes, so any parallel layout can load them), ``trainer.json``
(step, token count, LR schedule, data-loader state; written by rank 0) and one
``rng_rank{R}.pt`` per rank. A save is written under ``step_N.tmp``; once every rank has
finished, rank 0 renames it and only then points ``checkpoints/latest`` at it, so a crash
during a save leaves the previous checkpoint and ``latest`` as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import Future

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

LATEST = "latest"


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint folder ``checkpoint.resume`` names: ``none`` -> None; ``auto`` -> the
    run's ``latest`` (None before its first save); otherwise a checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        pointer = os.path.join(checkpoints_dir(output_dir), LATEST)
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            resume = os.path.join(checkpoints_dir(output_dir), f.read().strip())
    missing = [f for f in ("trainer.json", ".metadata") if not os.path.isfile(f"{resume}/{f}")]
    if missing:
        raise ValueError(
            f"checkpoint.resume: '{resume}' is not a complete OmniWeave checkpoint (no "
            f"{' or '.join(missing)}); pass a checkpoints/step_* folder, 'auto' or 'none'."
        )
    return resume


class Checkpointer:
    """Saves and loads one run's checkpoints; ``group`` is a process group of its own (gloo),
    so an async save's collectives never interleave with training's."""

    def __init__(
        self,
        output_dir: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        keep_last: int,
        async_save: bool,
    ):
        self.folder = checkpoints_dir(output_dir)
        self.model, self.optimizer = model, optimizer
        self.keep_last, self.async_save = keep_last, async_save
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.group = dist.new_group(backend="gloo")
        self.pending: tuple[Future, str] | None = None

    def save(self, step: int, trainer_state: dict) -> str:
        """Start writing the checkpoint of ``step`` (finished first: the previous async one);
        returns the folder it will have once complete."""
        self.finish()
        staging = os.path.join(self.folder, step_name(step) + ".tmp")
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash during a save
            os.makedirs(staging)
            with open(os.path.join(staging, "trainer.json"), "w") as f:
                json.dump({**trainer_state, "step": step, "world_size": self.world_size}, f)
        dist.barrier(group=self.group)
        torch.save(_rng_state(), os.path.join(staging, f"rng_rank{self.rank}.pt"))
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=staging, process_group=self.group)
            self.pending = (future, staging)
        else:
            dcp.save(state, checkpoint_id=staging, process_group=self.group)
            self._complete(staging)
        return staging.removesuffix(".tmp")

    def finish(self) -> None:
        """Wait for an async save in flight, then complete it."""
        if self.pending is not None:
            future, staging = self.pending
            self.pending = None
            future.result()
            self._complete(staging)

    def _complete(self, staging: str) -> None:
        """Every rank has written ``staging``: rename it, move ``latest``, prune old ones."""
        dist.barrier(group=self.group)
        if self.rank == 0:
            final = staging.removesuffix(".tmp")
            os.replace(staging, final)
            pointer = os.path.join(self.folder, LATEST)
            with open(pointer + ".tmp", "w") as f:
                f.write(os.path.basename(final) + "\n")
            os.replace(pointer + ".tmp", pointer)
            self._prune()
        dist.barrier(group=self.group)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        saved = sorted(
            name
            for name in os.listdir(self.folder)
            if name.startswith("step_") and not name.endswith(".tmp")
        )
        for name in saved[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.folder, name))

    def load(self, path: str) -> dict:
        """Load ``path`` into the model and optimizer (resharded to this layout); returns its
        trainer state. RNG states come back where the world size is unchanged. A model-only
        checkpoint (an imported HF folder) loads the weights alone."""
        with open(os.path.join(path, "trainer.json")) as f:
            trainer_state = json.load(f)
        if trainer_state.get("model_only"):  # `omniweave export --format dcp`: weights only
            # (get_state_dict with the optimizer would initialise Adam's state by a step)
            model_state = get_model_state_dict(self.model)
            dcp.load({"model": model_state}, checkpoint_id=path, process_group=self.group)
            set_model_state_dict(self.model, model_state)
            return trainer_state
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=path, process_group=self.group)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        rng = os.path.join(path, f"rng_rank{self.rank}.pt")
        if trainer_state["world_size"] == self.world_size and os.path.isfile(rng):
            _set_rng_state(torch.load(rng, weights_only=False))
        return trainer_state


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
