"""SQLite group commit (secretsd/storage/sqlite_writer.py): writes that queue up share one
transaction and one sync, and each keeps the outcome it would have had alone."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from secretsd.errors import ConflictError, StorageError
from secretsd.storage.sqlite import SQLiteStorage
from secretsd.storage.testing import initialized, version


def _writes(s: SQLiteStorage) -> tuple[int, int]:
    assert s._writes is not None
    return s._writes.transactions, s._writes.writes


async def _hold_the_writer(s: SQLiteStorage) -> tuple[asyncio.Task[None], threading.Event]:
    """A write that blocks the writer thread until released: what queues behind it is one batch."""
    release, started = threading.Event(), threading.Event()

    def blocker(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    task = asyncio.create_task(s._write(blocker))
    await asyncio.to_thread(started.wait, 10)
    return task, release


async def test_concurrent_writes_share_transactions_and_all_are_durable(
        sqlite_store: SQLiteStorage, tmp_path: Path) -> None:
    before = _writes(sqlite_store)
    held, release = await _hold_the_writer(sqlite_store)
    writes = [asyncio.create_task(sqlite_store.write_version(version(f"app/k{i}", 1), expected_current=0, metadata=None,
                                                      max_versions=5)) for i in range(32)]
    await asyncio.sleep(0.05)  # every write is queued behind the held one
    release.set()
    await held
    await asyncio.gather(*writes)
    transactions, count = (a - b for a, b in zip(_writes(sqlite_store), before, strict=True))
    assert count == 33
    assert transactions == 2, "the 32 queued writes should have committed together"
    await sqlite_store.close()
    again = SQLiteStorage(tmp_path / "db.sqlite")
    await again.open()
    try:
        assert [s.path for s in await again.list_secrets("app")] == sorted(f"app/k{i}" for i in range(32))
    finally:
        await again.close()


async def test_a_failing_write_is_undone_alone_and_its_batch_commits(sqlite_store: SQLiteStorage) -> None:
    await sqlite_store.write_version(version("app/taken", 1), expected_current=0, metadata=None, max_versions=5)
    held, release = await _hold_the_writer(sqlite_store)

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('half', 'written')")
        raise ValueError("refused after a partial write")

    first = asyncio.create_task(sqlite_store.write_version(version("app/a", 1), expected_current=0, metadata=None,
                                                    max_versions=5))
    stale = asyncio.create_task(sqlite_store.write_version(version("app/taken", 1), expected_current=0, metadata=None,
                                                    max_versions=5))
    partial = asyncio.create_task(sqlite_store._write(half_then_fail))
    last = asyncio.create_task(sqlite_store.write_version(version("app/b", 1), expected_current=0, metadata=None,
                                                   max_versions=5))
    await asyncio.sleep(0.05)
    release.set()
    await held
    results = await asyncio.gather(first, stale, partial, last, return_exceptions=True)
    assert isinstance(results[1], ConflictError)
    assert isinstance(results[2], ValueError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[3], BaseException)
    assert await sqlite_store.get_meta("half") is None, "the failed write's own changes must be rolled back"
    assert {s.path for s in await sqlite_store.list_secrets("app")} == {"app/a", "app/b", "app/taken"}
    taken = await sqlite_store.get_secret("app/taken")
    assert taken is not None and taken.current_version == 1


async def test_an_error_that_ends_the_transaction_fails_every_write_of_its_batch(sqlite_store: SQLiteStorage) -> None:
    # A write whose error makes SQLite roll the whole transaction back itself (as a full disk or an
    # I/O error does): the writes before it in the batch are gone too, so none may report success.
    held, release = await _hold_the_writer(sqlite_store)

    def end_the_transaction(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full")

    before = asyncio.create_task(sqlite_store.write_version(version("app/before", 1), expected_current=0, metadata=None,
                                                     max_versions=5))
    breaker = asyncio.create_task(sqlite_store._write(end_the_transaction))
    await asyncio.sleep(0.05)
    release.set()
    await held
    results = await asyncio.gather(before, breaker, return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results), results
    assert await sqlite_store.get_secret("app/before") is None
    # The writer goes on: the next write commits as usual.
    await sqlite_store.write_version(version("app/after", 1), expected_current=0, metadata=None, max_versions=5)
    assert await sqlite_store.get_secret("app/after") is not None


async def test_writes_queued_at_close_fail_instead_of_hanging(tmp_path: Path) -> None:
    s = SQLiteStorage(tmp_path / "db.sqlite")
    await s.open()
    await initialized(s)
    held, release = await _hold_the_writer(s)
    queued = asyncio.create_task(s.write_version(version("app/late", 1), expected_current=0, metadata=None,
                                                 max_versions=5))
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(s.close())
    await asyncio.sleep(0.05)
    release.set()
    await held
    await closing
    with pytest.raises(StorageError):
        await asyncio.wait_for(queued, 5)
