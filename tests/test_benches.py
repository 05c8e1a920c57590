"""The benches that drive the Trainer in their own process run end to end at tiny sizes, so a
change to the Trainer's API cannot break one unnoticed (two had, found only when their
figures were next taken). Their figures are not checked here: tests never assert timings."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

TINY = {
    "hf_trainer.py": ["--steps", "3", "--warmup", "1", "--batch", "4", "--threads", "1"],
    "packing.py": ["--steps", "1", "--warmup", "1", "--threads", "1", "--batch", "8"]
    + ["--attn-tokens", "256", "--attn-repeats", "1", "--attn-warmup", "0"],
    "overhead.py": ["--steps", "2", "--warmup", "1", "--threads", "1"],
    "state_memory.py": ["--worlds", "1", "2"],
}


@pytest.mark.parametrize("script", TINY)
def test_bench_runs_and_prints_its_table(script, tmp_path):
    extra = ["--plot", str(tmp_path / "loss.png")] if script == "hf_trainer.py" else []
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *TINY[script], *extra],
        cwd=tmp_path,  # what a bench writes under runs/ stays in the test's folder
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| ---" in result.stdout, result.stdout[-3000:]
