"""The storage engine's rules, one test per rule, and the seam between the engine and its dialects.

The conformance suite (``secretsd.storage.testing``) runs the same rules end to end on both
backends; these tests pin each rule as a function, where it now lives once.
"""

from __future__ import annotations

import inspect
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from secretsd.errors import AlreadyInitializedError, ConflictError, StorageError
from secretsd.storage import codec, engine
from secretsd.storage.base import RotationStatus, SecretRecord, VersionRecord, VersionState
from secretsd.storage.migrations import load_migrations, pending_migrations
from secretsd.storage.postgres_sql import PostgresRowOps as PostgresOps
from secretsd.storage.rows import require_empty
from secretsd.storage.sqlite import SQLiteStorage
from secretsd.storage.sqlite import _Ops as SQLiteOps

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def secret(current: int, latest: int, pending: int | None = None) -> SecretRecord:
    return SecretRecord(path="p", current_version=current, created_at=T0, updated_at=T0, latest_version=latest,
                        pending_version=pending)


# -- the seam -------------------------------------------------------------------------------------------
def test_every_dialect_implements_every_row_operation() -> None:
    assert engine.missing_ops(SQLiteOps) == []
    assert engine.missing_ops(PostgresOps) == []
    assert engine.ops_are_coroutines(PostgresOps)
    # SQLite's run on the writer thread, inside BEGIN IMMEDIATE: plain functions, never coroutines.
    assert not any(inspect.iscoroutinefunction(getattr(SQLiteOps, name)) for name in engine.OP_NAMES)


def test_a_plan_is_closed_when_its_dialect_fails() -> None:
    closed: list[bool] = []

    def plan() -> engine.Plan[None]:
        try:
            yield engine.Op("lock_secret", ("p",))
        finally:
            closed.append(True)

    class Broken:
        def lock_secret(self, path: str) -> None:
            raise OSError("gone")

    with pytest.raises(OSError, match="gone"):
        engine.run_sync(plan(), Broken())
    assert closed == [True]


# -- check-and-set and version allocation ------------------------------------------------------------------
def test_check_and_set_requires_the_expected_current_version() -> None:
    engine.check_and_set("p", None, 0, 1)
    engine.check_and_set("p", secret(3, 3), 3, 4)
    with pytest.raises(ConflictError, match="current version of p is 3, expected 2"):
        engine.check_and_set("p", secret(3, 3), 2, 4)
    with pytest.raises(ConflictError):
        engine.check_and_set("p", None, 1, 2)  # expected a secret that does not exist


def test_a_new_version_takes_the_next_number_and_numbers_are_never_reused() -> None:
    with pytest.raises(ConflictError):
        engine.check_and_set("p", secret(3, 3), 3, 3)
    with pytest.raises(ConflictError):
        engine.check_and_set("p", secret(3, 3), 3, 5)
    # A discarded pending version 4 left latest_version at 4: the next write is 5, not 4.
    with pytest.raises(ConflictError):
        engine.check_and_set("p", secret(3, 4), 3, 4)
    engine.check_and_set("p", secret(3, 4), 3, 5)


# -- pruning ----------------------------------------------------------------------------------------------
def test_pruning_never_drops_a_labelled_version_or_one_in_grace() -> None:
    candidates = [(1, None), (2, T0 + timedelta(days=1)), (3, T0), (4, None), (5, None)]
    assert engine.versions_to_prune(candidates, {4, None}, T0) == [1, 3, 5]  # grace ending now is over
    assert engine.versions_to_prune(candidates, {4, 5}, T0 + timedelta(days=2)) == [1, 2, 3]


