"""Shards: one data file each, indexed for random access.

A shard is a ``.jsonl``, ``.jsonl.gz``, ``.json`` (one JSON array), ``.parquet`` file or a
Hugging Face ``datasets`` folder (``save_to_disk``). Indexing a text shard scans it once for
the byte span of each record (gzip: with ``indexed_gzip`` seek points); the index is cached
and rebuilt when the shard's size or mtime changes. Reading record ``i`` then costs one seek,
and memory holds only the records being read (spans are memory-mapped).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from omniweave.data.formats import detect_format
from omniweave.data.records import parse_line

SOLID = np.ones(256, dtype=bool)  # bytes other than JSON whitespace
SOLID[list(b" \t\r\n")] = False
# Small buffers: a random read decompresses from its seek point (256 KiB apart), not more.
GZIP_BUFFERS = {"readbuf_size": 1 << 16, "buffer_size": 1 << 16}
FORMAT_PROBE = 100  # records read to find a file's format
HEAD_BYTES = 1 << 20  # read at a time from a text file's start to check its first records
WHITESPACE_RE = re.compile(r"[ \t\r\n]*")


def is_dataset_folder(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")
    )


@dataclass
class Shard:
    """One data file: its kind, format, record count and how to read record ``i``."""

    path: str
    kind: str  # jsonl, jsonl.gz, json, parquet, datasets
    format: str
    num_records: int
    spans: np.ndarray | None = None  # [records, 2] byte (start, end) in the decompressed text
    gz_index: str | None = None  # indexed_gzip seek points
    dense: bool = True  # JSONL without blank lines: record i is on line i + 1

    def __post_init__(self):
        self._handle, self._pid, self._group = None, None, (None, None)  # opened on first read

    def __getstate__(self) -> dict:  # handles stay with their process
        return {**self.__dict__, "_handle": None, "_pid": None, "_group": (None, None)}

    def read(self, i: int) -> tuple[Any, str | None]:
        """Record ``i``, parsed, or None and why it could not be parsed."""
        if self.kind in ("parquet", "datasets"):
            return _without_nulls(self._row(i)), None
        start, end = (int(x) for x in self.spans[i])
        handle = self._open()
        handle.seek(start)
        return parse_line(handle.read(end - start))

    def where(self, i: int) -> str:
        """ "line N" of record ``i`` (counted on demand where the file has blank lines)."""
        if self.kind in ("parquet", "datasets"):
            return f"row {i + 1}"
        if self.kind != "json" and self.dense:
            return f"line {i + 1}"
        handle = self._open()
        handle.seek(0)
        newlines = handle.read(int(self.spans[i][0])).count(b"\n")
        return f"line {newlines + 1}"

    def _open(self):
        """This process's handle (each worker opens its own)."""
        if self._pid != os.getpid():
            if self.kind in ("parquet", "datasets"):
                self._handle = _open_table(self.path, self.kind)
            else:
                self._handle = _open_text(self.path, self.gz_index)
            self._pid, self._group = os.getpid(), (None, None)
        return self._handle

    def _row(self, i: int) -> dict:
        table = self._open()
        if self.kind == "datasets":
            return table[i]
        starts = np.cumsum(
            [0] + [table.metadata.row_group(g).num_rows for g in range(table.num_row_groups)]
        )
        group = int(np.searchsorted(starts, i, side="right") - 1)
        if self._group[0] != group:  # one row group decoded at a time
            self._group = (group, table.read_row_group(group).to_pylist())
        return self._group[1][i - starts[group]]

    def fingerprint(self) -> list:
        """What identifies the shard's content for a resume: name, size, records, a checksum
        of its first and last MiB."""
        size, crc = 0, 0
        for file in _files_of(self.path):
            size += os.path.getsize(file)
            with open(file, "rb") as f:
                crc = zlib.crc32(f.read(1 << 20), crc)
                f.seek(max(0, os.path.getsize(file) - (1 << 20)))
                crc = zlib.crc32(f.read(), crc)
        return [os.path.basename(os.path.normpath(self.path)), size, self.num_records, crc]


