"""The PostgreSQL backend: the shared conformance suite, plus what only a shared server has.

Runs against a throwaway server (``tests/postgres_fixture.py``); each test gets its own database.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from secretsd.errors import ConfigError, ConflictError, StorageError, StorageUnavailableError
from secretsd.storage import Storage
from secretsd.storage.postgres import PostgresStorage
from secretsd.storage.testing import StorageConformance, initialized, version
from tests.postgres_fixture import PostgresServer, free_port, fresh_database, start_or_skip

DSN_ENV = "SECRETSD_TEST_PG_DSN"


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    server = start_or_skip()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database(pg: PostgresServer) -> AsyncIterator[str]:
    async with fresh_database(pg) as name:
        yield name


@pytest.fixture
def dsn(pg: PostgresServer, database: str) -> str:
    """The test database's full URI, password included (what dsn_env would hold)."""
    return pg.dsn(database)


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[PostgresStorage]:
    s = PostgresStorage(dsn, pool_max=4)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


class TestPostgresConformance(StorageConformance):
    @pytest.fixture
    async def storage(self, dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Storage]:
        # Built the way the daemon builds it: from the [storage] table, password from the environment.
        monkeypatch.setenv(DSN_ENV, dsn)
        s = PostgresStorage.from_config({"dsn_env": DSN_ENV, "pool_max": 4}, data_dir=tmp_path)
        await s.open()
        yield s
        await s.close()


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://secretsd:hunter2@db.example:5432/secretsd",
        "postgres://secretsd:hunter2@db.example/secretsd",
        "postgresql://secretsd@db.example/secretsd?password=hunter2",
        "postgresql://secretsd:@db.example/secretsd",
    ],
)
def test_password_in_config_dsn_is_refused(dsn: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must not contain a password") as info:
        PostgresStorage.from_config({"dsn": dsn}, data_dir=tmp_path)
    assert "hunter2" not in str(info.value)
    assert "dsn_env" in str(info.value) and "pgpass" in str(info.value)


def test_dsn_without_password_is_accepted(tmp_path: Path) -> None:
    s = PostgresStorage.from_config(
        {"dsn": "postgresql://secretsd@db.example:5433/vault", "pool_min": 2, "pool_max": 5,
         "statement_timeout_ms": 250},
        data_dir=tmp_path,
    )
    assert (s.pool_min, s.pool_max, s.statement_timeout_ms) == (2, 5, 250)
    assert s.backend == "postgres"
    assert "vault" in s.description and "db.example:5433" in s.description


def test_dsn_env_holds_the_full_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DSN_ENV, "postgresql://secretsd:s3cr3t-pw@db.example/vault")
    s = PostgresStorage.from_config({"dsn_env": DSN_ENV}, data_dir=tmp_path)
    assert "s3cr3t-pw" not in repr(s) and "s3cr3t-pw" not in s.description
    monkeypatch.delenv(DSN_ENV)
    with pytest.raises(ConfigError, match=DSN_ENV):
        PostgresStorage.from_config({"dsn_env": DSN_ENV}, data_dir=tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dsn": "postgresql://u@h/d", "password": "x"}, "unknown storage option"),
        ({"dsn": "postgresql://u@h/d", "path": "x.db"}, "unknown storage option"),
        ({}, "exactly one of"),
        ({"dsn": "postgresql://u@h/d", "dsn_env": "X"}, "exactly one of"),
        ({"dsn": "host=h dbname=d"}, "postgresql:// connection URI"),
        ({"dsn": "postgresql://u@h/d", "pool_max": 0}, "pool_max"),
        ({"dsn": "postgresql://u@h/d", "pool_min": 5, "pool_max": 2}, "pool_min <= pool_max"),
        ({"dsn": "postgresql://u@h/d", "statement_timeout_ms": "5s"}, "statement_timeout_ms"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        PostgresStorage.from_config(options, data_dir=tmp_path)


# -- migrations ----------------------------------------------------------------------------------
async def test_migrations_are_recorded_and_idempotent(dsn: str) -> None:
    for _ in range(2):
        s = PostgresStorage(dsn)
        await s.open()
        await s.close()
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT number, name FROM schema_migrations")
    finally:
        await conn.close()
    assert sorted(tuple(r) for r in rows) == [(1, "initial"), (2, "lifecycle"), (3, "token_renewal"),
                                                    (4, "token_purge")]


async def test_an_old_store_opens_and_its_tokens_do_not_renew(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store made before 0003_token_renewal: migrated at open, its tokens keep their expiry."""
    from datetime import UTC, datetime, timedelta

    from secretsd.domain.token_service import renewed_expiry
    from secretsd.storage.migrations import load_migrations

    every = load_migrations("postgres")
    with monkeypatch.context() as m:
        m.setattr("secretsd.storage.postgres.load_migrations", lambda backend: every[:2])
        old = PostgresStorage(dsn)
        await old.open()
        await old.close()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO tokens (token_id, secret_hash, client, policies, created_at, created_by, "
                           "expires_at) VALUES ('0123456789abcdef', $1, 'svc', '[\"p\"]'::jsonb, $2, 'admin', $3)",
                           bytes(32), t0, t0 + timedelta(days=1))
    finally:
        await conn.close()
    store = PostgresStorage(dsn)
    await store.open()
    try:
        record = await store.get_token("0123456789abcdef")
        assert record is not None and record.client == "svc" and record.expires_at == t0 + timedelta(days=1)
        assert record.ttl_seconds is None and record.max_expires_at is None
        assert renewed_expiry(record, t0) == record.expires_at
    finally:
        await store.close()


async def test_an_old_store_gains_the_purge_indexes_and_its_dead_tokens_purge(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store made before 0004_token_purge: migrated at open, its expired token purged past retention."""
    from datetime import UTC, datetime, timedelta

    from secretsd.storage.migrations import load_migrations

    every = load_migrations("postgres")
    with monkeypatch.context() as m:
        m.setattr("secretsd.storage.postgres.load_migrations", lambda backend: every[:3])
        old = PostgresStorage(dsn)
        await old.open()
        await old.close()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO tokens (token_id, secret_hash, client, policies, created_at, created_by, "
                           "expires_at) VALUES ('0123456789abcdef', $1, 'svc', '[\"p\"]'::jsonb, $2, 'admin', $3)",
                           bytes(32), t0, t0 + timedelta(days=1))
    finally:
        await conn.close()
    store = PostgresStorage(dsn)
    await store.open()
    try:
        now = t0 + timedelta(days=9)
        assert await store.purge_tokens(now - timedelta(days=7), now) == 1
        assert await store.get_token("0123456789abcdef") is None
    finally:
        await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'tokens'")
        names = {r["indexname"] for r in found}
    finally:
        await conn.close()
    assert {"tokens_revoked_at", "tokens_expires_at"} <= names


async def test_replicas_migrating_at_once_apply_each_migration_once(dsn: str) -> None:
    stores = [PostgresStorage(dsn) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await initialized(stores[0])
        assert all([await s.is_initialized() for s in stores])
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 4
    finally:
        await conn.close()


async def test_newer_schema_is_refused(dsn: str) -> None:
    s = PostgresStorage(dsn)
    await s.open()
    await s.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', now())")
    finally:
        await conn.close()
    newer = PostgresStorage(dsn)
    with pytest.raises(StorageError, match="newer secretsd"):
        await newer.open()
    assert newer._pool is None  # closed again after the refusal


# -- replicas: concurrent check-and-set ----------------------------------------------------------
async def test_concurrent_cas_across_two_replicas_one_winner_per_version(dsn: str) -> None:
    """Two pools (two replicas) race on the same versions: each version is won exactly once."""
    a, b = PostgresStorage(dsn, pool_max=4), PostgresStorage(dsn, pool_max=4)
    await a.open()
    await b.open()
    try:
        await initialized(a)
        await a.write_version(version("race", 1), expected_current=0, metadata=None, max_versions=100)
        for n in range(2, 12):
            attempts = [
                (a if i % 2 else b).write_version(version("race", n, ct=bytes([65 + i])), expected_current=n - 1,
                                                  metadata=None, max_versions=100)
                for i in range(6)
            ]
            results = await asyncio.gather(*attempts, return_exceptions=True)
            winners = [r for r in results if not isinstance(r, BaseException)]
            assert len(winners) == 1, results
            assert all(isinstance(r, ConflictError) for r in results if isinstance(r, BaseException)), results
            assert winners[0].secret.current_version == n
        assert [v.version for v in await b.list_versions("race")] == list(range(1, 12))
        assert (await b.keyring_terms())[0].encryptions == 11
    finally:
        await a.close()
        await b.close()


async def test_contended_increments_across_two_replicas_lose_no_update(dsn: str) -> None:
    """Workers on two replicas read-modify-write one secret until each has landed its writes."""
    a, b = PostgresStorage(dsn, pool_max=5), PostgresStorage(dsn, pool_max=5)
    await a.open()
    await b.open()
    per_worker, workers = 6, 8
    acknowledged: dict[int, bytes] = {}
    counts: list[int] = []

    async def worker(store: PostgresStorage, wid: int) -> None:
        landed = 0
        while landed < per_worker:
            secret = await store.get_secret("counter")
            current = secret.current_version if secret else 0
            tag = bytes([wid, landed])
            try:
                result = await store.write_version(version("counter", current + 1, ct=tag),
                                                   expected_current=current, metadata=None, max_versions=1000)
            except ConflictError:
                await asyncio.sleep(random.random() / 200)
                continue
            assert result.secret.current_version == current + 1
            assert current + 1 not in acknowledged, "two writers were told they wrote the same version"
            acknowledged[current + 1] = tag * 20
            counts.append(result.term_encryptions)
            landed += 1

    try:
        await initialized(a)
        await asyncio.gather(*(worker(a if w % 2 else b, w) for w in range(workers)))
        total = per_worker * workers
        assert sorted(acknowledged) == list(range(1, total + 1))
        for n, ciphertext in acknowledged.items():  # every acknowledged write is there, as written
            stored = await (b if n % 2 else a).get_version("counter", n)
            assert stored is not None and stored.ciphertext == ciphertext
        assert sorted(counts) == list(range(1, total + 1))  # the counter never skipped or repeated
        assert (await a.keyring_terms())[0].encryptions == total
    finally:
        await a.close()
        await b.close()


async def test_initialize_from_two_replicas_at_once(dsn: str) -> None:
    from secretsd.errors import AlreadyInitializedError

    a, b = PostgresStorage(dsn), PostgresStorage(dsn)
    await a.open()
    await b.open()
    try:
        results = await asyncio.gather(initialized(a), initialized(b), return_exceptions=True)
        assert sum(isinstance(r, AlreadyInitializedError) for r in results) == 1, results
        assert sum(not isinstance(r, BaseException) for r in results) == 1, results
    finally:
        await a.close()
        await b.close()


# -- pool settings and unavailability -------------------------------------------------------------
async def test_statement_timeout_is_applied_to_every_pooled_connection(dsn: str) -> None:
    s = PostgresStorage(dsn, pool_min=2, pool_max=2, statement_timeout_ms=1234)
    await s.open()
    try:
        pool = s._pool
        assert pool is not None
        for _ in range(3):  # also after connections went back to the pool (and were reset)
            values = await asyncio.gather(*(pool.fetchval("SHOW statement_timeout") for _ in range(2)))
            assert values == ["1234ms", "1234ms"]
    finally:
        await s.close()


async def test_a_lock_held_too_long_is_storage_unavailable(dsn: str) -> None:
    s = PostgresStorage(dsn, statement_timeout_ms=200)
    await s.open()
    blocker = await asyncpg.connect(dsn)
    try:
        await initialized(s)
        await s.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=5)
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM secrets WHERE path = 'p' FOR UPDATE")
            with pytest.raises(StorageUnavailableError, match="statement timeout"):
                await s.write_version(version("p", 2), expected_current=1, metadata=None, max_versions=5)
        # Nothing half-written, and the store works again once the lock is gone.
        assert [v.version for v in await s.list_versions("p")] == [1]
        await s.write_version(version("p", 2), expected_current=1, metadata=None, max_versions=5)
    finally:
        await blocker.close()
        await s.close()


async def test_unreachable_server_is_storage_unavailable_without_the_password() -> None:
    port = free_port()  # nothing listens there
    secret = "pw-" + "9f8e7d6c5b4a"
    s = PostgresStorage(f"postgresql://secretsd:{secret}@127.0.0.1:{port}/vault", connect_timeout_ms=2000)
    with pytest.raises(StorageUnavailableError) as info:
        await s.open()
    message = str(info.value)
    assert secret not in message
    assert "vault" in message and f"127.0.0.1:{port}" in message
    assert info.value.retryable
    assert not isinstance(info.value, OSError | asyncpg.PostgresError)
    with pytest.raises(StorageUnavailableError):  # a store that is not open says so too
        await s.ping()


async def test_wrong_password_is_storage_unavailable_without_the_password(pg: PostgresServer,
                                                                          database: str) -> None:
    wrong = "wrong-" + "a1b2c3d4"
    s = PostgresStorage(f"postgresql://{pg.user}:{wrong}@127.0.0.1:{pg.port}/{database}")
    with pytest.raises(StorageUnavailableError, match="refused our credentials") as info:
        await s.open()
    assert wrong not in str(info.value) and pg.password not in str(info.value)


async def test_recovers_after_the_server_drops_its_connections(pg: PostgresServer, store: PostgresStorage,
                                                               database: str) -> None:
    await initialized(store)
    await asyncio.gather(*(store.ping() for _ in range(store.pool_max)))  # open several connections
    assert await _terminate_connections(pg, database) >= 1
    # Every pooled connection is dead, and asyncpg may not know yet: nothing had been sent on them,
    # so each operation moves on to a fresh connection instead of failing.
    await asyncio.gather(*(store.ping() for _ in range(store.pool_max)))
    assert await store.is_initialized()


async def _terminate_connections(pg: PostgresServer, database: str) -> int:
    admin = await asyncpg.connect(pg.socket_dsn())
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        return int(killed)
    finally:
        await admin.close()


async def test_a_dead_pooled_connection_is_replaced_before_the_transaction_begins(
    pg: PostgresServer, dsn: str, database: str
) -> None:
    """Nothing was sent on a connection that died idle, so that one is retried on a fresh one."""
    s = PostgresStorage(dsn, pool_min=1, pool_max=1)
    await s.open()
    try:
        await initialized(s)
        assert await _terminate_connections(pg, database) == 1
        await s.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=5)
        assert await _terminate_connections(pg, database) == 1
        assert (await s.get_version("p", None)) is not None
    finally:
        await s.close()
