"""The rotation scheduler: inside every daemon, working only while it holds the leader lock.

Each tick (``[rotation] tick_seconds``) it asks the daemon's ``Leadership``
(``secretsd.runtime.leadership``), which keeps trying the storage leader lock ``scheduler`` without
waiting (a flock beside a SQLite database, an advisory lock on PostgreSQL) and re-checks its
hold; the scheduler never touches the lock itself (one lock object, one task using it). The holder finishes or
discards pending versions a dead daemon left behind and rotates what is due; the others do
nothing until the holder dies and one of them gets the lock on its next tick. Leadership only
avoids duplicate work: every write is a check-and-set in storage, so even two leaders at once
(a partitioned holder whose lock already passed on) cannot lose or half-make a version.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from secretsd.custody.barrier import Barrier
from secretsd.domain.rotation import Outcome, RotationService

log = logging.getLogger("secretsd.runtime.scheduler")


class Leader(Protocol):
    """What the leader-only tasks (rotation, token purge, scheduled backups) need of
    ``secretsd.runtime.leadership.Leadership`` (kept current by its own task)."""

    @property
    def is_leader(self) -> bool: ...


class Sealed(Protocol):
    """What the leader-only tasks need of the barrier: they run only while unsealed."""

    @property
    def sealed(self) -> bool: ...


class RotationScheduler:
    def __init__(self, rotation: RotationService, barrier: Barrier, leadership: Leader, *,
                 tick_seconds: float) -> None:
        self._rotation = rotation
        self._barrier = barrier
        self._leadership = leadership
        self.tick_seconds = tick_seconds

    @property
    def leader(self) -> bool:
        return self._leadership.is_leader

    async def tick(self) -> list[Outcome]:
        """One round: if this process leads, rotate what is due (and recover orphaned pending versions)."""
        if self._barrier.sealed:
            return []
        if not self._leadership.is_leader:
            return []
        outcomes = await self._rotation.run_due()
        for o in outcomes:
            if o.result not in ("skipped", "rescheduled"):
                log.info("scheduler: %s %s%s", o.path, o.result, f" ({o.reason})" if o.reason else "")
        return outcomes

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the scheduler must outlive any one failed round
                log.error("scheduler tick failed: %s", type(exc).__name__)
            await asyncio.sleep(self.tick_seconds)
