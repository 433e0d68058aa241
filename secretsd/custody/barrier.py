"""The barrier: seal state, and the only path by which values are sealed and opened.

While sealed the daemon still answers ``/healthz`` and authenticates requests, but every operation
that needs a data key fails with ``SealedError``; a background task retries unsealing with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from keyproviders import KeyProvider
from secretsd import errors
from secretsd.clock import Clock, utcnow
from secretsd.custody.crypto import DataKey, blob_aad, value_aad
from secretsd.custody.keyring import BINDING_PARAM, Keyring, legacy_bindings, make_term, provider_errors, unseal
from secretsd.custody.providers import ProviderSet
from secretsd.events import Event, EventBus
from secretsd.records import KeyringTerm, VersionRecord
from secretsd.storage import Storage

log = logging.getLogger("secretsd.custody.barrier")


@dataclass(frozen=True)
class SealedValue:
    term: int
    nonce: bytes
    ciphertext: bytes


def seal_blob(key: DataKey, term: int, purpose: str, plaintext: bytes) -> SealedValue:
    """The one way a daemon-internal secret is sealed: under a keyring term, bound to its purpose.

    The barrier uses it with its active term; ``init`` with term 1 before any barrier exists.
    """
    nonce, ciphertext = key.seal(plaintext, blob_aad(purpose, term))
    return SealedValue(term, nonce, ciphertext)


def _refresh_all(providers: list[KeyProvider]) -> None:
    for provider in providers:
        provider.refresh()


def check_coverage(providers: list[KeyProvider], newest: KeyringTerm) -> None:
    """A new term must be wrapped for every provider kind the newest term is wrapped for.

    Otherwise a daemon still running with the configuration from before `keyring migrate` (or
    before a recovery provider was added) would make a term that the store's current
    configuration cannot open.
    """
    missing = sorted({w.provider for w in newest.wrappings} - {p.name for p in providers})
    if missing:
        raise errors.ProviderUnavailable(
            f"the keyring is also wrapped for key provider(s) {', '.join(missing)}, which this daemon is "
            "not configured with (was the keyring migrated?); restart it with the store's current "
            "configuration before adding keys"
        )


class Barrier:
    def __init__(
        self,
        storage: Storage,
        providers: ProviderSet,
        *,
        max_encryptions_per_term: int,
        events: EventBus | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._storage = storage
        self._providers = providers
        self._max_encryptions = max_encryptions_per_term
        # Past this, with no new term made (a provider down for long), sealing stops altogether:
        # random 96-bit nonces must stay far from the 2^32 bound of NIST SP 800-38D.
        self._hard_limit = min(2 * max_encryptions_per_term, 2**32 - 2**24)
        self._events = events or EventBus()
        self._clock = clock
        self._keyring: Keyring | None = None
        self._rekey_lock = asyncio.Lock()
        self.last_error: str | None = None
        # Read by the metrics collector at scrape time; plain integers cost nothing per request.
        self.seal_count = 0
        self.open_count = 0
        self.crypto_errors = 0

    # -- state --------------------------------------------------------------------------------
    @property
    def sealed(self) -> bool:
        return self._keyring is None

    @property
    def providers(self) -> ProviderSet:
        return self._providers

    def _ring(self) -> Keyring:
        if self._keyring is None:
            raise errors.SealedError(
                "the daemon is sealed: its key provider has not unwrapped the keyring yet"
            )
        return self._keyring

    @property
    def active_term(self) -> int | None:
        return None if self._keyring is None else self._keyring.active_term

    def encryptions(self, term: int) -> int:
        return self._ring().encryptions.get(term, 0)

    async def unseal(self) -> None:
        """Unwrap every keyring term now with any configured provider; raise if none can."""
        # Built lazily: a key file or token that is missing at start is a sealed daemon that keeps
        # retrying, not a daemon that refuses to start.
        providers = await self._providers.ready_any()
        terms = await self._storage.keyring_terms()
        self._keyring = await unseal(providers, terms)
        self.last_error = None
        # Every provider, not only the one that unsealed, must show it holds the store's key; one
        # that does not is reported (degraded) and never wraps.
        self._providers.bind(terms, self._keyring.keys)
        await asyncio.to_thread(self._providers.prove_built)
        await self._bind_legacy_recovery(terms)
        log.info("unsealed: %d keyring term(s), active term %d",
                 len(self._keyring.keys), self._keyring.active_term)
        self._events.emit(Event("barrier.unseal", self._clock(), "system",
                                detail={"active_term": self._keyring.active_term}))

    async def _bind_legacy_recovery(self, terms: list[KeyringTerm]) -> None:
        """Migrate a store written before binding tags: tag its recovery wrappings now (trust on first use).

        Best effort: a store this process may not write (a conflict with a replica doing the same)
        stays as it was and is migrated at a later unseal; the binding rule still holds meanwhile.
        """
        ring = self._ring()
        changes = legacy_bindings(self._providers.available(), terms, ring.keys)
        if not changes:
            return
        try:
            for term, wrappings in changes:
                await self._storage.replace_keyring_wrappings(term.term, term.wrappings, wrappings)
        except errors.SecretsdError as exc:
            log.warning("could not bind the recovery key to the keyring yet: %s", exc)
            return
        key_ids = sorted({w.key_id for _, ws in changes for w in ws if BINDING_PARAM in w.params})
        log.warning("bound recovery key %s to the keyring (%d term(s)): it was trusted on first use, as the "
                    "store had no binding; expected once, after the upgrade (docs/recovery.md)",
                    ", ".join(key_ids), len(changes))
        self._events.emit(Event("keyring.recovery_bind", self._clock(), "system",
                                detail={"key_ids": key_ids, "terms": len(changes), "trust": "first use"}))
        self._providers.bind(await self._storage.keyring_terms(), ring.keys)

    async def unseal_until_done(self, max_delay: float) -> None:
        """Retry ``unseal`` with capped exponential backoff and jitter until it succeeds."""
        delay = 0.5
        while self.sealed:
            try:
                await self.unseal()
                return
            except errors.ConfigError as exc:
                # Not something time will fix, but the process stays up to say so on /readyz.
                self.last_error = str(exc)
                log.error("cannot unseal: %s", exc)
            except (errors.SecretsdError, OSError) as exc:
                self.last_error = str(exc)
                log.warning("still sealed: %s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, max_delay)

    # -- values -------------------------------------------------------------------------------
    def seal_value(self, path: str, version: int, plaintext: bytes) -> SealedValue:
        ring = self._ring()
        term = ring.active_term
        if ring.encryptions.get(term, 0) >= self._hard_limit:
            raise errors.ProviderUnavailable(
                f"keyring term {term} has sealed {self._hard_limit} values and no new term could be made; "
                "writes resume once every configured key provider is reachable and a rekey succeeds"
            )
        nonce, ciphertext = ring.keys[term].seal(plaintext, value_aad(path, version, term))
        self.seal_count += 1
        return SealedValue(term, nonce, ciphertext)

    def seal_blob(self, purpose: str, plaintext: bytes) -> SealedValue:
        """Seal a daemon-internal secret (not a secret version) under the active term."""
        ring = self._ring()
        return seal_blob(ring.keys[ring.active_term], ring.active_term, purpose, plaintext)

    def open_blob(self, purpose: str, sealed: SealedValue) -> bytes:
        key = self._ring().key(sealed.term)
        if key is None:
            raise errors.CryptoError(f"keyring term {sealed.term} is unknown")
        return key.open(sealed.nonce, sealed.ciphertext, blob_aad(purpose, sealed.term))

    async def open_value(self, record: VersionRecord) -> bytes:
        ring = self._ring()
        key = ring.key(record.term)
        if key is None:
            # Another replica added a term since we unsealed: load it, once.
            await self.reload()
            key = self._ring().key(record.term)
            if key is None:
                raise errors.CryptoError(f"keyring term {record.term} is unknown")
        self.open_count += 1
        try:
            return key.open(record.nonce, record.ciphertext, value_aad(record.path, record.version, record.term))
        except errors.CryptoError:
            self.crypto_errors += 1
            raise

    async def reload(self) -> None:
        async with self._rekey_lock:
            await self.unseal()

    async def note_encryptions(self, term: int, count: int) -> None:
        """Record a term's encryption count; rotate to a new term once it reaches the limit."""
        ring = self._ring()
        ring.encryptions[term] = max(count, ring.encryptions.get(term, 0))
        if term == ring.active_term and count >= self._max_encryptions:
            log.warning("keyring term %d reached %d encryptions; rotating", term, count)
            try:
                await self.rekey(reason="encryption limit", only_if_active=term)
            except errors.SecretsdError as exc:
                # The write that got us here is committed: report it as done, and try again on the
                # next write (the term is still over its limit, and far below 2^32).
                log.error("automatic keyring rotation failed, will retry on the next write: %s", exc)

    # -- keyring changes ----------------------------------------------------------------------
    async def rekey(
        self, *, reason: str = "requested", client: str = "system", only_if_active: int | None = None
    ) -> int:
        """Add a new DEK term and make it active; return its number."""
        async with self._rekey_lock:
            ring = self._ring()
            if only_if_active is not None and ring.active_term != only_if_active:
                return ring.active_term
            providers = await self._providers.ready_all()
            terms = await self._storage.keyring_terms()
            check_coverage(providers, terms[-1])
            with provider_errors():
                await asyncio.to_thread(_refresh_all, providers)
            # After the refresh, right before wrapping: a key re-read or re-found may be another key.
            self._providers.bind(terms, ring.keys)
            providers = await asyncio.to_thread(self._providers.prove_all)
            number = max(t.term for t in terms) + 1
            with provider_errors():
                record, dek = await make_term(providers, number, self._clock())
            try:
                await self._storage.add_keyring_term(record)
            except errors.ConflictError:
                # Another replica rekeyed at the same moment; use whatever is stored now.
                self._keyring = await unseal(providers, await self._storage.keyring_terms())
                return self._keyring.active_term
            ring.keys[number] = DataKey(dek)
            ring.encryptions[number] = 0
            ring.active_term = number
            self._providers.bind([*terms, record], ring.keys)
        log.info("keyring rotated to term %d (%s)", number, reason)
        self._events.emit(Event("keyring.rotate", self._clock(), client,
                                detail={"term": number, "reason": reason}))
        return number

    def close(self) -> None:
        self._providers.close()
        self._keyring = None
