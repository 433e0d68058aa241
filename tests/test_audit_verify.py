"""`verify` outcome by outcome: every check it makes, with the exact result (message, file, line,
record, count) pinned, on logs built here so each case is one small edit of a good chain.

The daemon-level tests (test_audit.py, test_audit_retention.py) show the checks catch real
tampering; these pin each result field so splitting `verify` into its checks cannot change one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from secretsd.audit.record import GENESIS_HASH, Signer, canonical, load_public_pem, record_hash
from secretsd.audit.verify import Head, VerifyResult, verify
from secretsd.custody.crypto import VerifyKey

SIGNER = Signer.generate()
KEY: VerifyKey = load_public_pem(SIGNER.public_pem())


def chain(first: int, count: int, *, prev: str = GENESIS_HASH, unsigned: tuple[int, ...] = (),
          extra: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Records ``first`` .. ``first + count - 1``, chained from ``prev``, signed unless listed."""
    out = []
    for seq in range(first, first + count):
        record: dict[str, Any] = {"action": "secret.read", "client": "admin", "seq": seq, "prev_hash": prev}
        record |= (extra or {}).get(seq, {})
        if seq not in unsigned:
            record = SIGNER.sign(record)
        out.append(record)
        prev = record_hash(record)
    return out


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(canonical(r) + b"\n" for r in records))
    return path


def test_a_good_chain_over_two_files_verifies(tmp_path: Path) -> None:
    recs = chain(1, 5)
    files = [write(tmp_path / "a.000001", recs[:2]), write(tmp_path / "a", recs[2:])]
    assert verify(files, KEY, head=Head(5, record_hash(recs[-1])), from_start=True) == VerifyResult(True, 5)


def test_an_empty_log_with_head_zero_verifies_and_without_a_head_too(tmp_path: Path) -> None:
    empty = write(tmp_path / "a", [])
    assert verify([empty], KEY, head=Head(0, GENESIS_HASH)) == VerifyResult(True, 0)
    assert verify([], KEY) == VerifyResult(True, 0)


def test_a_line_without_its_newline_is_a_truncated_record(tmp_path: Path) -> None:
    path = write(tmp_path / "a", chain(1, 3))
    path.write_bytes(path.read_bytes()[:-1])
    assert verify([path], KEY) == VerifyResult(False, 2, "truncated: the last record is incomplete", str(path), 3)


@pytest.mark.parametrize(("line", "problem"), [
    (b"{not json\n", "not a JSON record (edited or corrupted)"),
    (b"[1,2]\n", "not an audit record (edited or corrupted)"),
    (b'{"seq":"2"}\n', "not an audit record (edited or corrupted)"),
])
def test_a_line_that_is_not_a_record_is_named(tmp_path: Path, line: bytes, problem: str) -> None:
    path = write(tmp_path / "a", chain(1, 1))
    path.write_bytes(path.read_bytes() + line)
    assert verify([path], KEY) == VerifyResult(False, 1, problem, str(path), 2)


def test_a_non_canonical_line_is_refused_before_its_signature(tmp_path: Path) -> None:
    recs = chain(1, 2)
    path = tmp_path / "a"
    path.write_bytes(canonical(recs[0]) + b"\n" + canonical(recs[1]).replace(b",", b", ", 1) + b"\n")
    result = verify([path], KEY)
    assert (result.ok, result.records, result.file, result.line, result.seq) == (False, 1, str(path), 2, 2)
    assert result.problem and "canonical" in result.problem


def test_an_edited_signed_record_fails_its_signature(tmp_path: Path) -> None:
    recs = chain(1, 3)
    recs[1] = recs[1] | {"client": "mallory"}
    path = write(tmp_path / "a", recs)
    assert verify([path], KEY) == VerifyResult(
        False, 1, "signature does not verify: the record was edited, or signed by another key", str(path), 2, 2)


def test_a_log_that_starts_after_record_1_is_named_removed(tmp_path: Path) -> None:
    recs = chain(1, 4)
    path = write(tmp_path / "a", recs[2:])
    removed = "the log starts at record 3, not 1: records were removed (no audit.pruned record accounts for them)"
    assert verify([path], KEY, from_start=True) == VerifyResult(False, 0, removed, str(path), 1, 3)
    # Without from_start a tail of the log is fine ...
    assert verify([path], KEY) == VerifyResult(True, 2)
    # ... unless its first record claims to start the chain.
    restarted = write(tmp_path / "b", chain(3, 2))
    removed = "the log starts at record 3, not 1: records were removed (no audit.pruned record accounts for them)"
    assert verify([restarted], KEY) == VerifyResult(False, 0, removed, str(restarted), 1, 3)


