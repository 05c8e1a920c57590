"""The sample schema: a record is ``{"text": str}`` or ``{"messages": [...]}``; either may
carry ``"media": {modality: [paths]}``, the items at the ``<modality>`` markers of its
text or message contents, in order.

Records are read from their files by ``omniweave.data.sources``; this module says what a
valid one is.
"""

import json
from typing import Any

ROLES = ("system", "user", "assistant")


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
    return (
        "needs a 'text' string or a 'messages' list (or alpaca's 'instruction'/'output', "
        "ShareGPT's 'conversations')"
    )


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


def parse_line(raw: bytes) -> tuple[Any, str | None]:
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
