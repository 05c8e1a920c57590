"""Record formats found in the wild, read as our own schema (``text`` or ``messages``).

- ``text``: ``{"text": ...}`` (optionally ``prompt``, ``media``), learned whole;
- ``messages``: ``{"messages": [{"role", "content"}, ...]}``, assistant turns learned;
- ``alpaca``: ``{"instruction", "input", "output"}`` (and optional ``system``), the output learned;
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}``, the ``gpt`` turns learned.

A file holds one format (``text`` and ``messages`` records, our own, may mix): its first
record decides, and a record of another is an error.
"""

from __future__ import annotations

from typing import Any

FORMATS = ("text", "messages", "alpaca", "sharegpt")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
SHAREGPT_ROLES["assistant"] = "assistant"


def detect_format(record: Any) -> str | None:
    """The format of one parsed record (by its non-null fields), or None when it has none."""
    if not isinstance(record, dict):
        return None
    for name, key in (("text", "text"), ("messages", "messages"), ("sharegpt", "conversations")):
        if record.get(key) is not None:
            return name
    if record.get("instruction") is not None and record.get("output") is not None:
        return "alpaca"
    return None


def _family(format: str) -> str:
    """Our own schema's two kinds of record may share a file; other formats may not."""
    return "text or messages" if format in ("text", "messages") else format


def as_record(record: Any, expected: str) -> Any:
    """``record`` in our schema (validated later); ValueError when it is of another format than
    the file's ``expected`` one. A record of no format is returned as is, for validation to
    say what it lacks."""
    found = detect_format(record)
    if found is not None and _family(found) != _family(expected):
        raise ValueError(
            f"a {found} record in a file of {_family(expected)} records; one format per file"
        )
    if found == "alpaca":
        return _from_alpaca(record)
    if found == "sharegpt":
        return _from_sharegpt(record)
    return record


def _from_alpaca(record: dict) -> dict:
    fields = {key: record.get(key) or "" for key in ("system", "instruction", "input", "output")}
    bad = [key for key, value in fields.items() if not isinstance(value, str)]
    if bad:
        raise ValueError(f"alpaca field(s) {', '.join(bad)} must be strings")
    prompt = "\n\n".join(part for part in (fields["instruction"], fields["input"]) if part)
    messages = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
    messages += [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": fields["output"]},
    ]
    return _with_media({"messages": messages}, record)


def _from_sharegpt(record: dict) -> dict:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise ValueError("'conversations' must be a list of {from, value} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            roles = ", ".join(SHAREGPT_ROLES)
            raise ValueError(f"conversations[{i}].from must be one of {roles}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("'conversations' has no gpt turn (nothing to train on)")
    return _with_media({"messages": messages}, record)


def _with_media(converted: dict, record: dict) -> dict:
    if "media" in record:
        converted["media"] = record["media"]
    return converted