def _without_nulls(row: dict) -> dict:
    """A columnar file pads the fields a row lacks with None: they are not the row's."""
    return {
        key: _without_nulls(value) if isinstance(value, dict) else value
        for key, value in row.items()
        if value is not None
    }


def _files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
    return [path]


def _kind(path: str) -> str:
    if os.path.isdir(path):
        return "datasets"
    lower = path.lower()
    return next(
        ext.lstrip(".")
        for ext in (".jsonl.gz", ".jsonl", ".json", ".parquet")
        if lower.endswith(ext)
    )


def _open_text(path: str, gz_index: str | None):
    if gz_index is None:
        return open(path, "rb")  # noqa: SIM115 - kept open for the shard's life
    import indexed_gzip

    handle = indexed_gzip.IndexedGzipFile(path, **GZIP_BUFFERS)
    handle.import_index(gz_index)
    return handle


def _open_table(path: str, kind: str):
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path, memory_map=True)
    import datasets

    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split ({', '.join(data)})")
        data = data["train"]
    return data


def index_shard(path: str, cache_dir: str) -> Shard:
    """Index one shard (or load its cached index); ValueError naming the file on bad data."""
    kind = _kind(path)
    try:
        if kind in ("parquet", "datasets"):
            table = _open_table(path, kind)
            count = table.metadata.num_rows if kind == "parquet" else len(table)
            shard = Shard(path, kind, "", count)
        else:
            shard = _cached_text_index(path, kind, cache_dir)
    except Exception as error:
        raise _read_error(path, error) from None
    return _with_format(shard)


def head_shard(path: str, records: int = FORMAT_PROBE) -> Shard:
    """A shard of the first ``records`` records of ``path`` only, read without indexing the
    whole file (a JSON array is parsed whole); ValueError naming the file on bad data."""
    kind = _kind(path)
    try:
        if kind in ("parquet", "datasets"):
            table = _open_table(path, kind)
            count = table.metadata.num_rows if kind == "parquet" else len(table)
            shard = Shard(path, kind, "", min(count, records))
        elif kind == "json":
            spans = _array_spans(path)[:records]
            shard = Shard(path, kind, "", len(spans), spans, dense=False)
        else:
            opener = gzip.open if kind == "jsonl.gz" else open
            head, at_end = b"", False
            with opener(path, "rb") as handle:
                while not at_end and head.count(b"\n") <= records:
                    chunk = handle.read(HEAD_BYTES)
                    head, at_end = head + chunk, not chunk
            spans, dense = _line_spans(io.BytesIO(head))
            if not at_end:  # the last line may go on past the head
                spans = spans[spans[:, 1] < len(head)]
            shard = Shard(path, kind, "", min(len(spans), records), spans[:records], None, dense)
            shard._handle, shard._pid = io.BytesIO(head), os.getpid()
    except Exception as error:
        raise _read_error(path, error) from None
    return _with_format(shard)


def _read_error(path: str, error: Exception) -> Exception:
    """A one-line ValueError naming ``path`` for a read failure (OS, gzip, pyarrow, datasets);
    any other exception as it is."""
    if isinstance(error, (OSError, EOFError, zlib.error)):
        return ValueError(f"{path}: cannot read ({error})")
    if type(error).__module__.split(".")[0] in ("pyarrow", "datasets", "fsspec"):
        return ValueError(f"{path}: cannot read ({type(error).__name__}: {error})")
    return error


def _with_format(shard: Shard) -> Shard:
    """``shard`` with its format probed; ValueError when it holds no records."""
    if not shard.num_records:
        raise ValueError(f"{shard.path}: no records")
    shard.format = _probe_format(shard)
    return shard


def _probe_format(shard: Shard) -> str:
    """The format of the shard's first record that has one; ours where none has (its records
    then fail validation, each naming its line)."""
    for i in range(min(shard.num_records, FORMAT_PROBE)):
        found = detect_format(shard.read(i)[0])
        if found:
            return found
    return "text"


