"""This rank's micro-batches, step after step, read and tokenized on demand.

The records of step k are a pure function of (seed, k) and the sources (``SampleOrder``).
With fixed micro-batches a rank reads only its share of them (every dp-th record); under a
token budget every rank tokenizes the step's records to plan, splits them across ranks by
token load, and collates only its own. ``StepBatches[k]`` is that step's work, so worker
processes of a ``DataLoader`` prepare steps ahead of the trainer; resuming at step k needs
nothing but k, on any number of data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing as mp
import multiprocessing.forkserver as forkserver
import os
import sys
from dataclasses import dataclass, field

import torch

from omniweave.data.order import SampleOrder
from omniweave.data.packing import (
    MicroBatch,
    balanced_micro_batches,
    empty_batch,
    pack_row,
    pad_rows,
)
from omniweave.data.processors import IGNORE_INDEX, tokenize_multimodal, tokenize_record
from omniweave.data.sources import (
    Sources,
    checked_record,
    index_sources,
    located_records,
    source_specs,
)
from omniweave.train.supervision import data_worker_init

COUNTS = ("truncated", "dropped_overlong", "no_labels", "skipped_bad")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[torch.Tensor]] | None = None  # per modality, in text order


class SampleMaker:
    """Record -> ``Sample`` under the over-long policy (truncate, drop, error); returns the
    sample and what was done to it (None, or one of ``COUNTS``).

    ``omni`` (an OmniModel's ``OmniParts``) enables media records; a multimodal sample is
    truncated only where no placeholder is lost, else dropped.
    """

    def __init__(self, tokenizer, max_seq_len: int, on_overlong: str, omni=None):
        self.tokenizer, self.max_seq_len, self.on_overlong = tokenizer, max_seq_len, on_overlong
        self.omni = omni

    def __call__(self, record: dict, base_dir: str) -> tuple[Sample | None, str | None]:
        """ValueError (why, without the file) for a record that cannot be a sample."""
        if record.get("media") and self.omni is None:
            raise ValueError("has media but the model has no encoders (model.omni)")
        if self.omni is not None:
            tokens = tokenize_multimodal(record, self.tokenizer, self.omni, base_dir)
        else:
            tokens = tokenize_record(record, self.tokenizer, self.max_seq_len + 1)
        media, limit, outcome = tokens.pop("media", None), self.max_seq_len, None
        if len(tokens["input_ids"]) > limit:
            if self.on_overlong == "error":
                raise ValueError(
                    f"longer than data.max_seq_len={limit} tokens; raise max_seq_len or set "
                    "data.on_overlong to truncate or drop."
                )
            lost = self.omni is not None and any(
                tokens["input_ids"][limit:].count(mark) for mark in self.omni.placeholders.values()
            )
            if self.on_overlong == "drop" or lost:
                return None, "dropped_overlong"
            tokens, outcome = {key: value[:limit] for key, value in tokens.items()}, "truncated"
        if all(label == IGNORE_INDEX for label in tokens["labels"][1:]):
            return None, "no_labels"
        return Sample(tokens["input_ids"], tokens["labels"], media), outcome


def load_samples(
    path: str, tokenizer, max_seq_len: int, on_overlong: str, omni=None, skip_bad: bool = False
) -> tuple[list[Sample], dict[str, int], list[str]]:
    """Read and tokenize every record of ``path`` at once (for tools and tests; training
    streams). Returns the samples, the counts of ``COUNTS`` and the reason of each skip."""
    make = SampleMaker(tokenizer, max_seq_len, on_overlong, omni)
    records, skipped = located_records(path, skip_bad)
    samples, counts = [], dict.fromkeys(COUNTS, 0)
    for file, where, record in records:
        try:
            sample, outcome = make(record, os.path.dirname(os.path.abspath(file)))
        except ValueError as error:
            if not skip_bad:
                raise ValueError(f"{file}, {where}: {error}") from None
            skipped.append(f"{file}, {where}: {error}")
            continue
        if outcome:
            counts[outcome] += 1
        if sample:
            samples.append(sample)
    counts["skipped_bad"] = len(skipped)
    return samples, counts, skipped


@dataclass
class StepData:
    """One step's micro-batches for this rank, what happened to the records it accounts for
    (every dp-th of the step), and why bad ones were skipped. ``error``: the one-line
    message that must stop the run (the batches are then empty)."""

    batches: list[MicroBatch]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    skipped: list[str] = field(default_factory=list)
    error: str | None = None


class StepBatches(torch.utils.data.Dataset):
    """``self[step]``: this rank's ``StepData`` of optimizer step ``step``, fixed micro-batches
    or a token budget, padded or packed rows, each a multiple of ``multiple`` (SP x TP degree)
    long."""

    def __init__(
        self,
        sources: Sources,
        order: SampleOrder,
        make: SampleMaker,
        dp: tuple[int, int],
        pad_id: int,
        micro_batch_size: int = 1,
        budget: tuple[int, str] | None = None,
        packing: bool = False,
        multiple: int = 1,
        skip_bad: bool = False,
        attention_weight: float = 0.0,
    ):
        self.sources, self.order, self.make = sources, order, make
        (self.dp_size, self.dp_rank), self.pad_id = dp, pad_id
        self.micro_batch_size, self.budget, self.packing = micro_batch_size, budget, packing
        self.multiple, self.skip_bad = multiple, skip_bad
        self.attention_weight = attention_weight  # attention's work per token^2 vs dense's
        self.fingerprint = sources.fingerprint()  # what the shards held at start

    def state_dict(self) -> dict:
        """What the sample order depends on (the step is the trainer's)."""
        o = self.order
        return {
            "seed": o.seed,
            "shuffle": o.shuffle,
            "global_batch_size": o.batch,
            "sources": self.fingerprint,
        }

    def check_resume(self, saved: dict, allow_changed_sources: bool) -> None:
        """ValueError when ``saved`` describes another sample order than this one."""
        mine = self.state_dict()
        if allow_changed_sources:
            mine["sources"] = saved.get("sources")
        changed = [key for key in mine if saved.get(key) != mine[key]]
        if "sources" in changed:
            raise ValueError(
                "The training data changed since the checkpoint (a shard added, removed or "
                "edited), so its sample order is not the saved run's; restore the data, or set "
                "data.allow_changed_sources: true to resume on the new data."
            )
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)} -> {mine[key]}" for key in changed)
            raise ValueError(
                f"The saved data-loader state follows another sample order ({details}); "
                "resume with the same data, seed and train.global_batch_size."
            )

    def __len__(self) -> int:
        return 2**62  # an endless stream of steps

    def __getitem__(self, step: int) -> StepData:
        try:
            return self._step(step)
        except ValueError as error:  # a worker hands the message on, not a traceback
            return StepData([], error=str(error))

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches of ``step`` (ValueError on a bad record)."""
        data = self[step]
        if data.error:
            raise ValueError(data.error)
        return data.batches

    def _step(self, step: int) -> StepData:
        refs = self.order.global_batch(step)
        data = StepData([])
        if self.budget is None:
            size = self.micro_batch_size
            mine = list(range(self.dp_rank, len(refs), self.dp_size))
            plan = [mine[i : i + size] for i in range(0, len(mine), size)]
            samples = {i: self._sample(refs[i], i, data) for i in mine}
        else:
            samples = {i: self._sample(ref, i, data) for i, ref in enumerate(refs)}
            kept = [i for i, sample in samples.items() if sample is not None]
            lengths = [len(samples[i].input_ids) for i in kept]
            costs = [self._cost(samples[i]) for i in kept]
            work = [n + self.attention_weight * n * n for n in lengths]
            plans = balanced_micro_batches(costs, work, self.dp_size, self.budget[0], self.packing)
            plan = [[kept[i] for i in part] for part in plans[self.dp_rank]]
        collate = pack_row if self.packing else pad_rows
        for part in plan:
            chosen = [samples[i] for i in part if samples[i] is not None]
            batch = collate(chosen, self.pad_id, self.multiple) if chosen else None
            data.batches.append(batch or empty_batch(self.pad_id, self.multiple))
        return data

    def _sample(self, ref: tuple[int, int], position: int, data: StepData) -> Sample | None:
        """The sample of record ``ref``; what happened to it counts on one rank only."""
        shard, index = self.sources.locate(*ref)
        mine = position % self.dp_size == self.dp_rank
        record, problem = checked_record(shard, index)
        sample = outcome = None
        if problem is None:
            try:
                sample, outcome = self.make(record, os.path.dirname(os.path.abspath(shard.path)))
            except ValueError as error:
                problem = str(error)
        if problem:
            where = f"{shard.path}, {shard.where(index)}: {problem}"
            if not self.skip_bad:
                raise ValueError(where)
            outcome = "skipped_bad"
            if mine:
                data.skipped.append(where)
        if outcome and mine:
            data.counts[outcome] += 1
        return sample

    def _cost(self, sample: Sample) -> int:
        if self.budget[1] == "labels":
            return sum(label != IGNORE_INDEX for label in sample.labels[1:])
        return len(sample.input_ids)


def prefetched(
    batches: StepBatches, start: int, stop: int, workers: int, prefetch: int, timeout_s: float = 0
):
    """``batches[step]`` for step in [start, stop), prepared by ``workers`` processes up to
    ``prefetch`` steps ahead (in this process when ``workers`` is 0). A step the workers have
    not delivered after ``timeout_s`` (0: no limit) is a one-line error, not a hang."""
    if workers == 0:
        return (batches[step] for step in range(start, stop))
    loader = torch.utils.data.DataLoader(
        batches,
        sampler=range(start, stop),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=workers,
        prefetch_factor=math.ceil(prefetch / workers),
        multiprocessing_context=worker_context(),
        worker_init_fn=functools.partial(data_worker_init, os.getpid()),  # dies with the rank
        timeout=timeout_s,
    )
    with _main_module_hidden():  # the workers start here
        steps = iter(loader)
    return _within(steps, start, stop, timeout_s)


@contextlib.contextmanager
def _main_module_hidden():
    """Workers need nothing of ``__main__``. Unseen, it is not run again in each of them (as
    a worker that is not a fork would), so a script that trains at import time, with no
    ``if __name__ == "__main__":``, does not train again in its workers."""
    main = sys.modules["__main__"]
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in vars(main)}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


def worker_context(*preload: str):
    """Data workers start from a fork server where there is one, not as forks of the rank.
    A rank has threads of its own (gloo's take and drop Python thread states), and a fork
    taken while one of them holds the interpreter's thread-list lock leaves the child waiting
    for that lock forever (CPython gh-112275: the child takes it before resetting it; seen
    with 3.11.7). The server is a fresh single-threaded process that imports this module and
    the modules ``preload`` once. It starts at the first call, so a call before the model is
    built overlaps those imports (later calls' ``preload`` is moot)."""
    _quiet_resource_tracker()  # spawn uses the tracker too
    if "forkserver" not in mp.get_all_start_methods():
        return None  # spawn (macOS, Windows): also a fresh interpreter
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__, *preload])
    forkserver.ensure_running()
    return context


