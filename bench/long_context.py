"""Longest sequence a tiny model trains at a per-process memory cap, for Ulysses (sp) and
ring context parallelism (cp): sp = 1, 2, 4, cp = 4 and sp = 2 x cp = 2.

For each layout the script spawns sp x cp gloo processes (nccl on CUDA) that train a tiny
random Qwen2 (fp32, sdpa) on one packed row of L tokens: forward, backward, clipping and an
AdamW step, each rank holding L / (sp x cp) tokens as the trainer splits them. A process's
memory is its peak above the baseline taken after model build and a warm-up step at a short
length: peak resident set (ru_maxrss) on CPU, max_memory_allocated on CUDA; the ranks take
the largest.
L doubles from --start until it misses the cap, then bisects between the last fit and the
first miss on a grid of --grid x sp x cp tokens. Bisecting needs the peak to be reset (CUDA, or
/proc/self/clear_refs on Linux, after malloc_trim so freed heap does not count), since
ru_maxrss never falls; without it only the doubling runs. Defaults: about 2.5 min on 2 cores.

    .venv/bin/python bench/long_context.py [--cap-gb C] [--layouts 1x1 2x1 4x1 1x4 2x2]
        [--start L] [--grid G]   (a layout is SPxCP)
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import resource
import shlex
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.queues import SimpleQueue

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import multiprocessing as mp
from transformers.utils import logging as hf_logging

from omniweave.data.loader import Sample
from omniweave.data.packing import pack_row
from omniweave.data.processors import IGNORE_INDEX
from omniweave.distributed.parallel_state import (
    ParallelState,
    device_for_rank,
    init_process_group,
    resolve_degrees,
)
from omniweave.distributed.ring import balanced_slice, ring_inputs
from omniweave.distributed.ulysses import apply_sequence_attention, check_heads
from omniweave.models.loader import build_model, load_hf_config
from omniweave.train.optim import build_optimizer, clip_grad_norm

MODEL = dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=2)
MODEL |= dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)
MODEL |= dict(max_position_embeddings=131072, tie_word_embeddings=True)
GB = 1e9


def peak_bytes(device: torch.device) -> int:
    """This process's peak memory so far: GPU allocated, or resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak(device: torch.device) -> bool:
    """Restart the peak from the current usage; False where this platform cannot."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if sys.platform == "linux":  # return freed heap to the OS first: it would count as used
        ctypes.CDLL(None).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the resident-set high-water mark that ru_maxrss reports
        return True
    except OSError:
        return False


def make_step(model: torch.nn.Module, state: ParallelState) -> Callable[[int], None]:
    """One optimizer step on a single packed row of ``length`` random tokens, split over the
    ring (``cp``, balanced chunks) and Ulysses (``sp``) as the trainer splits rows."""
    d, device = state.degrees, state.device
    sp = d.sequence
    optimizer = build_optimizer(model, 1e-4, (0.9, 0.95), 1e-8, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]

    def ring_share(t: torch.Tensor) -> torch.Tensor:
        return balanced_slice(t, d.cp, state.cp_rank) if d.cp > 1 else t

    def local(t: torch.Tensor) -> torch.Tensor:
        return ring_share(t).chunk(d.sp, dim=-1)[state.sp_rank].to(device)

    def step(length: int) -> None:
        generator = torch.Generator().manual_seed(length)
        ids = torch.randint(MODEL["vocab_size"], (length,), generator=generator).tolist()
        batch = pack_row([Sample(ids, ids)], pad_id=0, multiple=d.row_multiple)
        ring = ring_inputs(batch.position_ids, d.cp, state.cp_rank, device) if d.cp > 1 else {}
        logits = model(
            input_ids=local(batch.input_ids),
            position_ids=local(batch.position_ids),
            use_cache=False,
            cu_seq_lens_q=batch.cu_seqlens,
            **ring,
        ).logits
        token_loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            local(batch.targets).flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        (token_loss * sp / batch.label_tokens).backward()
        del logits, token_loss
        clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker(
    rank: int, layout: tuple[int, int], port: int, args: argparse.Namespace, results: SimpleQueue
) -> None:
    """One rank: build, warm up, then search for the longest L under the cap."""
    (sp, cp), world = layout, layout[0] * layout[1]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    hf_logging.set_verbosity_error()
    init_process_group()
    state = ParallelState(resolve_degrees(world, sp=sp, cp=cp), device_for_rank(rank))
    model = build_model(load_hf_config(None, MODEL, "sdpa"), state, seed=0)
    apply_sequence_attention(model, "sdpa", state.sp_group, ring=state.cp_group)
    step, grid, cap = make_step(model, state), args.grid * world, args.cap_gb * GB
    step(grid)  # warm-up: optimizer state, allocator pools, kernels
    baseline = peak_bytes(state.device)
    resettable = reset_peak(state.device)
    tried: list[tuple[int, float, float]] = []  # (L, GB over baseline, seconds)

    def fits(length: int) -> bool:
        reset_peak(state.device)
        start = time.perf_counter()
        step(length)
        used = torch.tensor(float(max(0, peak_bytes(state.device) - baseline)), device=state.device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        tried.append((length, float(used) / GB, time.perf_counter() - start))
        return float(used) <= cap

    fit, miss, length = 0, None, args.start
    while miss is None and length <= args.max_len:
        fit, miss = (length, None) if fits(length) else (fit, length)
        length *= 2
    while resettable and miss is not None and (mid := (fit + miss) // 2 // grid * grid) > fit:
        fit, miss = (mid, miss) if fits(mid) else (fit, mid)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())  # global sizes, also of DTensors
        row = dict(sp=sp, cp=cp, world=world, longest=fit, miss=miss, tried=tried)
        results.put(row | dict(baseline=baseline / GB))
        results.put(params)
    dist.destroy_process_group()
    # A gloo process that built a DeviceMesh aborts now and then in its exit-time C++
    # destructors ("terminate called without an active exception"): skip them.
    sys.stdout.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--cap-gb", type=float, default=0.5, help="memory cap per process above the baseline")
    add("--layouts", nargs="+", default=["1x1", "2x1", "4x1", "1x4", "2x2"], help="SPxCP")
    add("--start", type=int, default=1024, help="first L tried (then doubled)")
    add("--grid", type=int, default=256, help="bisection grid, in tokens per rank")
    add("--max-len", type=int, default=131072, help="stop doubling past this L")
    add("--threads", type=int, default=2, help="threads in all, shared by a layout's ranks")
    args = parser.parse_args()
    config = load_hf_config(None, MODEL, "sdpa")
    layouts = []
    for text in args.layouts:
        sp, cp = (int(n) for n in text.split("x"))
        try:
            check_heads(config, sp)
        except ValueError as error:
            parser.error(str(error))
        if args.start % (args.grid * sp * cp) or args.grid % 2:
            parser.error(f"--start must be a multiple of --grid x sp x cp (grid even); {text}")
        layouts.append((sp, cp))
    context = multiprocessing.get_context("spawn")
    results, rows = context.SimpleQueue(), []
    for sp, cp in layouts:
        world = sp * cp
        os.environ["OMP_NUM_THREADS"] = str(max(1, args.threads // world))  # the spawned ranks'
        start = time.perf_counter()
        mp.spawn(worker, args=((sp, cp), free_port(), args, results), nprocs=world, join=True)
        row, params = results.get(), results.get()
        rows.append(row | dict(seconds=time.perf_counter() - start))

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"arguments: {vars(args)}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"Qwen2 {params / 1e6:.2f}M params, fp32, sdpa, "
        f"{MODEL['hidden_size']} hidden x {MODEL['num_hidden_layers']} layers, "
        f"{MODEL['num_attention_heads']} heads ({MODEL['num_key_value_heads']} KV), "
        f"vocab {MODEL['vocab_size']}; memory cap {args.cap_gb:g} GB per process above the "
        "baseline (after build + warm-up)\n"
    )
    print(
        "| sp | cp | processes | longest L | tokens per process | ratio to 1 process | "
        "first miss | baseline GB | wall s |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    base = next((r["longest"] for r in rows if r["world"] == 1), None)
    for r in rows:
        longest, miss = r["longest"], r["miss"] or f"> {args.max_len}"
        ratio = f"{longest / base:.2f}" if base and longest else "-"
        print(
            f"| {r['sp']} | {r['cp']} | {r['world']} | {longest or f'< {miss}'} | "
            f"{longest // r['world']} | {ratio} | {miss} | {r['baseline']:.2f} | "
            f"{r['seconds']:.0f} |"
        )
    print("\ntried (L: GB above baseline, step s):")
    for r in rows:
        trail = ", ".join(f"{n}: {gb:.3f} ({s:.1f}s)" for n, gb, s in r["tried"])
        print(f"- sp={r['sp']} cp={r['cp']}: {trail}")


if __name__ == "__main__":
    main()
