"""The audit log's files as bytes on disk: the last and first complete records, the complete size
after a torn tail, removal and directory syncs. ``log.py`` writes the log; this reads what it left."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of a file.

    Only newline-terminated lines count: a final line without its newline was torn by a crash
    and never acknowledged, even if it happens to parse. Lines that do not parse (someone else's
    bytes) are skipped here and reported by `audit verify`.
    """
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return None
    with fh:
        pos = fh.seek(0, os.SEEK_END)
        carry = b""
        while pos > 0:
            start = max(0, pos - 65536)
            fh.seek(start)
            lines = (fh.read(pos - start) + carry).split(b"\n")
            pos = start
            # lines[-1] follows the last newline; lines[0] may continue further back.
            for raw in reversed(lines[1:-1] if start > 0 else lines[:-1]):
                if raw.strip():
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and isinstance(record.get("seq"), int):
                        return record
            carry = lines[0] + b"\n" if start > 0 else b""
    return None


@dataclass(frozen=True)
class Rotated:
    path: Path
    first_seq: int
    last_seq: int
    last_hash: str

    def describe(self) -> dict[str, Any]:
        return {"file": self.path.name, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "last_hash": self.last_hash}


def first_record(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as fh:
        line = fh.readline()
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("seq"), int) else None


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def complete_size(path: Path) -> int:
    """Bytes up to and including the last newline."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            while size > 0:
                start = max(0, size - 65536)
                fh.seek(start)
                chunk = fh.read(size - start)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    return start + cut + 1
                size = start
    except FileNotFoundError:
        pass
    return 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
