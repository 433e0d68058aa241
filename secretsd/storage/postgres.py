"""The PostgreSQL backend (asyncpg): several daemon replicas share one database.

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
import hashlib
import json
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import asyncpg

from keyproviders import WrappedKey
from secretsd.errors import (
    AlreadyInitializedError,
    ConfigError,
    ConflictError,
    StorageError,
    StorageUnavailableError,
)
from secretsd.storage import codec, engine, rows
from secretsd.storage.base import (
    ChangeSubscription,
    ExportRow,
    KeyringTerm,
    RevokeGuard,
    RotationStatus,
    SecretRecord,
    Storage,
    TokenRecord,
    VersionInfo,
    VersionRecord,
    VersionState,
    WriteResult,
)
from secretsd.storage.migrations import load_migrations

T = TypeVar("T")

OPTIONS = frozenset({"dsn", "dsn_env", "pool_min", "pool_max", "statement_timeout_ms", "connect_timeout_ms"})
DEFAULT_POOL_MIN = 1
DEFAULT_POOL_MAX = 10
DEFAULT_STATEMENT_TIMEOUT_MS = 5_000
DEFAULT_CONNECT_TIMEOUT_MS = 10_000
#: Whole-transaction retries after a serialization failure or deadlock.
TRANSACTION_ATTEMPTS = 5
#: Key of the transaction-level advisory lock that serialises migrations across replicas.
MIGRATION_LOCK_KEY = 0x5EC2E75D  # "secretsd"
#: Client-side bound on one migration statement (or the wait for another replica's migration).
MIGRATION_TIMEOUT_S = 3600.0
_SCHEMES = ("postgresql://", "postgres://")

def _select(table: str, columns: Sequence[str], alias: str = "") -> str:
    """Column list for a SELECT: JSON columns as text, which the engine's row codecs decode."""
    return ", ".join(f"{alias}{c}::text" if rows.kind(table, c) == "json" else f"{alias}{c}" for c in columns)


_SECRET_COLS = _select("secrets", engine.SECRET_COLUMNS)
_VERSION_COLS = _select("secret_versions", engine.VERSION_COLUMNS, "v.")
_TOKEN_COLS = _select("tokens", engine.TOKEN_COLUMNS)
_SELECT_SECRET = f"SELECT {_SECRET_COLS} FROM secrets WHERE path = $1"  # noqa: S608 - constant columns
_SELECT_VERSION = f"SELECT {_VERSION_COLS} FROM secret_versions v WHERE v.path = $1 AND v.version = $2"  # noqa: S608
_SELECT_CURRENT_VERSION = (f"SELECT {_VERSION_COLS} FROM secrets s JOIN secret_versions v "  # noqa: S608
                           "ON v.path = s.path AND v.version = s.current_version WHERE s.path = $1")
_READ_COLS = _select("secrets", engine.SECRET_COLUMNS, "s.") + ", " + _VERSION_COLS
#: One indexed lookup per read: the label's column (engine.label_column) names the version.
_READ_BY_LABEL = {
    column: f"SELECT {_READ_COLS} FROM secrets s JOIN secret_versions v "  # noqa: S608 - constant columns
            f"ON v.path = s.path AND v.version = s.{column} WHERE s.path = $1"
    for column in engine.LABEL_COLUMNS.values()
}
_READ_BY_NUMBER = (f"SELECT {_READ_COLS} FROM secrets s JOIN secret_versions v "  # noqa: S608 - constant columns
                   "ON v.path = s.path AND v.version = $2 WHERE s.path = $1")


def _as_is(value: Any) -> Any:
    """asyncpg already returns aware datetimes for timestamptz columns."""
    return value


def _assignments(table: str, values: Mapping[str, Any], first: int) -> list[str]:
    """``column = $n`` (cast to jsonb for JSON columns, which the engine passes as text)."""
    kinds = rows.COLUMN_KINDS[table][1]
    out = []
    for i, column in enumerate(values, start=first):
        if column not in kinds:  # names come from the engine, never from a caller; refuse all the same
            raise ValueError(f"unknown column {table}.{column}")
        out.append(f"{column} = ${i}::jsonb" if kinds[column] == "json" else f"{column} = ${i}")
    return out