# -- version states -----------------------------------------------------------------------------------
def test_a_version_is_deleted_only_when_active_and_restored_only_when_deleted() -> None:
    now = T0 + timedelta(hours=1)
    assert engine.state_change("active", VersionState.DELETED, None, now) == {"state": "deleted", "deleted_at": now}
    assert engine.state_change("deleted", VersionState.DELETED, T0, now) is None
    assert engine.state_change("destroyed", VersionState.DELETED, T0, now) is None
    assert engine.state_change("deleted", VersionState.ACTIVE, T0, now) == {"state": "active", "deleted_at": None}
    assert engine.state_change("active", VersionState.ACTIVE, None, now) is None
    assert engine.state_change("destroyed", VersionState.ACTIVE, T0, now) is None


def test_destroying_wipes_the_ciphertext_and_keeps_the_first_deletion_time() -> None:
    now = T0 + timedelta(hours=1)
    wiped = {"state": "destroyed", "nonce": b"", "ciphertext": b""}
    assert engine.state_change("active", VersionState.DESTROYED, None, now) == wiped | {"deleted_at": now}
    assert engine.state_change("deleted", VersionState.DESTROYED, T0, now) == wiped | {"deleted_at": T0}
    assert engine.state_change("destroyed", VersionState.DESTROYED, T0, now) is None


# -- labels ------------------------------------------------------------------------------------------------
def test_each_label_names_one_column_and_nothing_else_is_a_label() -> None:
    assert {label: engine.label_column(label) for label in ("current", "previous", "pending")} == {
        "current": "current_version", "previous": "previous_version", "pending": "pending_version"}
    for bad in ("latest", "current_version", "", "s.path"):
        with pytest.raises(ValueError, match="unknown label"):
            engine.label_column(bad)


# -- row codecs --------------------------------------------------------------------------------------------
def test_one_row_codec_reads_both_dialects_time_forms() -> None:
    iso = T0.isoformat()
    row = ["p", 2, iso, iso, '{"a":1}', 3, 1, None, None, None, '{"failures":2}']
    from_text = engine.secret_from_row(row, lambda v: None if v is None else datetime.fromisoformat(v))
    native = engine.secret_from_row([T0 if v == iso else v for v in row], lambda v: v)
    assert from_text == native
    assert native.metadata == {"a": 1} and native.rotation is None and native.rotation_status.failure_count == 2


# -- RotationStatus ------------------------------------------------------------------------------------------
def test_rotation_status_is_stored_as_the_same_json_object_as_the_old_dict() -> None:
    old = {"last_result": "succeeded", "last_reason": "", "last_attempt_at": "2026-01-01T00:00:00+00:00",
           "last_success_at": "2026-01-01T00:00:00+00:00", "failures": 0, "last_version": 4, "trigger": "api"}
    status = RotationStatus.of(old)
    assert status == old and dict(status) == old and status.last_version == 4
    assert json.loads(codec.metadata_to_json(status)) == old
    assert RotationStatus() == {} and not RotationStatus() and RotationStatus.of(None) == {}


def test_rotation_status_carries_unknown_keys_and_odd_types_through() -> None:
    stored = {"failures": True, "retry_hint": {"s": 5}, "last_result": None}
    status = RotationStatus.of(stored)
    assert status.failures is None and status.failure_count == 0 and status.last_result is None
    assert dict(status) == stored
    bumped = status.replace(failures=1, last_result="failed")
    assert dict(bumped) == {"failures": 1, "retry_hint": {"s": 5}, "last_result": "failed"}
    with pytest.raises(TypeError):
        status.replace(retry_hint=1)


# -- migrations ---------------------------------------------------------------------------------------------
def test_a_schema_newer_than_the_code_is_refused() -> None:
    known = load_migrations("sqlite")
    assert [m.number for m in pending_migrations(known, [], "store")] == list(range(1, len(known) + 1))
    assert pending_migrations(known, range(1, len(known) + 1), "store") == []
    assert [m.number for m in pending_migrations(known, [1], "store")] == list(range(2, len(known) + 1))
    with pytest.raises(StorageError, match="the store was written by a newer secretsd"):
        pending_migrations(known, [1, len(known) + 1], "store")


