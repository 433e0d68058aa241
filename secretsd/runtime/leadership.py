"""Leadership for singleton work (the rotation scheduler, cleanup) among replicas sharing a store.

One ``Leadership`` per name and process keeps trying to take ``storage.leader_lock(name)`` (a
PostgreSQL session advisory lock; a flock beside an SQLite file). The holder re-checks its hold at
the same interval: a lost session (database restart, network cut) means lost leadership. When a
leader dies, its session ends, the database frees the lock, and another replica takes over at its
next attempt: failover within ``retry_seconds`` of the database noticing (at once after a crash or
kill -9, whose socket the kernel closes; after TCP keepalive for a vanished host, see docs/ha.md).

Usage by singleton work::

    if daemon.leadership.is_leader:
        await run_one_scheduler_pass()

or ``await leadership.wait_until_leader()``. Leadership is advisory: between the database freeing a
lost session's lock and the old holder noticing, two processes may briefly both believe they lead,
so singleton work must still write through the storage's check-and-set (as everything does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from secretsd.errors import SecretsdError
from secretsd.storage import Storage
from secretsd.storage.base import SCHEDULER_LOCK

log = logging.getLogger("secretsd.runtime.leadership")

DEFAULT_NAME = SCHEDULER_LOCK


class Leadership:
    def __init__(self, storage: Storage, name: str = DEFAULT_NAME, *, retry_seconds: float = 2.0) -> None:
        self.name = name
        self._lock = storage.leader_lock(name)
        self._retry = retry_seconds
        self._leader = False
        self._became_leader = asyncio.Event()
        self._listeners: list[Callable[[bool], None]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(is_leader)`` on the event loop whenever leadership is gained or lost."""
        self._listeners.append(callback)

    async def wait_until_leader(self) -> None:
        await self._became_leader.wait()

    def _set(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            self._became_leader.set()
            log.info("became the leader for %s", self.name)
        else:
            self._became_leader.clear()
            if self._task is None:
                log.info("handed over leadership for %s", self.name)
            else:
                log.warning("no longer the leader for %s", self.name)
        for callback in list(self._listeners):
            try:
                callback(leader)
            except Exception:  # a listener's bug must not stop leadership tracking
                log.exception("leadership listener failed")

    async def attempt(self) -> bool:
        """One attempt: take (or, when held, re-check) the lock. True if this process leads now."""
        try:
            held = await self._lock.try_acquire()
        except SecretsdError as exc:
            if self._leader:
                log.warning("leadership check for %s failed: %s", self.name, exc)
            held = False
        self._set(held)
        return held

    async def run(self) -> None:
        while True:
            await self.attempt()
            await asyncio.sleep(self._retry)

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"leadership-{self.name}")
        return self._task

    async def stop(self) -> None:
        """Stop trying, and hand leadership over at once (the next candidate takes it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(SecretsdError, OSError):
            await self._lock.release()
        self._set(False)
