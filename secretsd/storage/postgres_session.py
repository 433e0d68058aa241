"""The PostgreSQL dialect's connections outside the pool: the leader lock and the change feed.

Each holds a connection of its own, so neither depends on pool traffic, and a holder that dies
loses its lock (or its subscription) with its connection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import asyncpg

from secretsd.errors import StorageUnavailableError

if TYPE_CHECKING:
    from secretsd.storage.postgres import PostgresStorage


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


class Subscription:
    """LISTEN on a connection of its own: notifications must not depend on pool traffic."""

    def __init__(self, storage: PostgresStorage, conn: asyncpg.Connection) -> None:
        self._storage = storage
        self._conn = conn

    @classmethod
    async def open(
        cls, storage: PostgresStorage, channels: Sequence[str], callback: Callable[[str, str], None]
    ) -> Subscription:
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
