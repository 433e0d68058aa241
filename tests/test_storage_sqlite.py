from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from secretsd.errors import StorageError
from secretsd.storage import Storage
from secretsd.storage.sqlite import SQLiteStorage
from secretsd.storage.testing import StorageConformance, initialized


class TestSQLiteConformance(StorageConformance):
    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[Storage]:
        s = SQLiteStorage(tmp_path / "db.sqlite")
        await s.open()
        yield s
        await s.close()


async def test_database_is_owner_only_wal_and_full_sync(tmp_path: Path) -> None:
    s = SQLiteStorage(tmp_path / "db.sqlite")
    await s.open()
    await initialized(s)
    try:
        assert (tmp_path / "db.sqlite").stat().st_mode & 0o777 == 0o600
        conn = sqlite3.connect(tmp_path / "db.sqlite")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        assert s._writer is not None
        assert s._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        await s.close()


async def test_migrations_are_recorded_and_idempotent(tmp_path: Path) -> None:
    for _ in range(2):
        s = SQLiteStorage(tmp_path / "db.sqlite")
        await s.open()
        await s.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    assert conn.execute("SELECT number, name FROM schema_migrations").fetchall() == [
        (1, "initial"), (2, "lifecycle"), (3, "token_renewal"), (4, "token_purge")]


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    s = SQLiteStorage(tmp_path / "db.sqlite")
    await s.open()
    await s.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', 'x')")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="newer secretsd"):
        await SQLiteStorage(tmp_path / "db.sqlite").open()


async def test_secure_delete_is_on(tmp_path: Path) -> None:
    s = SQLiteStorage(tmp_path / "db.sqlite")
    await s.open()
    try:
        assert s._writer is not None and s._writer.execute("PRAGMA secure_delete").fetchone()[0] == 1
    finally:
        await s.close()


def test_unknown_sqlite_options_are_refused(tmp_path: Path) -> None:
    from secretsd.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown option"):
        SQLiteStorage.from_config({"pth": "x.db"}, data_dir=tmp_path)


async def test_an_old_store_gains_the_purge_indexes_and_the_sweep_uses_them(tmp_path: Path) -> None:
    """tests/data/sqlite_store_v1.db (written before migration 0004) opens, gains the indexes, and
    its revoked token is purged past retention; the purge's query reads through an index, not a scan."""
    import shutil
    from datetime import UTC, datetime, timedelta

    from secretsd.storage import sqlite as sqlite_backend

    path = tmp_path / "store.db"
    shutil.copyfile(Path(__file__).parent / "data" / "sqlite_store_v1.db", path)
    path.chmod(0o600)
    s = SQLiteStorage(path)
    await s.open()
    try:
        old = await s.get_token("00000000000000bb")
        assert old is not None and old.revoked_at is not None
        now = old.revoked_at + timedelta(days=8)
        assert await s.purge_tokens(now - timedelta(days=7), now) == 1
        assert await s.get_token("00000000000000bb") is None
        assert [t for t in await s.list_tokens() if t.is_active(datetime.now(UTC))]  # the live ones stay
    finally:
        await s.close()
    conn = sqlite3.connect(path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"tokens_revoked_at", "tokens_expires_at"} <= names
    plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + sqlite_backend._SQL.lock_purgeable_tokens,
                                                 ("2026-01-01T00:00:00+00:00", 1000)))
    conn.close()
    assert "tokens_revoked_at" in plan and "tokens_expires_at" in plan
