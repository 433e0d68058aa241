"""Verify audit log files: signatures, sequence, hash chain, and the stored head."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secretsd.audit.record import GENESIS_HASH, parse_line, record_hash, signature_valid
from secretsd.custody.crypto import VerifyKey

_ROTATED = re.compile(r"\.(\d{6,})$")


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    problem: str | None = None
    file: str | None = None
    line: int | None = None
    seq: int | None = None
    #: Records 1 to this were removed by retention, as an ``audit.pruned`` record in the chain says.
    pruned_through: int | None = None

    def describe(self) -> str:
        if self.ok:
            pruned = (f"; records 1 to {self.pruned_through} were pruned by retention (audit.pruned)"
                      if self.pruned_through else "")
            return f"OK: {self.records} record(s) verified{pruned}"
        where = f"{self.file}:{self.line}" if self.file and self.line else (self.file or "log")
        seq = f" (record {self.seq})" if self.seq is not None else ""
        return f"FAILED at {where}{seq}: {self.problem}"


def log_files(active: Path) -> list[Path]:
    """The rotated files of a log, oldest first, then the active file."""
    rotated = sorted(
        (p for p in active.parent.glob(active.name + ".*") if _ROTATED.search(p.name)),
        key=lambda p: int(_ROTATED.search(p.name).group(1)),  # type: ignore[union-attr]
    )
    return [*rotated, *([active] if active.exists() else [])]


@dataclass
class _Walk:
    """What the check knows after the records read so far, and where it stands."""

    expected_seq: int | None = None  # None until the first record
    prev_hash: str | None = None
    count: int = 0
    unsigned_from: int | None = None  # the first record since the last signature
    # A whole log that starts after record 1: acceptable only if a later record of the chain says
    # retention removed exactly the records before it (see pruned_by_retention).
    unanchored: tuple[VerifyResult, int, str] | None = None  # (the failure to report, seq, prev_hash)
    pruned_through: int | None = None
    file: str | None = None
    line: int | None = None

    @property
    def last_seq(self) -> int:
        return (self.expected_seq or 1) - 1

    def bad(self, problem: str, seq: int | None = None) -> VerifyResult:
        """The failure of the record being read: named by file, line and (when known) sequence."""
        return VerifyResult(False, self.count, problem, self.file, self.line, seq)


def verify(
    files: Sequence[Path], key: VerifyKey, *, head: Head | None = None, from_start: bool = False
) -> VerifyResult:
    """Check every record in order. The first bad record ends the check, named with why.

    ``from_start``: the files are the whole log, so it must begin with record 1. ``head``: the
    (sequence, hash) the store recorded last, so a cut-off tail is detected too.
    """
    walk = _Walk()
    for path, line_no, raw in _lines(files):
        walk.file, walk.line = str(path), line_no
        failed = _check_record(walk, raw, key, from_start)
        if failed is not None:
            return failed
    return (_check_anchored(walk) or _check_unsigned_tail(walk, files) or _check_stored_head(walk, files, head)
            or _verified(walk, head))


def _lines(files: Sequence[Path]) -> Iterator[tuple[Path, int, bytes]]:
    """Every line of the files, in order, with its file and line number (from 1)."""
    for path in files:
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                yield path, line_no, raw


def _check_record(walk: _Walk, raw: bytes, key: VerifyKey, from_start: bool) -> VerifyResult | None:
    """One line: a canonical record, signed validly if signed, in its place in the chain."""
    parsed = _parse_record(walk, raw)
    if isinstance(parsed, VerifyResult):
        return parsed
    record, seq = parsed
    signed = "sig" in record
    if signed and not signature_valid(key, record):
        return walk.bad("signature does not verify: the record was edited, or signed by another key", seq)
    if walk.expected_seq is None:
        failed = _check_start(walk, record, seq, from_start)
    else:
        failed = _check_sequence(walk, walk.expected_seq, seq) or _check_link(walk, record, seq)
    if failed is not None:
        return failed
    _accept(walk, record, seq, signed)
    return None


def _parse_record(walk: _Walk, raw: bytes) -> tuple[dict[str, Any], int] | VerifyResult:
    """The record of a complete line that is exactly its canonical bytes, and its sequence."""
    if not raw.endswith(b"\n"):
        return walk.bad("truncated: the last record is incomplete")
    try:
        record, not_canonical = parse_line(raw)
    except ValueError:
        return walk.bad("not a JSON record (edited or corrupted)")
    if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
        return walk.bad("not an audit record (edited or corrupted)")
    seq: int = record["seq"]
    if not_canonical:  # before the signature: a duplicate key can hide behind a valid one
        return walk.bad(not_canonical, seq)
    return record, seq


def _check_start(walk: _Walk, record: dict[str, Any], seq: int, from_start: bool) -> VerifyResult | None:
    """The first record: a log that starts the chain, or is the whole log, begins at record 1. A
    whole log starting later is held as unanchored until a retention record accounts for it."""
    starts = record.get("prev_hash") == GENESIS_HASH
    if (starts or from_start) and (seq != 1 or not starts):
        removed = walk.bad(f"the log starts at record {seq}, not 1: records were removed (no "
                           "audit.pruned record accounts for them)", seq)
        if starts or not isinstance(record.get("prev_hash"), str):
            return removed
        walk.unanchored = (removed, seq, record["prev_hash"])
    return None


def _check_sequence(walk: _Walk, expected: int, seq: int) -> VerifyResult | None:
    """Each record after the first is the one after the last: none reordered, duplicated or missing."""
    if seq < expected:
        return walk.bad(f"record {seq} appears after record {expected - 1}: records were "
                        "reordered or duplicated", seq)
    if seq > expected:
        return walk.bad(f"records {expected} to {seq - 1} are missing: removed", seq)
    return None


def _check_link(walk: _Walk, record: dict[str, Any], seq: int) -> VerifyResult | None:
    """Each record's prev_hash is the hash of the record before it."""
    if record.get("prev_hash") != walk.prev_hash:
        # Record `seq` is authentic if signed, so the one before it changed.
        return walk.bad(f"record {seq - 1} was edited or replaced: record {seq} does not chain to it", seq - 1)
    return None


