"""The PostgreSQL dialect (asyncpg): several daemon replicas share one database.

The store's rules live in ``secretsd.storage.engine``; this module holds the SQL, the connection
pool, transactions and retries, row locks (``_Ops``), error conversion, leader locks and the
LISTEN/NOTIFY change feed.

Configuration, the ``[storage]`` table with ``backend = "postgres"``:

``dsn``
    A libpq connection URI *without a password*, e.g. ``postgresql://secretsd@db:5432/secretsd``.
    The password then comes from a libpq password file (``~/.pgpass`` or ``PGPASSFILE``), a service
    file (``?service=NAME``, ``PGSERVICEFILE``) or ``PGPASSWORD``. A ``dsn`` that carries a password
    is refused: configuration files get copied, committed and printed.
``dsn_env``
    Instead of ``dsn``: the name of an environment variable that holds the *complete* connection
    URI, password included. Exactly one of ``dsn`` and ``dsn_env`` must be set.
``pool_min``, ``pool_max``
    Connection pool bounds (default 1 and 10).
``statement_timeout_ms``
    PostgreSQL's ``statement_timeout`` for every pooled connection (default 5000; 0 disables it).
    It also bounds waits for row locks, so a stuck writer turns into a retryable 503, not a hang.
``connect_timeout_ms``
    How long to wait for a new connection, or for a free one from the pool (default 10000).

Every driver and OS error is converted here, once: unique and other integrity violations become
``ConflictError``; connection failures, timeouts, cancelled statements and an overloaded or
restarting server become ``StorageUnavailableError`` (retryable; the pool reconnects by itself when
the server is back); anything else ``StorageError``. Messages name the host and database, never
the password.

Concurrency: ``write_version`` runs in one READ COMMITTED transaction that locks the secret's row
(``SELECT ... FOR UPDATE``) before its check-and-set, and relies on the primary keys of ``secrets``
and ``secret_versions`` when the secret does not exist yet, so of N concurrent writers with the same
expectation exactly one commits and the others get ``ConflictError``, whichever replica they run
on. The sealing term's encryption count grows by ``UPDATE ... RETURNING`` in the same transaction.
Serialization failures and deadlocks (which PostgreSQL only reports at stricter isolation levels,
and CockroachDB reports often) roll the whole transaction back and are retried a few times.

Destroyed versions: their ciphertext is overwritten with empty bytes, but PostgreSQL's MVCC keeps
the old row version on disk until VACUUM reclaims it (it is ciphertext under a wrapped key).

Portability (CockroachDB, YugabyteDB): the data path uses only plain SQL (``FOR UPDATE``,
``ON CONFLICT``, ``RETURNING``, ``= ANY($n)``); no advisory locks. Non-portable bits are marked
"portability:" below and in the migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import quote

import asyncpg

from keyproviders import WrappedKey
from secretsd.errors import (
    ConfigError,
    ConflictError,
    StorageError,
    StorageUnavailableError,
)
from secretsd.storage import codec, engine, queries, rows
from secretsd.storage import postgres_sql as sql
from secretsd.storage.base import (
    BatchWrite,
    ChangeSubscription,
    ExportRow,
    KeyringTerm,
    RevokeGuard,
    RotationStatus,
    Seal,
    SecretRecord,
    Storage,
    StoreSnapshot,
    TokenRecord,
    VersionInfo,
    VersionRecord,
    VersionState,
    WriteResult,
)
from secretsd.storage.migrations import load_migrations, pending_migrations
from secretsd.storage.postgres_config import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    DEFAULT_POOL_MAX,
    DEFAULT_POOL_MIN,
    DEFAULT_STATEMENT_TIMEOUT_MS,
    Target,
    int_option,
    parse_dsn,
    resolve_dsn,
)
from secretsd.storage.postgres_session import AdvisoryLeaderLock, Subscription

T = TypeVar("T")

#: Whole-transaction retries after a serialization failure or deadlock.
TRANSACTION_ATTEMPTS = 5
#: Key of the transaction-level advisory lock that serialises migrations across replicas.
MIGRATION_LOCK_KEY = 0x5EC2E75D  # "secretsd"
#: Client-side bound on one migration statement (or the wait for another replica's migration).
MIGRATION_TIMEOUT_S = 3600.0

class _StaleConnection(Exception):
    """Internal: a pooled connection was dead before we did anything with it; try another."""


class PostgresStorage:
    """``Storage`` on a PostgreSQL database, through an asyncpg connection pool.

    ``dsn_env`` names an environment variable holding the complete connection URI (password
    included); ``dsn`` holds a URI without a password. See the module docstring for all options.
    """

    backend: ClassVar[str] = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        pool_min: int = DEFAULT_POOL_MIN,
        pool_max: int = DEFAULT_POOL_MAX,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        connect_timeout_ms: int = DEFAULT_CONNECT_TIMEOUT_MS,
    ) -> None:
        """Use ``from_config`` for configuration files; this takes any URI, password or not."""
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ConfigError(f"storage pool bounds must satisfy 0 <= pool_min <= pool_max, 1 <= pool_max "
                              f"(got {pool_min}, {pool_max})")
        description, password = parse_dsn(dsn, "the storage DSN")
        self._target = Target(dsn, description, password)
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout_ms = connect_timeout_ms
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"PostgresStorage({self._target.description})"

    @property
    def description(self) -> str:
        """The database, for messages: host, port, user and name, never the password."""
        return self._target.description

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, data_dir: Path) -> PostgresStorage:
        """Build from the ``[storage]`` table minus ``backend``; ``data_dir`` is not used."""
        dsn = resolve_dsn(options)
        return cls(
            dsn,
            pool_min=int_option(options, "pool_min", DEFAULT_POOL_MIN, 0),
            pool_max=int_option(options, "pool_max", DEFAULT_POOL_MAX, 1),
            statement_timeout_ms=int_option(options, "statement_timeout_ms", DEFAULT_STATEMENT_TIMEOUT_MS, 0),
            connect_timeout_ms=int_option(options, "connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS, 1),
        )

    # -- error conversion: the one place driver errors become secretsd errors -------------------
    def _scrub(self, text: str) -> str:
        """Defence in depth: drivers do not echo passwords, but a message must never carry one."""
        password = self._target.password
        if password:
            for form in (password, quote(password, safe=""), quote(password)):
                text = text.replace(form, "***")
        return text

    def _convert(self, exc: BaseException) -> StorageError:
        where = self._target.description
        detail = self._scrub(f"{exc.__class__.__name__}: {exc}".rstrip(": "))
        if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
            return ConflictError("the write conflicts with stored data")
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
            return StorageUnavailableError(f"{where} refused our credentials ({detail})")
        if isinstance(exc, asyncpg.QueryCanceledError):
            return StorageUnavailableError(
                f"{where} cancelled a statement: statement timeout or an operator's cancel ({detail})"
            )
        unavailable = (
            OSError,  # refused, unreachable, DNS; TimeoutError is one too
            asyncpg.PostgresConnectionError,  # class 08
            asyncpg.OperatorInterventionError,  # shutting down, cannot connect now
            asyncpg.InsufficientResourcesError,  # too many connections, disk full
            asyncpg.TransactionRollbackError,  # serialization failure after our retries
            asyncpg.InvalidCatalogNameError,  # no such database (yet)
        )
        if isinstance(exc, unavailable):
            return StorageUnavailableError(f"{where} is unavailable ({detail})")
        if isinstance(exc, asyncpg.InternalClientError | asyncpg.InterfaceError) and not isinstance(
            exc, asyncpg.DataError
        ):
            # "connection is closed", "pool is closing", or asyncpg's protocol state confused by a
            # connection the server dropped: the connection went away under us.
            return StorageUnavailableError(f"{where} is unavailable ({detail})")
        return StorageError(f"{where} failed ({detail})")

    _DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
    #: What using a pooled connection the server has already dropped looks like (the server
    #: restarted, or terminated the backend): asyncpg may only notice on the next statement.
    _STALE_ERRORS = (
        asyncpg.PostgresConnectionError,
        asyncpg.AdminShutdownError,
        asyncpg.InternalClientError,
        asyncpg.InterfaceError,
        ConnectionError,
    )

    # -- plumbing -------------------------------------------------------------------------------
    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageUnavailableError(f"{self._target.description}: the store is not open")
        return self._pool

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, transaction: bool = True) -> T:
        """Run ``fn`` on a pooled connection, in a transaction unless it only reads (``transaction=False``).

        Retried, because nothing was committed: the whole transaction after a serialization
        failure or deadlock (a few times), and on another connection when the first one turns out
        to be dead before the transaction began (or during a read-only ``fn``): after a server
        restart every pooled connection may be dead without asyncpg knowing yet. A connection
        lost after BEGIN is not retried: whether COMMIT landed is unknown, so the caller gets
        ``StorageUnavailableError``. Our own errors raised inside ``fn`` roll back and pass through.
        """
        pool = self._require_pool()
        stale_retries = self.pool_max  # each dead connection is dropped from the pool once seen
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(pool, fn, transaction)
            except _StaleConnection as stale:
                cause = stale.__cause__ or stale
                if stale_retries <= 0:
                    raise self._convert(cause) from cause
                stale_retries -= 1
            except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError) as exc:
                if attempt >= TRANSACTION_ATTEMPTS:
                    raise self._convert(exc) from exc
                await asyncio.sleep(0.005 * 2**attempt)
            except self._DRIVER_ERRORS as exc:
                raise self._convert(exc) from exc

    async def _attempt(
        self, pool: asyncpg.Pool, fn: Callable[[asyncpg.Connection], Awaitable[T]], transaction: bool
    ) -> T:
        async with pool.acquire(timeout=self.connect_timeout_ms / 1000) as conn:
            if not transaction:
                try:
                    return await fn(conn)
                except asyncpg.DataError:
                    raise  # bad arguments (an InterfaceError too), not a dead connection
                except self._STALE_ERRORS as exc:
                    raise _StaleConnection from exc
            tx = conn.transaction()
            try:
                await tx.start()
            except self._STALE_ERRORS as exc:
                raise _StaleConnection from exc
            try:
                result = await fn(conn)
            except BaseException:
                # If the connection is gone the server rolls back anyway; keep the first error.
                with contextlib.suppress(*self._DRIVER_ERRORS):
                    await tx.rollback()
                raise
            await tx.commit()
            return result

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def run(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows

        return await self._run(run, transaction=False)

    def leader_lock(self, name: str) -> AdvisoryLeaderLock:
        return AdvisoryLeaderLock(self, name)

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        settings = {"application_name": "secretsd"}
        command_timeout = None
        if self.statement_timeout_ms:
            settings["statement_timeout"] = str(self.statement_timeout_ms)
            # Client side too, for when the server cannot even answer (a network partition).
            command_timeout = (self.statement_timeout_ms + self.connect_timeout_ms) / 1000
        try:
            self._pool = await asyncpg.create_pool(
                self._target.dsn,
                min_size=self.pool_min,
                max_size=self.pool_max,
                timeout=self.connect_timeout_ms / 1000,
                command_timeout=command_timeout,
                server_settings=settings,
            )
        except self._DRIVER_ERRORS as exc:
            raise self._convert(exc) from exc
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        migrations = load_migrations("postgres")

        async def run(conn: asyncpg.Connection) -> None:
            # Waiting for another replica's migration, or migrating a big table, may take longer
            # than a statement should; the client-side command timeout is lifted per call.
            # portability: CockroachDB accepts SET LOCAL only in recent versions.
            await conn.execute("SET LOCAL statement_timeout = 0", timeout=MIGRATION_TIMEOUT_S)
            # Two replicas starting together: the second waits here, then finds the work done.
            # portability: in CockroachDB pg_advisory_xact_lock is a compatibility no-op (and DDL in a
            # transaction has limits); there two migrators collide as serialization failures,
            # which _run retries, or one fails and its replica must be restarted.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY, timeout=MIGRATION_TIMEOUT_S)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(number integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL)",
                timeout=MIGRATION_TIMEOUT_S,
            )
            done = [row[0] for row in await conn.fetch("SELECT number FROM schema_migrations")]
            for m in pending_migrations(migrations, done, self._target.description):
                for statement in m.statements():
                    await conn.execute(statement, timeout=MIGRATION_TIMEOUT_S)
                await conn.execute(
                    "INSERT INTO schema_migrations (number, name, applied_at) VALUES ($1, $2, $3)",
                    m.number, m.name, datetime.now(UTC),
                )

        await self._run(run)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=self.connect_timeout_ms / 1000)
            except (TimeoutError, *self._DRIVER_ERRORS):
                pool.terminate()

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def _plan(self, make: Callable[[], engine.Plan[T]]) -> T:
        """Run one of the engine's plans in a transaction; a retried transaction gets a fresh plan."""
        return await self._run(lambda conn: engine.run_async(make(), sql.PostgresRowOps(conn)))

    # -- initialisation -----------------------------------------------------------------------
    async def is_initialized(self) -> bool:
        return bool(await self._fetch(sql.SQL.is_initialized))

    async def initialize(
        self, meta: Mapping[str, str], first_term: KeyringTerm, admin_token: TokenRecord
    ) -> None:
        where = self._target.description
        await self._plan(lambda: engine.initialize(meta, first_term, admin_token, datetime.now(UTC), where))

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetch(sql.SQL.get_meta, key)
        return str(rows[0][0]) if rows else None

    async def put_meta(self, key: str, value: str, *, only_if_absent: bool = False) -> bool:
        statement = sql.SQL.put_meta_if_absent if only_if_absent else sql.SQL.put_meta

        async def run(conn: asyncpg.Connection) -> bool:
            return await conn.fetchval(statement, key, value) is not None

        return await self._run(run)

    # -- keyring ------------------------------------------------------------------------------
    async def keyring_terms(self) -> list[KeyringTerm]:
        rows = await self._fetch(sql.SQL.keyring_terms)
        return [engine.term_from_row(r, sql.as_is) for r in rows]

    async def add_keyring_term(self, term: KeyringTerm) -> None:
        await self._plan(lambda: engine.add_keyring_term(term))

    async def replace_keyring_wrappings(
        self, term: int, expected: tuple[WrappedKey, ...], wrappings: tuple[WrappedKey, ...]
    ) -> None:
        await self._plan(lambda: engine.replace_keyring_wrappings(term, expected, wrappings))

    # -- secrets --------------------------------------------------------------------------------
    async def get_secret(self, path: str) -> SecretRecord | None:
        rows = await self._fetch(sql.SQL.get_secret, path)
        return engine.secret_from_row(rows[0], sql.as_is) if rows else None

    async def get_version(self, path: str, version: int | None) -> VersionRecord | None:
        if version is None:
            rows = await self._fetch(sql.SQL.get_current_version, path)
        else:
            rows = await self._fetch(sql.SQL.get_version, path, version)
        return engine.version_from_row(rows[0], sql.as_is) if rows else None

    async def read_version(
        self, path: str, *, version: int | None = None, label: str = "current"
    ) -> tuple[SecretRecord, VersionRecord] | None:
        if version is None:
            rows = await self._fetch(sql.SQL.read_by_label[engine.label_column(label)], path)
        else:
            rows = await self._fetch(sql.SQL.read_by_number, path, version)
        if not rows:
            return None
        values, split = list(rows[0].values()), queries.SECRET_WIDTH
        return engine.secret_from_row(values[:split], sql.as_is), engine.version_from_row(values[split:], sql.as_is)

    async def read_current_page(
        self, prefix: str, *, after: str = "", limit: int = 1000,
    ) -> list[tuple[SecretRecord, VersionRecord | None]]:
        low, high = codec.prefix_bounds(prefix)
        split = queries.SECRET_WIDTH
        out: list[tuple[SecretRecord, VersionRecord | None]] = []
        for row in await self._fetch(sql.SQL.read_current_page, low, high, prefix, after, limit):
            values = list(row.values())
            out.append((engine.secret_from_row(values[:split], sql.as_is),
                        None if values[split] is None else engine.version_from_row(values[split:], sql.as_is)))
        return out

    async def write_version(
        self,
        record: VersionRecord,
        *,
        expected_current: int,
        metadata: Mapping[str, Any] | None,
        max_versions: int,
        grace_until: datetime | None = None,
    ) -> WriteResult:
        # The row lock (lock_secret: FOR UPDATE) makes concurrent writers of one path, on any
        # replica, take turns; READ COMMITTED then shows each the version its predecessor committed.
        return await self._plan(lambda: engine.write_version(
            record, expected_current=expected_current, metadata=metadata, max_versions=max_versions,
            grace_until=grace_until,
        ))

    async def write_unconditional(
        self, path: str, seal: Seal, *, metadata: Mapping[str, Any] | None, max_versions: int,
    ) -> WriteResult:
        return await self._plan(lambda: engine.write_unconditional(
            path, seal, metadata=metadata, max_versions=max_versions))

    async def write_batch(
        self, items: Sequence[BatchWrite], *, max_versions: int,
    ) -> list[WriteResult | ConflictError]:
        return await self._plan(lambda: engine.write_batch(items, max_versions=max_versions))

    async def create_pending(self, record: VersionRecord, *, expected_current: int) -> WriteResult:
        return await self._plan(lambda: engine.create_pending(record, expected_current=expected_current))

    async def finish_pending(
        self,
        path: str,
        version: int,
        *,
        expected_current: int,
        now: datetime,
        grace_until: datetime | None,
        max_versions: int,
        rotation_due: datetime | None,
        rotation_status: RotationStatus,
    ) -> SecretRecord:
        return await self._plan(lambda: engine.finish_pending(
            path, version, expected_current=expected_current, now=now, grace_until=grace_until,
            max_versions=max_versions, rotation_due=rotation_due, rotation_status=rotation_status,
        ))

    async def discard_pending(
        self,
        path: str,
        version: int,
        *,
        now: datetime,
        rotation_due: datetime | None,
        rotation_status: RotationStatus,
    ) -> bool:
        return await self._plan(lambda: engine.discard_pending(
            path, version, now=now, rotation_due=rotation_due, rotation_status=rotation_status,
        ))

    async def set_rotation(
        self, path: str, policy: Mapping[str, Any] | None, rotation_due: datetime | None
    ) -> SecretRecord | None:
        return await self._plan(lambda: engine.set_rotation(path, policy, rotation_due))

    async def record_rotation(
        self, path: str, rotation_due: datetime | None, rotation_status: RotationStatus
    ) -> None:
        await self._plan(lambda: engine.record_rotation(path, rotation_due, rotation_status))

    async def rotation_candidates(self, now: datetime, *, limit: int = 100) -> list[SecretRecord]:
        rows = await self._fetch(sql.SQL.rotation_candidates, now, limit)
        return [engine.secret_from_row(r, sql.as_is) for r in rows]

    async def list_secrets(self, prefix: str, *, after: str = "", limit: int = 1000) -> list[SecretRecord]:
        low, high = codec.prefix_bounds(prefix)
        rows = await self._fetch(sql.SQL.list_secrets, low, high, prefix, after, limit)
        return [engine.secret_from_row(r, sql.as_is) for r in rows]

    async def count_secrets(self) -> int:
        rows = await self._fetch(sql.SQL.count_secrets)
        return int(rows[0][0])

    async def list_versions(self, path: str) -> list[VersionInfo]:
        rows = await self._fetch(sql.SQL.list_versions, path)
        return [engine.version_info_from_row(r, sql.as_is) for r in rows]

    async def set_version_state(
        self, path: str, versions: Sequence[int], state: VersionState, now: datetime
    ) -> list[int]:
        return await self._plan(lambda: engine.set_version_state(path, versions, state, now))

    # -- tokens -------------------------------------------------------------------------------
    async def create_token(self, token: TokenRecord) -> None:
        await self._plan(lambda: engine.create_token(token))

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = await self._fetch(sql.SQL.get_token, token_id)
        return engine.token_from_row(rows[0], sql.as_is) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._fetch(sql.SQL.list_tokens)
        return [engine.token_from_row(r, sql.as_is) for r in rows]

    async def list_tokens_page(self, now: datetime, *, after: str = "", limit: int = 1000,
                               include_expired: bool = False) -> list[TokenRecord]:
        rows = await self._fetch(sql.SQL.list_tokens_page, after, engine.EPOCH if include_expired else now, limit)
        return [engine.token_from_row(r, sql.as_is) for r in rows]

    async def purge_tokens(self, cutoff: datetime, now: datetime, *, limit: int = engine.PURGE_BATCH) -> int:
        return await self._plan(lambda: engine.purge_tokens(cutoff, now, limit))

    async def revoke_token(self, token_id: str, now: datetime, *, guard: RevokeGuard | None = None) -> bool:
        return await self._plan(lambda: engine.revoke_token(token_id, now, guard))

    async def renew_token(self, token_id: str, expires_at: datetime, now: datetime) -> bool:
        return await self._plan(lambda: engine.renew_token(token_id, expires_at, now))

    # -- change feed (LISTEN/NOTIFY) ------------------------------------------------------------
    async def subscribe(
        self, channels: Sequence[str], callback: Callable[[str, str], None]
    ) -> ChangeSubscription:
        """LISTEN on a dedicated connection outside the pool; see ``secretsd.runtime.replication``."""
        return await Subscription.open(self, channels, callback)

    # -- copying a whole store ----------------------------------------------------------------
    async def _copy_columns(self, conn: asyncpg.Connection, table: str) -> list[str]:
        found = await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1",
            table,
        )
        return rows.copy_columns(table, [r[0] for r in found], self._target.description)

    async def count_rows(self, table: str) -> int:
        if table not in rows.COLUMN_KINDS:
            raise ValueError(f"unknown table {table!r}")
        found = await self._fetch(f"SELECT count(*) FROM {table}")  # noqa: S608 - a known table name
        return int(found[0][0])

    async def export_rows(self, table: str, *, batch_size: int = 500) -> AsyncIterator[list[ExportRow]]:
        pool = self._require_pool()
        try:
            async with pool.acquire(timeout=self.connect_timeout_ms / 1000) as conn:
                async for batch in self._export_on(conn, table, batch_size):
                    yield batch
        except self._DRIVER_ERRORS as exc:
            raise self._convert(exc) from exc

    async def _export_on(self, conn: Any, table: str, batch_size: int) -> AsyncIterator[list[ExportRow]]:
        if table not in rows.COLUMN_KINDS:
            raise ValueError(f"unknown table {table!r}")
        # Keys compare bytewise (COLLATE "C"), the order SQLite's BINARY collation gives too.
        keys = rows.key_columns(table)
        order = ", ".join(f'{k} COLLATE "C"' if rows.kind(table, k) == "text" else k for k in keys)
        columns = await self._copy_columns(conn, table)
        select = ", ".join(f"{c}::text" if rows.kind(table, c) == "json" else c for c in columns)
        after: list[Any] | None = None
        while True:
            if after is None:
                sql = f"SELECT {select} FROM {table} ORDER BY {order} LIMIT $1"  # noqa: S608
                found = await conn.fetch(sql, batch_size)
            else:
                marks = ", ".join(f"${i + 2}" for i in range(len(keys)))
                sql = (f"SELECT {select} FROM {table} WHERE ({order}) > ({marks}) "  # noqa: S608
                       f"ORDER BY {order} LIMIT $1")
                found = await conn.fetch(sql, batch_size, *after)
            if not found:
                return
            batch = [_decode_row(table, columns, r) for r in found]
            after = [batch[-1][k] for k in keys]
            yield batch

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[StoreSnapshot]:
        pool = self._require_pool()
        try:
            # REPEATABLE READ: every statement of the transaction sees the snapshot its first one took.
            async with pool.acquire(timeout=self.connect_timeout_ms / 1000) as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute("SET LOCAL statement_timeout = 0")  # a big table takes a while to read
                yield _PostgresSnapshot(self, conn)
        except self._DRIVER_ERRORS as exc:
            raise self._convert(exc) from exc

    async def import_rows(self, batches: AsyncIterable[tuple[str, Sequence[ExportRow]]]) -> None:
        pool = self._require_pool()
        try:
            async with pool.acquire(timeout=self.connect_timeout_ms / 1000) as conn, conn.transaction():
                # Bulk loading may take longer than one request should. portability: SET LOCAL.
                await conn.execute("SET LOCAL statement_timeout = 0")
                # Keeps a replica from initialising this database while we load it.
                await conn.execute("LOCK TABLE meta IN EXCLUSIVE MODE")
                columns: dict[str, list[str]] = {}
                for table in rows.TABLES:
                    found = await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})")  # noqa: S608
                    rows.require_empty(table, bool(found), self._target.description)
                    columns[table] = await self._copy_columns(conn, table)
                async for table, batch in batches:
                    if not batch:
                        continue
                    cols = rows.insert_columns(table, columns[table], batch[0], self._target.description)
                    marks = ", ".join(
                        f"${i + 1}::jsonb" if rows.kind(table, c) == "json" else f"${i + 1}" for i, c in enumerate(cols)
                    )
                    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})"  # noqa: S608 - known names
                    await conn.executemany(sql, [_encode_row(table, cols, r) for r in batch])
        except self._DRIVER_ERRORS as exc:
            raise self._convert(exc) from exc


