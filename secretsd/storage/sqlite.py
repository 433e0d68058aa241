"""The embedded SQLite dialect: WAL journal, ``synchronous=FULL``, numbered migrations.

The store's rules live in ``secretsd.storage.engine``; this module holds the SQL, the
connections, the writer thread and its transactions (``_Ops`` runs the engine's row operations).

Writes run on one dedicated thread with its own connection, so an fsync never blocks the event
loop and writes are serialised without a lock. Point reads run inline on the event loop through a
second connection: in WAL mode a reader never waits for the writer, and an indexed lookup costs a
few microseconds, far less than a hop to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import sqlite3
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from keyproviders import WrappedKey
from secretsd.errors import (
    ConfigError,
    ConflictError,
    StorageError,
    StorageUnavailableError,
)
from secretsd.storage import codec, engine, queries
from secretsd.storage import rows as rowcodec
from secretsd.storage.base import (
    BatchWrite,
    ExportRow,
    KeyringTerm,
    RevokeGuard,
    RotationStatus,
    Seal,
    SecretRecord,
    StoreSnapshot,
    TokenRecord,
    VersionInfo,
    VersionRecord,
    VersionState,
    WriteResult,
)
from secretsd.storage.migrations import load_migrations, pending_migrations
from secretsd.storage.sqlite_writer import GroupCommitWriter

T = TypeVar("T")
DEFAULT_FILENAME = "secretsd.db"
_TOKEN_COLS = ", ".join(engine.TOKEN_COLUMNS)
#: The reads (secretsd.storage.queries), rendered once for SQLite.
_SQL = queries.Statements.render(queries.SQLITE)
_SPLIT = queries.SECRET_WIDTH


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _connect(path: Path, busy_ms: int) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write transaction takes the
    # write lock up front instead of failing half-way on upgrade.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit that returned survives power loss and kill -9 (invariant 4).
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    # Destroyed versions must not linger in free pages: overwrite deleted content with zeros.
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    return conn


class FileLeaderLock:
    """flock(2) on a file beside the database: the processes (workers) on one host that share it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    async def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the lock


def _param(value: Any) -> Any:
    return _ts(value) if isinstance(value, datetime) else value


def _assignments(table: str, values: Mapping[str, Any]) -> str:
    # Column names come from the engine, never from a caller; refuse anything else all the same.
    for column in values:
        if column not in rowcodec.COLUMN_KINDS[table][1]:
            raise ValueError(f"unknown column {table}.{column}")
    return ", ".join(f"{column} = ?" for column in values)


@functools.lru_cache(maxsize=16)
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """An INSERT of ``columns``, built (and its column names checked) once per column set."""
    _assignments(table, dict.fromkeys(columns))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"  # noqa: S608