class _Ops:
    """The engine's row operations (``engine.RowOps``, as coroutines) on one connection in a transaction.

    The ``lock_*`` reads take row locks (``FOR UPDATE``) held until commit: that is how writers on
    different replicas take turns on a secret, a keyring term or the set of active tokens.
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def lock_secret(self, path: str) -> SecretRecord | None:
        row = await self.conn.fetchrow(f"{_SELECT_SECRET} FOR UPDATE", path)
        return engine.secret_from_row(row, _as_is) if row is not None else None

    async def insert_secret(self, values: Mapping[str, Any]) -> None:
        marks = [a.split(" = ", 1)[1] for a in _assignments("secrets", values, 1)]
        await self.conn.execute(f"INSERT INTO secrets ({', '.join(values)}) "  # noqa: S608 - checked columns
                                f"VALUES ({', '.join(marks)})", *values.values())

    async def update_secret(self, path: str, values: Mapping[str, Any]) -> None:
        sets = ", ".join(_assignments("secrets", values, 2))
        await self.conn.execute(f"UPDATE secrets SET {sets} WHERE path = $1", path, *values.values())  # noqa: S608

    async def lock_versions(self, path: str, versions: Sequence[int]) -> list[tuple[int, str, datetime | None]]:
        found = await self.conn.fetch(
            "SELECT version, state, deleted_at FROM secret_versions "
            "WHERE path = $1 AND version = ANY($2::integer[]) FOR UPDATE",
            path, list(versions),
        )
        return [(r[0], r[1], r[2]) for r in found]

    async def insert_version(self, record: VersionRecord) -> None:
        await self.conn.execute(
            "INSERT INTO secret_versions (path, version, term, nonce, ciphertext, created_at, "
            "created_by, state, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            record.path, record.version, record.term, record.nonce, record.ciphertext,
            record.created_at, record.created_by, record.state.value, record.expires_at,
        )

    async def update_version(self, path: str, version: int, values: Mapping[str, Any]) -> None:
        sets = ", ".join(_assignments("secret_versions", values, 3))
        await self.conn.execute(f"UPDATE secret_versions SET {sets} WHERE path = $1 AND version = $2",  # noqa: S608
                                path, version, *values.values())

    async def prunable_versions(self, path: str, upto: int) -> list[tuple[int, datetime | None]]:
        found = await self.conn.fetch(
            "SELECT version, grace_until FROM secret_versions WHERE path = $1 AND version <= $2", path, upto,
        )
        return [(r[0], r[1]) for r in found]

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        await self.conn.execute("DELETE FROM secret_versions WHERE path = $1 AND version = ANY($2::integer[])",
                                path, list(versions))

    async def count_encryption(self, term: int) -> int | None:
        count = await self.conn.fetchval(
            "UPDATE keyring_terms SET encryptions = encryptions + 1 WHERE term = $1 RETURNING encryptions", term,
        )
        return None if count is None else int(count)

    async def claim_initialized(self, at: datetime) -> bool:
        # ON CONFLICT: of two replicas initialising at once, the second waits on the key, then
        # sees it taken, instead of failing with a bare unique violation.
        claimed = await self.conn.fetchval(
            "INSERT INTO meta (key, value) VALUES ('initialized_at', $1) ON CONFLICT (key) DO NOTHING RETURNING key",
            at.astimezone(UTC).isoformat(),
        )
        return claimed is not None

    async def insert_meta(self, items: Sequence[tuple[str, str]]) -> None:
        await self.conn.executemany("INSERT INTO meta (key, value) VALUES ($1, $2)", items)

    async def insert_term(self, term: KeyringTerm) -> None:
        await self.conn.execute(
            "INSERT INTO keyring_terms (term, wrappings, created_at, encryptions) VALUES ($1, $2::jsonb, $3, $4)",
            term.term, codec.wrappings_to_json(term.wrappings), term.created_at, term.encryptions,
        )

    async def lock_term_wrappings(self, term: int) -> str | None:
        # The row lock orders concurrent re-wraps from several replicas: the second sees the
        # first's wrappings, not the ones it expected, and fails.
        found = await self.conn.fetchval("SELECT wrappings::text FROM keyring_terms WHERE term = $1 FOR UPDATE", term)
        return None if found is None else str(found)

    async def update_term_wrappings(self, term: int, wrappings_json: str) -> None:
        await self.conn.execute("UPDATE keyring_terms SET wrappings = $2::jsonb WHERE term = $1", term, wrappings_json)

    async def insert_token(self, token: TokenRecord) -> None:
        await self.conn.execute(
            "INSERT INTO tokens (token_id, secret_hash, client, policies, created_at, created_by, "
            "expires_at, revoked_at) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8)",
            token.token_id, token.secret_hash, token.client, codec.policies_to_json(token.policies),
            token.created_at, token.created_by, token.expires_at, token.revoked_at,
        )

    async def lock_active_tokens(self) -> list[TokenRecord]:
        # FOR UPDATE locks every unrevoked token row until COMMIT: a concurrent guarded revocation
        # on any replica waits, then re-reads the rows (READ COMMITTED drops the one revoked
        # meanwhile) and judges what is really left.
        found = await self.conn.fetch(
            f"SELECT {_TOKEN_COLS} FROM tokens WHERE revoked_at IS NULL ORDER BY token_id FOR UPDATE",  # noqa: S608
        )
        return [engine.token_from_row(r, _as_is) for r in found]

    async def revoke_token(self, token_id: str, now: datetime) -> bool:
        hit = await self.conn.fetchval(
            "UPDATE tokens SET revoked_at = $2 WHERE token_id = $1 AND revoked_at IS NULL RETURNING 1", token_id, now,
        )
        return hit is not None

    async def notify(self, channel: str, payload: str) -> None:
        # Delivered to listeners when (and only if) the transaction commits.
        # portability: CockroachDB has no LISTEN/NOTIFY; see docs/ha.md.
        await self.conn.execute("SELECT pg_notify($1, $2)", channel, payload)


@dataclass(frozen=True)
class _Target:
    """Where we connect: what messages may show (never the password) and what they must not."""

    dsn: str = field(repr=False)
    description: str
    password: str | None = field(default=None, repr=False)


def _parse_dsn(dsn: str, source: str) -> tuple[str, str | None]:
    """(description, password) of a connection URI; ``ConfigError`` if it is not one."""
    if not dsn.startswith(_SCHEMES):
        raise ConfigError(f"{source} must be a postgresql:// connection URI")
    parts = urlsplit(dsn)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, has_colon, raw_password = userinfo.partition(":")
    query = parse_qs(parts.query, keep_blank_values=True)
    password = unquote(raw_password) if has_colon else None
    if password is None and query.get("password"):
        password = query["password"][0]
    hosts = unquote(hostlist) or ",".join(query.get("host", [])) or "the default host"
    database = unquote(parts.path.lstrip("/")) or ",".join(query.get("dbname", [])) or "the default database"
    who = f"{unquote(user)}@" if user else ""
    return f"PostgreSQL database {database!r} at {who}{hosts}", password


def _int_option(options: Mapping[str, Any], name: str, default: int, minimum: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"storage.{name} must be an integer >= {minimum}, not {value!r}")
    return value


class AdvisoryLeaderLock:
    """A session-level advisory lock on a connection of its own, outside the pool.

    PostgreSQL releases it when that connection ends, so a leader that dies (or is cut off) loses
    leadership without anyone cleaning up. portability: CockroachDB accepts advisory-lock calls
    but does not enforce them; there a lease row would be needed instead (see docs/ha.md).
    """

    def __init__(self, storage: PostgresStorage, name: str) -> None:
        self._storage = storage
        # A stable 63-bit key from the name: the same on every replica.
        self._key = int.from_bytes(hashlib.sha256(f"secretsd:{name}".encode()).digest()[:8], "big") >> 1
        self._conn: asyncpg.Connection | None = None
        self._got = False  # the lock was granted on self._conn

    @property
    def held(self) -> bool:
        return self._got and self._conn is not None and not self._conn.is_closed()

    async def try_acquire(self) -> bool:
        """Take the lock if free; a holder's call also proves its session (and so the lock) is alive.

        A candidate keeps its connection between attempts, so retrying every few seconds does not
        open (and authenticate) a connection each time.
        """
        timeout = self._storage.connect_timeout_ms / 1000
        conn = self._conn
        try:
            if conn is None or conn.is_closed():
                self._got = False
                conn = self._conn = await asyncpg.connect(
                    self._storage._target.dsn, timeout=timeout,
                    server_settings={"application_name": "secretsd-leader"},
                )
            if self._got:
                # A silently partitioned session would keep is_closed() False: ask the server.
                await conn.fetchval("SELECT 1", timeout=timeout)
                return True
            self._got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key, timeout=timeout))
            return self._got
        except (TimeoutError, *self._storage._DRIVER_ERRORS) as exc:
            # Whatever the state of that session, it holds nothing we can count on any more.
            self._got = False
            self._conn = None
            if conn is not None:
                conn.terminate()
            raise self._storage._convert(exc) from exc

    async def release(self) -> None:
        conn, self._conn, self._got = self._conn, None, False
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except (TimeoutError, *self._storage._DRIVER_ERRORS):
                conn.terminate()


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
        description, password = _parse_dsn(dsn, "the storage DSN")
        self._target = _Target(dsn, description, password)
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
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ConfigError(
                f"unknown storage option(s) for postgres: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(OPTIONS))})"
            )
        dsn_option, env_name = options.get("dsn"), options.get("dsn_env")
        if (dsn_option is None) == (env_name is None):
            raise ConfigError("set exactly one of storage.dsn (a URI without password) and storage.dsn_env "
                              "(the name of an environment variable holding the full URI)")
        if dsn_option is not None:
            if not isinstance(dsn_option, str):
                raise ConfigError("storage.dsn must be a string")
            _, password = _parse_dsn(dsn_option, "storage.dsn")
            if password is not None:
                raise ConfigError(
                    "storage.dsn must not contain a password: put the full URI in an environment "
                    "variable and name it in storage.dsn_env, or keep the password in a libpq password "
                    "file (~/.pgpass, PGPASSFILE) or service file (?service=NAME)"
                )
            dsn = dsn_option
        else:
            if not isinstance(env_name, str) or not env_name:
                raise ConfigError("storage.dsn_env must be the name of an environment variable")
            dsn = os.environ.get(env_name, "")
            if not dsn:
                raise ConfigError(f"storage.dsn_env names {env_name}, which is not set or empty")
            _parse_dsn(dsn, f"the environment variable {env_name}")
        return cls(
            dsn,
            pool_min=_int_option(options, "pool_min", DEFAULT_POOL_MIN, 0),
            pool_max=_int_option(options, "pool_max", DEFAULT_POOL_MAX, 1),
            statement_timeout_ms=_int_option(options, "statement_timeout_ms", DEFAULT_STATEMENT_TIMEOUT_MS, 0),
            connect_timeout_ms=_int_option(options, "connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS, 1),
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
            done = {row[0] for row in await conn.fetch("SELECT number FROM schema_migrations")}
            if done and max(done) > len(migrations):
                raise StorageError(
                    f"the {self._target.description} was written by a newer secretsd "
                    f"(schema {max(done)}, this version knows {len(migrations)})"
                )
            for m in migrations:
                if m.number in done:
                    continue
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
        return await self._run(lambda conn: engine.run_async(make(), _Ops(conn)))

    # -- initialisation -----------------------------------------------------------------------
    async def is_initialized(self) -> bool:
        return bool(await self._fetch("SELECT 1 FROM meta WHERE key = 'initialized_at'"))

    async def initialize(
        self, meta: Mapping[str, str], first_term: KeyringTerm, admin_token: TokenRecord
    ) -> None:
        where = self._target.description
        await self._plan(lambda: engine.initialize(meta, first_term, admin_token, datetime.now(UTC), where))

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM meta WHERE key = $1", key)
        return str(rows[0][0]) if rows else None

    async def put_meta(self, key: str, value: str, *, only_if_absent: bool = False) -> bool:
        if only_if_absent:
            sql = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING RETURNING 1"
        else:
            sql = ("INSERT INTO meta (key, value) VALUES ($1, $2) "
                   "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value RETURNING 1")

        async def run(conn: asyncpg.Connection) -> bool:
            return await conn.fetchval(sql, key, value) is not None

        return await self._run(run)

    # -- keyring ------------------------------------------------------------------------------
    async def keyring_terms(self) -> list[KeyringTerm]:
        rows = await self._fetch(
            "SELECT term, wrappings::text, created_at, encryptions FROM keyring_terms ORDER BY term"
        )
        return [
            KeyringTerm(term=r[0], wrappings=codec.wrappings_from_json(r[1]), created_at=r[2], encryptions=r[3])
            for r in rows
        ]

    async def add_keyring_term(self, term: KeyringTerm) -> None:
        await self._plan(lambda: engine.add_keyring_term(term))

    async def replace_keyring_wrappings(
        self, term: int, expected: tuple[WrappedKey, ...], wrappings: tuple[WrappedKey, ...]
    ) -> None:
        if not wrappings:
            raise ValueError("a keyring term needs at least one wrapping")
        await self._plan(lambda: engine.replace_keyring_wrappings(term, expected, wrappings))

    # -- secrets --------------------------------------------------------------------------------
    async def get_secret(self, path: str) -> SecretRecord | None:
        rows = await self._fetch(_SELECT_SECRET, path)
        return engine.secret_from_row(rows[0], _as_is) if rows else None

    async def get_version(self, path: str, version: int | None) -> VersionRecord | None:
        if version is None:
            rows = await self._fetch(_SELECT_CURRENT_VERSION, path)
        else:
            rows = await self._fetch(_SELECT_VERSION, path, version)
        return engine.version_from_row(rows[0], _as_is) if rows else None

    async def read_version(
        self, path: str, *, version: int | None = None, label: str = "current"
    ) -> tuple[SecretRecord, VersionRecord] | None:
        if version is None:
            rows = await self._fetch(_READ_BY_LABEL[engine.label_column(label)], path)
        else:
            rows = await self._fetch(_READ_BY_NUMBER, path, version)
        if not rows:
            return None
        values = list(rows[0].values())
        return engine.secret_from_row(values[:11], _as_is), engine.version_from_row(values[11:], _as_is)

    async def write_version(
        self,
        record: VersionRecord,
        *,
        expected_current: int,
        metadata: Mapping[str, Any] | None,
        max_versions: int,
        grace_until: datetime | None = None,
    ) -> WriteResult:
        if max_versions < 1:
            raise ValueError("max_versions must be at least 1")
        # The row lock (lock_secret: FOR UPDATE) makes concurrent writers of one path, on any
        # replica, take turns; READ COMMITTED then shows each the version its predecessor committed.
        return await self._plan(lambda: engine.write_version(
            record, expected_current=expected_current, metadata=metadata, max_versions=max_versions,
            grace_until=grace_until,
        ))

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
        rows = await self._fetch(
            f"SELECT {_SECRET_COLS} FROM secrets "  # noqa: S608 - constant columns
            "WHERE pending_version IS NOT NULL OR (rotation_due IS NOT NULL AND rotation_due <= $1) "
            "ORDER BY rotation_due NULLS FIRST, path LIMIT $2",
            now, limit,
        )
        return [engine.secret_from_row(r, _as_is) for r in rows]

    async def list_secrets(self, prefix: str, *, after: str = "", limit: int = 1000) -> list[SecretRecord]:
        low, high = codec.prefix_bounds(prefix)
        rows = await self._fetch(
            f"SELECT {_SECRET_COLS} FROM secrets "  # noqa: S608 - constant columns
            "WHERE ((path >= $1 AND path < $2) OR path = $3) AND path > $4 ORDER BY path LIMIT $5",
            low, high, prefix, after, limit,
        )
        return [engine.secret_from_row(r, _as_is) for r in rows]

    async def count_secrets(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM secrets")
        return int(rows[0][0])

    async def list_versions(self, path: str) -> list[VersionInfo]:
        rows = await self._fetch(
            "SELECT path, version, created_at, created_by, state, deleted_at, expires_at, grace_until "
            "FROM secret_versions WHERE path = $1 ORDER BY version",
            path,
        )
        return [
            VersionInfo(path=r[0], version=r[1], created_at=r[2], created_by=r[3], state=VersionState(r[4]),
                        deleted_at=r[5], expires_at=r[6], grace_until=r[7])
            for r in rows
        ]

    async def set_version_state(
        self, path: str, versions: Sequence[int], state: VersionState, now: datetime
    ) -> list[int]:
        return await self._plan(lambda: engine.set_version_state(path, versions, state, now))

    # -- tokens -------------------------------------------------------------------------------
    async def create_token(self, token: TokenRecord) -> None:
        await self._plan(lambda: engine.create_token(token))

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = await self._fetch(f"SELECT {_TOKEN_COLS} FROM tokens WHERE token_id = $1", token_id)  # noqa: S608
        return engine.token_from_row(rows[0], _as_is) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._fetch(f"SELECT {_TOKEN_COLS} FROM tokens ORDER BY created_at, token_id")  # noqa: S608
        return [engine.token_from_row(r, _as_is) for r in rows]

    async def revoke_token(self, token_id: str, now: datetime, *, guard: RevokeGuard | None = None) -> bool:
        return await self._plan(lambda: engine.revoke_token(token_id, now, guard))

    # -- change feed (LISTEN/NOTIFY) ------------------------------------------------------------
    async def subscribe(
        self, channels: Sequence[str], callback: Callable[[str, str], None]
    ) -> ChangeSubscription:
        """LISTEN on a dedicated connection outside the pool; see ``secretsd.replication``."""
        return await _Subscription.open(self, channels, callback)

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
        if table not in rows.COLUMN_KINDS:
            raise ValueError(f"unknown table {table!r}")
        pool = self._require_pool()
        # Keys compare bytewise (COLLATE "C"), the order SQLite's BINARY collation gives too.
        keys = rows.key_columns(table)
        order = ", ".join(f'{k} COLLATE "C"' if rows.kind(table, k) == "text" else k for k in keys)
        try:
            async with pool.acquire(timeout=self.connect_timeout_ms / 1000) as conn:
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
                    if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):  # noqa: S608
                        raise AlreadyInitializedError(
                            f"the store {self._target.description} is not empty (table {table} has rows); "
                            "nothing was changed"
                        )
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


class _Subscription:
    """LISTEN on a connection of its own: notifications must not depend on pool traffic."""

    def __init__(self, storage: PostgresStorage, conn: asyncpg.Connection) -> None:
        self._storage = storage
        self._conn = conn

    @classmethod
    async def open(
        cls, storage: PostgresStorage, channels: Sequence[str], callback: Callable[[str, str], None]
    ) -> _Subscription:
        def relay(_conn: object, _pid: int, channel: str, payload: str) -> None:
            callback(channel, payload)

        try:
            conn = await asyncpg.connect(storage._target.dsn, timeout=storage.connect_timeout_ms / 1000,
                                         server_settings={"application_name": "secretsd-listen"})
        except storage._DRIVER_ERRORS as exc:
            raise storage._convert(exc) from exc
        try:
            for channel in channels:
                await conn.add_listener(channel, relay)
        except storage._DRIVER_ERRORS as exc:
            conn.terminate()
            raise storage._convert(exc) from exc
        return cls(storage, conn)

    async def ping(self) -> None:
        if self._conn.is_closed():
            raise StorageUnavailableError(f"{self._storage.description}: the notification connection was lost")
        try:
            # Also proves the server still answers: a silent network partition leaves is_closed() False.
            await self._conn.fetchval("SELECT 1", timeout=self._storage.connect_timeout_ms / 1000)
        except (TimeoutError, *self._storage._DRIVER_ERRORS) as exc:
            self._conn.terminate()
            raise self._storage._convert(exc) from exc

    async def close(self) -> None:
        if not self._conn.is_closed():
            try:
                await self._conn.close(timeout=2)
            except (TimeoutError, *self._storage._DRIVER_ERRORS):
                self._conn.terminate()


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
