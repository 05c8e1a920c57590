"""The measured peak FLOP/s behind MFU: best of timed GEMMs, cached per CPU model and torch."""

from __future__ import annotations

import json
import os

import pytest
import torch

from omniweave.train import metrics

CPU = torch.device("cpu")


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Peak measurements counted (each returns a new figure) and cached under tmp_path."""
    calls = []

    def fake_gemm_flops(device, size, repeats):
        calls.append((size, torch.get_num_threads()))
        return 1e9 * len(calls)

    monkeypatch.setattr(metrics, "CACHE", str(tmp_path / "peak_flops.json"))
    monkeypatch.setattr(metrics, "gemm_flops", fake_gemm_flops)
    return calls


def test_gemm_flops_takes_the_fastest_timed_repeat(monkeypatch):
    warmup = [1e-9, 2e-9]  # faster than any timed repeat: must not count
    timed = [4.0, 3.0, 0.5, 2.0, 1.0, 6.0, 0.8, 5.0]
    ticks = iter(t for seconds in warmup + timed for t in (0.0, seconds))
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(ticks))
    assert metrics.gemm_flops(CPU, 64, warmup=2, repeats=8) == 2 * 64**3 / 0.5
    assert next(ticks, None) is None  # every repeat timed alone


def test_measures_with_all_cpu_threads_and_shares_per_process(measured):
    peak = metrics.device_peak_flops(CPU, local_world_size=2)
    assert {threads for _, threads in measured} == {os.cpu_count()}
    assert torch.get_num_threads() == 1  # conftest's setting restored
    assert {size for size, _ in measured} == set(metrics.CPU_GEMM_REPEATS)
    assert peak == 1e9 * len(measured) / 2  # the best size, halved for 2 processes


def test_cache_key_holds_cpu_model_threads_and_torch(measured):
    peak = metrics.device_peak_flops(CPU, 1)
    with open(metrics.CACHE) as f:
        ((key, cached),) = json.load(f).items()
    assert metrics.cpu_model() in key and torch.__version__ in key
    assert f"{os.cpu_count()} threads" in key
    assert cached == peak
    assert metrics.device_peak_flops(CPU, 1) == peak  # cached: not measured again
    assert len(measured) == len(metrics.CPU_GEMM_REPEATS)


@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_cpu_model_is_the_cpuinfo_model_name():
    with open("/proc/cpuinfo") as f:
        names = {line.split(":")[1].strip() for line in f if line.startswith("model name")}
    assert metrics.cpu_model() in names


@pytest.mark.parametrize("figure", [1.0, 1e20])
def test_other_cpu_models_cached_figure_is_ignored_and_kept(measured, monkeypatch, figure):
    stale = {"Another CPU, 2 threads, torch 0.1": figure, "cpu-2threads": figure}
    with open(metrics.CACHE, "w") as f:
        json.dump(stale, f)
    peak = metrics.device_peak_flops(CPU, 1)
    assert measured and peak == 1e9 * len(measured)
    with open(metrics.CACHE) as f:
        cache = json.load(f)
    (key,) = cache.keys() - stale.keys()
    assert metrics.cpu_model() in key and cache == stale | {key: peak}


def test_refresh_measures_again_and_overwrites(measured):
    first = metrics.device_peak_flops(CPU, 1)
    calls = len(measured)
    again = metrics.device_peak_flops(CPU, 1, refresh=True)
    assert len(measured) == 2 * calls and again > first
    assert metrics.device_peak_flops(CPU, 1) == again
    assert len(measured) == 2 * calls


def test_implausible_mfu_is_above_one():
    assert metrics.implausible_mfu(1.02)
    assert not metrics.implausible_mfu(0.97)
    assert not metrics.implausible_mfu(1.0)
