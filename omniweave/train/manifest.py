"""What a complete checkpoint holds, and whether a folder still holds it.

``manifest.json`` lists every file of a checkpoint folder with its size and CRC-32. It is
written last, atomically, once all ranks have finished writing, so a folder without one was
never completed; ``verify`` compares a folder with its manifest.
"""

from __future__ import annotations

import json
import os
import zlib

MANIFEST = "manifest.json"
CHUNK = 4 << 20


def file_record(path: str) -> dict:
    """Size and CRC-32 (hex) of one file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def files_to_record(folder: str) -> list[str]:
    """The files of ``folder`` a manifest covers (all but the manifest), sorted."""
    return sorted(n for n in os.listdir(folder) if n not in (MANIFEST, MANIFEST + ".tmp"))


def write_manifest(folder: str, records: dict[str, dict]) -> None:
    """Write ``folder/manifest.json`` atomically (a temporary file renamed, both synced)."""
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump({"files": dict(sorted(records.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def record_folder(folder: str) -> None:
    """Checksum every file of ``folder`` here and write its manifest (one process)."""
    names = files_to_record(folder)
    write_manifest(folder, {n: file_record(os.path.join(folder, n)) for n in names})


def verify(folder: str, checksums: bool = True) -> str | None:
    """None when ``folder`` holds every file of its manifest, at its size (and CRC-32 with
    ``checksums``); otherwise what is wrong, in a few words naming the file."""
    if not os.path.isdir(folder):
        return "the folder is missing"
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: its save never finished"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, {expected['size']:,} were written"
        if checksums and file_record(path)["crc32"] != expected["crc32"]:
            return f"{name} does not match its checksum"
    return None
