"""Assembly: build the daemon's parts from settings, initialise a store, report status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyproviders import KeyProvider
from secretsd import __version__, tokens
from secretsd.audit.chains import ChainClaim, candidates, claim_chain, release
from secretsd.audit.keys import AUDIT_KEY_META, ValueHasher, load_signer, new_key_document
from secretsd.audit.log import AuditLog
from secretsd.audit.mirrors import stdout_mirror, syslog_mirror
from secretsd.audit.verify import Head
from secretsd.auth import AuthenticatorContext, create_authenticators
from secretsd.backup.restore import require_restore_audited
from secretsd.clock import Clock, utcnow
from secretsd.custody.barrier import Barrier
from secretsd.custody.crypto import DataKey
from secretsd.custody.keyring import make_term
from secretsd.custody.providers import ProviderSet
from secretsd.domain.policy import ROOT_POLICY, PolicyStore
from secretsd.domain.rotation import RotationService
from secretsd.domain.secret_service import SecretsService
from secretsd.domain.token_service import TokenService
from secretsd.errors import (
    AlreadyInitializedError,
    AuditError,
    NotFoundError,
    NotInitializedError,
    SealedError,
    SecretsdError,
)
from secretsd.events import Event, EventBus
from secretsd.records import TokenRecord
from secretsd.runtime.backup_schedule import BackupScheduler
from secretsd.runtime.config import Settings
from secretsd.runtime.leadership import Leadership
from secretsd.runtime.metrics import Metrics, TimedProvider
from secretsd.runtime.replication import ReplicaSync
from secretsd.runtime.scheduler import RotationScheduler
from secretsd.runtime.token_purge import TokenPurger
from secretsd.storage import Storage, create_storage

if TYPE_CHECKING:
    from secretsd.backup.format import Manifest

log = logging.getLogger("secretsd")

ADMIN_CLIENT = "admin"
# While the audit log fails, the daemon probes it itself, at first after this many seconds, then
# twice as long each time up to the cap: readiness must come back when the disk does, without a
# client request (a load balancer sends none to a replica whose /readyz says 503).
AUDIT_PROBE_FIRST_SECONDS = 0.5
AUDIT_PROBE_MAX_SECONDS = 5.0


def build_storage(settings: Settings) -> Storage:
    return create_storage(settings.storage.options(), data_dir=settings.require_data_dir())


def provider_set(
    settings: Settings, *, create: bool = False, decorate: Callable[[KeyProvider], KeyProvider] | None = None
) -> ProviderSet:
    return ProviderSet(settings.provider_specs(), settings.require_data_dir(), create=create, decorate=decorate)


def private_data_dir(data_dir: Path) -> None:
    """The data directory holds the database, the audit log and (file provider) the KEK: make it
    owner-only when we may, and say so loudly when we may not (a volume owned by someone else)."""
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        data_dir.chmod(0o700)
    except PermissionError:
        log.warning("data directory %s has mode %04o and cannot be made owner-only; anyone in its group "
                    "or others who can enter it may read the store's files", data_dir, mode)
    else:
        log.warning("data directory %s had mode %04o; tightened to 0700", data_dir, mode)


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
    private_data_dir(data_dir)
    storage = build_storage(settings)
    await storage.open()
    try:
        if await storage.is_initialized():
            raise AlreadyInitializedError(f"the store in {data_dir} is already initialised; nothing was changed")
        provider_group = provider_set(settings, create=True)
        try:
            providers = await provider_group.ready_all()
            now = clock()
            term, dek = await make_term(providers, 1, now)
            _signer, audit_key = new_key_document(DataKey(dek), term.term)
            new = tokens.generate_token()
            admin = TokenRecord(
                token_id=new.token_id, secret_hash=new.secret_hash, client=ADMIN_CLIENT,
                policies=(ROOT_POLICY,), created_at=now, created_by="init",
            )
            meta = {"format": "1", "created_by_version": __version__,
                    "provider": providers[0].name, "host": platform.node(), AUDIT_KEY_META: audit_key}
            await storage.initialize(meta, term, admin)
            return InitResult(new.token, data_dir, providers[0].name, providers[0].key_id())
        finally:
            provider_group.close()
    finally:
        await storage.close()


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("could not audit an internal event: %s", task.exception())


class Daemon:
    """Every long-lived part of a running daemon, wired together."""

    def __init__(self, settings: Settings, *, clock: Clock = utcnow, worker: int | None = None) -> None:
        self.settings = settings
        self.worker = worker  # worker N of serve --workers: its derived chain starts from <chain>-wN
        # The chain this process writes: the configured one, or the name derived when the log opens
        # (None until then).
        self.audit_chain: str | None = settings.audit.chain if settings.audit.chain_configured else None
        self.clock = clock
        self.events = EventBus()
        self.storage = build_storage(settings)
        self.policies = PolicyStore(settings.policy_file, events=self.events, clock=clock)
        self.providers = provider_set(
            settings, decorate=lambda p: TimedProvider(p, self._observe_provider)  # type: ignore[arg-type, return-value]
        )
        self.barrier = Barrier(
            self.storage, self.providers,
            max_encryptions_per_term=settings.max_encryptions_per_term,
            events=self.events, clock=clock,
        )
        # Authentication (secretsd.auth): the methods configured, built through their entry points.
        self.authenticators = create_authenticators(
            settings.authenticator_specs(),
            AuthenticatorContext(self.storage, clock=clock, cache_seconds=settings.token_cache_seconds),
        )
        self.secrets = SecretsService(
            self.storage, self.barrier, max_versions=settings.max_versions,
            max_value_bytes=settings.max_value_bytes, events=self.events, clock=clock,
        )
        self.tokens = TokenService(self.storage, self.policies, self.authenticators,
                                   events=self.events, clock=clock)
        # Replicas (docs/ha.md): other processes' keyring changes and revocations; singleton work.
        self.replication = ReplicaSync(self.storage, self.barrier, self.authenticators,
                                       poll_seconds=settings.change_poll_seconds)
        self.leadership = Leadership(self.storage, retry_seconds=settings.leader_retry_seconds)
        # Secret lifecycle (docs/rotation.md): rotation, and its scheduler (leader only).
        self.rotation = RotationService(
            self.storage, self.barrier, settings.rotation, max_versions=settings.max_versions,
            max_value_bytes=settings.max_value_bytes, events=self.events, clock=clock,
        )
        self.scheduler = RotationScheduler(self.rotation, self.barrier, self.leadership,
                                           tick_seconds=settings.rotation.tick_seconds)
        # Scheduled backups ([backup], docs/backup.md): the leader only, the online backup's file.
        self.backup_schedule = BackupScheduler(settings.backup, self.storage, self.providers.available,
                                               self.barrier, self.leadership, self._write_backup, self.record,
                                               clock=clock)
        # Token purge ([tokens], docs/operations.md): the leader deletes long-dead token rows.
        self.token_purge = TokenPurger(self.storage, self.barrier, self.leadership, self.events,
                                       purge_after_days=settings.tokens.purge_after_days,
                                       interval_seconds=settings.tokens.purge_interval_seconds, clock=clock)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = contextlib.AsyncExitStack()  # what start set up, for stop to unwind
        self.metrics = Metrics(self)
        self.events.subscribe(self.metrics.on_event)
        self.audit: AuditLog | None = None
        self._event_tasks: set[asyncio.Task[None]] = set()
        self.value_hasher: ValueHasher | None = None
        self.events.subscribe(self._audit_event)

    async def start(self) -> None:
        """Open storage and try to unseal; if that fails, keep retrying in the background.

        Each step registers its undo on an exit stack as soon as it is done: a start that fails
        unwinds exactly what it set up, and ``stop`` unwinds the rest, newest first.
        """
        async with contextlib.AsyncExitStack() as stack:
            await self._start(stack)
            self._started = stack.pop_all()

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        if self.settings.data_dir is not None and self.settings.data_dir.is_dir():
            private_data_dir(self.settings.data_dir)
        await self.storage.open()
        stack.push_async_callback(self.storage.close)
        if not await self.storage.is_initialized():
            raise NotInitializedError(
                f"the store in {self.settings.data_dir} is not initialised; "
                f"run 'secretsd init --data-dir {self.settings.data_dir}'"
            )
        await require_restore_audited(self.storage)  # a restore whose audit record is missing is not served
        stack.callback(self.barrier.close)
        stack.push_async_callback(self._close_audit)  # the log may open later, after a background unseal
        stack.push_async_callback(self._drain_event_tasks)
        await self.tokens.warn_about_reserved_names()
        stack.push_async_callback(self._cancel_tasks)  # before the first task: one cleanup for all
        try:
            await self.barrier.unseal()
        except SecretsdError as exc:
            self.barrier.last_error = str(exc)
            log.warning("starting sealed: %s", exc)
            self._tasks.append(asyncio.create_task(self._unseal_in_background()))
        else:
            await self._open_audit()
        self._tasks.append(asyncio.create_task(self._watch_providers()))
        self._tasks.append(asyncio.create_task(self._watch_audit()))
        self._tasks.append(asyncio.create_task(self.replication.run()))
        self.leadership.start()
        # Left first when stopping: another replica can take over at once.
        stack.push_async_callback(self.leadership.stop)
        if self.settings.rotation.scheduler:
            self._tasks.append(asyncio.create_task(self.scheduler.run()))
        if self.settings.backup.enabled:
            self._tasks.append(asyncio.create_task(self.backup_schedule.run()))
        if self.token_purge.enabled:
            self._tasks.append(asyncio.create_task(self.token_purge.run()))

    def _observe_provider(self, provider: str, operation: str, seconds: float) -> None:
        self.metrics.provider_seconds.labels(provider, operation).observe(seconds)

    async def refresh_gauges(self) -> None:
        """Counts that need a storage query: taken when metrics are scraped, not per request."""
        now = self.clock()
        self.metrics.gauges["secrets"] = await self.storage.count_secrets()
        self.metrics.gauges["tokens"] = sum(1 for t in await self.storage.list_tokens() if t.is_active(now))

    async def _unseal_in_background(self) -> None:
        await self.barrier.unseal_until_done(self.settings.unseal_retry_max_seconds)
        delay = 0.5
        while True:  # until the audit log opens: without it every request is refused
            try:
                await self._open_audit()
                return
            except SecretsdError as exc:
                log.error("cannot open the audit log (retrying in %.0fs): %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.unseal_retry_max_seconds)

    # -- audit --------------------------------------------------------------------------------
    def _head_key(self) -> str:
        return f"audit_head:{self.audit_chain}"

    async def _claim_audit_chain(self) -> ChainClaim | None:
        """A configured chain is taken as is (AuditLog refuses it if held); otherwise derive a free one."""
        conf = self.settings.audit
        data_dir = self.settings.require_data_dir()
        if conf.chain_configured:
            self.audit_chain = conf.chain
            return None
        base = conf.chain if self.worker is None else f"{conf.chain}-w{self.worker}"
        node = platform.node()
        claim = await claim_chain(self.storage, candidates(base, node), lambda name: conf.log_path(data_dir, name),
                                  node=node)
        self.audit_chain = claim.name
        return claim

    async def _open_audit(self) -> None:
        """Open the audit log; it needs the unsealed keyring, which holds its signing key."""
        conf = self.settings.audit
        if not conf.enabled:
            return
        signer = await load_signer(self.storage, self.barrier)
        claim = await self._claim_audit_chain()
        try:
            raw_head = await self.storage.get_meta(self._head_key())
        except BaseException:
            release(claim)
            raise
        stored = Head(**json.loads(raw_head)) if raw_head else None
        mirror = {"stdout": stdout_mirror, "syslog": syslog_mirror() if conf.mirror == "syslog" else None,
                  "none": None}[conf.mirror]

        async def store_head(head: Head) -> None:
            await self.storage.put_meta(self._head_key(), json.dumps({"seq": head.seq, "hash": head.hash}))

        audit = AuditLog(
            conf.log_path(self.settings.require_data_dir(), self.audit_chain), signer, head_store=store_head,
            stored_head=stored, max_file_bytes=conf.max_file_bytes,
            write_timeout=conf.write_timeout_seconds, mirror=mirror,
            sign_every_record=conf.sign == "record", head_interval=conf.head_interval_seconds,
            failure_budget=conf.failure_budget(), keep_rotated_files=conf.keep_rotated_files,
            keep_rotated_bytes=conf.keep_rotated_bytes, lock_fd=None if claim is None else claim.lock_fd,
        )
        audit.on_batch = self.metrics.observe_audit_batch
        try:
            await audit.open()
        except BaseException:
            await audit.close()  # lets go of a derived chain's lock
            raise
        log.info("audit chain %r (%s, %s)", self.audit_chain, audit.path,
                 "configured" if claim is None else "derived: [audit] chain is not set")
        self.audit = audit
        self.value_hasher = ValueHasher(signer)
        try:
            await self.record({"action": "daemon.unsealed", "client": "system", "decision": "allow",
                               "outcome": "ok", "active_term": self.barrier.active_term})
        except BaseException as exc:
            # Let go of the log (and its lock), so that a retry opens it afresh.
            self.audit = None
            await audit.close()
            if isinstance(exc, AuditError):
                raise AuditError(f"cannot write the audit log {audit.path}, and the daemon does not serve "
                                 "without it (the error logged above says why)") from exc
            raise

    async def record(self, fields: dict[str, Any]) -> None:
        """Write one audit record and wait until it is durable.

        Raises ``AuditError`` when it cannot be written and the log is fail-closed. While sealed
        there is no signing key, so nothing can be recorded (and the API refuses all but status).
        """
        await self._record([fields])

    async def record_requests(self, records: list[dict[str, Any]]) -> None:
        """The records of a batch's items, in order; all durable when this returns."""
        await self._record(records)

    async def _record(self, records: list[dict[str, Any]]) -> None:
        if self.audit is None:
            if self.settings.audit.enabled and not self.barrier.sealed:
                raise AuditError("the audit log is not open")
            return
        try:
            if len(records) == 1:
                await self.audit.append(records[0])
            else:
                await self.audit.append_many(records)
        except AuditError:
            if self.settings.audit.fail_closed:
                raise
            log.error("audit record(s) lost (audit.fail_closed = false): %s",
                      ", ".join(sorted({str(r.get("action")) for r in records})))

    async def record_request(self, fields: dict[str, Any]) -> None:
        """A request's record; an unauthenticated failure beyond its budget is only counted."""
        if self.audit is not None and self.audit.summarised(fields):
            return
        await self.record(fields)

    def value_hmac(self, value: str | bytes) -> str | None:
        return None if self.value_hasher is None else self.value_hasher(value)

    @property
    def max_body_bytes(self) -> int:
        return self.settings.max_body_bytes

    @property
    def max_versions(self) -> int:
        return self.settings.max_versions

    async def metrics_page(self) -> bytes:
        if not self.settings.metrics.enabled:
            raise NotFoundError("metrics are disabled ([metrics] enabled = false)")
        await self.refresh_gauges()
        return self.metrics.render()

    async def backup(self, send: Callable[[bytes], Awaitable[None]]) -> Manifest:
        """Online ``backup create``: the offline command's snapshot and file (secretsd.runtime.backup)."""
        from secretsd.runtime.backup import source_of, stream_backup

        if self.barrier.sealed:
            raise SealedError("the daemon is sealed: a backup needs the keyring")
        return await stream_backup(self.storage, self.providers.available(), send,
                                   source=source_of(self.settings), clock=self.clock)

    async def _write_backup(self, storage: Storage, providers: Sequence[KeyProvider],
                            send: Callable[[bytes], Awaitable[None]]) -> Manifest:
        """A scheduled backup's bytes: the same snapshot and file as ``backup create``."""
        from secretsd.runtime.backup import source_of, stream_backup

        return await stream_backup(storage, providers, send, source=source_of(self.settings), clock=self.clock)

    async def audit_ready(self) -> None:
        """While the audit log is failing, refuse up front, before anything is read or changed.

        The check is itself a record: the first request after the disk recovers writes it and
        goes ahead, so recovery needs no operator.
        """
        if self.settings.audit.enabled and self.audit is None and not self.barrier.sealed:
            # Unsealed in the background a moment ago: nothing may run before its log is open.
            raise AuditError("the audit log is not open yet")
        if self.audit is not None and not self.audit.healthy and self.settings.audit.fail_closed:
            await self.record({"action": "audit.probe", "client": "system", "decision": "allow",
                               "outcome": "ok"})

    async def _watch_audit(self) -> None:
        """Probe a failing audit log until it heals, so that /readyz recovers with the disk."""
        delay = AUDIT_PROBE_FIRST_SECONDS
        while True:
            await asyncio.sleep(delay)
            if self.audit is None or self.audit.healthy:
                delay = AUDIT_PROBE_FIRST_SECONDS
                continue
            try:
                await self.audit_ready()  # one audit.probe record; a success marks the log healthy
            except Exception as exc:  # the watcher must outlive any one failed probe
                if not isinstance(exc, AuditError):  # the log already says why an audit write failed
                    log.error("audit probe failed: %s", type(exc).__name__)
                delay = min(delay * 2, AUDIT_PROBE_MAX_SECONDS)  # a full disk: one failed write per delay

    def _audit_event(self, event: Event) -> None:
        # Requests are recorded by the HTTP layer; here only what happens on the daemon's own
        # initiative (automatic rotation, policy reloads).
        if event.client != "system" or event.action == "barrier.unseal" or self.audit is None:
            return
        fields = {"action": event.action, "client": "system", "decision": "allow", "outcome": "ok",
                  "path": event.path, "version": event.version, **event.detail}
        task = asyncio.get_running_loop().create_task(self.record(fields))
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)
        task.add_done_callback(_log_task_failure)

    async def _watch_providers(self) -> None:
        """Check provider health now and then: a lost HSM shows as degraded, and comes back."""
        while True:
            await asyncio.sleep(self.settings.provider_check_seconds)
            try:
                await asyncio.to_thread(self.providers.check_health)
            except Exception as exc:  # the watcher must outlive any one failed check
                log.error("provider health check failed: %s", type(exc).__name__)

    async def stop(self) -> None:
        """Undo what ``start`` set up, newest first (a second call, or one without start, does nothing)."""
        await self._started.aclose()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _drain_event_tasks(self) -> None:
        if self._event_tasks:  # let records of events that just happened reach the log
            await asyncio.wait(set(self._event_tasks), timeout=self.settings.audit.write_timeout_seconds)

    async def _close_audit(self) -> None:
        if self.audit is not None:
            await self.audit.close()

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
        audit_ok = True
        if self.settings.audit.enabled:
            if self.audit is None:
                checks["audit"] = "not open"
            else:
                checks["audit"] = "ok" if self.audit.healthy else "failing"
            # Fail-closed means a failing log refuses requests: then the daemon is not ready.
            audit_ok = checks["audit"] == "ok" or not self.settings.audit.fail_closed
        ready = not self.barrier.sealed and checks["storage"] == "ok" and audit_ok
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
            "leader": self.leadership.is_leader,
            "backup": self.backup_schedule.status(),
            "audit_chain": self.audit_chain if self.settings.audit.enabled else None,
            **self.replication.status(),
            "policy": self.policies.status(),
            "version": __version__,
        }
