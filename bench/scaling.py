"""Tokens/s at 1, 2 and 4 processes on a length-skewed real-text corpus (Debian fortunes):
OmniWeave with fixed micro-batches, OmniWeave under a token budget, and Hugging Face
``Trainer`` (DDP under ``torchrun``), the same model, weights, samples and optimizer settings.

Precision: OmniWeave runs ``model.dtype`` = ``--dtype``, by default bfloat16 (bf16 compute,
fp32 master weights and gradient reduction; ``--dtype float32`` for fp32 throughout). HF
Trainer runs twice per world size, in fp32 and with ``bf16=True`` (autocast, fp32 master
weights), and the ratios take its faster run: each side at the precision a user would pick.

- OmniWeave runs through its CLI (``omniweave train CONFIG --nproc N``, FSDP over the N
  processes, one process = the plain model), packed rows, ``train.compile: true`` (its
  decoder blocks and loss compiled; ``--set train.compile=false`` for eager), the records in
  file order (``data.shuffle: false``) of a seeded shuffle of the corpus; "fixed" is
  ``train.micro_batch_size = 16 / N`` (one packed micro-batch per rank, as HF's batch),
  "budget" is ``data.max_tokens_per_microbatch: 2048``; "budget, replicas" is the same under
  ``parallel.dp_replicate: N, dp_shard: 1`` (every rank a whole replica, gradients averaged
  over the replicas as HF's are: by DDP in fp32, by HSDP with shards of one in bf16), at 2 or
  more processes. Its figures are ``metrics.jsonl``'s.
- HF Trainer: ``torchrun --nproc_per_node N`` (accelerate's MULTI_CPU DDP over gloo,
  ``ddp_find_unused_parameters=False``), 16 / N samples per process and step in the same
  order (a sequential sampler), ``DataCollatorWithFlattening`` (one row, no padding; the
  model's ``use_cache`` off, else transformers attends across the row's samples). A
  callback takes the time from one step's end to the next (the data fetch included, as
  OmniWeave's step time includes its wait for data); a ``training_step`` override counts the
  tokens, summed over ranks after.

Both count non-padding input tokens per second of step time; each figure is the median of
the per-step rates after the warm-up steps, pooled over ``--repeats`` runs (the sides take
turns, the other way round every other repeat). The per-step token counts of the sides are
compared, so all are known to train the same samples at every step, and so are their step-1
losses at 1 process. OMP_NUM_THREADS is the same for all sides: ``--threads``, or cores /
processes (2 threads at 1 process on 2 cores). The N processes share the machine's cores, so
where N x threads >= cores, more processes add no compute: the speed-up line then measures
the cost of distributing.

    make .data/tokenizer && .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/scaling.py [--procs 1 2 4] [--steps N] [--warmup K] [--repeats R]
        [--threads T] [--set data.num_workers=0 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import sys
import time

from launch import (
    BATCH,
    DATA,
    HF_OPTIMIZER,
    MAX_LEN,
    MODEL,
    ROOT,
    TOKENIZER,
    launch,
    omniweave_settings,
    parse_sets,
    run_omniweave,
    save_model,
    step_seconds,
    step_tokens,
)

OUT = os.path.join(ROOT, "runs", "bench-scaling")
BUDGET = 2048
TARGETS = {  # (processes, ratio): the floor
    (1, "budget/HF"): 1.5,
    (2, "budget/fixed"): 0.95,
    (2, "budget/HF"): 1.5,
    (2, "replicas/HF"): 1.5,
}


# This benchmark.


def shuffled_corpus(path: str, seed: int = 0) -> str:
    """The fortunes in a seeded random order, so file order is a random sample order."""
    with open(DATA) as f:
        lines = f.readlines()
    random.Random(seed).shuffle(lines)
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def hf_run(side: str, nproc: int, threads: int, model: str, data: str, steps: int) -> dict:
    """HF Trainer under torchrun (side ``hf-bf16``: autocast): per-step global tokens and
    rank 0's step seconds."""
    out = os.path.join(OUT, f"{side}-{nproc}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", __file__, "--hf-worker", out, model, data]
    command += ["--steps", str(steps)] + (["--hf-bf16"] if side == "hf-bf16" else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    print(f"bench: HF Trainer: {shlex.join(command)}", file=sys.stderr, flush=True)
    result = launch(command, env, f"{out}.log")
    if result["error"]:
        return result
    ranks = []
    for rank in range(nproc):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    tokens = [sum(step) for step in zip(*(r["tokens"] for r in ranks), strict=True)]
    result |= dict(tokens=tokens, seconds=ranks[0]["seconds"], threads=ranks[0]["threads"])
    return result | dict(first_loss=ranks[0]["losses"][0])


def hf_worker(out: str, model_dir: str, data: str, steps: int, bf16: bool) -> None:
    """One torchrun process of the HF side; writes ``out/rank{R}.json``."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorWithFlattening,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    with open(data) as f:
        texts = [json.loads(next(f))["text"] for _ in range(steps * BATCH)]
    samples = []
    for ids in tokenizer(texts)["input_ids"]:  # as OmniWeave: end of text added, then cut
        ids = ids if ids[-1:] == [tokenizer.eos_token_id] else [*ids, tokenizer.eos_token_id]
        samples.append({"input_ids": ids[:MAX_LEN]})

    class Clock(TrainerCallback):
        def __init__(self):
            self.tokens, self.steps, self.seconds, self.losses, self.last = 0, [], [], [], 0.0

        def on_train_begin(self, *args, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            now = time.perf_counter()
            self.steps.append(self.tokens)
            self.seconds.append(now - self.last)
            self.tokens, self.last = 0, now

    class Counted(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            clock.tokens += inputs["input_ids"].numel()  # one flattened row: no padding
            loss = super().training_step(model, inputs, *args, **kwargs)
            clock.losses.append(float(loss))
            return loss

    clock = Clock()
    arguments = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=BATCH // world,
        max_steps=steps,
        **HF_OPTIMIZER,
        ddp_find_unused_parameters=False,  # HF's default True costs a graph walk per step
        bf16=bf16,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False  # with a cache, the packed rows' samples see each other
    trainer = Counted(
        model=model,
        args=arguments,
        train_dataset=samples,
        data_collator=DataCollatorWithFlattening(),
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    figures = dict(tokens=clock.steps, seconds=clock.seconds, losses=clock.losses)
    figures["threads"] = torch.get_num_threads()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(figures, f)
    # No teardown: torch's gloo process group can abort (C++ terminate) or deadlock when it is
    # destroyed just after a collective: two four-process HF runs here did, one each way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


SIDES = ("fixed", "budget", "replicas", "hf", "hf-bf16")


def sides_at(nproc: int) -> tuple[str, ...]:
    """The sides run at ``nproc`` processes: replicas need two or more."""
    return SIDES if nproc > 1 else tuple(side for side in SIDES if side != "replicas")


def run_side(side: str, nproc: int, threads: int, model: str, data: str, args) -> dict:
    """One run: per-step tokens and seconds and the step-1 loss, or ``error``."""
    if side.startswith("hf"):
        return hf_run(side, nproc, threads, model, data, args.steps)
    batching = {
        "fixed": {"train.micro_batch_size": BATCH // nproc},
        "budget": {"data.max_tokens_per_microbatch": BUDGET},
        "replicas": {
            "data.max_tokens_per_microbatch": BUDGET,
            "parallel.dp_replicate": nproc,
            "parallel.dp_shard": 1,
        },
    }[side]
    out = os.path.join(OUT, f"{side}-{nproc}")
    settings = omniweave_settings(model, data, out, args.steps)
    settings |= {"data.shuffle": False, "train.compile": True, "model.dtype": args.dtype}
    settings |= batching | parse_sets(args.set)
    result = run_omniweave(f"OmniWeave {side}", settings, nproc, threads)
    rows = result["rows"]
    if not result["error"] and len(rows) < args.steps:
        result["error"] = f"{len(rows)} of {args.steps} steps logged"
    if not result["error"]:
        result |= dict(tokens=step_tokens(rows), seconds=step_seconds(rows))
        result["first_loss"] = rows[0]["loss"]
    return result


def measure(threads: dict[int, int], model: str, data: str, args) -> dict[int, dict[str, dict]]:
    """Every side at every world size, ``--repeats`` times (the sides in turn, the other way
    round every other repeat). Per side: ``rate`` (median tokens/s over the steps after
    warm-up of all its runs), ``medians`` (each run's), ``tokens``, ``first_loss``, or
    ``error`` (the first run's that failed)."""
    runs = {(n, side): [] for n in threads for side in sides_at(n)}
    for repeat in range(args.repeats):
        for n in threads:
            for side in sides_at(n) if repeat % 2 == 0 else sides_at(n)[::-1]:
                runs[n, side].append(run_side(side, n, threads[n], model, data, args))
    results: dict[int, dict[str, dict]] = {n: {} for n in threads}
    for (n, side), done in runs.items():
        failed = [r["error"] for r in done if r["error"]]
        if failed:
            results[n][side] = {"error": failed[0]}
            continue
        rates = [
            [t / s for t, s in zip(r["tokens"], r["seconds"], strict=True)][args.warmup :]
            for r in done
        ]
        results[n][side] = {
            "error": None,
            "rate": statistics.median(x for run in rates for x in run),
            "medians": [statistics.median(run) for run in rates],
            "tokens": done[0]["tokens"],
            "first_loss": done[0]["first_loss"],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=30, help="steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and world size")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process (cores / N)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--set", action="append", default=[], help="OmniWeave KEY=VALUE")
    parser.add_argument("--hf-worker", nargs=3, help=argparse.SUPPRESS)  # OUT MODEL DATA
    parser.add_argument("--hf-bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(*args.hf_worker, args.steps, args.hf_bf16)
    if not (os.path.isfile(DATA) and os.path.isdir(TOKENIZER)):
        sys.exit("bench/scaling.py: run `make .data/tokenizer` first (the fortunes corpus).")
    if any(BATCH % n for n in args.procs):
        sys.exit(f"bench/scaling.py: --procs must divide the global batch ({BATCH})")
    os.makedirs(OUT, exist_ok=True)
    model = save_model(os.path.join(OUT, "model"))
    data = shuffled_corpus(os.path.join(OUT, "fortunes-shuffled.jsonl"))
    cores = os.cpu_count() or 1
    threads = {n: args.threads or max(1, cores // n) for n in args.procs}
    results = measure(threads, model, data, args)

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(
        f"{args.steps} steps of {BATCH} fortunes (max_seq_len {MAX_LEN}, in one seeded random "
        f"order for all runs), Qwen2 {MODEL['hidden_size']} hidden x "
        f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']}/"
        f"{MODEL['num_key_value_heads']} heads; OmniWeave in {args.dtype}; {cores} cores; "
        f"{args.repeats} run(s) per cell, the sides taking turns; median of per-step tokens/s "
        f"over steps {args.warmup + 1}-{args.steps} of all its runs (in brackets: the runs' own "
        "medians, lowest-highest). OmniWeave's data.num_workers is its default unless set "
        "(its share of the cores no rank's threads use: 0 when they take every core, as HF's "
        "dataloader_num_workers), and its train.compile is true (HF Trainer's torch_compile "
        "stays at its default, off); "
        f"OmniWeave settings given: {' '.join(args.set) or 'none'}.\n"
    )
    names = {
        "fixed": f"OmniWeave fixed (micro {BATCH}/N, packed)",
        "budget": f"OmniWeave budget {BUDGET} (packed)",
        "replicas": f"OmniWeave budget {BUDGET}, replicas",
        "hf": "HF Trainer fp32 (DDP, flattening)",
        "hf-bf16": "HF Trainer bf16",
    }
    print(f"| processes | threads/process | {' | '.join(names.values())} | same tokens per step |")
    print(f"| ---: | ---: | {'---: | ' * len(names)}--- |")
    for n, sides in results.items():
        cells = [_cell(sides[side]) if side in sides else "(1 process)" for side in names]
        print(f"| {n} | {threads[n]} | {' | '.join(cells)} | {_same_tokens(sides)} |")

    ratios = ("budget/fixed", "budget/HF", "replicas/HF", "fixed/HF")
    print("\nHF below: the faster of HF Trainer's fp32 and bf16 runs at that world size.")
    print(f"\n| processes | {' | '.join(ratios)} |\n| ---: | ---: | ---: | ---: | ---: |")
    for n, sides in results.items():
        sides = sides | {"HF": _faster(sides["hf"], sides["hf-bf16"])}
        cells = []
        for ratio in ratios:
            top, bottom = (sides.get(s, {}).get("rate") for s in ratio.split("/"))
            cell = _ratio(top, bottom)
            if (n, ratio) in TARGETS and top and bottom:
                verdict = "OK" if top / bottom >= TARGETS[n, ratio] else "under target"
                cell += f" ({verdict}: target >= {TARGETS[n, ratio]})"
            cells.append(cell)
        print(f"| {n} | {' | '.join(cells)} |")

    if 1 in results:  # one process: HF's loss is the global one too
        losses = [f"{s} " + _num(results[1][s].get("first_loss"), ".5f") for s in sides_at(1)]
        print(f"\nstep-1 loss at 1 process (same weights and samples): {', '.join(losses)}")
    first = args.procs[0]
    print(f"\ntokens/s at N processes over {first} process(es) (same side):")
    for side, name in names.items():
        rates = {n: results[n].get(side, results[n]["budget"]).get("rate") for n in args.procs}
        speedups = [f"{n}: " + _ratio(rate, rates[first]) for n, rate in rates.items()]
        print(f"- {name}: {', '.join(speedups)}")


def _faster(*results: dict) -> dict:
    """The result of the faster run (a failed one counts as slowest)."""
    return max(results, key=lambda r: r.get("rate") or 0.0)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(top: float | None, bottom: float | None) -> str:
    return f"{top / bottom:.2f}x" if top and bottom else "n/a"


def _cell(result: dict) -> str:
    if result["error"]:
        return f"failed ({result['error']})"
    low, high = min(result["medians"]), max(result["medians"])
    return f"{result['rate']:,.0f}" + (
        f" ({low:,.0f}-{high:,.0f})" if len(result["medians"]) > 1 else ""
    )


def _same_tokens(sides: dict) -> str:
    """Whether every run of this world size trained the same tokens at every step."""
    counts = [tuple(r["tokens"]) for r in sides.values() if not r["error"]]  # first runs
    if len(counts) < 2:
        return "n/a"
    return "yes" if len(set(counts)) == 1 else "NO: " + ", ".join(str(sum(c)) for c in counts)


if __name__ == "__main__":
    main()
