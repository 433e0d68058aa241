"""Verify audit log files: signatures, sequence, hash chain, and the stored head."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def verify(
    files: Sequence[Path], key: VerifyKey, *, head: Head | None = None, from_start: bool = False
) -> VerifyResult:
    """Check every record in order. The first bad record ends the check, named with why.

    ``from_start``: the files are the whole log, so it must begin with record 1. ``head``: the
    (sequence, hash) the store recorded last, so a cut-off tail is detected too.
    """
    expected_seq: int | None = None
    prev_hash: str | None = None
    count = 0
    unsigned_from: int | None = None  # the first record since the last signature
    # A whole log that starts after record 1: acceptable only if a later record of the chain says
    # retention removed exactly the records before it (see pruned_by_retention).
    unanchored: tuple[VerifyResult, int, str] | None = None  # (the failure to report, seq, prev_hash)
    pruned_through: int | None = None
    for path in files:
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                def bad(problem: str, seq: int | None = None) -> VerifyResult:
                    return VerifyResult(False, count, problem, str(path), line_no, seq)  # noqa: B023

                if not raw.endswith(b"\n"):
                    return bad("truncated: the last record is incomplete")
                try:
                    record, not_canonical = parse_line(raw)
                except ValueError:
                    return bad("not a JSON record (edited or corrupted)")
                if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
                    return bad("not an audit record (edited or corrupted)")
                seq = record["seq"]
                if not_canonical:  # before the signature: a duplicate key can hide behind a valid one
                    return bad(not_canonical, seq)
                signed = "sig" in record
                if signed and not signature_valid(key, record):
                    return bad("signature does not verify: the record was edited, or signed by another key", seq)
                if expected_seq is None:
                    starts = record.get("prev_hash") == GENESIS_HASH
                    if (starts or from_start) and (seq != 1 or not starts):
                        removed = bad(f"the log starts at record {seq}, not 1: records were removed (no "
                                      "audit.pruned record accounts for them)", seq)
                        if starts or not isinstance(record.get("prev_hash"), str):
                            return removed
                        unanchored = (removed, seq, record["prev_hash"])
                elif seq < expected_seq:
                    return bad(f"record {seq} appears after record {expected_seq - 1}: records were "
                               "reordered or duplicated", seq)
                elif seq > expected_seq:
                    return bad(f"records {expected_seq} to {seq - 1} are missing: removed", seq)
                elif record.get("prev_hash") != prev_hash:
                    # Record `seq` is authentic if signed, so the one before it changed.
                    return bad(f"record {seq - 1} was edited or replaced: record {seq} does not chain to it",
                               seq - 1)
                expected_seq = seq + 1
                prev_hash = record_hash(record)
                count += 1
                if unanchored is not None and pruned_by_retention(record, unanchored[1], unanchored[2]):
                    pruned_through = unanchored[1] - 1
                    unanchored = None
                if signed:
                    unsigned_from = None
                elif unsigned_from is None:
                    unsigned_from = seq
    if unanchored is not None:
        return unanchored[0]
    if unsigned_from is not None:
        last_seq = (expected_seq or 1) - 1
        return VerifyResult(False, count, f"records {unsigned_from} to {last_seq} carry no signature: the log "
                            "was cut inside a batch, or they were forged", str(files[-1]), None, unsigned_from)
    if head is not None:
        last = (expected_seq or 1) - 1
        if last < head.seq:
            return VerifyResult(False, count, f"truncated: the log ends at record {last} but the store's "
                                f"head is record {head.seq}", str(files[-1]) if files else None, None, last)
        # Head 0 is a store that has recorded nothing yet: an empty log is then the whole truth.
        if last == head.seq and head.seq > 0 and prev_hash != head.hash:
            return VerifyResult(False, count, "the last record does not match the store's head "
                                "(replaced tail)", str(files[-1]) if files else None, None, last)
    if count == 0 and (head is None or head.seq == 0):
        return VerifyResult(True, 0)
    return VerifyResult(True, count, pruned_through=pruned_through)


def pruned_by_retention(record: dict[str, object], first_seq: int, first_prev_hash: str) -> bool:
    """The rule "a log may start after record 1 only where retention says it pruned": ``record``
    (a verified record of the same chain, later than the first one present) is an ``audit.pruned``
    record naming a removed file whose last record is the one just before the first present, by
    sequence and by hash. Someone who deletes files by hand has no such record to show, and
    cannot forge one without the signing key."""
    return (record.get("action") == "audit.pruned" and record.get("client") == "system"
            and record.get("last_seq") == first_seq - 1 and record.get("last_hash") == first_prev_hash)