_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def _quiet_resource_tracker() -> None:
    """The loader's queues register their semaphores with multiprocessing's resource tracker,
    a child of the rank started with the rank's ``-W`` options. When a rank is killed, the
    tracker frees them and warns of "leaked semaphore objects": expected after a kill, and
    noise beside the run's own one-line error, so the tracker starts with that warning off."""
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)


class DataTimeout(TimeoutError):
    """The data workers delivered no step within the timeout."""


def _within(steps, start: int, stop: int, timeout_s: float):
    """``steps``, with the data loader's timeout said as the run's one-line error."""
    for step in range(start, stop):
        try:
            data = next(steps)
        except RuntimeError as error:
            if "timed out" not in str(error):
                raise
            raise DataTimeout(
                f"the data workers delivered no batch for step {step + 1} within "
                f"parallel.timeout_s={timeout_s:g} s: a worker is hung (or data.num_workers=0 "
                "runs the data path in the training process, where a hang can be traced)"
            ) from None
        yield data


def _as_is(item):
    return item


def default_workers() -> int:
    """Data workers per rank: its share of the cores that no rank computes on, 0 to 4 (a rank
    on a GPU takes one core, a rank on the CPU its threads). Where the ranks take every core,
    a worker can only preempt them, so the data path runs in the rank (measured: 2 ranks on 2
    cores trained 5,950-6,310 tokens/s in-process against 5,170-5,450 with a worker each, 1
    rank 7,670-7,690 against 7,430-7,590)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = 1 if torch.cuda.is_available() else torch.get_num_threads()
    spare = (os.cpu_count() or 1) - local * threads
    return max(0, min(4, spare // local))


def row_multiple(cfg, state) -> int:
    """What every row's length rounds up to: the parallel splits' multiple and
    ``data.pad_to_multiple_of``. By default, bfloat16 rows on CPU round up to 64 tokens:
    oneDNN JIT-builds a bfloat16 GEMM kernel for each new shape (5-10 ms each, measured), so
    rows of any length would build new kernels every step."""
    bucket = cfg.data.pad_to_multiple_of
    if bucket is None:
        bucket = 64 if state.device.type == "cpu" and cfg.model.dtype != "float32" else 1
    return math.lcm(state.degrees.row_multiple, bucket)


def build_step_batches(cfg, state, tokenizer, omni, attention_weight: float) -> StepBatches:
    """The run's ``StepBatches`` from its config and ``ParallelState``: sources indexed (each
    rank indexes its part, cached in ``output_dir/data_index``), the sample order, the plan."""
    import torch.distributed as dist

    d, t = cfg.data, cfg.train

    def gather(problem):
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        return problems

    sources = index_sources(
        source_specs(d),
        os.path.join(t.output_dir, "data_index"),
        state.rank,
        state.world_size,
        gather if dist.is_initialized() else None,
    )
    order = SampleOrder(sources.sizes, sources.weights, t.global_batch_size, t.seed, d.shuffle)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    budget = d.max_tokens_per_microbatch
    return StepBatches(
        sources,
        order,
        SampleMaker(tokenizer, d.max_seq_len, d.on_overlong, omni),
        (state.degrees.dp, state.dp_rank),
        pad_id,
        micro_batch_size=t.micro_batch_size,
        budget=None if budget is None else (budget, d.budget_counts),
        packing=d.packing,
        multiple=row_multiple(cfg, state),
        skip_bad=d.on_bad_sample == "skip",
        attention_weight=attention_weight,
    )
