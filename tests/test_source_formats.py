"""Foreign record formats (alpaca, ShareGPT), one format per file, and sources that are one-line
errors: missing, empty, cut short, not what their name says."""

from __future__ import annotations

import gzip
import json
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omniweave.data.sources import index_shard, index_sources, located_records, read_records
from tests.source_data import RECORDS, _columns, _jsonl, _lines, _present

# 4. alpaca and ShareGPT

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate.", "input": "chat → cat", "output": "gato", "system": "Be brief."},
    {"instruction": "Sum the list.", "input": "[1, 2]", "output": "3"},
]
ALPACA_MESSAGES = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate.\n\nchat → cat"},
        {"role": "assistant", "content": "gato"},
    ],
    [{"role": "user", "content": "Sum the list.\n\n[1, 2]"}, {"role": "assistant", "content": "3"}],
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "user", "value": "and you?"},
            {"from": "assistant", "value": "fine"},
        ]
    },
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]
SHAREGPT_MESSAGES = [
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and you?"},
        {"role": "assistant", "content": "fine"},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


def test_alpaca_converts_to_messages(tmp_path):
    expected = [{"messages": m} for m in ALPACA_MESSAGES]
    assert read_records(_lines(tmp_path / "a.jsonl", ALPACA)) == expected
    (tmp_path / "a.json").write_text(json.dumps(ALPACA, indent=2))
    assert read_records(str(tmp_path / "a.json")) == expected
    pq.write_table(pa.table(_columns(ALPACA)), tmp_path / "a.parquet")  # system: None, None
    assert read_records(str(tmp_path / "a.parquet")) == expected
    assert index_shard(str(tmp_path / "a.parquet"), str(tmp_path / "c")).format == "alpaca"


def test_sharegpt_converts_to_messages(tmp_path):
    path = _lines(tmp_path / "s.jsonl", SHAREGPT)
    assert read_records(path) == [{"messages": m} for m in SHAREGPT_MESSAGES]
    assert index_shard(path, str(tmp_path / "c")).format == "sharegpt"


@pytest.mark.parametrize(
    ("records", "line", "found", "expected"),
    [
        ([ALPACA[0], None, ALPACA[1], SHAREGPT[0], ALPACA[2]], 4, "sharegpt", "alpaca"),
        ([SHAREGPT[0], ALPACA[0], SHAREGPT[1]], 2, "alpaca", "sharegpt"),
        ([{"text": "t"}, RECORDS[1], None, ALPACA[0], ALPACA[1]], 4, "alpaca", "text or messages"),
    ],
)
def test_one_format_per_file(tmp_path, records, line, found, expected):
    path = _lines(tmp_path / "mixed.jsonl", records)
    with pytest.raises(ValueError) as error:
        read_records(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}, line {line}: ")
    assert f"{found} record in a file of {expected} records; one format per file" in message
    kept, skipped = located_records(path, skip_bad=True)
    assert len(kept) + len(skipped) == sum(r is not None for r in records)
    assert skipped[0].startswith(f"{path}, line {line}: ")


def test_a_record_of_no_format_is_a_one_line_error_or_skipped(tmp_path):
    records = [{"text": "one"}, None, {"foo": 1}, {"text": "two"}, {"bar": [1]}]
    path = _lines(tmp_path / "odd.jsonl", records)
    with pytest.raises(ValueError) as error:
        read_records(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}, line 3: ")
    kept, skipped = located_records(path, skip_bad=True)
    assert [(w, r) for _, w, r in kept] == [
        ("line 1", {"text": "one"}),
        ("line 4", {"text": "two"}),
    ]
    assert [s.split(": ")[0] for s in skipped] == [f"{path}, line 3", f"{path}, line 5"]
    assert all("\n" not in s for s in skipped)


def test_skip_bad_keeps_the_files_own_format(tmp_path):
    path = _lines(tmp_path / "mixed.jsonl", [ALPACA[0], SHAREGPT[0], ALPACA[1]])
    kept, skipped = located_records(path, skip_bad=True)
    assert [r for _, _, r in kept] == [{"messages": m} for m in ALPACA_MESSAGES[:2]]
    assert [w for _, w, _ in kept] == ["line 1", "line 3"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}, line 2: a sharegpt record")


# 5. errors


def _missing(tmp_path):
    return tmp_path / "nowhere.jsonl"


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _csv(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    return tmp_path / "data.csv"


def _truncated_gz(tmp_path):
    body = "".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(200))
    raw = gzip.compress(body.encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    return tmp_path / "cut.jsonl.gz"


def _garbage_parquet(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not a parquet file" * 8)
    return tmp_path / "junk.parquet"


def _json_object(tmp_path):
    (tmp_path / "object.json").write_text(json.dumps({"text": "not in an array"}))
    return tmp_path / "object.json"


def _not_gzip(tmp_path):
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not compressed"}\n')
    return tmp_path / "plain.jsonl.gz"


def _bad_utf8(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    return tmp_path / "latin1.jsonl"


def _empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    return tmp_path / "empty.jsonl"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_missing, "no such file"),
        (_empty_dir, "no data files"),
        (_csv, "unknown extension '.csv'"),
        (_truncated_gz, ""),
        (_garbage_parquet, "cannot read"),
        (_json_object, "one JSON array"),
        (_not_gzip, "cannot read"),
        (_bad_utf8, "line 2: not valid UTF-8"),
        (_empty_file, "no records"),
    ],
)
def test_bad_sources_are_one_line_errors_naming_the_path(tmp_path, make, says):
    path = str(make(tmp_path))
    with pytest.raises(ValueError) as error:
        read_records(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(path) and says in message, message
    if make not in (_truncated_gz, _bad_utf8):  # those index, then fail on a record
        with pytest.raises(ValueError) as error:
            index_sources([(path, 1.0)], str(tmp_path / "cache"))
        assert "\n" not in str(error.value) and str(error.value).startswith(path)


def test_an_invalid_line_names_its_line(tmp_path):
    path = str(_bad_utf8(tmp_path))
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 2: not valid UTF-8$"):
        read_records(path)
    path = _lines(tmp_path / "broken.jsonl", [{"text": "a"}, None, None])
    with open(path, "a") as f:
        f.write('{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 4: invalid JSON"):
        read_records(path)


@pytest.mark.parametrize("cut", ["at a flush point", "in half, skip_bad"])
def test_a_truncated_gzip_is_an_error(tmp_path, cut):
    lines = [json.dumps({"text": f"record {i} " * 20}).encode() + b"\n" for i in range(100)]
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = packer.compress(b"".join(lines[:50])) + packer.flush(zlib.Z_FULL_FLUSH)
    whole = head + packer.compress(b"".join(lines[50:])) + packer.flush()
    assert gzip.decompress(whole) == b"".join(lines)
    cut_bytes = head if cut == "at a flush point" else whole[: len(whole) // 2]
    with pytest.raises(EOFError):  # the independent check: the file is not a whole gzip stream
        gzip.decompress(cut_bytes)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut_bytes)
    with pytest.raises(ValueError, match="cut.jsonl.gz"):
        located_records(str(path), skip_bad=cut != "at a flush point")


@pytest.mark.parametrize(
    "body",
    [
        '[{"text": "a"}, {"text": "b"}',
        '[{"text": "a"}, {"text": "b"},',
        '[{"text": "a"} {"text": "b"}]',
        '[{"text": "a"}] {"text": "b"}',
    ],
    ids=["unterminated", "unterminated after a comma", "missing comma", "text after the array"],
)
def test_a_json_file_that_is_not_one_array_is_an_error(tmp_path, body):
    with pytest.raises(json.JSONDecodeError):  # the independent check
        json.loads(body)
    (tmp_path / "bad.json").write_text(body)
    with pytest.raises(ValueError, match="bad.json"):
        read_records(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("kind", ["parquet", "datasets"])
@pytest.mark.parametrize(
    "records",
    [
        [{"text": "hello", "prompt": "say: "}, RECORDS[1]],
        [
            {"text": "<image> a", "media": {"image": ["a.png"]}},
            {"text": "<audio> b", "media": {"audio": ["b.wav"]}},
        ],
    ],
    ids=["prompt", "media"],
)
def test_columnar_padding_is_not_a_field(tmp_path, kind, records):
    import datasets

    (tmp_path / "rows.jsonl").write_text(_jsonl(records, {})[0])
    assert read_records(str(tmp_path / "rows.jsonl")) == records  # valid as JSONL
    columns = _columns(records)
    if kind == "parquet":
        path = tmp_path / "rows.parquet"
        pq.write_table(pa.table(columns), path)
    else:
        path = tmp_path / "rows"
        datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    assert [_present(r) for r in read_records(str(path))] == records
