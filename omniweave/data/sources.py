"""Data sources: the shards behind a file, a directory or a glob, and weighted mixes of them.

``source_files`` finds a source's shards; ``index_sources`` indexes every shard (each rank
its part, all reading the cached indexes after) so that record ``i`` of a source is one seek
away; ``checked_record`` reads one in our schema.
"""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np

from omniweave.data.formats import as_record
from omniweave.data.records import validate_record
from omniweave.data.shards import Shard, head_shard, index_shard, is_dataset_folder

EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def source_files(path: str) -> list[str]:
    """The shards of ``path`` (a file, a directory searched recursively, or a glob), sorted."""
    if is_dataset_folder(path) or os.path.isfile(path):
        if not (is_dataset_folder(path) or path.lower().endswith(EXTENSIONS)):
            ext = os.path.splitext(path)[1]
            raise ValueError(
                f"{path}: unknown extension {ext!r} (expected {', '.join(EXTENSIONS)})"
            )
        return [path]
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in files if f.lower().endswith(EXTENSIONS)]
            found += [
                os.path.join(root, d) for d in dirs if is_dataset_folder(os.path.join(root, d))
            ]
            dirs[:] = [d for d in dirs if not is_dataset_folder(os.path.join(root, d))]
    else:
        found = [p for p in glob.glob(path, recursive=True)]
        found = [p for p in found if is_dataset_folder(p) or p.lower().endswith(EXTENSIONS)]
    if not found:
        kinds = ", ".join(EXTENSIONS) + " or a datasets folder"
        raise ValueError(
            f"{path}: no data files ({kinds})"
            if os.path.isdir(path)
            else f"{path}: no such file, directory or matching files ({kinds})"
        )
    return sorted(found)


def source_specs(data) -> list[tuple[str, float]]:
    """(path, weight) of ``data.train_path`` or of each of ``data.sources`` (a DataConfig);
    ValueError unless exactly one is set and every source is ``{path, weight}`` with a
    positive weight."""
    if (data.train_path is None) == (data.sources is None):
        raise ValueError(
            "set data.train_path (a file, directory or glob) or data.sources "
            "([{path, weight}, ...]), not both and not neither."
        )
    if data.sources is None:
        return [(data.train_path, 1.0)]
    for i, source in enumerate(data.sources):
        ok = isinstance(source, dict) and set(source) <= {"path", "weight"}
        ok = ok and isinstance(source.get("path"), str)
        weight = source.get("weight", 1.0) if ok else None
        if not (ok and isinstance(weight, int | float) and weight > 0):
            raise ValueError(
                f"data.sources[{i}] must be {{path: str, weight: number > 0}}; got {source!r}"
            )
    return [(source["path"], float(source.get("weight", 1.0))) for source in data.sources]


class Sources:
    """The shards of each weighted source; record ``index`` of a source is found by its shard."""

    def __init__(self, shards: list[list[Shard]], weights: list[float]):
        self.shards, self.weights = shards, weights
        self.starts = [np.cumsum([0] + [s.num_records for s in group]) for group in shards]
        self.sizes = [int(starts[-1]) for starts in self.starts]

    def locate(self, source: int, index: int) -> tuple[Shard, int]:
        starts = self.starts[source]
        shard = int(np.searchsorted(starts, index, side="right") - 1)
        return self.shards[source][shard], index - int(starts[shard])

    def fingerprint(self) -> list:
        return [
            [weight, [s.fingerprint() for s in group]]
            for group, weight in zip(self.shards, self.weights, strict=True)
        ]


def index_sources(
    specs: list[tuple[str, float]], cache_dir: str, rank: int = 0, world: int = 1, gather=None
) -> Sources:
    """Index every shard of ``specs`` ((path, weight) pairs). Under several processes each
    indexes its part first (``gather`` collects their errors, as all_gather_object would), then
    all read the cached indexes."""
    files = [source_files(path) for path, _ in specs]
    problem = None
    try:
        for path in sorted({f for group in files for f in group})[rank::world]:
            index_shard(path, cache_dir)
    except ValueError as error:
        problem = str(error)
    problems = [p for p in (gather(problem) if gather else [problem]) if p]
    if problems:
        raise ValueError(problems[0])
    shards = [[index_shard(path, cache_dir) for path in group] for group in files]
    return Sources(shards, [weight for _, weight in specs])


def check_sources(specs: list[tuple[str, float]], skip_bad: bool) -> None:
    """Read the first records of every shard of ``specs``: a file that cannot be read, is
    empty, or (unless ``skip_bad``) has a bad record among them is a one-line ValueError;
    under ``skip_bad`` a file none of whose first records is valid is one too."""
    for path, _ in specs:
        for file in source_files(path):
            shard = head_shard(file)
            problems = []
            for i in range(shard.num_records):
                problem = checked_record(shard, i)[1]
                if problem and not skip_bad:
                    raise ValueError(f"{file}, {shard.where(i)}: {problem}")
                problems.append(problem and f"{shard.where(i)}: {problem}")
            if all(problems):
                raise ValueError(
                    f"{file}: none of its first {len(problems)} records is valid "
                    f"(the first, {problems[0]})"
                )


def checked_record(shard: Shard, i: int) -> tuple[dict | None, str | None]:
    """Record ``i`` of ``shard`` in our schema, or None and why it is not a valid sample."""
    raw, problem = shard.read(i)
    if problem is None:
        try:
            raw = as_record(raw, shard.format)
        except ValueError as error:
            problem = str(error)
    problem = problem or validate_record(raw)
    return (None, problem) if problem else (raw, None)


def located_records(
    path: str, skip_bad: bool = False
) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """(file, "line N", record) for every valid record of ``path`` (any source), and, under
    ``skip_bad``, the reasons of those left out (otherwise the first bad one is a ValueError)."""
    records, skipped = [], []
    with tempfile.TemporaryDirectory() as cache:
        for file in source_files(path):
            shard = index_shard(file, cache)
            for i in range(shard.num_records):
                record, problem = checked_record(shard, i)
                if problem and not skip_bad:
                    raise ValueError(f"{file}, {shard.where(i)}: {problem}")
                if problem:
                    skipped.append(f"{file}, {shard.where(i)}: {problem}")
                else:
                    records.append((file, shard.where(i), record))
    if not records:
        first = f" ({len(skipped)} bad, the first: {skipped[0]})" if skipped else ""
        raise ValueError(f"{path}: no records{first}")
    return records, skipped


def read_records(path: str) -> list[dict]:
    """Every record of ``path``, validated (the first bad one is a ValueError)."""
    return [record for _, _, record in located_records(path)[0]]
