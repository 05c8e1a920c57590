"""Data sources (omniweave.data.sources, .formats): every kind of source reads the same records,
random access and line numbers, the index cache, foreign formats, one-line errors, mixtures."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omniweave.data import shards as src
from omniweave.data.sources import (
    index_shard,
    index_sources,
    located_records,
    read_records,
    source_files,
)
from tests.source_data import RECORDS, SHARDS, _columns, _jsonl, _lines, _present


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """RECORDS in every kind of source, and the line of each record in the text files."""
    import datasets

    root = tmp_path_factory.mktemp("written")
    blanks = {3: [""], 17: ["   \t"], 30: ["", ""]}
    text, lines = _jsonl(RECORDS, blanks)
    (root / "blank.jsonl").write_bytes(text.encode())
    (root / "blank.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    crlf, _ = _jsonl(RECORDS, blanks, "\r\n")
    (root / "crlf.jsonl").write_bytes(crlf.encode())
    dense, dense_lines = _jsonl(RECORDS, {})
    (root / "dense.jsonl").write_bytes(dense.encode())
    (root / "dense.jsonl.gz").write_bytes(gzip.compress(dense.encode()))
    pretty = json.dumps(RECORDS, indent=2, ensure_ascii=False)
    (root / "pretty.json").write_bytes(pretty.encode())
    # each element is a top-level object: its first line is exactly "  {"
    json_lines = [n for n, line in enumerate(pretty.split("\n"), 1) if line == "  {"]
    assert len(json_lines) == 40
    pq.write_table(pa.table(_columns(RECORDS)), root / "rows.parquet", row_group_size=7)
    columns = _columns(RECORDS)
    datasets.Dataset.from_list(
        [{key: columns[key][i] for key in columns} for i in range(40)]
    ).save_to_disk(str(root / "arrow"))
    shards = root / "shards"
    (shards / "sub").mkdir(parents=True)
    for name, start, end in SHARDS:
        body, _ = _jsonl(RECORDS[start:end], {})
        (shards / name).write_bytes(gzip.compress(body.encode()))
    (shards / "README.md").write_text("not data\n")
    (shards / ".cache").mkdir()
    (shards / ".cache" / "junk.jsonl").write_text('{"foo": 1}\n')  # a hidden dir is skipped
    return {
        "root": root,
        "text": {
            "blank.jsonl": lines,
            "blank.jsonl.gz": lines,
            "crlf.jsonl": lines,
            "dense.jsonl": dense_lines,
            "dense.jsonl.gz": dense_lines,
            "pretty.json": json_lines,
        },
        "tables": ["rows.parquet", "arrow"],
        "shards": shards,
    }


# 1. every kind of source reads the same records


@pytest.mark.parametrize(
    "name", ["blank.jsonl", "blank.jsonl.gz", "crlf.jsonl", "dense.jsonl.gz", "pretty.json"]
)
def test_text_files_read_the_records_in_order_with_their_lines(written, name):
    path = str(written["root"] / name)
    located, skipped = located_records(path)
    assert [record for _, _, record in located] == RECORDS
    assert [where for _, where, _ in located] == [f"line {n}" for n in written["text"][name]]
    assert {file for file, _, _ in located} == {path} and skipped == []
    assert read_records(path) == RECORDS


@pytest.mark.parametrize("name", ["rows.parquet", "arrow"])
def test_tables_read_the_records_in_order(written, name):
    path = str(written["root"] / name)
    located, _ = located_records(path)
    assert [_present(record) for _, _, record in located] == RECORDS
    assert [where for _, where, _ in located] == [f"row {i}" for i in range(1, 41)]


def test_a_directory_and_a_glob_read_their_shards_in_sorted_order(written):
    shards = written["shards"]
    expected = [str(shards / name) for name, _, _ in SHARDS]
    assert source_files(str(shards)) == expected
    assert source_files(str(shards / "**" / "part-*.jsonl.gz")) == expected
    for path in (str(shards), str(shards / "**" / "part-*.jsonl.gz")):
        located, _ = located_records(path)
        assert [record for _, _, record in located] == RECORDS
        files = [file for file, _, _ in located]
        assert files == [str(shards / n) for n, a, b in SHARDS for _ in range(a, b)]
        lines = [f"line {k}" for _, a, b in SHARDS for k in range(1, b - a + 1)]
        assert [where for _, where, _ in located] == lines


def test_source_files_finds_datasets_folders_and_skips_hidden_dirs(tmp_path):
    import datasets

    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "notes.txt").write_text("not data\n")
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "a_set"))
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.jsonl").write_text('{"text": "c"}\n')
    assert source_files(str(tmp_path)) == [str(tmp_path / "a_set"), str(tmp_path / "b.jsonl")]
    assert source_files(str(tmp_path / "a_set")) == [str(tmp_path / "a_set")]
    assert source_files(str(tmp_path / "*")) == [str(tmp_path / "a_set"), str(tmp_path / "b.jsonl")]
    assert read_records(str(tmp_path)) == [{"text": "a"}, {"text": "b"}]


def test_a_dataset_dict_reads_its_train_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"text": "t1"}, {"text": "t2"}])
    test = datasets.Dataset.from_list([{"text": "held out"}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert source_files(str(tmp_path)) == [str(tmp_path / "dd")]
    assert read_records(str(tmp_path / "dd")) == [{"text": "t1"}, {"text": "t2"}]


# 2. random access


@pytest.mark.parametrize(
    "name", ["blank.jsonl", "blank.jsonl.gz", "crlf.jsonl", "dense.jsonl", "pretty.json"]
)
def test_random_access_reads_each_record_and_its_real_line(written, name, tmp_path):
    path = str(written["root"] / name)
    shard = index_shard(path, str(tmp_path / "cache"))
    assert (shard.num_records, shard.format) == (40, "text")
    order = list(range(40))
    random.Random(name).shuffle(order)
    for i in order:
        assert shard.read(i) == (RECORDS[i], None)
        assert shard.where(i) == f"line {written['text'][name][i]}"
    copy = pickle.loads(pickle.dumps(shard))  # as a forked or spawned worker gets it
    for i in order[:5]:
        assert copy.read(i) == (RECORDS[i], None)


@pytest.mark.parametrize("name", ["rows.parquet", "arrow"])
def test_random_access_in_tables(written, name, tmp_path):
    shard = index_shard(str(written["root"] / name), str(tmp_path / "cache"))
    assert (shard.num_records, shard.format) == (40, "text")
    order = list(range(40))
    random.Random(name).shuffle(order)  # crosses parquet's 7-row groups back and forth
    for i in order:
        record, problem = shard.read(i)
        assert (_present(record), problem) == (RECORDS[i], None)
        assert shard.where(i) == f"row {i + 1}"


class _Chunks(io.RawIOBase):
    """A stream that returns at most ``n`` bytes a read, to put chunk edges everywhere."""

    def __init__(self, data: bytes, n: int):
        self.data, self.n = io.BytesIO(data), n

    def read(self, size: int = -1) -> bytes:
        return self.data.read(self.n if size < 0 else min(self.n, size))


def _expected_spans(data: bytes) -> tuple[list[tuple[int, int]], bool]:
    spans, at, blank = [], 0, False
    parts = data.split(b"\n")
    for k, line in enumerate(parts):
        if line.strip(b" \t\r\n"):
            spans.append((at, at + len(line)))
        elif k < len(parts) - 1:
            blank = True
        at += len(line) + 1
    return spans, not blank


def test_line_spans_across_chunk_edges():
    rng = random.Random(0)
    pieces = [b"", b" ", b"\t", b"\r", b'{"a": 1}', b"x", b"  y ", "é".encode()]
    for _ in range(500):
        data = b"".join(
            rng.choice(pieces) + (b"\n" if rng.random() < 0.8 else b"")
            for _ in range(rng.randint(0, 12))
        )
        spans, dense = src._line_spans(_Chunks(data, rng.randint(1, 9)))
        assert ([tuple(s) for s in spans.tolist()], dense) == _expected_spans(data), data


# 3. the index cache


class _Rescanned(Exception):
    pass


def _refuse(*args, **kwargs):
    raise _Rescanned


@pytest.mark.parametrize(
    ("name", "scanner"),
    [("a.jsonl", "_line_spans"), ("a.jsonl.gz", "_line_spans"), ("a.json", "_array_spans")],
)
def test_the_index_is_cached_and_rebuilt_when_the_file_grows(tmp_path, monkeypatch, name, scanner):
    path, cache = tmp_path / name, str(tmp_path / "cache")

    def write(records):
        if name.endswith(".json"):
            path.write_text(json.dumps(records, indent=2))
        else:
            body = _jsonl(records, {2: [""]})[0].encode()
            path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)

    write(RECORDS[:10])
    assert index_shard(str(path), cache).num_records == 10
    monkeypatch.setattr(src, scanner, _refuse)
    shard = index_shard(str(path), cache)  # from the cache: no scan
    assert shard.num_records == 10
    assert [shard.read(i)[0] for i in (9, 0, 4)] == [RECORDS[9], RECORDS[0], RECORDS[4]]
    write(RECORDS[:11])
    with pytest.raises(_Rescanned):
        index_shard(str(path), cache)
    monkeypatch.undo()
    shard = index_shard(str(path), cache)
    assert shard.num_records == 11 and shard.read(10) == (RECORDS[10], None)


def test_a_same_size_rewrite_with_a_new_mtime_is_reindexed(tmp_path):
    path, cache = tmp_path / "a.jsonl", str(tmp_path / "cache")
    before = '{"text": "a"}\n{"text": "b"}\n'
    after = '{"text": "' + "c" * 15 + '"}\n'
    assert len(before) == len(after)
    path.write_text(before)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    assert index_shard(str(path), cache).num_records == 2
    path.write_text(after)
    os.utime(path, ns=(1_000_000_001_000_000_000, 1_000_000_001_000_000_000))
    shard = index_shard(str(path), cache)
    assert shard.num_records == 1 and shard.read(0) == ({"text": "c" * 15}, None)


def test_files_of_the_same_name_have_their_own_index(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    for folder, count in (("x", 3), ("y", 5)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_text(_jsonl(RECORDS[:count], {})[0])
    assert index_shard(str(tmp_path / "x" / "train.jsonl"), cache).num_records == 3
    assert index_shard(str(tmp_path / "y" / "train.jsonl"), cache).num_records == 5
    assert index_shard(str(tmp_path / "x" / "train.jsonl"), cache).num_records == 3
    monkeypatch.setattr(src, "_line_spans", _refuse)  # and both stay cached side by side
    assert index_shard(str(tmp_path / "y" / "train.jsonl"), cache).num_records == 5
    assert index_shard(str(tmp_path / "x" / "train.jsonl"), cache).num_records == 3


# 6. several sources


def test_index_sources_locates_records_across_shards(written, tmp_path):
    shards, pretty = written["shards"], written["root"] / "pretty.json"
    sources = index_sources([(str(shards), 3.0), (str(pretty), 1.0)], str(tmp_path / "cache"))
    assert sources.sizes == [40, 40] and sources.weights == [3.0, 1.0]
    for name, start, end in SHARDS:
        for i in range(start, end):
            shard, j = sources.locate(0, i)
            assert (shard.path, j) == (str(shards / name), i - start)
            assert shard.read(j) == (RECORDS[i], None)
    for i in range(40):
        shard, j = sources.locate(1, i)
        assert (shard.path, j, shard.read(j)[0]) == (str(pretty), i, RECORDS[i])
    fingerprint = sources.fingerprint()
    assert [weight for weight, _ in fingerprint] == [3.0, 1.0]
    assert [[name, size, count] for name, size, count, _ in fingerprint[0][1]] == [
        [os.path.basename(n), os.path.getsize(shards / n), b - a] for n, a, b in SHARDS
    ]
    assert fingerprint[1][1][0][:3] == ["pretty.json", os.path.getsize(pretty), 40]


def test_the_fingerprint_follows_a_same_size_edit(tmp_path):
    path, cache = tmp_path / "train.jsonl", str(tmp_path / "cache")
    path.write_text(_jsonl(RECORDS, {})[0])
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table(_columns(RECORDS)), other)
    specs = [(str(path), 1.0), (str(other), 2.0)]
    first = index_sources(specs, cache).fingerprint()
    assert index_sources(specs, cache).fingerprint() == first  # stable
    stat = os.stat(path)
    text = path.read_text()
    path.write_text(text.replace("record 20", "record 2X", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert os.path.getsize(path) == stat.st_size
    second = index_sources(specs, cache).fingerprint()
    assert second != first
    assert second[0][1][0][:3] == first[0][1][0][:3] and second[1] == first[1]


def test_the_fingerprint_of_a_large_file_checks_its_first_and_last_mib(tmp_path):
    path, cache = tmp_path / "big.jsonl", str(tmp_path / "cache")
    line = json.dumps({"text": "x" * 1000}) + "\n"
    body = line * 2600  # about 2.6 MB: the first and last MiB do not overlap
    path.write_text(body)
    first = index_sources([(str(path), 1.0)], cache).fingerprint()
    assert first[0][1][0][:3] == ["big.jsonl", len(body), 2600]
    for at in (20, len(body) - 20):  # a byte in the first MiB, then one in the last
        path.write_text(body[:at] + "y" + body[at + 1 :])
        assert index_sources([(str(path), 1.0)], cache).fingerprint() != first


def test_an_error_on_another_rank_fails_every_rank(tmp_path):
    path = _lines(tmp_path / "a.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="^rank 1 failed$"):
        index_sources(
            [(path, 1.0)], str(tmp_path / "c"), 0, 2, gather=lambda p: [p, "rank 1 failed"]
        )