class _Ops:
    """The engine's row operations (``engine.RowOps``) on the writer connection, inside BEGIN IMMEDIATE.

    No locking reads: BEGIN IMMEDIATE already holds the database's only write lock until COMMIT.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def lock_secret(self, path: str) -> SecretRecord | None:
        row = self.conn.execute(_SQL.lock_secret, (path,)).fetchone()
        return engine.secret_from_row(row, _dt) if row else None

    def insert_secret(self, values: Mapping[str, Any]) -> None:
        self.conn.execute(_insert_sql("secrets", tuple(values)), [_param(v) for v in values.values()])

    def update_secret(self, path: str, values: Mapping[str, Any]) -> None:
        self.conn.execute(f"UPDATE secrets SET {_assignments('secrets', values)} WHERE path = ?",  # noqa: S608
                          [*map(_param, values.values()), path])

    def lock_versions(self, path: str, versions: Sequence[int]) -> list[tuple[int, str, datetime | None]]:
        marks = ", ".join("?" for _ in versions)
        rows = self.conn.execute(
            f"SELECT version, state, deleted_at FROM secret_versions WHERE path = ? AND version IN ({marks})",  # noqa: S608
            (path, *versions),
        ).fetchall()
        return [(r[0], r[1], _dt(r[2])) for r in rows]

    def insert_version(self, record: VersionRecord) -> None:
        self.conn.execute(
            "INSERT INTO secret_versions (path, version, term, nonce, ciphertext, created_at, "
            "created_by, state, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.path, record.version, record.term, record.nonce, record.ciphertext,
             _ts(record.created_at), record.created_by, record.state.value,
             _ts(record.expires_at) if record.expires_at else None),
        )

    def update_version(self, path: str, version: int, values: Mapping[str, Any]) -> None:
        self.conn.execute(
            f"UPDATE secret_versions SET {_assignments('secret_versions', values)} "  # noqa: S608
            "WHERE path = ? AND version = ?",
            [*map(_param, values.values()), path, version],
        )

    def prunable_versions(self, path: str, upto: int) -> list[tuple[int, datetime | None]]:
        rows = self.conn.execute(_SQL.prunable_versions, (path, upto)).fetchall()
        return [(r[0], _dt(r[1])) for r in rows]

    def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        self.conn.executemany("DELETE FROM secret_versions WHERE path = ? AND version = ?",
                              [(path, v) for v in versions])

    def count_encryption(self, term: int, n: int) -> int | None:
        row = self.conn.execute(_SQL.count_encryption, (term, n)).fetchone()
        return None if row is None else int(row[0])

    def claim_initialized(self, at: datetime) -> bool:
        return bool(self.conn.execute(_SQL.put_meta_if_absent, (queries.INITIALIZED_AT, _ts(at))).fetchall())

    def insert_meta(self, items: Sequence[tuple[str, str]]) -> None:
        self.conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", items)

    def insert_term(self, term: KeyringTerm) -> None:
        self.conn.execute(
            "INSERT INTO keyring_terms (term, wrappings, created_at, encryptions) VALUES (?, ?, ?, ?)",
            (term.term, codec.wrappings_to_json(term.wrappings), _ts(term.created_at), term.encryptions),
        )

    def lock_term_wrappings(self, term: int) -> str | None:
        row = self.conn.execute(_SQL.lock_term_wrappings, (term,)).fetchone()
        return None if row is None else str(row[0])

    def update_term_wrappings(self, term: int, wrappings_json: str) -> None:
        self.conn.execute("UPDATE keyring_terms SET wrappings = ? WHERE term = ?", (wrappings_json, term))

    def insert_token(self, token: TokenRecord) -> None:
        self.conn.execute(
            f"INSERT INTO tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant columns
            (token.token_id, token.secret_hash, token.client, codec.policies_to_json(token.policies),
             _ts(token.created_at), token.created_by,
             _ts(token.expires_at) if token.expires_at else None,
             _ts(token.revoked_at) if token.revoked_at else None,
             token.ttl_seconds, _ts(token.max_expires_at) if token.max_expires_at else None),
        )

    def lock_active_tokens(self, token_id: str, now: datetime) -> list[TokenRecord]:
        rows = self.conn.execute(_SQL.lock_active_tokens, (token_id, _ts(now))).fetchall()
        return [engine.token_from_row(r, _dt) for r in rows]

    def lock_purgeable_tokens(self, cutoff: datetime, limit: int) -> list[TokenRecord]:
        rows = self.conn.execute(_SQL.lock_purgeable_tokens, (_ts(cutoff), limit)).fetchall()
        return [engine.token_from_row(r, _dt) for r in rows]

    def delete_tokens(self, token_ids: Sequence[str]) -> None:
        self.conn.executemany("DELETE FROM tokens WHERE token_id = ?", [(t,) for t in token_ids])

    def revoke_token(self, token_id: str, now: datetime) -> bool:
        return bool(self.conn.execute(_SQL.revoke_token, (token_id, _ts(now))).fetchall())

    def renew_token(self, token_id: str, expires_at: datetime, now: datetime) -> bool:
        return bool(self.conn.execute(_SQL.renew_token, (token_id, _ts(expires_at), _ts(now))).fetchall())

    def notify(self, channel: str, payload: str) -> None:
        """No change feed on one host: other workers poll (``secretsd.runtime.replication``)."""

    # A batch item's own savepoint, inside the one the group commit gives the whole batch.
    def savepoint(self) -> None:
        self.conn.execute("SAVEPOINT batch_item")

    def release_savepoint(self) -> None:
        self.conn.execute("RELEASE batch_item")

    def rollback_savepoint(self) -> None:
        self.conn.execute("ROLLBACK TO batch_item")
        self.conn.execute("RELEASE batch_item")


class SQLiteStorage:
    """``Storage`` on one SQLite database file."""

    backend: ClassVar[str] = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._writes: GroupCommitWriter | None = None  # the writer connection's group commit

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, data_dir: Path) -> SQLiteStorage:
        unknown = sorted(set(options) - {"path"})
        if unknown:
            raise ConfigError(f"storage: unknown option(s) for the sqlite backend: {', '.join(unknown)}")
        raw = options.get("path") or DEFAULT_FILENAME
        path = Path(str(raw))
        return cls(path if path.is_absolute() else data_dir / path)

    # -- plumbing -------------------------------------------------------------------------------
    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writes is None:
            raise StorageUnavailableError("the SQLite store is not open")
        try:
            return await self._writes.run(fn)
        except sqlite3.Error as exc:
            raise self._convert(exc) from exc

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StorageUnavailableError("the SQLite store is not open")
        return self._reader

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._read().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._convert(exc) from exc

    def _convert(self, exc: sqlite3.Error) -> StorageError:
        if isinstance(exc, sqlite3.IntegrityError):
            return ConflictError("the write conflicts with stored data")
        if isinstance(exc, sqlite3.OperationalError):
            return StorageUnavailableError(f"SQLite database {self.path} is unavailable ({exc})")
        return StorageError(f"SQLite database {self.path} failed ({exc.__class__.__name__})")

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            # Create the file owner-only before SQLite does; its -wal and -shm files copy the mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        loop = asyncio.get_running_loop()
        try:
            self._writer = await loop.run_in_executor(self._executor, _connect, self.path, 10_000)
            self._writes = GroupCommitWriter(self._writer, self._executor)
            # The reader runs on the event loop: in WAL mode it never waits for our writer, and it
            # must not stall the loop for long behind a foreign lock either.
            self._reader = _connect(self.path, 1_000)
        except sqlite3.Error as exc:
            await self.close()
            raise StorageUnavailableError(f"cannot open SQLite database {self.path} ({exc})") from exc
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        migrations = load_migrations("sqlite")

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(number INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            done = [row[0] for row in conn.execute("SELECT number FROM schema_migrations")]
            for m in pending_migrations(migrations, done, f"database {self.path}"):
                for statement in m.statements():
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (m.number, m.name, _ts(datetime.now(UTC))),
                )

        await self._write(run)

    async def close(self) -> None:
        if self._writes is not None:
            self._writes.close()
            self._writes = None
        if self._executor is not None:
            writer = self._writer
            if writer is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, writer.close)
            self._executor.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
        self._writer = self._reader = None
        self._executor = None

    def leader_lock(self, name: str) -> FileLeaderLock:
        return FileLeaderLock(self.path.with_name(f"{self.path.name}.leader-{name}.lock"))

    async def ping(self) -> None:
        self._query("SELECT 1")

    async def _plan(self, plan: engine.Plan[T]) -> T:
        """Run one of the engine's plans in a write transaction on the writer thread."""
        return await self._write(lambda conn: engine.run_sync(plan, _Ops(conn)))

    # -- initialisation -----------------------------------------------------------------------
    async def is_initialized(self) -> bool:
        return bool(self._query(_SQL.is_initialized))

    async def initialize(
        self, meta: Mapping[str, str], first_term: KeyringTerm, admin_token: TokenRecord
    ) -> None:
        await self._plan(engine.initialize(meta, first_term, admin_token, datetime.now(UTC), str(self.path)))

    async def get_meta(self, key: str) -> str | None:
        rows = self._query(_SQL.get_meta, (key,))
        return str(rows[0][0]) if rows else None

    async def put_meta(self, key: str, value: str, *, only_if_absent: bool = False) -> bool:
        statement = _SQL.put_meta_if_absent if only_if_absent else _SQL.put_meta
        return await self._write(lambda conn: bool(conn.execute(statement, (key, value)).fetchall()))

    # -- keyring ------------------------------------------------------------------------------
    async def keyring_terms(self) -> list[KeyringTerm]:
        rows = self._query(_SQL.keyring_terms)
        return [engine.term_from_row(r, _dt) for r in rows]

    async def add_keyring_term(self, term: KeyringTerm) -> None:
        await self._plan(engine.add_keyring_term(term))

    async def replace_keyring_wrappings(
        self, term: int, expected: tuple[WrappedKey, ...], wrappings: tuple[WrappedKey, ...]
    ) -> None:
        await self._plan(engine.replace_keyring_wrappings(term, expected, wrappings))

    # -- secrets --------------------------------------------------------------------------------
    async def get_secret(self, path: str) -> SecretRecord | None:
        rows = self._query(_SQL.get_secret, (path,))
        return engine.secret_from_row(rows[0], _dt) if rows else None

    async def get_version(self, path: str, version: int | None) -> VersionRecord | None:
        if version is None:
            rows = self._query(_SQL.get_current_version, (path,))
        else:
            rows = self._query(_SQL.get_version, (path, version))
        return engine.version_from_row(rows[0], _dt) if rows else None

    async def read_version(
        self, path: str, *, version: int | None = None, label: str = "current"
    ) -> tuple[SecretRecord, VersionRecord] | None:
        if version is None:
            rows = self._query(_SQL.read_by_label[engine.label_column(label)], (path,))
        else:
            rows = self._query(_SQL.read_by_number, (path, version))
        if not rows:
            return None
        return engine.secret_from_row(rows[0][:_SPLIT], _dt), engine.version_from_row(rows[0][_SPLIT:], _dt)

    async def read_current_page(
        self, prefix: str, *, after: str = "", limit: int = 1000,
    ) -> list[tuple[SecretRecord, VersionRecord | None]]:
        low, high = codec.prefix_bounds(prefix)
        rows = self._query(_SQL.read_current_page, (low, high, prefix, after, limit))
        return [(engine.secret_from_row(r[:_SPLIT], _dt),
                 None if r[_SPLIT] is None else engine.version_from_row(r[_SPLIT:], _dt)) for r in rows]

    async def write_version(
        self,
        record: VersionRecord,
        *,
        expected_current: int,
        metadata: Mapping[str, Any] | None,
        max_versions: int,
        grace_until: datetime | None = None,
    ) -> WriteResult:
        return await self._plan(engine.write_version(
            record, expected_current=expected_current, metadata=metadata, max_versions=max_versions,
            grace_until=grace_until,
        ))

    async def write_unconditional(
        self, path: str, seal: Seal, *, metadata: Mapping[str, Any] | None, max_versions: int,
    ) -> WriteResult:
        return await self._plan(engine.write_unconditional(path, seal, metadata=metadata, max_versions=max_versions))

    async def write_batch(
        self, items: Sequence[BatchWrite], *, max_versions: int,
    ) -> list[WriteResult | ConflictError]:
        return await self._plan(engine.write_batch(items, max_versions=max_versions))

    async def create_pending(self, record: VersionRecord, *, expected_current: int) -> WriteResult:
        return await self._plan(engine.create_pending(record, expected_current=expected_current))

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
        return await self._plan(engine.finish_pending(
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
        return await self._plan(engine.discard_pending(
            path, version, now=now, rotation_due=rotation_due, rotation_status=rotation_status,
        ))

    async def set_rotation(
        self, path: str, policy: Mapping[str, Any] | None, rotation_due: datetime | None
    ) -> SecretRecord | None:
        return await self._plan(engine.set_rotation(path, policy, rotation_due))

    async def record_rotation(
        self, path: str, rotation_due: datetime | None, rotation_status: RotationStatus
    ) -> None:
        await self._plan(engine.record_rotation(path, rotation_due, rotation_status))

    async def rotation_candidates(self, now: datetime, *, limit: int = 100) -> list[SecretRecord]:
        rows = self._query(_SQL.rotation_candidates, (_ts(now), limit))
        return [engine.secret_from_row(r, _dt) for r in rows]

    async def list_secrets(self, prefix: str, *, after: str = "", limit: int = 1000) -> list[SecretRecord]:
        low, high = codec.prefix_bounds(prefix)
        rows = self._query(_SQL.list_secrets, (low, high, prefix, after, limit))
        return [engine.secret_from_row(r, _dt) for r in rows]

    async def count_secrets(self) -> int:
        return int(self._query(_SQL.count_secrets)[0][0])

    async def list_versions(self, path: str) -> list[VersionInfo]:
        rows = self._query(_SQL.list_versions, (path,))
        return [engine.version_info_from_row(r, _dt) for r in rows]

    async def set_version_state(
        self, path: str, versions: Sequence[int], state: VersionState, now: datetime
    ) -> list[int]:
        return await self._plan(engine.set_version_state(path, versions, state, now))

    # -- tokens -------------------------------------------------------------------------------
    async def create_token(self, token: TokenRecord) -> None:
        await self._plan(engine.create_token(token))

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._query(_SQL.get_token, (token_id,))
        return engine.token_from_row(rows[0], _dt) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = self._query(_SQL.list_tokens)
        return [engine.token_from_row(r, _dt) for r in rows]

    async def list_tokens_page(self, now: datetime, *, after: str = "", limit: int = 1000,
                               include_expired: bool = False) -> list[TokenRecord]:
        shown_after = engine.EPOCH if include_expired else now
        rows = self._query(_SQL.list_tokens_page, (after, _ts(shown_after), limit))
        return [engine.token_from_row(r, _dt) for r in rows]

    async def purge_tokens(self, cutoff: datetime, now: datetime, *, limit: int = engine.PURGE_BATCH) -> int:
        return await self._plan(engine.purge_tokens(cutoff, now, limit))

    async def renew_token(self, token_id: str, expires_at: datetime, now: datetime) -> bool:
        return await self._plan(engine.renew_token(token_id, expires_at, now))

    async def revoke_token(self, token_id: str, now: datetime, *, guard: RevokeGuard | None = None) -> bool:
        # BEGIN IMMEDIATE holds the database's write lock from here to COMMIT: the guard's view
        # cannot change under it, in this process or another one on the same file.
        return await self._plan(engine.revoke_token(token_id, now, guard))

    # -- copying a whole store ----------------------------------------------------------------
    def _copy_columns(self, conn: sqlite3.Connection, table: str) -> list[str]:
        found = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        return rowcodec.copy_columns(table, found, f"SQLite database {self.path}")

    async def count_rows(self, table: str) -> int:
        return self._count_on(self._read(), table)

    def _count_on(self, conn: sqlite3.Connection, table: str) -> int:
        if table not in rowcodec.COLUMN_KINDS:
            raise ValueError(f"unknown table {table!r}")
        try:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - a known table
        except sqlite3.Error as exc:
            raise self._convert(exc) from exc

    def export_rows(self, table: str, *, batch_size: int = 500) -> AsyncIterator[list[ExportRow]]:
        return self._export_on(self._read(), table, batch_size)

    async def _export_on(self, conn: sqlite3.Connection, table: str, batch_size: int) -> AsyncIterator[list[ExportRow]]:
        if table not in rowcodec.COLUMN_KINDS:
            raise ValueError(f"unknown table {table!r}")

        def query(sql: str, params: Sequence[Any]) -> list[Any]:
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._convert(exc) from exc

        try:
            columns = self._copy_columns(conn, table)
        except sqlite3.Error as exc:
            raise self._convert(exc) from exc
        keys = rowcodec.key_columns(table)
        order = ", ".join(keys)  # BINARY collation: bytewise, like PostgreSQL's COLLATE "C"
        after: list[Any] | None = None
        while True:
            if after is None:
                sql = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order} LIMIT ?"  # noqa: S608
                found = query(sql, (batch_size,))
            else:
                marks = ", ".join("?" for _ in keys)
                sql = (f"SELECT {', '.join(columns)} FROM {table} WHERE ({order}) > ({marks}) "  # noqa: S608
                       f"ORDER BY {order} LIMIT ?")
                found = query(sql, (*after, batch_size))
            if not found:
                return
            batch = [self._decode_row(table, columns, r) for r in found]
            last = found[-1]
            after = [last[columns.index(k)] for k in keys]
            yield batch
            await asyncio.sleep(0)  # reads run on the event loop: let it breathe between batches

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[StoreSnapshot]:
        if self._reader is None:
            raise StorageUnavailableError("the SQLite store is not open")
        # A connection of its own: the shared reader's statements must not join this transaction.
        # In WAL mode the first read fixes what the transaction sees until it ends; writers go on.
        try:
            conn = _connect(self.path, 1_000)
        except sqlite3.Error as exc:
            raise self._convert(exc) from exc
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM meta").fetchone()
            yield _SQLiteSnapshot(self, conn)
        except sqlite3.Error as exc:
            raise self._convert(exc) from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    @staticmethod
    def _decode_row(table: str, columns: list[str], record: Sequence[Any]) -> ExportRow:
        out: ExportRow = {}
        for column, value in zip(columns, record, strict=True):
            if value is not None:
                kind = rowcodec.kind(table, column)
                if kind == "time":
                    value = rowcodec.parse_time(value)
                elif kind == "json":
                    value = json.loads(value)
                elif kind == "bytes":
                    value = bytes(value)
            out[column] = value
        return out

    @staticmethod
    def _encode_row(table: str, columns: list[str], row: ExportRow) -> tuple[Any, ...]:
        values: list[Any] = []
        for column in columns:
            value = row.get(column)
            if value is not None:
                kind = rowcodec.kind(table, column)
                if kind == "time":
                    value = _ts(value)
                elif kind == "json":
                    value = rowcodec.to_json_text(value)
            values.append(value)
        return tuple(values)

    async def import_rows(self, batches: AsyncIterable[tuple[str, Sequence[ExportRow]]]) -> None:
        if self._executor is None or self._writer is None:
            raise StorageUnavailableError("the SQLite store is not open")
        conn, loop, executor = self._writer, asyncio.get_running_loop(), self._executor

        def begin() -> dict[str, list[str]]:
            conn.execute("BEGIN IMMEDIATE")
            columns = {}
            for table in rowcodec.TABLES:
                found = conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()  # noqa: S608
                rowcodec.require_empty(table, found is not None, str(self.path))
                columns[table] = self._copy_columns(conn, table)
            return columns

        def insert(table: str, present: list[str], batch: Sequence[ExportRow]) -> None:
            cols = rowcodec.insert_columns(table, present, batch[0], f"SQLite database {self.path}")
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"  # noqa: S608
            conn.executemany(sql, [self._encode_row(table, cols, r) for r in batch])

        began = False
        try:
            columns = await loop.run_in_executor(executor, begin)
            began = True
            async for table, batch in batches:
                if batch:
                    await loop.run_in_executor(executor, insert, table, columns[table], batch)
            await loop.run_in_executor(executor, conn.execute, "COMMIT")
            began = False
        except sqlite3.Error as exc:
            raise self._convert(exc) from exc
        finally:
            if began or conn.in_transaction:
                await loop.run_in_executor(executor, conn.execute, "ROLLBACK")


class _SQLiteSnapshot:
    """``StoreSnapshot`` over one SQLite read transaction (``SQLiteStorage.snapshot``)."""

    def __init__(self, store: SQLiteStorage, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn

    async def count_rows(self, table: str) -> int:
        return self._store._count_on(self._conn, table)

    def export_rows(self, table: str, *, batch_size: int = 500) -> AsyncIterator[list[ExportRow]]:
        return self._store._export_on(self._conn, table, batch_size)