def _cached_text_index(path: str, kind: str, cache_dir: str) -> Shard:
    stat = os.stat(path)
    stamp = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha1(stamp["path"].encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"{os.path.basename(path)}-{key}")
    gz_index = os.path.join(folder, "gzindex") if kind == "jsonl.gz" else None
    meta = _read_json(os.path.join(folder, "meta.json"))
    if meta and meta["stamp"] == stamp:
        spans = np.load(os.path.join(folder, "spans.npy"), mmap_mode="r")
        return Shard(path, kind, "", len(spans), spans, gz_index, meta["dense"])
    os.makedirs(folder, exist_ok=True)
    if kind == "jsonl.gz":
        import indexed_gzip

        with gzip.open(path, "rb") as handle:  # raises EOFError where the stream is cut
            spans, dense = _line_spans(handle)
        with indexed_gzip.IndexedGzipFile(path, spacing=1 << 18, **GZIP_BUFFERS) as handle:
            handle.build_full_index()
            handle.export_index(gz_index + ".tmp")
        os.replace(gz_index + ".tmp", gz_index)
    elif kind == "jsonl":
        with open(path, "rb") as handle:
            spans, dense = _line_spans(handle)
    else:
        spans, dense = _array_spans(path), False
    np.save(os.path.join(folder, "spans.tmp.npy"), spans)
    os.replace(os.path.join(folder, "spans.tmp.npy"), os.path.join(folder, "spans.npy"))
    _write_json(os.path.join(folder, "meta.json"), {"stamp": stamp, "dense": dense})
    return Shard(path, kind, "", len(spans), spans, gz_index, dense)


def _line_spans(stream) -> tuple[np.ndarray, bool]:
    """Byte spans of the lines holding more than whitespace, and whether there were no others."""
    starts, ends = [], []
    offset, line_start, solid_before, blank = 0, 0, False, False
    while chunk := stream.read(1 << 22):
        data = np.frombuffer(chunk, np.uint8)
        newlines = np.flatnonzero(data == 10)
        solid = np.zeros(len(data) + 1, dtype=np.int32)
        np.cumsum(SOLID[data], out=solid[1:])
        bounds = np.concatenate([[0], newlines + 1])
        has = solid[newlines] - solid[bounds[:-1]] > 0
        line_starts = bounds[:-1] + offset
        if len(newlines):
            has[0] |= solid_before
            line_starts[0] = line_start
            starts.append(line_starts[has])
            ends.append(newlines[has] + offset)
            blank |= not has.all()
            line_start, solid_before = int(bounds[-1]) + offset, False
        solid_before |= bool(solid[-1] - solid[bounds[-1]] > 0)
        offset += len(data)
    if solid_before:  # a last line without a newline
        starts.append(np.array([line_start]))
        ends.append(np.array([offset]))
    spans = np.stack([np.concatenate(starts or [[]]), np.concatenate(ends or [[]])], axis=1)
    return spans.astype(np.int64), not blank


def _array_spans(path: str) -> np.ndarray:
    """Byte spans of the elements of a JSON array file (anything else is a ValueError)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 ({error})") from None
    decoder, spans = json.JSONDecoder(), []
    at = _skip(text, 0)
    if text[at : at + 1] != "[":
        raise ValueError(f"{path}: a .json file must hold one JSON array of records")
    at = _skip(text, at + 1)
    byte = at  # what lies between elements is ASCII: as many bytes as characters
    while text[at : at + 1] != "]":
        try:
            _, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            raise _json_error(path, text, error.pos, error.msg) from None
        size = len(text[at:end].encode("utf-8"))
        spans.append((byte, byte + size))
        after = _skip(text, end)
        if text[after : after + 1] == ",":
            at = _skip(text, after + 1)
            if text[at : at + 1] in ("]", ""):
                raise _json_error(path, text, at, "expected an element after ','")
        elif text[after : after + 1] == "]":
            at = after
        else:
            raise _json_error(path, text, after, "expected ',' or ']' after an element")
        byte += size + at - end
    if _skip(text, at + 1) != len(text):
        raise _json_error(path, text, at + 1, "text after the array")
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def _skip(text: str, at: int) -> int:
    """The position of the first non-whitespace character from ``at``."""
    return WHITESPACE_RE.match(text, at).end()


def _json_error(path: str, text: str, position: int, why: str) -> ValueError:
    line = text.count("\n", 0, position) + 1
    return ValueError(f"{path}, line {line}: invalid JSON array ({why})")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)
