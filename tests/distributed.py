"""Run a function in N gloo processes and gather each rank's return value.

A rank that raises fails the test with that rank's traceback; a run that outlives
``timeout`` (a hang in a collective) fails instead of blocking the suite.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch

from omniweave.data.loader import worker_context


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),  # one host, as torchrun sets it
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        buffer = io.BytesIO()  # tensors by value: a shared-memory handle dies with the rank
        torch.save(fn(*args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300.0) -> list:
    """``fn(*args)`` on each of ``world_size`` ranks; returns the results in rank order."""
    # ranks fork from the data loader's fork server (spawn where there is none), with torch,
    # transformers and OmniWeave imported once: a spawned rank would import them again
    context = worker_context("transformers", "omniweave.train.trainer") or mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, fn, args, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    gathered: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(gathered) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"distributed run timed out after {timeout}s") from None
            if not ok:
                raise AssertionError(_first_cause(rank, value, results))
            gathered[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [gathered[rank] for rank in range(world_size)]


def _first_cause(rank: int, error: str, results) -> str:
    """The failure to report: a rank whose peer closed the connection usually only saw
    another rank's failure, so a rank's own error, reported a moment later, goes first."""
    failures = {rank: error}
    deadline = time.monotonic() + 10
    while "Connection closed by peer" in error and time.monotonic() < deadline:
        try:
            other, ok, value = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not ok:
            failures[other] = value
            if "Connection closed by peer" not in value:
                rank, error = other, value
    others = ", ".join(str(r) for r in sorted(failures) if r != rank)
    also = f" (rank(s) {others} failed too)" if others else ""
    return f"rank {rank} failed{also}:\n{error}"
