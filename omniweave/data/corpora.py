"""Small public-domain-ish corpora turned into JSONL records (for demos and tests)."""

import json
import os
import re

# Old fortunes underline with overstrikes: "___\b\b\bnot" prints an underlined "not".
_OVERSTRIKE = re.compile("[^\x08]\x08")


def fortunes_to_jsonl(paths: list[str], out_path: str) -> int:
    """Write the quotes of fortune files (or folders of them) as ``{"text"}`` JSONL.

    Returns the number of records written.
    """
    quotes = read_fortunes(paths)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    tmp_path = f"{out_path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as out:
        for quote in quotes:
            out.write(json.dumps({"text": quote}, ensure_ascii=False) + "\n")
    os.replace(tmp_path, out_path)  # a half-written file never looks finished
    return len(quotes)


def read_fortunes(paths: list[str]) -> list[str]:
    """The quotes of fortune files or folders of them. Quotes are separated by lines holding
    only ``%``; ``.dat``/``.u8`` index files and symlinks in folders are skipped."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if name.endswith((".dat", ".u8")) or os.path.islink(full):
                    continue
                if os.path.isfile(full):
                    files.append(full)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"{path}: no such fortune file or folder")
    if not files:
        raise ValueError(f"no fortune files found in {', '.join(paths)}")
    return [quote for path in files for quote in _read_fortunes(path)]


def _read_fortunes(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    quotes, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            quotes.append("\n".join(current))
            current = []
        else:
            current.append(line)
    quotes.append("\n".join(current))
    cleaned = (_strip_overstrikes(q).strip() for q in quotes)
    return [q for q in cleaned if q]


def _strip_overstrikes(text: str) -> str:
    """Drop each character that a backspace erases, innermost pair first."""
    while "\x08" in text:
        erased = _OVERSTRIKE.sub("", text)
        if erased == text:
            return text.replace("\x08", "")
        text = erased
    return text
