"""The sample schema: a record is ``{"text": str}`` or ``{"messages": [...]}``; either may
carry ``"media": {modality: [paths]}``, the items at the ``<modality>`` markers of its
text or message contents, in order.

``read_records`` loads a whole ``.jsonl`` or ``.parquet`` file and validates every
record, so that a bad sample fails up front with its file and line.
"""

import json
import os
from typing import Any

ROLES = ("system", "user", "assistant")


def read_records(path: str) -> list[dict]:
    """Read and validate the records of a ``.jsonl`` or ``.parquet`` file."""
    return [record for _, record in located_records(path)[0]]


def located_records(path: str, skip_bad: bool = False) -> tuple[list[tuple[str, dict]], list[str]]:
    """``("line N" | "row N", record)`` for each valid record, and, under ``skip_bad``, the
    reasons of the records left out (otherwise the first bad one is a ValueError)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        rows = _read_jsonl(path)
        where = "line"
    elif ext == ".parquet":
        rows = [(number, row, None) for number, row in enumerate(_read_parquet(path), start=1)]
        where = "row"
    else:
        raise ValueError(f"{path}: unknown extension {ext!r} (expected .jsonl or .parquet)")
    records, skipped = [], []
    for number, record, problem in rows:
        reason = problem or validate_record(record)
        if reason and not skip_bad:
            raise ValueError(f"{path}, {where} {number}: {reason}")
        if reason:
            skipped.append(f"{path}, {where} {number}: {reason}")
        else:
            records.append((f"{where} {number}", record))
    if not records:
        first = f" ({len(skipped)} bad, the first: {skipped[0]})" if skipped else ""
        raise ValueError(f"{path}: no records{first}")
    return records, skipped


def validate_record(record: Any) -> str | None:
    """Return why ``record`` is not a valid sample, or None if it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    text, messages = record.get("text"), record.get("messages")
    if text is not None and messages is not None:
        return "has both 'text' and 'messages'; set exactly one"
    media = record.get("media")
    if media is not None and (
        (text is None and messages is None)
        or not isinstance(media, dict)
        or not all(
            isinstance(paths, list) and all(isinstance(p, str) for p in paths)
            for paths in media.values()
        )
    ):
        return (
            "'media' must map modality names to lists of file paths, next to 'text' or 'messages'"
        )
    if text is not None:
        if not isinstance(text, str):
            return f"'text' must be a string, got {type(text).__name__}"
        if not isinstance(record.get("prompt", ""), str):
            return f"'prompt' must be a string, got {type(record['prompt']).__name__}"
        return None if text.strip() else "'text' is empty"
    if messages is not None:
        if "prompt" in record:
            return "'prompt' goes with 'text'; in 'messages', the user turns are the prompt"
        return _validate_messages(messages)
    return "needs a 'text' string or a 'messages' list"


def record_texts(record: dict) -> list[str]:
    """The raw strings of a valid record: its prompt and text, or each message's content."""
    if record.get("text") is not None:
        return [record.get("prompt", "") + record["text"]]
    return [message["content"] for message in record["messages"]]


def _validate_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object with 'role' and 'content'"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string, got {type(content).__name__}"
    if not any(m["role"] == "assistant" for m in messages):
        return "'messages' has no assistant message (nothing to train on)"
    return None


def _read_jsonl(path: str) -> list[tuple[int, Any, str | None]]:
    """(line number, parsed object, why it could not be parsed) per line that is not blank:
    a blank line holds JSON whitespace only, so one of any other character is malformed."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip(b" \t\r\n"):
                rows.append((number, *_parse_line(raw)))
    return rows


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    """The object of one JSONL line, or None and why it is not one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    try:
        record = json.loads(line)
        if "\\u" in line:  # an escape may be a lone surrogate, which no text can hold
            json.dumps(record, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    except UnicodeEncodeError:
        return None, "a \\u escape is a lone surrogate, not a character"
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, deep nesting
        return None, f"invalid JSON ({e})"
    return record, None


def _read_parquet(path: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read parquet ({e})") from None
