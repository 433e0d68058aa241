"""Replicas sharing one store: keep each process's keyring and token cache in step with the others.

Several daemon processes (replicas behind a load balancer) share
one store. Each holds the unwrapped keyring and a short token cache in memory, so it must hear what
the others change:

* **Keyring.** A term added or re-wrapped by another replica. Reading needs nothing from here: the
  barrier reloads once when it meets an unknown term. Writing does: until it reloads, a replica
  keeps *encrypting* under its old term (still valid, but not what an operator who just rotated
  expects). ``ReplicaSync`` reloads the barrier when the newest stored term is newer than the
  active one, or when a term's wrappings changed (a master-key rotation or provider migration: the
  reload proves this replica can still open the keyring, and says so loudly if it cannot).
* **Token revocations.** Each replica caches verified tokens for ``token_cache_seconds``; a
  revocation notification drops that token from the cache at once.

Both arrive as notifications when the storage backend has a change feed (``ChangeFeed``:
PostgreSQL LISTEN/NOTIFY on a dedicated connection, sent in the writing transaction so it is
delivered only on commit). Notifications can be lost while the feed is down, so they are only the
fast path:

* the keyring is re-read every ``change_poll_seconds`` regardless (one small query): a replica
  encrypts under a superseded term for at most that long, even with no feed at all (SQLite);
* a token revocation is bounded by ``token_cache_seconds`` whatever happens to the feed; on every
  (re)connection the whole token cache is dropped, for revocations missed meanwhile;
* a lost feed is noticed at the next poll (a ``ping`` on its connection) and re-established with
  capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from keyproviders import WrappedKey
from secretsd.custody.barrier import Barrier
from secretsd.domain.identity import CredentialCache
from secretsd.errors import SecretsdError
from secretsd.storage import Storage
from secretsd.storage.base import KEYRING_CHANNEL, TOKENS_CHANNEL, ChangeFeed, ChangeSubscription

log = logging.getLogger("secretsd.runtime.replication")

RETRY_MIN_SECONDS = 0.5


class ReplicaSync:
    """A background task that applies other replicas' keyring changes and token revocations here."""

    def __init__(
        self, storage: Storage, barrier: Barrier, tokens: CredentialCache, *, poll_seconds: float
    ) -> None:
        self._storage = storage
        self._barrier = barrier
        self._tokens = tokens
        self._poll = poll_seconds
        self._feed: ChangeFeed | None = storage if isinstance(storage, ChangeFeed) else None
        self._wake = asyncio.Event()
        self._wrappings: dict[int, tuple[WrappedKey, ...]] | None = None
        #: "listening" (change feed up), "polling" (feed down, retrying) or "polling only" (no feed).
        self.mode = "starting" if self._feed is not None else "polling only"
        self.reloads = 0
        self.notifications = 0
        self.last_error: str | None = None

    def status(self) -> dict[str, Any]:
        return {"change_feed": self.mode, "keyring_reloads": self.reloads}

    # -- notifications (called on the event loop by the feed) -----------------------------------
    def _on_notify(self, channel: str, payload: str) -> None:
        self.notifications += 1
        if channel == TOKENS_CHANNEL:
            self._tokens.invalidate(payload)
        elif channel == KEYRING_CHANNEL:
            self._wake.set()

    # -- the keyring check ----------------------------------------------------------------------
    async def check_keyring(self) -> bool:
        """Reload the barrier if the stored keyring moved on; True if it reloaded."""
        if self._barrier.sealed:
            return False  # the unseal task reads the whole keyring when it succeeds
        terms = await self._storage.keyring_terms()
        if not terms:
            return False
        wrappings = {t.term: t.wrappings for t in terms}
        active = self._barrier.active_term
        changed = active is None or terms[-1].term > active
        if self._wrappings is not None:
            changed = changed or any(self._wrappings.get(n, w) != w for n, w in wrappings.items())
        if changed:
            try:
                await self._barrier.reload()
            except SecretsdError as exc:
                # Keep serving with the keys we hold; try again at the next poll.
                self.last_error = str(exc)
                log.error("the keyring changed in storage but this replica cannot reload it: %s", exc)
                return False
            self.reloads += 1
            self.last_error = None
            log.info("keyring reloaded after a change by another process: active term %s",
                     self._barrier.active_term)
        self._wrappings = wrappings
        return changed

    async def _check_quietly(self) -> None:
        try:
            await self.check_keyring()
        except SecretsdError as exc:  # storage down: requests say so with 503; we try again later
            log.warning("keyring check failed: %s", exc)

    # -- the task -------------------------------------------------------------------------------
    async def _subscribe(self) -> ChangeSubscription | None:
        if self._feed is None:
            self.mode = "polling only"
            return None
        try:
            sub = await self._feed.subscribe([KEYRING_CHANNEL, TOKENS_CHANNEL], self._on_notify)
        except SecretsdError as exc:
            self.mode = "polling"
            log.warning("change feed unavailable, polling meanwhile: %s", exc)
            return None
        self.mode = "listening"
        return sub

    async def run(self) -> None:
        retry = RETRY_MIN_SECONDS
        while True:
            sub = await self._subscribe()
            if sub is not None:
                retry = RETRY_MIN_SECONDS
                log.info("listening for keyring changes and token revocations")
                self._tokens.invalidate_all()  # revocations we may have missed while not listening
            try:
                await self._check_quietly()  # and keyring changes
                await self._watch(sub, retry)
            finally:
                if sub is not None:
                    await sub.close()
            retry = min(retry * 2, self._poll)

    async def _watch(self, sub: ChangeSubscription | None, retry: float) -> None:
        """Check on every notification and every poll; return when the feed should be (re)opened."""
        loop = asyncio.get_running_loop()
        retry_at = loop.time() + retry
        while True:
            timeout = self._poll
            if sub is None and self._feed is not None:
                timeout = max(0.0, min(timeout, retry_at - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if sub is not None:
                try:
                    await sub.ping()
                except SecretsdError as exc:
                    self.mode = "polling"
                    log.warning("lost the change feed (%s); reconnecting", exc)
                    await self._check_quietly()
                    return
            await self._check_quietly()
            if sub is None and self._feed is not None and loop.time() >= retry_at:
                return