def _accept(walk: _Walk, record: dict[str, Any], seq: int, signed: bool) -> None:
    """Advance past a good record: the chain, the retention anchor, the unsigned run."""
    walk.expected_seq = seq + 1
    walk.prev_hash = record_hash(record)
    walk.count += 1
    if walk.unanchored is not None and pruned_by_retention(record, walk.unanchored[1], walk.unanchored[2]):
        walk.pruned_through = walk.unanchored[1] - 1
        walk.unanchored = None
    if signed:
        walk.unsigned_from = None
    elif walk.unsigned_from is None:
        walk.unsigned_from = seq


def _check_anchored(walk: _Walk) -> VerifyResult | None:
    """A whole log that starts after record 1 fails unless a retention record accounted for it."""
    return walk.unanchored[0] if walk.unanchored is not None else None


def _check_unsigned_tail(walk: _Walk, files: Sequence[Path]) -> VerifyResult | None:
    """The log ends on a signed record: a signature vouches for the unsigned records before it."""
    if walk.unsigned_from is None:
        return None
    return VerifyResult(False, walk.count, f"records {walk.unsigned_from} to {walk.last_seq} carry no signature: "
                        "the log was cut inside a batch, or they were forged", str(files[-1]), None,
                        walk.unsigned_from)


def _check_stored_head(walk: _Walk, files: Sequence[Path], head: Head | None) -> VerifyResult | None:
    """The log reaches the store's head, and its record there is the one the store recorded."""
    if head is None:
        return None
    last = walk.last_seq
    where = str(files[-1]) if files else None
    if last < head.seq:
        return VerifyResult(False, walk.count, f"truncated: the log ends at record {last} but the store's "
                            f"head is record {head.seq}", where, None, last)
    # Head 0 is a store that has recorded nothing yet: an empty log is then the whole truth.
    if last == head.seq and head.seq > 0 and walk.prev_hash != head.hash:
        return VerifyResult(False, walk.count, "the last record does not match the store's head "
                            "(replaced tail)", where, None, last)
    return None


def _verified(walk: _Walk, head: Head | None) -> VerifyResult:
    """Every check passed; an empty log reports no retention."""
    if walk.count == 0 and (head is None or head.seq == 0):
        return VerifyResult(True, 0)
    return VerifyResult(True, walk.count, pruned_through=walk.pruned_through)


def pruned_by_retention(record: dict[str, object], first_seq: int, first_prev_hash: str) -> bool:
    """The rule "a log may start after record 1 only where retention says it pruned": ``record``
    (a verified record of the same chain, later than the first one present) is an ``audit.pruned``
    record naming a removed file whose last record is the one just before the first present, by
    sequence and by hash. Someone who deletes files by hand has no such record to show, and
    cannot forge one without the signing key."""
    return (record.get("action") == "audit.pruned" and record.get("client") == "system"
            and record.get("last_seq") == first_seq - 1 and record.get("last_hash") == first_prev_hash)