# -- export/import: neutral values (secretsd.storage.rows) <-> PostgreSQL parameters -------------
def _decode_row(table: str, columns: list[str], record: asyncpg.Record) -> ExportRow:
    out: ExportRow = {}
    for i, column in enumerate(columns):
        value = record[i]
        if value is not None:
            kind = rows.kind(table, column)
            if kind == "json":
                value = json.loads(value)
            elif kind == "bytes":
                value = bytes(value)
        out[column] = value
    return out


def _encode_row(table: str, columns: list[str], row: ExportRow) -> tuple[Any, ...]:
    values: list[Any] = []
    for column in columns:
        value = row.get(column)
        if value is not None and rows.kind(table, column) == "json":
            value = rows.to_json_text(value)
        values.append(value)
    return tuple(values)


if TYPE_CHECKING:  # mypy proves the backend still satisfies the protocol when it grows

    def _conforms(storage: PostgresStorage) -> Storage:
        return storage


class _PostgresSnapshot:
    """``StoreSnapshot`` over one REPEATABLE READ, read-only transaction (``PostgresStorage.snapshot``)."""

    def __init__(self, store: PostgresStorage, conn: Any) -> None:
        self._store = store
        self._conn = conn

    async def count_rows(self, table: str) -> int:
        if table not in rows.COLUMN_KINDS:
            raise ValueError(f"unknown table {table!r}")
        try:
            return int(await self._conn.fetchval(f"SELECT count(*) FROM {table}"))  # noqa: S608 - a known table
        except PostgresStorage._DRIVER_ERRORS as exc:
            raise self._store._convert(exc) from exc

    async def export_rows(self, table: str, *, batch_size: int = 500) -> AsyncIterator[list[ExportRow]]:
        try:
            async for batch in self._store._export_on(self._conn, table, batch_size):
                yield batch
        except PostgresStorage._DRIVER_ERRORS as exc:
            raise self._store._convert(exc) from exc