def test_an_import_loads_only_into_an_empty_store() -> None:
    require_empty("meta", False, "x")
    with pytest.raises(AlreadyInitializedError, match="table tokens has rows"):
        require_empty("tokens", True, "x")


# -- encryption counting ---------------------------------------------------------------------------------
def test_sealing_under_an_unknown_term_is_a_conflict() -> None:
    # SQLite's foreign key refuses such a version too; the rule must not rest on a schema detail.
    class Counts:
        def count_encryption(self, term: int, n: int) -> int | None:
            return {1: 6 + n}.get(term)

    assert engine.run_sync(engine.count_encryption_plan(1), Counts()) == 7
    assert engine.run_sync(engine.count_encryption_plan(1, 3), Counts()) == 9
    with pytest.raises(ConflictError, match="keyring term 9 does not exist"):
        engine.run_sync(engine.count_encryption_plan(9), Counts())


# -- a store written before the engine ---------------------------------------------------------------------
async def test_a_store_written_by_the_previous_release_reads_and_writes_on(tmp_path: Path) -> None:
    """tests/data/sqlite_store_v1.db was written by the code before the engine (make_sqlite_store_v1.py)."""
    path = tmp_path / "store.db"
    shutil.copyfile(Path(__file__).parent / "data" / "sqlite_store_v1.db", path)
    path.chmod(0o600)
    s = SQLiteStorage(path)
    await s.open()
    try:
        assert await s.is_initialized()
        db = await s.get_secret("app/db")
        assert db is not None and isinstance(db.rotation_status, RotationStatus)
        assert dict(db.rotation_status) == {
            "last_result": "failed", "last_reason": "hook timed out", "last_attempt_at": "2026-01-03T00:00:00+00:00",
            "failures": 2, "trigger": "schedule"}
        assert db.rotation_status.failure_count == 2 and db.rotation is not None and db.rotation["enabled"] is True
        assert (db.current_version, db.previous_version, db.pending_version, db.latest_version) == (3, 2, 4, 4)
        assert db.metadata == {"owner": "team-a"} and db.rotation_due == T0 + timedelta(days=2)
        labels = {label: await s.read_version("app/db", label=label) for label in ("current", "previous", "pending")}
        assert {k: (v[1].version, v[1].ciphertext) for k, v in labels.items() if v} == {
            "current": (3, b"three"), "previous": (2, b"two"), "pending": (4, b"four")}
        two = await s.get_version("app/db", 2)
        assert two is not None and two.grace_until == T0 + timedelta(days=7)
        old = await s.list_versions("app/old")
        assert [(v.version, v.state, v.deleted_at) for v in old] == [
            (1, VersionState.DELETED, T0 + timedelta(days=3)), (2, VersionState.DESTROYED, T0 + timedelta(days=4))]
        token = await s.get_token("00000000000000bb")
        assert token is not None and token.revoked_at == T0 + timedelta(days=5) and token.policies == ("read",)
        # The engine carries on where the old code stopped: finish the pending rotation, then write.
        status = db.rotation_status.replace(last_result="succeeded", failures=0, last_version=4)
        done = await s.finish_pending("app/db", 4, expected_current=3, now=T0 + timedelta(days=3), grace_until=None,
                                      max_versions=2, rotation_due=None, rotation_status=status)
        assert done == await s.get_secret("app/db") and done.rotation_status == status
        assert [v.version for v in await s.list_versions("app/db")] == [2, 3, 4]  # 2 is in grace for 4 more days
        wrote = await s.write_version(
            VersionRecord(path="app/db", version=5, created_at=T0 + timedelta(days=4), created_by="svc",
                          state=VersionState.ACTIVE, term=1, nonce=b"5" * 12, ciphertext=b"five"),
            expected_current=4, metadata=None, max_versions=2)
        assert wrote.term_encryptions == 7  # six sealed by the old code, one now
        assert [v.version for v in await s.list_versions("app/db")] == [2, 4, 5]
    finally:
        await s.close()