def test_a_first_record_whose_prev_hash_is_not_text_is_named_removed(tmp_path: Path) -> None:
    path = write(tmp_path / "a", chain(3, 1, extra={3: {"prev_hash": 7}}))
    removed = "the log starts at record 3, not 1: records were removed (no audit.pruned record accounts for them)"
    assert verify([path], KEY, from_start=True) == VerifyResult(False, 0, removed, str(path), 1, 3)


def test_a_retention_record_accounts_for_the_records_before_the_first(tmp_path: Path) -> None:
    old = chain(1, 4)
    pruned = {"action": "audit.pruned", "client": "system", "last_seq": 2, "last_hash": record_hash(old[1])}
    recs = chain(3, 4, prev=record_hash(old[1]), extra={5: pruned})
    path = write(tmp_path / "a", recs)
    assert verify([path], KEY, from_start=True) == VerifyResult(True, 4, pruned_through=2)
    # A record naming another cut does not.
    wrong = chain(3, 4, prev=record_hash(old[1]), extra={5: pruned | {"last_seq": 1}})
    path = write(tmp_path / "b", wrong)
    removed = "the log starts at record 3, not 1: records were removed (no audit.pruned record accounts for them)"
    assert verify([path], KEY, from_start=True) == VerifyResult(False, 0, removed, str(path), 1, 3)


def test_reordered_missing_and_replaced_records_are_named(tmp_path: Path) -> None:
    recs = chain(1, 4)
    swapped = write(tmp_path / "a", [recs[0], recs[2], recs[1], recs[3]])
    assert verify([swapped], KEY) == VerifyResult(
        False, 1, "records 2 to 2 are missing: removed", str(swapped), 2, 3)
    repeated = write(tmp_path / "b", [recs[0], recs[1], recs[1]])
    assert verify([repeated], KEY) == VerifyResult(
        False, 2, "record 2 appears after record 2: records were reordered or duplicated", str(repeated), 3, 2)
    other = SIGNER.sign({k: v for k, v in recs[1].items() if k != "sig"} | {"client": "x"})
    replaced = write(tmp_path / "c", [recs[0], other, recs[2]])
    result = verify([replaced], KEY)
    assert result == VerifyResult(False, 2, "record 2 was edited or replaced: record 3 does not chain to it",
                                  str(replaced), 3, 2)


def test_an_unsigned_tail_is_named_from_its_first_record(tmp_path: Path) -> None:
    recs = chain(1, 5, unsigned=(4, 5))
    files = [write(tmp_path / "a.000001", recs[:2]), write(tmp_path / "a", recs[2:])]
    assert verify(files, KEY) == VerifyResult(
        False, 5, "records 4 to 5 carry no signature: the log was cut inside a batch, or they were forged",
        str(files[1]), None, 4)
    # Unsigned records inside a batch are vouched for by the signed record that ends it.
    ok = write(tmp_path / "b", chain(1, 5, unsigned=(2, 3)))
    assert verify([ok], KEY) == VerifyResult(True, 5)


def test_the_stored_head_catches_a_cut_or_replaced_tail(tmp_path: Path) -> None:
    recs = chain(1, 4)
    path = write(tmp_path / "a", recs[:3])
    assert verify([path], KEY, head=Head(4, record_hash(recs[3]))) == VerifyResult(
        False, 3, "truncated: the log ends at record 3 but the store's head is record 4", str(path), None, 3)
    assert verify([], KEY, head=Head(4, "x")) == VerifyResult(
        False, 0, "truncated: the log ends at record 0 but the store's head is record 4", None, None, 0)
    assert verify([path], KEY, head=Head(3, "f" * 64)) == VerifyResult(
        False, 3, "the last record does not match the store's head (replaced tail)", str(path), None, 3)
    # A head behind the log is the window records newer than it live in: not a failure.
    assert verify([path], KEY, head=Head(2, "f" * 64)) == VerifyResult(True, 3)


def test_an_unanchored_start_is_reported_before_the_tail_and_head(tmp_path: Path) -> None:
    path = write(tmp_path / "a", chain(3, 2, prev="e" * 64, unsigned=(4,)))
    removed = "the log starts at record 3, not 1: records were removed (no audit.pruned record accounts for them)"
    assert verify([path], KEY, head=Head(9, "x"), from_start=True) == VerifyResult(False, 0, removed, str(path), 1, 3)


def test_a_whole_log_whose_record_1_does_not_start_the_chain_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "a", chain(1, 2, prev="e" * 64))
    removed = "the log starts at record 1, not 1: records were removed (no audit.pruned record accounts for them)"
    assert verify([path], KEY, from_start=True) == VerifyResult(False, 0, removed, str(path), 1, 1)
    assert verify([path], KEY) == VerifyResult(True, 2)
