"""The token purge (``[tokens] purge_after_days``): inside every daemon, run only by the leader.

Every login (``POST /v1/auth/jwt/login``) mints a token; without a purge their rows would pile up
for ever. Each sweep deletes tokens revoked or expired more than the retention ago, in batches of
``engine.PURGE_BATCH`` rows per transaction (the writer is never held long), until a batch comes
back short. Which rows may go is the storage engine's rule (``engine.is_purgeable``: never a token
active now, so never the last active root token). Leadership is the rotation scheduler's
(``secretsd.runtime.leadership``), so with replicas or ``--workers`` one process sweeps; every sweep
is audited once (``token.purge`` with the count, through the event bus as the daemon's own work)
and counted in ``secretsd_tokens_purged_total``. Nothing is purged while sealed: no audit then.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from secretsd.clock import Clock, utcnow
from secretsd.events import Event, EventBus
from secretsd.runtime.scheduler import Leader, Sealed
from secretsd.storage import Storage, engine

log = logging.getLogger("secretsd.runtime.token_purge")

ACTION = "token.purge"
#: Batches one sweep deletes at most: a huge backlog is worked off over several sweeps.
MAX_BATCHES_PER_SWEEP = 100


class TokenPurger:
    """``run`` is the daemon's task; ``sweep`` is one purge (tests call it)."""

    def __init__(self, storage: Storage, barrier: Sealed, leadership: Leader, events: EventBus, *,
                 purge_after_days: int, interval_seconds: float, batch: int = engine.PURGE_BATCH,
                 clock: Clock = utcnow) -> None:
        self._storage = storage
        self._barrier = barrier
        self._leadership = leadership
        self._events = events
        self.retention = timedelta(days=purge_after_days)
        self.interval_seconds = interval_seconds
        self._batch = batch
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self.retention > timedelta(0)

    async def tick(self) -> int | None:
        """A sweep if purging is on, this process leads and the keyring is unsealed; else None."""
        if not self.enabled or self._barrier.sealed or not self._leadership.is_leader:
            return None
        return await self.sweep()

    async def sweep(self) -> int:
        """Delete every token dead for longer than the retention (up to ``MAX_BATCHES_PER_SWEEP``
        batches); audit and count the run once; return how many rows went."""
        now = self._clock()
        cutoff = now - self.retention
        deleted = 0
        for _ in range(MAX_BATCHES_PER_SWEEP):
            n = await self._storage.purge_tokens(cutoff, now, limit=self._batch)
            deleted += n
            if n < self._batch:
                break
        if deleted:
            log.info("purged %d token(s) revoked or expired before %s", deleted, cutoff.isoformat())
        self._events.emit(Event(ACTION, now, "system", detail={"count": deleted, "before": cutoff.isoformat()}))
        return deleted

    async def run(self) -> None:
        while True:
            # One interval after start first: a restart is no reason to sweep (or to add a record to
            # the chain of a daemon that has just started serving).
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failed sweep
                log.error("token purge failed: %s", type(exc).__name__)
