"""``omniweave train`` on a 1,000,000-record corpus at 1 and 2 processes: time to the first
step, peak memory, steady tokens/s and the time steps wait for data, for an in-memory source
(one plain ``.jsonl`` of a 50,000-record subset) and a streaming one (16 gzip'd JSONL shards,
``data.train_path`` a directory or a glob).

- Corpus: built once into ``.data/scale/part-000NN.jsonl.gz`` (rebuilt only if a shard is
  missing), each record ``{"text": ...}`` of 1-3 Debian fortunes drawn by a seeded RNG; the
  subset is the first records of shard 0, in ``.data/scale-subset-N.jsonl``.
- Runs: the Qwen2 of ``bench/scaling.py``, max_seq_len 256, 16 samples per step, packed under
  a 2048-token budget, one data worker per rank (``data.num_workers: 1``: the path measured
  here; the default where the ranks' threads take every core is 0, in the rank), a fresh
  ``output_dir`` each (so the shard index is built cold).
- Start: wall clock from launching ``omniweave train`` to the start of step 1's compute: the
  modification time of ``metrics.jsonl`` when its first row appeared (``log_every: 1``; rows
  written meanwhile taken back by their step times), minus step 1's time less its
  ``data_wait_s`` (the first batch's wait counts as start-up; the whole step 1 is taken off
  where ``data_wait_s`` is not logged).
- Memory: peak resident set of the largest process of the run's tree (torchrun, ranks, data
  workers; polled every 0.1 s from outside), of the whole tree at once, and
  ``metrics.jsonl``'s ``peak_mem_gb`` (the largest rank's own peak RSS).
- tokens/s, ``data_wait_s`` and its share of the step: medians over the steps after warm-up.
A run that fails (e.g. a source kind the data path cannot read yet) shows its first error.

    make .data/tokenizer
    .venv/bin/python bench/data_scale.py [--procs 1 2] [--steps N] [--stream-path PATH]
        [--set data.num_workers=0 ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import statistics
import sys
import time

import numpy as np
from launch import (
    DATA,
    ROOT,
    TOKENIZER,
    omniweave_settings,
    parse_sets,
    run_omniweave,
    save_model,
    step_seconds,
)

SCALE = os.path.join(ROOT, ".data", "scale")
OUT = os.path.join(ROOT, "runs", "bench-data-scale")
MAX_LEN, BUDGET = 256, 2048
START_S, MEMORY_GB, WAIT_SHARE = 30.0, 1.5, 0.02  # targets: start, per process at 2, wait


def build_corpus(records: int, shards: int, seed: int = 0) -> float:
    """Write the shards into ``SCALE`` unless all are there; returns the seconds it took."""
    paths = [os.path.join(SCALE, f"part-{i:05d}.jsonl.gz") for i in range(shards)]
    if all(map(os.path.isfile, paths)):
        return 0.0
    start = time.perf_counter()
    with open(DATA) as f:  # each fortune as the inside of a JSON string
        escaped = [json.dumps(json.loads(line)["text"])[1:-1] for line in f]
    rng = np.random.default_rng(seed)
    tmp = SCALE + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for shard, path in enumerate(paths):
        counts = rng.integers(1, 4, size=records // shards + (shard < records % shards))
        picks = rng.integers(0, len(escaped), size=int(counts.sum())).tolist()
        ends = np.cumsum(counts).tolist()
        lines = [
            '{"text": "' + "\\n\\n".join(escaped[i] for i in picks[end - n : end]) + '"}\n'
            for n, end in zip(counts.tolist(), ends, strict=True)
        ]
        with gzip.open(os.path.join(tmp, os.path.basename(path)), "wb", compresslevel=1) as f:
            f.write("".join(lines).encode())
    shutil.rmtree(SCALE, ignore_errors=True)
    os.replace(tmp, SCALE)
    return time.perf_counter() - start


def build_subset(records: int) -> str:
    """The first ``records`` of shard 0 as one plain JSONL file (kept once written)."""
    path = os.path.join(ROOT, ".data", f"scale-subset-{records}.jsonl")
    if not os.path.isfile(path):
        with gzip.open(os.path.join(SCALE, "part-00000.jsonl.gz"), "rt") as f:
            lines = [next(f) for _ in range(records)]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)
    return path


def figures(result: dict, warmup: int) -> dict:
    """Start, memory, tokens/s and data wait of one run (``launch``'s result)."""
    rows = result["rows"]
    steps = list(zip(rows, step_seconds(rows), strict=True))
    first = steps[0][1] - rows[0].get("data_wait_s", 0.0)
    steady = steps[warmup:] or steps
    waits = [(r["data_wait_s"], s) for r, s in steady if "data_wait_s" in r]
    return {
        "start": result["first_row"] - result["start"] - first if result["first_row"] else None,
        "process_gb": result["peak_process_gb"],
        "tree_gb": result["peak_tree_gb"],
        "metrics_gb": max(r["peak_mem_gb"] for r in rows),
        "rate": statistics.median(r["tokens_per_s"] for r, _ in steady),
        "wait_ms": statistics.median(w for w, _ in waits) * 1e3 if waits else None,
        "share": statistics.median(w / s for w, s in waits) if waits else None,
    }


def verdicts(f: dict, nproc: int) -> str:
    """Each target met, missed or not measurable (memory only at 2 processes or more)."""
    checks = [("start", f["start"], START_S)]
    if nproc >= 2:
        checks.append(("memory", max(f["process_gb"], f["metrics_gb"]), MEMORY_GB))
    checks.append(("wait", f["share"], WAIT_SHARE))
    words = {None: "n/a", True: "OK", False: "missed"}
    return ", ".join(
        f"{name} {words[None if value is None else value < limit]}" for name, value, limit in checks
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process (cores / N)")
    parser.add_argument("--records", type=int, default=1_000_000, help="corpus records")
    parser.add_argument("--shards", type=int, default=16, help="corpus shards")
    parser.add_argument("--subset", type=int, default=50_000, help="in-memory source's records")
    parser.add_argument("--stream-path", default=SCALE, help="streaming data.train_path")
    parser.add_argument("--set", action="append", default=[], help="OmniWeave KEY=VALUE")
    args = parser.parse_args()
    if not (os.path.isfile(DATA) and os.path.isdir(TOKENIZER)):
        sys.exit("bench/data_scale.py: run `make .data/tokenizer` first (the fortunes corpus).")
    built = build_corpus(args.records, args.shards)
    sources = {"in-memory": build_subset(args.subset), "streaming": args.stream_path}
    os.makedirs(OUT, exist_ok=True)
    model = save_model(os.path.join(OUT, "model"))
    cores = os.cpu_count() or 1
    results = {}
    for nproc in args.procs:
        threads = args.threads or max(1, cores // nproc)
        for source, path in sources.items():
            out = os.path.join(OUT, f"{source}-{nproc}")
            settings = omniweave_settings(model, path, out, args.steps)
            settings |= {"data.max_seq_len": MAX_LEN, "data.max_tokens_per_microbatch": BUDGET}
            settings |= {"data.num_workers": 1}
            settings |= parse_sets(args.set)
            result = run_omniweave(f"{source}, {nproc} process(es)", settings, nproc, threads)
            if not result["error"] and not result["rows"]:
                result["error"] = "no step logged"
            results[nproc, source] = (threads, result)

    size = sum(os.path.getsize(os.path.join(SCALE, n)) for n in os.listdir(SCALE))
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(
        f"corpus: {args.records:,} records of 1-3 fortunes in {args.shards} gzip'd JSONL shards, "
        f"{size / 1e6:,.0f} MB in {os.path.relpath(SCALE, ROOT)}/ "
        + (f"(built in {built:.0f} s)" if built else "(cached)")
        + f"; in-memory: {os.path.relpath(sources['in-memory'], ROOT)}, streaming: "
        f"data.train_path={os.path.relpath(args.stream_path, ROOT)}. {args.steps} steps of 16 "
        f"samples (max_seq_len {MAX_LEN}, budget {BUDGET}, packed), Qwen2 256 x 4 layers, "
        f"{cores} cores; medians over steps {args.warmup + 1}-{args.steps}; OmniWeave settings "
        f"given: {' '.join(args.set) or 'none'}.\n"
    )
    print(
        "| processes | threads/process | source | start (s) | peak RSS, largest process (GB) "
        "| peak_mem_gb (metrics) | peak RSS, all processes (GB) | tokens/s | data_wait_s "
        "(ms) | data wait / step | targets |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for (nproc, source), (threads, result) in results.items():
        if result["error"]:
            print(f"| {nproc} | {threads} | {source} | failed ({result['error']}) |" + " |" * 7)
            continue
        f = figures(result, args.warmup)
        cells = [
            _num(f["start"], ".1f"),
            f"{f['process_gb']:.2f}",
            f"{f['metrics_gb']:.2f}",
            f"{f['tree_gb']:.2f}",
            f"{f['rate']:,.0f}",
            _num(f["wait_ms"], ".1f"),
            _num(f["share"], ".1%"),
            verdicts(f, nproc),
        ]
        print(f"| {nproc} | {threads} | {source} | {' | '.join(cells)} |")
    print(
        f"\ntargets: start < {START_S:.0f} s; peak memory < {MEMORY_GB} GB per process at 2 "
        f"processes (the larger of the outside and the metrics figure); data_wait_s < "
        f"{WAIT_SHARE:.0%} of the step time."
    )


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
