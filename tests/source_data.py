"""Records for the source tests: text and messages records with hard characters, and the
ways to write them (JSONL with blank lines, table columns)."""

from __future__ import annotations

import json

SPECIAL = [
    "naïve café — “quoted”",
    "日本語のテキスト",
    "emoji 😀 and 🧪 (astral: surrogate pairs when escaped)",
    'a "quoted" word and a back\\slash',
    "tab\tand\nnewline inside",
    "line\u2028separator, paragraph\u2029separator and next\u0085line",
    "control \x01\x1f chars",
    "plain ascii",
]
SHARDS = [("part-0.jsonl.gz", 0, 13), ("part-1.jsonl.gz", 13, 27), ("sub/part-2.jsonl.gz", 27, 40)]


def _records() -> list[dict]:
    """40 records: text and messages (some with a system turn), with awkward characters."""
    out = []
    for i in range(40):
        extra = SPECIAL[i % len(SPECIAL)]
        if i % 3 == 1:
            messages = [
                {"role": "user", "content": f"question {i}: {extra}"},
                {"role": "assistant", "content": f"answer {i} ✓"},
            ]
            if i % 2:
                messages.insert(0, {"role": "system", "content": "Be brief."})
            out.append({"messages": messages})
        else:
            out.append({"text": f"record {i}: {extra}"})
    return out


RECORDS = _records()


def _jsonl(records: list[dict], blanks: dict[int, list[str]], newline: str = "\n"):
    """JSONL text (escaped and raw unicode alternating) with ``blanks[i]`` lines after record i,
    and the 1-based line of each record."""
    lines, numbers = [], []
    for i, record in enumerate(records):
        lines.append(json.dumps(record, ensure_ascii=i % 2 == 0))
        numbers.append(len(lines))
        lines += blanks.get(i, [])
    return "".join(line + newline for line in lines), numbers


def _present(value):
    """``value`` without the None fields a columnar file pads missing keys with."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_present(v) for v in value]
    return value


def _columns(records: list[dict]) -> dict[str, list]:
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {key: [r.get(key) for r in records] for key in keys}


def _lines(path, records) -> str:
    path.write_text("".join((json.dumps(r) if r is not None else "") + "\n" for r in records))
    return str(path)
