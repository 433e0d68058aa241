"""The embedded SQLite backend: WAL journal, ``synchronous=FULL``, numbered migrations.

Writes run on one dedicated thread with its own connection, so an fsync never blocks the event
loop and writes are serialised without a lock. Point reads run inline on the event loop through a
second connection: in WAL mode a reader never waits for the writer, and an indexed lookup costs a
few microseconds, far less than a hop to a thread.
"""

from __future__ import annotations

import asyncio
import fcntl
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
    AlreadyInitializedError,
    ConfigError,
    ConflictError,
    StorageError,
    StorageUnavailableError,
)
from secretsd.storage import codec
from secretsd.storage import rows as rowcodec
from secretsd.storage.base import (
    ExportRow,
    KeyringTerm,
    RevokeGuard,
    RotationStatus,
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
_SECRET_COLS = ("path, current_version, created_at, updated_at, metadata, latest_version, "  # noqa: S105
                "previous_version, pending_version, rotation, rotation_due, rotation_status")
_VERSION_COLS = ("v.path, v.version, v.created_at, v.created_by, v.state, v.deleted_at, v.term, v.nonce, "
                 "v.ciphertext, v.expires_at, v.grace_until")
_LABELS = ("current", "previous", "pending")
_SELECT_SECRET = f"SELECT {_SECRET_COLS} FROM secrets WHERE path = ?"  # noqa: S608 - constant columns


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
        unknown = sorted(set(options) - {"path"})
        if unknown:
            raise ConfigError(f"storage: unknown option(s) for the sqlite backend: {', '.join(unknown)}")
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
            latest_version=row[5], previous_version=row[6], pending_version=row[7],
            rotation=codec.metadata_from_json(row[8]) if row[8] is not None else None,
            rotation_due=_dt(row[9]), rotation_status=RotationStatus.of(codec.metadata_from_json(row[10])),
        )

    @staticmethod
    def _version_record(r: Sequence[Any]) -> VersionRecord:
        return VersionRecord(
            path=r[0], version=r[1], created_at=_req_dt(r[2]), created_by=r[3],
            state=VersionState(r[4]), deleted_at=_dt(r[5]), term=r[6], nonce=bytes(r[7]),
            ciphertext=bytes(r[8]), expires_at=_dt(r[9]), grace_until=_dt(r[10]),
        )

    async def get_secret(self, path: str) -> SecretRecord | None:
        rows = self._query(
            _SELECT_SECRET,
            (path,),
        )
        return self._secret(rows[0]) if rows else None

    async def get_version(self, path: str, version: int | None) -> VersionRecord | None:
        cols = _VERSION_COLS
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
        return self._version_record(rows[0]) if rows else None

    async def read_version(
        self, path: str, *, version: int | None = None, label: str = "current"
    ) -> tuple[SecretRecord, VersionRecord] | None:
        if version is None and label not in _LABELS:
            raise ValueError(f"unknown label {label!r}")
        scols = ", ".join(f"s.{c.strip()}" for c in _SECRET_COLS.split(","))
        rows = self._query(
            f"SELECT {scols}, {_VERSION_COLS} FROM secrets s JOIN secret_versions v "  # noqa: S608 - constants
            "ON v.path = s.path AND v.version = CASE WHEN ? IS NOT NULL THEN ? WHEN ? = 'previous' "
            "THEN s.previous_version WHEN ? = 'pending' THEN s.pending_version ELSE s.current_version END "
            "WHERE s.path = ?",
            (version, version, label, label, path),
        )
        if not rows:
            return None
        return self._secret(rows[0][:11]), self._version_record(rows[0][11:])

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

        def run(conn: sqlite3.Connection) -> WriteResult:
            row = conn.execute(
                _SELECT_SECRET,
                (record.path,),
            ).fetchone()
            current = row[1] if row else 0
            latest = row[5] if row else 0
            if current != expected_current or record.version != latest + 1:
                raise ConflictError(
                    f"check-and-set failed: current version of {record.path} is {current}, "
                    f"expected {expected_current}"
                )
            created = _ts(record.created_at)
            meta_json = codec.metadata_to_json(metadata) if metadata is not None else None
            if row is None:
                conn.execute(
                    "INSERT INTO secrets (path, current_version, created_at, updated_at, metadata, "
                    "latest_version) VALUES (?, ?, ?, ?, ?, ?)",
                    (record.path, record.version, created, created, meta_json or "{}", record.version),
                )
            else:
                conn.execute(
                    "UPDATE secrets SET current_version = ?, updated_at = ?, latest_version = ?, "
                    "previous_version = ?, metadata = COALESCE(?, metadata) WHERE path = ?",
                    (record.version, created, record.version, current, meta_json, record.path),
                )
                if grace_until is not None:
                    conn.execute("UPDATE secret_versions SET grace_until = ? WHERE path = ? AND version = ?",
                                 (_ts(grace_until), record.path, current))
            self._insert_version(conn, record)
            self._prune(conn, record.path, record.version - max_versions, created)
            count = self._count_encryption(conn, record.term)
            out = conn.execute(
                _SELECT_SECRET,
                (record.path,),
            ).fetchone()
            return WriteResult(self._secret(out), count)

        return await self._write(run)

    @staticmethod
    def _insert_version(conn: sqlite3.Connection, record: VersionRecord) -> None:
        conn.execute(
            "INSERT INTO secret_versions (path, version, term, nonce, ciphertext, created_at, "
            "created_by, state, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.path, record.version, record.term, record.nonce, record.ciphertext,
             _ts(record.created_at), record.created_by, record.state.value,
             _ts(record.expires_at) if record.expires_at else None),
        )

    @staticmethod
    def _prune(conn: sqlite3.Connection, path: str, upto: int, now: str) -> None:
        """Drop versions numbered <= ``upto``, but never a labelled one or one still in grace."""
        conn.execute(
            "DELETE FROM secret_versions WHERE path = ? AND version <= ? "
            "AND version NOT IN (SELECT COALESCE(previous_version, 0) FROM secrets WHERE path = ? "
            "UNION SELECT COALESCE(pending_version, 0) FROM secrets WHERE path = ?) "
            "AND (grace_until IS NULL OR grace_until <= ?)",
            (path, upto, path, path, now),
        )

    @staticmethod
    def _count_encryption(conn: sqlite3.Connection, term: int) -> int:
        count = conn.execute(
            "UPDATE keyring_terms SET encryptions = encryptions + 1 WHERE term = ? RETURNING encryptions",
            (term,),
        ).fetchone()
        if count is None:
            raise ConflictError(f"keyring term {term} does not exist")
        return int(count[0])

    async def create_pending(self, record: VersionRecord, *, expected_current: int) -> WriteResult:
        def run(conn: sqlite3.Connection) -> WriteResult:
            row = conn.execute(_SELECT_SECRET, (record.path,)).fetchone()
            if row is None or row[1] != expected_current or row[7] is not None or record.version != row[5] + 1:
                raise ConflictError(f"{record.path} changed, or a rotation of it is in progress")
            conn.execute("UPDATE secrets SET pending_version = ?, latest_version = ? WHERE path = ?",
                         (record.version, record.version, record.path))
            self._insert_version(conn, record)
            count = self._count_encryption(conn, record.term)
            out = conn.execute(_SELECT_SECRET, (record.path,)).fetchone()
            return WriteResult(self._secret(out), count)

        return await self._write(run)

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
        def run(conn: sqlite3.Connection) -> SecretRecord:
            row = conn.execute(
                "SELECT s.current_version FROM secrets s JOIN secret_versions v ON v.path = s.path "
                "AND v.version = s.pending_version WHERE s.path = ? AND s.pending_version = ? "
                "AND v.state = 'active'",
                (path, version),
            ).fetchone()
            if row is None or row[0] != expected_current:
                raise ConflictError(f"{path} changed while it was being rotated")
            conn.execute(
                "UPDATE secrets SET current_version = ?, previous_version = ?, pending_version = NULL, "
                "updated_at = ?, rotation_due = ?, rotation_status = ? WHERE path = ?",
                (version, expected_current, _ts(now), _ts(rotation_due) if rotation_due else None,
                 codec.metadata_to_json(rotation_status), path),
            )
            conn.execute("UPDATE secret_versions SET grace_until = ? WHERE path = ? AND version = ?",
                         (_ts(grace_until) if grace_until else None, path, expected_current))
            self._prune(conn, path, version - max_versions, _ts(now))
            out = conn.execute(_SELECT_SECRET, (path,)).fetchone()
            return self._secret(out)

        return await self._write(run)

    async def discard_pending(
        self,
        path: str,
        version: int,
        *,
        now: datetime,
        rotation_due: datetime | None,
        rotation_status: RotationStatus,
    ) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE secrets SET pending_version = NULL, rotation_due = ?, rotation_status = ? "
                "WHERE path = ? AND pending_version = ?",
                (_ts(rotation_due) if rotation_due else None, codec.metadata_to_json(rotation_status),
                 path, version),
            )
            if cur.rowcount != 1:
                return False
            conn.execute(
                "UPDATE secret_versions SET state = 'destroyed', nonce = x'', ciphertext = x'', "
                "deleted_at = COALESCE(deleted_at, ?) WHERE path = ? AND version = ?",
                (_ts(now), path, version),
            )
            return True

        return await self._write(run)

    async def set_rotation(
        self, path: str, policy: Mapping[str, Any] | None, rotation_due: datetime | None
    ) -> SecretRecord | None:
        def run(conn: sqlite3.Connection) -> SecretRecord | None:
            conn.execute(
                "UPDATE secrets SET rotation = ?, rotation_due = ? WHERE path = ?",
                (codec.metadata_to_json(policy) if policy is not None else None,
                 _ts(rotation_due) if rotation_due else None, path),
            )
            out = conn.execute(_SELECT_SECRET, (path,)).fetchone()
            return self._secret(out) if out else None

        return await self._write(run)

    async def record_rotation(
        self, path: str, rotation_due: datetime | None, rotation_status: RotationStatus
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE secrets SET rotation_due = ?, rotation_status = ? WHERE path = ?",
                (_ts(rotation_due) if rotation_due else None, codec.metadata_to_json(rotation_status), path),
            )

        await self._write(run)

    async def rotation_candidates(self, now: datetime, *, limit: int = 100) -> list[SecretRecord]:
        rows = self._query(
            f"SELECT {_SECRET_COLS} FROM secrets WHERE pending_version IS NOT NULL "  # noqa: S608 - constants
            f"UNION SELECT {_SECRET_COLS} FROM secrets WHERE rotation_due IS NOT NULL AND rotation_due <= ? "
            "ORDER BY rotation_due, path LIMIT ?",
            (_ts(now), limit),
        )
        return [self._secret(r) for r in rows]

    async def list_secrets(self, prefix: str, *, after: str = "", limit: int = 1000) -> list[SecretRecord]:
        low, high = codec.prefix_bounds(prefix)
        rows = self._query(
            f"SELECT {_SECRET_COLS} FROM secrets "  # noqa: S608 - constant columns
            "WHERE ((path >= ? AND path < ?) OR path = ?) AND path > ? ORDER BY path LIMIT ?",
            (low, high, prefix, after, limit),
        )
        return [self._secret(r) for r in rows]

    async def count_secrets(self) -> int:
        return int(self._query("SELECT count(*) FROM secrets")[0][0])

    async def list_versions(self, path: str) -> list[VersionInfo]:
        rows = self._query(
            "SELECT path, version, created_at, created_by, state, deleted_at, expires_at, grace_until "
            "FROM secret_versions WHERE path = ? ORDER BY version",
            (path,),
        )
        return [
            VersionInfo(path=r[0], version=r[1], created_at=_req_dt(r[2]), created_by=r[3],
                        state=VersionState(r[4]), deleted_at=_dt(r[5]), expires_at=_dt(r[6]),
                        grace_until=_dt(r[7]))
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

    async def revoke_token(self, token_id: str, now: datetime, *, guard: RevokeGuard | None = None) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            # BEGIN IMMEDIATE holds the database's write lock from here to COMMIT: the guard's
            # view cannot change under it, in this process or another one on the same file.
            if guard is not None:
                rows = conn.execute(
                    f"SELECT {self._TOKEN_COLS} FROM tokens WHERE revoked_at IS NULL",  # noqa: S608
                ).fetchall()
                found = [self._token(r) for r in rows]
                target = next((t for t in found if t.token_id == token_id), None)
                if target is None:
                    return False
                guard(target, [t for t in found if t.token_id != token_id], now)
            cur = conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (_ts(now), token_id),
            )
            return cur.rowcount == 1

        return await self._write(run)

    # -- copying a whole store ----------------------------------------------------------------
    def _copy_columns(self, conn: sqlite3.Connection, table: str) -> list[str]:
        found = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        return rowcodec.copy_columns(table, found, f"SQLite database {self.path}")

    async def count_rows(self, table: str) -> int:
        if table not in rowcodec.COLUMN_KINDS:
            raise ValueError(f"unknown table {table!r}")
        return int(self._query(f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608 - a known table name

    async def export_rows(self, table: str, *, batch_size: int = 500) -> AsyncIterator[list[ExportRow]]:
        if table not in rowcodec.COLUMN_KINDS:
            raise ValueError(f"unknown table {table!r}")
        try:
            columns = self._copy_columns(self._read(), table)
        except sqlite3.Error as exc:
            raise self._convert(exc) from exc
        keys = rowcodec.key_columns(table)
        order = ", ".join(keys)  # BINARY collation: bytewise, like PostgreSQL's COLLATE "C"
        after: list[Any] | None = None
        while True:
            if after is None:
                sql = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order} LIMIT ?"  # noqa: S608
                found = self._query(sql, (batch_size,))
            else:
                marks = ", ".join("?" for _ in keys)
                sql = (f"SELECT {', '.join(columns)} FROM {table} WHERE ({order}) > ({marks}) "  # noqa: S608
                       f"ORDER BY {order} LIMIT ?")
                found = self._query(sql, (*after, batch_size))
            if not found:
                return
            batch = [self._decode_row(table, columns, r) for r in found]
            last = found[-1]
            after = [last[columns.index(k)] for k in keys]
            yield batch
            await asyncio.sleep(0)  # reads run on the event loop: let it breathe between batches

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
                if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():  # noqa: S608
                    raise AlreadyInitializedError(
                        f"the store {self.path} is not empty (table {table} has rows); nothing was changed"
                    )
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
