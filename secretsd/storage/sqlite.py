"""The embedded SQLite backend: WAL journal, ``synchronous=FULL``, numbered migrations.

Writes run on one dedicated thread with its own connection, so an fsync never blocks the event
loop and writes are serialised without a lock. Point reads run inline on the event loop through a
second connection: in WAL mode a reader never waits for the writer, and an indexed lookup costs a
few microseconds, far less than a hop to a thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from keyproviders import WrappedKey
from secretsd.errors import (
    AlreadyInitializedError,
    ConflictError,
    StorageError,
    StorageUnavailableError,
)
from secretsd.storage import codec
from secretsd.storage.base import (
    KeyringTerm,
    SecretRecord,
    TokenRecord,
    VersionInfo,
    VersionRecord,
    VersionState,
    WriteResult,
)
from secretsd.storage.migrations import load_migrations

T = TypeVar("T")
DEFAULT_FILENAME = "secretsd.db"


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _req_dt(value: str) -> datetime:
    return datetime.fromisoformat(value)


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


class SQLiteStorage:
    """``Storage`` on one SQLite database file."""

    backend: ClassVar[str] = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, data_dir: Path) -> SQLiteStorage:
        raw = options.get("path") or DEFAULT_FILENAME
        path = Path(str(raw))
        return cls(path if path.is_absolute() else data_dir / path)

    # -- plumbing -------------------------------------------------------------------------------
    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None or self._writer is None:
            raise StorageUnavailableError("the SQLite store is not open")
        conn = self._writer

        def run() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
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
            done = {row[0] for row in conn.execute("SELECT number FROM schema_migrations")}
            if done and max(done) > len(migrations):
                raise StorageError(
                    f"the database {self.path} was written by a newer secretsd "
                    f"(schema {max(done)}, this version knows {len(migrations)})"
                )
            for m in migrations:
                if m.number in done:
                    continue
                for statement in m.statements():
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (m.number, m.name, _ts(datetime.now(UTC))),
                )

        await self._write(run)

    async def close(self) -> None:
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

    # -- initialisation -----------------------------------------------------------------------
    async def is_initialized(self) -> bool:
        return bool(self._query("SELECT 1 FROM meta WHERE key = 'initialized_at'"))

    async def initialize(
        self, meta: Mapping[str, str], first_term: KeyringTerm, admin_token: TokenRecord
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM meta WHERE key = 'initialized_at'").fetchone():
                raise AlreadyInitializedError(f"the store {self.path} is already initialised")
            conn.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
            conn.execute(
                "INSERT INTO meta VALUES ('initialized_at', ?)", (_ts(datetime.now(UTC)),)
            )
            self._insert_term(conn, first_term)
            self._insert_token(conn, admin_token)

        await self._write(run)

    async def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def put_meta(self, key: str, value: str, *, only_if_absent: bool = False) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            if only_if_absent:
                cur = conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                                   (key, value))
            else:
                cur = conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
            return cur.rowcount == 1

        return await self._write(run)

    # -- keyring ------------------------------------------------------------------------------
    @staticmethod
    def _insert_term(conn: sqlite3.Connection, term: KeyringTerm) -> None:
        conn.execute(
            "INSERT INTO keyring_terms (term, wrappings, created_at, encryptions) VALUES (?, ?, ?, ?)",
            (term.term, codec.wrappings_to_json(term.wrappings), _ts(term.created_at), term.encryptions),
        )

    async def keyring_terms(self) -> list[KeyringTerm]:
        rows = self._query(
            "SELECT term, wrappings, created_at, encryptions FROM keyring_terms ORDER BY term"
        )
        return [
            KeyringTerm(term=r[0], wrappings=codec.wrappings_from_json(r[1]),
                        created_at=_req_dt(r[2]), encryptions=r[3])
            for r in rows
        ]

    async def add_keyring_term(self, term: KeyringTerm) -> None:
        await self._write(lambda conn: self._insert_term(conn, term))

    async def replace_keyring_wrappings(
        self, term: int, expected: tuple[WrappedKey, ...], wrappings: tuple[WrappedKey, ...]
    ) -> None:
        if not wrappings:
            raise ValueError("a keyring term needs at least one wrapping")

        def run(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT wrappings FROM keyring_terms WHERE term = ?", (term,)).fetchone()
            if row is None or codec.wrappings_from_json(row[0]) != expected:
                raise ConflictError(f"keyring term {term} changed while it was being re-wrapped")
            conn.execute("UPDATE keyring_terms SET wrappings = ? WHERE term = ?",
                         (codec.wrappings_to_json(wrappings), term))

        await self._write(run)

    # -- secrets --------------------------------------------------------------------------------
    @staticmethod
    def _secret(row: Sequence[Any]) -> SecretRecord:
        return SecretRecord(
            path=row[0], current_version=row[1], created_at=_req_dt(row[2]),
            updated_at=_req_dt(row[3]), metadata=codec.metadata_from_json(row[4]),
        )

    async def get_secret(self, path: str) -> SecretRecord | None:
        rows = self._query(
            "SELECT path, current_version, created_at, updated_at, metadata FROM secrets WHERE path = ?",
            (path,),
        )
        return self._secret(rows[0]) if rows else None

    async def get_version(self, path: str, version: int | None) -> VersionRecord | None:
        cols = "v.path, v.version, v.created_at, v.created_by, v.state, v.deleted_at, v.term, v.nonce, v.ciphertext"
        if version is None:
            rows = self._query(
                f"SELECT {cols} FROM secrets s JOIN secret_versions v "  # noqa: S608 - constant columns
                "ON v.path = s.path AND v.version = s.current_version WHERE s.path = ?",
                (path,),
            )
        else:
            rows = self._query(
                f"SELECT {cols} FROM secret_versions v WHERE v.path = ? AND v.version = ?",  # noqa: S608
                (path, version),
            )
        if not rows:
            return None
        r = rows[0]
        return VersionRecord(
            path=r[0], version=r[1], created_at=_req_dt(r[2]), created_by=r[3],
            state=VersionState(r[4]), deleted_at=_dt(r[5]), term=r[6], nonce=bytes(r[7]),
            ciphertext=bytes(r[8]),
        )

    async def write_version(
        self,
        record: VersionRecord,
        *,
        expected_current: int,
        metadata: Mapping[str, Any] | None,
        max_versions: int,
    ) -> WriteResult:
        if max_versions < 1:
            raise ValueError("max_versions must be at least 1")

        def run(conn: sqlite3.Connection) -> WriteResult:
            row = conn.execute(
                "SELECT path, current_version, created_at, updated_at, metadata FROM secrets WHERE path = ?",
                (record.path,),
            ).fetchone()
            current = row[1] if row else 0
            if current != expected_current or record.version != current + 1:
                raise ConflictError(
                    f"check-and-set failed: current version of {record.path} is {current}, "
                    f"expected {expected_current}"
                )
            created = _ts(record.created_at)
            meta_json = codec.metadata_to_json(metadata) if metadata is not None else None
            if row is None:
                conn.execute(
                    "INSERT INTO secrets (path, current_version, created_at, updated_at, metadata) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (record.path, record.version, created, created, meta_json or "{}"),
                )
            else:
                conn.execute(
                    "UPDATE secrets SET current_version = ?, updated_at = ?, "
                    "metadata = COALESCE(?, metadata) WHERE path = ?",
                    (record.version, created, meta_json, record.path),
                )
            conn.execute(
                "INSERT INTO secret_versions (path, version, term, nonce, ciphertext, created_at, "
                "created_by, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.path, record.version, record.term, record.nonce, record.ciphertext,
                 created, record.created_by, record.state.value),
            )
            conn.execute(
                "DELETE FROM secret_versions WHERE path = ? AND version <= ?",
                (record.path, record.version - max_versions),
            )
            count = conn.execute(
                "UPDATE keyring_terms SET encryptions = encryptions + 1 WHERE term = ? "
                "RETURNING encryptions",
                (record.term,),
            ).fetchone()
            if count is None:
                raise ConflictError(f"keyring term {record.term} does not exist")
            out = conn.execute(
                "SELECT path, current_version, created_at, updated_at, metadata FROM secrets WHERE path = ?",
                (record.path,),
            ).fetchone()
            return WriteResult(self._secret(out), int(count[0]))

        return await self._write(run)

    async def list_secrets(self, prefix: str, *, after: str = "", limit: int = 1000) -> list[SecretRecord]:
        low, high = codec.prefix_bounds(prefix)
        rows = self._query(
            "SELECT path, current_version, created_at, updated_at, metadata FROM secrets "
            "WHERE ((path >= ? AND path < ?) OR path = ?) AND path > ? ORDER BY path LIMIT ?",
            (low, high, prefix, after, limit),
        )
        return [self._secret(r) for r in rows]

    async def list_versions(self, path: str) -> list[VersionInfo]:
        rows = self._query(
            "SELECT path, version, created_at, created_by, state, deleted_at FROM secret_versions "
            "WHERE path = ? ORDER BY version",
            (path,),
        )
        return [
            VersionInfo(path=r[0], version=r[1], created_at=_req_dt(r[2]), created_by=r[3],
                        state=VersionState(r[4]), deleted_at=_dt(r[5]))
            for r in rows
        ]

    async def set_version_state(
        self, path: str, versions: Sequence[int], state: VersionState, now: datetime
    ) -> list[int]:
        def run(conn: sqlite3.Connection) -> list[int]:
            changed = []
            for version in sorted(set(versions)):
                if state is VersionState.DESTROYED:
                    cur = conn.execute(
                        "UPDATE secret_versions SET state = 'destroyed', nonce = x'', ciphertext = x'', "
                        "deleted_at = COALESCE(deleted_at, ?) "
                        "WHERE path = ? AND version = ? AND state != 'destroyed'",
                        (_ts(now), path, version),
                    )
                elif state is VersionState.DELETED:
                    cur = conn.execute(
                        "UPDATE secret_versions SET state = 'deleted', deleted_at = ? "
                        "WHERE path = ? AND version = ? AND state = 'active'",
                        (_ts(now), path, version),
                    )
                else:
                    cur = conn.execute(
                        "UPDATE secret_versions SET state = 'active', deleted_at = NULL "
                        "WHERE path = ? AND version = ? AND state = 'deleted'",
                        (path, version),
                    )
                if cur.rowcount:
                    changed.append(version)
            return changed

        return await self._write(run)

    # -- tokens -------------------------------------------------------------------------------
    @staticmethod
    def _insert_token(conn: sqlite3.Connection, token: TokenRecord) -> None:
        conn.execute(
            "INSERT INTO tokens (token_id, secret_hash, client, policies, created_at, created_by, "
            "expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (token.token_id, token.secret_hash, token.client, codec.policies_to_json(token.policies),
             _ts(token.created_at), token.created_by,
             _ts(token.expires_at) if token.expires_at else None,
             _ts(token.revoked_at) if token.revoked_at else None),
        )

    @staticmethod
    def _token(r: Sequence[Any]) -> TokenRecord:
        return TokenRecord(
            token_id=r[0], secret_hash=bytes(r[1]), client=r[2],
            policies=codec.policies_from_json(r[3]), created_at=_req_dt(r[4]), created_by=r[5],
            expires_at=_dt(r[6]), revoked_at=_dt(r[7]),
        )

    _TOKEN_COLS = "token_id, secret_hash, client, policies, created_at, created_by, expires_at, revoked_at"  # noqa: S105

    async def create_token(self, token: TokenRecord) -> None:
        await self._write(lambda conn: self._insert_token(conn, token))

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._query(f"SELECT {self._TOKEN_COLS} FROM tokens WHERE token_id = ?", (token_id,))  # noqa: S608
        return self._token(rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = self._query(f"SELECT {self._TOKEN_COLS} FROM tokens ORDER BY created_at, token_id")  # noqa: S608
        return [self._token(r) for r in rows]

    async def revoke_token(self, token_id: str, now: datetime) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (_ts(now), token_id),
            )
            return cur.rowcount == 1

        return await self._write(run)
