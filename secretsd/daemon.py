"""Assembly: build the daemon's parts from settings, initialise a store, report status."""

from __future__ import annotations

import asyncio
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secretsd import __version__, tokens
from secretsd.auth import Authenticator, TokenAuthenticator
from secretsd.barrier import Barrier
from secretsd.clock import Clock, utcnow
from secretsd.config import Settings
from secretsd.errors import AlreadyInitializedError, NotInitializedError, SecretsdError
from secretsd.events import EventBus
from secretsd.keyring import make_term
from secretsd.policy import ROOT_POLICY, PolicyStore
from secretsd.providers import ProviderSet
from secretsd.service import SecretsService
from secretsd.storage import Storage, TokenRecord, create_storage
from secretsd.token_service import TokenService

log = logging.getLogger("secretsd")

ADMIN_CLIENT = "admin"


def build_storage(settings: Settings) -> Storage:
    return create_storage(settings.storage.options(), data_dir=settings.require_data_dir())


def provider_set(settings: Settings, *, create: bool = False) -> ProviderSet:
    return ProviderSet(settings.provider_specs(), settings.require_data_dir(), create=create)


@dataclass(frozen=True)
class InitResult:
    admin_token: str
    data_dir: Path
    provider: str
    key_id: str


async def initialize_store(settings: Settings, *, clock: Clock = utcnow) -> InitResult:
    """Create a store: keyring term 1 wrapped by the configured provider, and an admin token.

    Refuses, changing nothing, when the store is already initialised.
    """
    data_dir = settings.require_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    storage = build_storage(settings)
    await storage.open()
    try:
        if await storage.is_initialized():
            raise AlreadyInitializedError(f"the store in {data_dir} is already initialised; nothing was changed")
        provider_group = provider_set(settings, create=True)
        try:
            await asyncio.to_thread(provider_group.build_missing)
            providers = provider_group.all_or_raise()
            now = clock()
            term, _dek = await make_term(providers, 1, now)
            new = tokens.generate_token()
            admin = TokenRecord(
                token_id=new.token_id, secret_hash=new.secret_hash, client=ADMIN_CLIENT,
                policies=(ROOT_POLICY,), created_at=now, created_by="init",
            )
            meta = {"format": "1", "created_by_version": __version__,
                    "provider": providers[0].name, "host": platform.node()}
            await storage.initialize(meta, term, admin)
            return InitResult(new.token, data_dir, providers[0].name, providers[0].key_id())
        finally:
            provider_group.close()
    finally:
        await storage.close()


class Daemon:
    """Every long-lived part of a running daemon, wired together."""

    def __init__(self, settings: Settings, *, clock: Clock = utcnow) -> None:
        self.settings = settings
        self.clock = clock
        self.events = EventBus()
        self.storage = build_storage(settings)
        self.policies = PolicyStore(settings.policy_file)
        self.providers = provider_set(settings)
        self.barrier = Barrier(
            self.storage, self.providers,
            max_encryptions_per_term=settings.max_encryptions_per_term,
            events=self.events, clock=clock,
        )
        self.token_auth = TokenAuthenticator(
            self.storage, cache_seconds=settings.token_cache_seconds, clock=clock
        )
        self.authenticators: list[Authenticator] = [self.token_auth]
        self.secrets = SecretsService(
            self.storage, self.barrier, max_versions=settings.max_versions,
            max_value_bytes=settings.max_value_bytes, events=self.events, clock=clock,
        )
        self.tokens = TokenService(self.storage, self.policies, self.token_auth,
                                   events=self.events, clock=clock)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open storage and try to unseal; if that fails, keep retrying in the background."""
        await self.storage.open()
        if not await self.storage.is_initialized():
            await self.storage.close()
            raise NotInitializedError(
                f"the store in {self.settings.data_dir} is not initialised; "
                f"run 'secretsd init --data-dir {self.settings.data_dir}'"
            )
        try:
            await self.barrier.unseal()
        except SecretsdError as exc:
            self.barrier.last_error = str(exc)
            log.warning("starting sealed: %s", exc)
            self._tasks.append(asyncio.create_task(
                self.barrier.unseal_until_done(self.settings.unseal_retry_max_seconds)
            ))
        self._tasks.append(asyncio.create_task(self._watch_providers()))

    async def _watch_providers(self) -> None:
        """Check provider health now and then: a lost HSM shows as degraded, and comes back."""
        while True:
            await asyncio.sleep(self.settings.provider_check_seconds)
            try:
                await asyncio.to_thread(self.providers.check_health)
            except Exception as exc:  # the watcher must outlive any one failed check
                log.error("provider health check failed: %s", type(exc).__name__)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.barrier.close()
        await self.storage.close()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        checks["barrier"] = "sealed" if self.barrier.sealed else "unsealed"
        try:
            await self.storage.ping()
            checks["storage"] = "ok"
        except SecretsdError as exc:
            # /readyz is public: say what, not where (the error names files and hosts).
            log.warning("readiness: storage unavailable: %s", exc)
            checks["storage"] = "unavailable"
        # A degraded provider does not make the daemon unready: it serves from the keys it holds.
        checks["providers"] = "ok" if all(s.ok for s in self.providers.states()) else "degraded"
        ready = not self.barrier.sealed and checks["storage"] == "ok"
        return ready, checks

    async def status(self) -> dict[str, Any]:
        states = self.providers.states()
        return {
            "initialized": await self.storage.is_initialized(),
            "sealed": self.barrier.sealed,
            "seal_error": self.barrier.last_error,
            "provider": states[0].kind,
            "key_id": states[0].key_id,
            "providers": [s.to_dict() for s in states],
            "degraded": not all(s.ok for s in states),
            "active_term": self.barrier.active_term,
            "storage": getattr(self.storage, "backend", type(self.storage).__name__),
            "version": __version__,
        }
