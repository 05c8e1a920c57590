"""Throughput, MFU and memory figures, and where they go: metrics.jsonl, TensorBoard, a plot."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "omniweave", "peak_flops.json")
# GEMM size: timed repeats. Small ones fit in cache and between other processes' time slices;
# large ones keep many cores busy. The fastest counts.
CPU_GEMM_REPEATS = {256: 64, 512: 32, 2048: 8}


def flops_per_token(model: nn.Module, config) -> tuple[float, float]:
    """(dense, attention) training FLOPs: 6 x non-embedding params per token, and
    12 x layers x attention width per token per token of context (so attention FLOPs of
    a sample of length s are that times s^2)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    if embedding is not output:
        params -= embedding.numel()
    config = config.get_text_config()  # a multimodal model's language model
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * params, 12.0 * config.num_hidden_layers * heads * head_dim


def device_peak_flops(device: torch.device, local_world_size: int, refresh: bool = False) -> float:
    """Peak FLOP/s one process can count on: its GPU, or its share of the machine's CPU cores.
    ``refresh`` measures again, overwriting the cached figure."""
    if device.type == "cuda":
        return measure_peak_flops(device, refresh)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return measure_peak_flops(device, refresh) / local_world_size
    finally:
        torch.set_num_threads(threads)


def implausible_mfu(mfu: float) -> bool:
    """An MFU above 1.0 means the peak figure is too low: measure it again (``refresh``)."""
    return mfu > 1.0


class Utilisation:
    """Model FLOPs utilisation of steps over ``world_size`` devices. The peak per device is
    ``configured`` (``train.peak_flops``), else measured by rank 0 (cached) while the others
    wait, so they don't compete for cores; a measured peak a step exceeds is measured again,
    once (the cached figure was taken on a busy machine)."""

    def __init__(self, configured: float | None, device: torch.device, world_size: int):
        self.configured, self.device, self.world_size = configured, device, world_size
        self.peak = configured or self._measured()
        self.remeasured = False

    def _measured(self, refresh: bool = False) -> float:
        peak = torch.zeros((), dtype=torch.float64, device=self.device)
        if dist.get_rank() == 0:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            peak.fill_(device_peak_flops(self.device, local_world, refresh))
        dist.broadcast(peak, src=0)
        return float(peak)

    def __call__(self, flops: float, seconds: float) -> float:
        """The MFU of a step of ``flops`` that took ``seconds``."""
        mfu = flops / seconds / (self.peak * self.world_size)
        if implausible_mfu(mfu) and not (self.configured or self.remeasured):
            self.peak, self.remeasured = self._measured(refresh=True), True
            mfu = flops / seconds / (self.peak * self.world_size)
        return mfu


def max_over_ranks(device: torch.device, *values: float) -> list[float]:
    """Each value's largest over all ranks (peak memory, step time)."""
    peak = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.tolist()


def measure_peak_flops(device: torch.device, refresh: bool = False) -> float:
    """Best GEMM FLOP/s on this device (fp32 on CPU, bf16 on GPU), cached per
    :func:`peak_cache_key` unless ``refresh``."""
    key = peak_cache_key(device)
    cache = {}
    if os.path.isfile(CACHE):
        with open(CACHE) as f:
            cache = json.load(f)
    if key in cache and not refresh:
        return cache[key]
    repeats = {8192: 8} if device.type == "cuda" else CPU_GEMM_REPEATS
    cache[key] = max(gemm_flops(device, size, repeats=n) for size, n in repeats.items())
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    with open(CACHE, "w") as f:
        json.dump(cache, f, indent=1)
    return cache[key]


def peak_cache_key(device: torch.device) -> str:
    """The GPU's or CPU's model name, the CPU thread count and the torch version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_flops(device: torch.device, size: int, warmup: int = 2, repeats: int = 8) -> float:
    """Best FLOP/s of ``repeats`` square GEMMs, each timed alone, after ``warmup`` untimed."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / min(seconds[warmup:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak device memory (GPU) or peak resident set size of this process (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


class MetricsWriter:
    """Writes one JSON line (and TensorBoard scalars) per logged step; plots loss at the end.
    A run resumed at ``start_step`` keeps the rows up to that step and drops the later ones
    (steps a crash interrupted, which are trained again)."""

    def __init__(self, output_dir: str, tensorboard: bool = True, start_step: int = 0):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.rows: list[dict] = []
        if start_step and os.path.isfile(self.path):
            with open(self.path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.rows = [row for row in rows if row["step"] <= start_step]
        self._file = open(self.path, "w")  # noqa: SIM115 - open for the whole run
        self._file.writelines(json.dumps(row) + "\n" for row in self.rows)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = os.path.join(output_dir, "tensorboard")
            self._tb = SummaryWriter(folder, purge_step=start_step + 1 if start_step else None)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self, plot: bool = True) -> str | None:
        """Close the outputs; return the path of the loss plot when one was drawn."""
        self._file.close()
        if self._tb:
            self._tb.close()
        if plot and self.rows:
            return plot_loss(self.rows, os.path.join(self.output_dir, "loss.png"))
        return None


def plot_loss(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training")
    evaluated = [r for r in rows if r.get("eval_loss") is not None]
    if evaluated:
        steps, losses = [r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated]
        ax.plot(steps, losses, "o-", label="eval")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
