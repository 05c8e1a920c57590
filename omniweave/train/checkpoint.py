"""Distributed checkpoints (DCP) that reshard: save atomically, keep the last few, resume.

``OUTPUT/checkpoints/step_00000010/`` holds the model and optimizer state as DCP files (keyed
by parameter name with global shapes, so any parallel layout can load them), ``trainer.json``
(step, token count, LR schedule, data-loader state; written by rank 0) and one
``rng_rank{R}.pt`` per rank. A save is written under ``step_N.tmp``; once every rank has
finished, rank 0 renames it and only then points ``checkpoints/latest`` at it, so a crash
during a save leaves the previous checkpoint and ``latest`` as they were. Before the rename,
``manifest.json`` records every file's size and CRC-32 (the ranks share the checksumming);
resuming verifies it, and ``auto`` falls back from a damaged checkpoint to an older intact
one, setting the damaged one aside as ``step_N.damaged``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from concurrent.futures import Future
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from omniweave.train.manifest import file_record, files_to_record, verify, write_manifest

LATEST = "latest"
STEP_FOLDER = re.compile(r"step_(\d{8})")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def saved_steps(output_dir: str) -> list[int]:
    """Steps of the run's completed checkpoint folders (``step_N``), newest first."""
    folder = checkpoints_dir(output_dir)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(m[1]) for n in names if (m := STEP_FOLDER.fullmatch(n))), reverse=True)


