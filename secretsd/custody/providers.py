"""The configured key providers of a store: a primary one plus optional recovery providers.

Every keyring term is wrapped once per configured provider, so any one of them can unseal; a new
term can only be made while all of them are reachable, or a recovery path would silently lapse.
A provider that cannot be built or is unhealthy is recorded with its error, and retried.

Once the store is unsealed the set is *bound* to it: a provider counts as usable only after it has
proved, by opening one of the store's wrappings, that it holds a key the store was sealed with
(``keyring.prove_custody``). A provider that answers to the right names with another key (a
replaced token or key file) is reported as mismatched, degraded, and never wraps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyproviders import KeyProvider, KeyProviderError, create_provider
from secretsd import errors
from secretsd.custody.crypto import DataKey
from secretsd.custody.keyring import convert_provider_error, prove_custody
from secretsd.records import KeyringTerm

log = logging.getLogger("secretsd.custody.providers")


@dataclass(frozen=True)
class ProviderState:
    kind: str
    key_id: str | None
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key_id": self.key_id, "ok": self.ok, "detail": self.detail}


class ProviderSet:
    """Builds providers lazily from their option tables, remembers failures, checks health."""

    def __init__(
        self,
        specs: Sequence[Mapping[str, Any]],
        base_dir: Path,
        *,
        create: bool = False,
        decorate: Callable[[KeyProvider], KeyProvider] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("at least one key provider must be configured")
        self._specs = [dict(s) for s in specs]
        self._base_dir = base_dir
        self._create = create
        self._decorate = decorate  # e.g. a latency-measuring wrapper
        self._built: dict[int, KeyProvider] = {}
        self._errors: dict[int, str] = {}
        self._mismatched: set[int] = set()
        self._binding: tuple[list[KeyringTerm], dict[int, DataKey]] | None = None
        self._lock = threading.Lock()

    @property
    def kinds(self) -> list[str]:
        return [str(s.get("kind")) for s in self._specs]

    def build_missing(self) -> None:
        """Try to build every provider not built yet (blocking: call from a worker thread).

        Failures are recorded per provider; one broken provider never stops the others. Raises
        ``ConfigError`` only when no provider is usable and a configuration error (which no retry
        can fix) is among the reasons.
        """
        config_error: errors.ConfigError | None = None
        for index, spec in enumerate(self._specs):
            with self._lock:
                if index in self._built:
                    continue
            try:
                provider = create_provider(spec, base_dir=self._base_dir, create=self._create)
                if self._decorate is not None:
                    provider = self._decorate(provider)
            except KeyProviderError as exc:
                error = convert_provider_error(exc)
                with self._lock:
                    self._errors[index] = str(error)
                if isinstance(error, errors.ConfigError):
                    config_error = error
                log.warning("key provider %s unavailable: %s", spec.get("kind"), error)
                continue
            with self._lock:
                self._built[index] = provider
                self._errors.pop(index, None)
        if config_error is not None and not self.available():
            raise config_error

    async def ready_any(self) -> list[KeyProvider]:
        """Build what is missing (in a worker thread); the usable providers, at least one, or raise."""
        await asyncio.to_thread(self.build_missing)
        available = self.available()
        if not available:
            raise self.first_error()
        return available

    async def ready_all(self) -> list[KeyProvider]:
        """Build what is missing (in a worker thread); every configured provider, or raise."""
        await asyncio.to_thread(self.build_missing)
        return self.all_or_raise()

    def available(self) -> list[KeyProvider]:
        with self._lock:
            return [self._built[i] for i in sorted(self._built)]

    def first_error(self) -> errors.SecretsdError:
        with self._lock:
            detail = next(iter(self._errors.values()), "no key provider could be built")
        return errors.ProviderUnavailable(detail)

    def all_or_raise(self) -> list[KeyProvider]:
        """Every configured provider, or ``ProviderUnavailable`` naming those that are missing."""
        with self._lock:
            missing = [i for i in range(len(self._specs)) if i not in self._built or i in self._errors]
            if missing:
                names = ", ".join(f"{self._specs[i].get('kind')} ({self._errors.get(i, 'not built')})"
                                  for i in missing)
                mismatched = sorted(self._mismatched.intersection(missing))
                if mismatched:
                    raise errors.ProviderKeyMismatch(
                        "refusing to wrap new keys: " + "; ".join(self._errors[i] for i in mismatched))
                raise errors.ProviderUnavailable(
                    f"new keys must be wrapped for every configured key provider; unavailable: {names}")
            return [self._built[i] for i in sorted(self._built)]

    # -- binding to the store ---------------------------------------------------------------------
    def bind(self, terms: list[KeyringTerm], keys: dict[int, DataKey]) -> None:
        """Remember the store's keyring (wrappings and the DEKs in memory) to prove providers against."""
        with self._lock:
            self._binding = (list(terms), dict(keys))

    def prove_built(self) -> None:
        """Prove every built provider against the bound store now; record the outcome (blocking)."""
        with self._lock:
            built = list(self._built.items())
        for index, provider in built:
            self._prove(index, provider)

    def prove_all(self) -> list[KeyProvider]:
        """Every configured provider, each proven against the bound store just now, or raise (blocking).

        What must run right before anything is wrapped: a key file re-read or a token re-found
        since the last proof may hold another key by now.
        """
        self.all_or_raise()
        self.prove_built()
        return self.all_or_raise()

    def _prove(self, index: int, provider: KeyProvider) -> None:
        with self._lock:
            binding = self._binding
        if binding is None:
            with self._lock:
                if index not in self._mismatched:
                    self._errors.pop(index, None)
            return
        terms, keys = binding
        try:
            prove_custody(provider, terms, keys)
        except errors.ProviderKeyMismatch as exc:
            with self._lock:
                if index not in self._mismatched:
                    log.error("key provider %s: %s", provider.name, exc)
                self._mismatched.add(index)
                self._errors[index] = str(exc)
            return
        except errors.SecretsdError as exc:
            with self._lock:
                self._errors[index] = str(exc)
            return
        with self._lock:
            if index in self._mismatched:
                log.warning("key provider %s holds the store's key again", provider.name)
            self._mismatched.discard(index)
            self._errors.pop(index, None)

    def check_health(self) -> list[ProviderState]:
        """Build what is missing, ask every built provider for its health (blocking)."""
        try:
            self.build_missing()
        except errors.ConfigError as exc:
            log.error("key provider configuration: %s", exc)
        for index, provider in list(self._built.items()):
            health = provider.health()
            # Reachable is not enough: it must still hold the store's key (one unwrap per check).
            self._prove(index, provider)
            with self._lock:
                if health.ok or index in self._mismatched:
                    continue
                if index not in self._errors:
                    log.warning("key provider %s degraded: %s", provider.name, health.detail)
                self._errors[index] = health.detail
        return self.states()

    def states(self) -> list[ProviderState]:
        out = []
        with self._lock:
            for index, spec in enumerate(self._specs):
                provider = self._built.get(index)
                error = self._errors.get(index)
                key_id = None
                if provider is not None:
                    try:
                        key_id = provider.key_id()
                    except KeyProviderError:
                        key_id = None
                out.append(ProviderState(str(spec.get("kind")), key_id, provider is not None and error is None,
                                         error or "ok"))
        return out

    def close(self) -> None:
        with self._lock:
            built, self._built = self._built, {}
        for provider in built.values():
            provider.close()