def latest_step(output_dir: str) -> int | None:
    """The step ``checkpoints/latest`` names, or None without one."""
    pointer = os.path.join(checkpoints_dir(output_dir), LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        match = STEP_FOLDER.fullmatch(f.read().strip())
    return int(match[1]) if match else None


def choose_checkpoint(
    resume: str, output_dir: str, checksums: bool = True
) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint folder ``checkpoint.resume`` names, verified, and the damaged ones passed
    over on the way (folder, what is wrong): ``none`` -> None; ``auto`` -> the newest intact
    one at or before ``latest`` (None before the first save); otherwise that folder, which
    must be intact."""
    if resume == "none":
        return None, []
    if resume != "auto":
        if not os.path.isdir(resume):
            raise ValueError(
                f"checkpoint.resume: '{resume}' is not a folder; pass a checkpoints/step_N "
                "folder, 'auto' or 'none'."
            )
        problem = verify(resume, checksums)
        if problem:
            raise ValueError(
                f"checkpoint.resume: '{resume}' is damaged or incomplete ({problem}); "
                "`omniweave checkpoint verify RUN` lists the intact ones, or use 'auto'."
            )
        return resume, []
    newest = latest_step(output_dir)
    steps = [s for s in saved_steps(output_dir) if newest is None or s <= newest]
    damaged = []
    for step in steps:
        folder = os.path.join(checkpoints_dir(output_dir), step_name(step))
        problem = verify(folder, checksums)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    if damaged:
        newest, problem = damaged[0]
        raise ValueError(
            f"no intact checkpoint in {checkpoints_dir(output_dir)}: all {len(damaged)} are "
            f"damaged (the newest, {newest}: {problem}); set checkpoint.resume: none to start "
            "afresh."
        )
    return None, []


def set_aside(damaged: list[tuple[str, str]], chosen: str) -> None:
    """Rename damaged checkpoints to ``step_N.damaged`` (kept for a look, never resumed from
    or counted by ``keep_last``) and point ``latest`` at the one chosen instead."""
    for folder, _ in damaged:
        shutil.rmtree(folder + ".damaged", ignore_errors=True)
        os.replace(folder, folder + ".damaged")
    if damaged:
        _point_latest(os.path.dirname(chosen), os.path.basename(chosen))


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """``choose_checkpoint``'s folder, checking sizes only (no checksums): quick, for the
    launcher and for tools that read a checkpoint."""
    return choose_checkpoint(resume, output_dir, checksums=False)[0]


def _point_latest(folder: str, name: str) -> None:
    pointer = os.path.join(folder, LATEST)
    with open(pointer + ".tmp", "w") as f:
        f.write(name + "\n")
    os.replace(pointer + ".tmp", pointer)


class Checkpointer:
    """Saves and loads one run's checkpoints; ``group`` is a process group of its own (gloo,
    waiting at most ``timeout_s`` like training's), so an async save's collectives never
    interleave with training's."""

    def __init__(
        self,
        output_dir: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        keep_last: int,
        async_save: bool,
        timeout_s: float = 600.0,
        trained_only: bool = False,
    ):
        self.run, self.folder = output_dir, checkpoints_dir(output_dir)
        # LoRA: frozen weights come from model.path (or the seed), not from checkpoints; all
        # names of each (a tied LM head too, which ignore_frozen_params would keep)
        params = model.named_parameters(remove_duplicate=False)
        self.frozen = {name for name, p in params if not p.requires_grad} if trained_only else ()
        self.options = StateDictOptions(strict=not trained_only)
        self.model, self.optimizer = model, optimizer
        self.keep_last, self.async_save = keep_last, async_save
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
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
        state = self._state()
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
        """Every rank has written ``staging``: checksum its files (each rank a share), write
        the manifest, rename it, move ``latest``, prune old ones."""
        dist.barrier(group=self.group)
        names = files_to_record(staging)[self.rank :: self.world_size]
        records = {n: file_record(os.path.join(staging, n)) for n in names}
        shares = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(records, shares, dst=0, group=self.group)
        if self.rank == 0:
            write_manifest(staging, {k: v for share in shares for k, v in share.items()})
            final = staging.removesuffix(".tmp")
            if os.path.isdir(final):  # written before a fallback to an older checkpoint
                shutil.rmtree(final)
            os.replace(staging, final)
            _point_latest(self.folder, os.path.basename(final))
            self._prune()
        dist.barrier(group=self.group)

    def _prune(self) -> None:
        """Delete the checkpoints older than the ``keep_last`` newest intact ones (sizes
        checked), so a damaged newer one never costs the last intact one."""
        if self.keep_last <= 0:
            return
        folders = {s: os.path.join(self.folder, step_name(s)) for s in saved_steps(self.run)}
        intact = [s for s, folder in folders.items() if verify(folder, checksums=False) is None]
        if len(intact) < self.keep_last:
            return
        for step, folder in folders.items():
            if step < intact[self.keep_last - 1]:
                shutil.rmtree(folder)

    def load(self, path: str) -> dict:
        """Load ``path`` into the model and optimizer (resharded to this layout); returns its
        trainer state. RNG states come back where the world size is unchanged. A model-only
        checkpoint (an imported HF folder) loads the weights alone."""
        with open(os.path.join(path, "trainer.json")) as f:
            trainer_state = json.load(f)
        if trainer_state.get("model_only") and self.frozen:
            raise ValueError(
                f"{path} holds a whole model; a LoRA run takes its base weights from model.path: "
                "export it with `omniweave export --format hf` and set model.path to the folder."
            )
        if trainer_state.get("model_only"):  # `omniweave export --format dcp`: weights only
            # (get_state_dict with the optimizer would initialise Adam's state by a step)
            model_state = get_model_state_dict(self.model)
            dcp.load({"model": model_state}, checkpoint_id=path, process_group=self.group)
            set_model_state_dict(self.model, model_state)
            return trainer_state
        state = self._state()
        dcp.load(state, checkpoint_id=path, process_group=self.group)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self.options,
        )
        rng = os.path.join(path, f"rng_rank{self.rank}.pt")
        if trainer_state["world_size"] == self.world_size and os.path.isfile(rng):
            _set_rng_state(torch.load(rng, weights_only=False))
        return trainer_state

    def _state(self) -> dict:
        """The model's (trained) weights and the optimizer's state, as DCP saves and loads."""
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        model_state = {k: v for k, v in model_state.items() if k not in self.frozen}
        return {"model": model_state, "optimizer": optimizer_state}


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
