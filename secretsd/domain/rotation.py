"""Secret lifecycle: rotation policy, staging labels, grace, expiry, and the rotation state machine.

The rules live here, once (docs/rotation.md has the prose):

- ``check_servable`` decides whether a version may be served to a caller: the serving rule.
- ``RotationService.rotate`` is the state machine
  ``(no pending) -> create pending -> hook set -> hook test -> finish (pending becomes current,
  current becomes previous with a grace period)``, or, on any failure, ``discard pending``
  (destroyed; current unchanged). Every step that changes state is a check-and-set in storage, so
  several replicas, the API and the scheduler can race on one secret and no version is lost.
- ``RotationService.recover`` finishes or discards a pending version a dead daemon left behind.

HTTP handlers and the scheduler call this module; it calls storage and the barrier.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from secretsd.clock import Clock, utcnow
from secretsd.custody.barrier import Barrier
from secretsd.domain.generators import BytesGenerator, GeneratorSpec
from secretsd.domain.hooks import Hook, HookCall, HookFailed
from secretsd.domain.identity import Principal
from secretsd.domain.rotation_settings import RotationSettings
from secretsd.domain.values import encodable, validate_expiry
from secretsd.errors import (
    ConflictError,
    GoneError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    RotationFailedError,
)
from secretsd.events import Event, EventBus
from secretsd.paths import validate_path, validate_prefix
from secretsd.records import SecretRecord, VersionInfo, VersionRecord, VersionState
from secretsd.storage import Storage

log = logging.getLogger("secretsd.domain.rotation")

DAY = 86400
DEFAULT_PERIOD_SECONDS = 90 * DAY
DEFAULT_GRACE_SECONDS = 14 * DAY
SYSTEM = Principal(client="system", policies=(), method="internal")
LABELS = ("current", "previous", "pending")


class RotationPolicy(BaseModel):
    """A secret's rotation policy, stored with its metadata (``PUT /v1/metadata/{path}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Scheduled rotation on or off. Manual rotation (API, CLI) works either way.
    enabled: bool = False
    period_seconds: int = Field(default=DEFAULT_PERIOD_SECONDS, ge=3600, le=3650 * DAY)
    #: How long the superseded version stays readable by ordinary readers.
    grace_seconds: int = Field(default=DEFAULT_GRACE_SECONDS, ge=0, le=365 * DAY)
    generator: GeneratorSpec = Field(default_factory=BytesGenerator)
    #: The name of a hook in the daemon's ``[rotation.hooks]`` configuration.
    hook: str | None = None
    #: No version older than this is served (applies whether or not ``enabled``).
    max_age_seconds: int | None = Field(default=None, ge=60, le=3650 * DAY)

    @model_validator(mode="after")
    def _consistent(self) -> RotationPolicy:
        if self.enabled and self.grace_seconds > self.period_seconds:
            raise ValueError("grace_seconds must not exceed period_seconds")
        if self.enabled and self.max_age_seconds is not None and self.max_age_seconds <= self.period_seconds:
            raise ValueError("max_age_seconds must exceed period_seconds, or values expire before they rotate")
        return self

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> RotationPolicy:
        """The stored policy, or the default (scheduled rotation off) when there is none."""
        if raw is None:
            return cls()
        try:
            return cls.model_validate(dict(raw))
        except ValidationError:
            log.error("a stored rotation policy is invalid; treating it as the default")
            return cls()

    @property
    def period(self) -> timedelta:
        return timedelta(seconds=self.period_seconds)

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.grace_seconds)


# -- the serving rule ----------------------------------------------------------------------------
def effective_expiry(version: VersionInfo, rotation: Mapping[str, Any] | None) -> datetime | None:
    """The earlier of the version's own ``expires_at`` and its creation plus the secret's max age."""
    expiry = version.expires_at
    max_age = rotation.get("max_age_seconds") if rotation else None
    if isinstance(max_age, int) and not isinstance(max_age, bool):
        by_age = version.created_at + timedelta(seconds=max_age)
        expiry = by_age if expiry is None else min(expiry, by_age)
    return expiry


def labels_of(secret: SecretRecord, version: int) -> list[str]:
    return [name for name, number in (("current", secret.current_version), ("previous", secret.previous_version),
                                      ("pending", secret.pending_version)) if number == version]


def check_servable(secret: SecretRecord, version: VersionRecord | VersionInfo, *, now: datetime,
                   privileged: bool, may_read_pending: bool) -> None:
    """The serving rule: raise unless ``version`` of ``secret`` may be served to this caller now.

    - deleted or destroyed: 404, to everyone;
    - the pending version (not yet published): 404 unless the caller may rotate the secret;
    - expired (own ``expires_at`` or the secret's max age): 410, to everyone, admin included;
    - superseded by a rotation and past its grace period: 410, unless the caller is ``admin``.
    """
    if version.state is not VersionState.ACTIVE:
        raise NotFoundError(f"version {version.version} of {secret.path} is {version.state.value}")
    if version.version == secret.pending_version and not may_read_pending:
        raise NotFoundError(f"{secret.path} has no version {version.version}")
    expiry = effective_expiry(version, secret.rotation)
    if expiry is not None and now >= expiry:
        raise GoneError(f"version {version.version} of {secret.path} expired at {expiry.isoformat()}")
    if (version.version != secret.current_version and version.grace_until is not None
            and now >= version.grace_until and not privileged):
        raise GoneError(
            f"version {version.version} of {secret.path} was rotated out; its grace period ended at "
            f"{version.grace_until.isoformat()}"
        )


def backoff(failures: int, settings: RotationSettings) -> timedelta:
    """Delay before retrying after ``failures`` consecutive failures: exponential, capped."""
    exponent = min(max(failures - 1, 0), 30)
    return timedelta(seconds=min(settings.retry_max_seconds, settings.retry_base_seconds * 2**exponent))


# -- the state machine ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Rotated:
    path: str
    version: int
    previous_version: int
    grace_until: datetime | None
    secret: SecretRecord


@dataclass(frozen=True)
class Outcome:
    """What the scheduler did with one candidate (for tests, logs and the status table)."""

    path: str
    result: str  # succeeded | failed | blocked | conflict | rescheduled | recovered | discarded | skipped
    reason: str = ""
    version: int | None = None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class RotationService:
    def __init__(
        self,
        storage: Storage,
        barrier: Barrier,
        settings: RotationSettings,
        *,
        max_versions: int,
        max_value_bytes: int,
        events: EventBus | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._storage = storage
        self._barrier = barrier
        self.settings = settings
        self._max_versions = max_versions
        self._max_value_bytes = max_value_bytes
        self._events = events or EventBus()
        self._clock = clock
        self._hooks = {name: Hook(name, hook) for name, hook in settings.hooks.items()}
        #: Paths this process is rotating right now: their pending versions are not orphans.
        self._inflight: set[str] = set()

    # -- policy -------------------------------------------------------------------------------
    async def set_policy(self, who: Principal, path: str, policy: RotationPolicy | None) -> SecretRecord:
        validate_path(path)
        if policy is not None and policy.hook is not None:
            hook = self._hooks.get(policy.hook)
            if hook is None or not hook.settings.allows(path):
                # One answer for both: callers learn nothing about hooks meant for other paths.
                raise RequestError(f"no rotation hook named {policy.hook!r} is available for {path}")
        secret = await self._storage.get_secret(path)
        if secret is None:
            raise NotFoundError(f"no secret at {path}")
        due = secret.updated_at + policy.period if policy is not None and policy.enabled else None
        raw = policy.model_dump(mode="json") if policy is not None else None
        updated = await self._storage.set_rotation(path, raw, due)
        if updated is None:
            raise NotFoundError(f"no secret at {path}")
        self._events.emit(Event("secret.policy", self._clock(), who.client, path,
                                detail={"rotation": "enabled" if policy and policy.enabled else
                                        "disabled" if policy else "removed"}))
        return updated

    async def list_status(self, prefix: str) -> list[SecretRecord]:
        """Secrets under ``prefix`` that have a rotation policy, a pending version or a history."""
        prefix = validate_prefix(prefix)
        found: list[SecretRecord] = []
        after = ""
        while True:
            page = await self._storage.list_secrets(prefix, after=after, limit=1000)
            found.extend(s for s in page if s.rotation is not None or s.pending_version is not None
                         or s.rotation_status)
            if len(page) < 1000:
                return found
            after = page[-1].path

    # -- rotating -------------------------------------------------------------------------------
    async def rotate(self, who: Principal, path: str, value: str | None = None, *,
                     expires_at: datetime | None = None, trigger: str = "api") -> Rotated:
        """Rotate ``path`` now: a new current version, the old one previous (with grace).

        Raises ``RequestError`` when the generator is ``supplied`` and no value was given,
        ``ConflictError`` when a rotation is already in progress or a write raced this one (the
        new value is then discarded), ``RotationFailedError`` when the hook failed.
        """
        validate_path(path)
        expires_at = validate_expiry(expires_at, self._clock())
        if value is not None:
            encodable(value)
        secret = await self._storage.get_secret(path)
        if secret is None:
            raise NotFoundError(f"no secret at {path}")
        policy = RotationPolicy.parse(secret.rotation)
        if path in self._inflight or secret.pending_version is not None:
            raise ConflictError(
                f"a rotation of {path} is in progress (pending version {secret.pending_version}); a pending "
                "version left by a stopped daemon is finished or discarded by the scheduler"
            )
        if value is None:
            if policy.generator.kind == "supplied":
                raise RequestError(f"the rotation policy of {path} needs a supplied value: give one")
            value = policy.generator.generate()
        plaintext = value.encode("utf-8")
        if len(plaintext) > self._max_value_bytes:
            raise PayloadTooLargeError(f"the value is larger than {self._max_value_bytes} bytes")
        try:
            hook = self._hook(policy, path)
        except RotationFailedError as exc:
            await self._record_failure(who, secret, policy, exc.message, trigger)
            raise
        self._inflight.add(path)
        try:
            version = secret.latest_version + 1
            sealed = self._barrier.seal_value(path, version, plaintext)
            record = VersionRecord(
                path=path, version=version, created_at=self._clock(), created_by=who.client,
                state=VersionState.ACTIVE, term=sealed.term, nonce=sealed.nonce, ciphertext=sealed.ciphertext,
                expires_at=expires_at,
            )
            try:
                made = await self._storage.create_pending(record, expected_current=secret.current_version)
            except ConflictError:
                raise ConflictError(f"{path} changed while the rotation began; try again") from None
            await self._barrier.note_encryptions(sealed.term, made.term_encryptions)
            return await self._complete(who, made.secret, version, value, policy, hook, trigger)
        finally:
            self._inflight.discard(path)

    def _hook(self, policy: RotationPolicy, path: str) -> Hook | None:
        if policy.hook is None:
            return None
        hook = self._hooks.get(policy.hook)
        if hook is None or not hook.settings.allows(path):
            # Checked again at run time: the configuration may have changed since the policy was set.
            raise RotationFailedError(f"the rotation hook {policy.hook!r} is not configured for {path}")
        return hook

    async def _complete(self, who: Principal, secret: SecretRecord, version: int, value: str,
                        policy: RotationPolicy, hook: Hook | None, trigger: str) -> Rotated:
        """Steps 2-4 for a pending ``version`` (already stored): hook set/test, then finish or discard."""
        path, expected = secret.path, secret.current_version
        if hook is not None:
            try:
                await hook.run(HookCall(path, version, expected, value))
            except HookFailed as exc:
                await self._discard(who, secret, version, policy, exc.reason, trigger, result="failed")
                raise RotationFailedError(
                    f"rotation of {path} failed: {exc.reason}; the pending version {version} was discarded and "
                    f"version {expected} stays current"
                ) from None
        now = self._clock()
        grace_until = now + policy.grace
        status = secret.rotation_status.replace(
            last_result="succeeded", last_reason="", last_attempt_at=_iso(now), last_success_at=_iso(now),
            failures=0, last_version=version, trigger=trigger,
        )
        try:
            done = await self._storage.finish_pending(
                path, version, expected_current=expected, now=now, grace_until=grace_until,
                max_versions=self._max_versions, rotation_due=now + policy.period if policy.enabled else None,
                rotation_status=status,
            )
        except ConflictError:
            reason = "the secret was written while it was being rotated"
            await self._discard(who, secret, version, policy, reason, trigger, result="conflict")
            raise ConflictError(f"{path} was written while it was being rotated; the rotation's value "
                                f"(version {version}) was discarded and the write stands") from None
        self._events.emit(Event("rotation.succeeded", now, who.client, path, version,
                                {"outcome": "ok", "previous_version": expected, "trigger": trigger,
                                 "grace_until": _iso(grace_until)}))
        return Rotated(path, version, expected, grace_until, done)

    async def _discard(self, who: Principal, secret: SecretRecord, version: int, policy: RotationPolicy,
                       reason: str, trigger: str, *, result: str) -> None:
        now = self._clock()
        failures = secret.rotation_status.failure_count + 1
        status = secret.rotation_status.replace(
            last_result=result, last_reason=reason, last_attempt_at=_iso(now), failures=failures, trigger=trigger,
        )
        due = now + backoff(failures, self.settings) if policy.enabled else secret.rotation_due
        discarded = await self._storage.discard_pending(path := secret.path, version, now=now, rotation_due=due,
                                                        rotation_status=status)
        log.warning("rotation of %s failed (%s); pending version %d %s", path, reason, version,
                    "discarded" if discarded else "was already gone")
        self._events.emit(Event("rotation.failed", now, who.client, path, version,
                                {"outcome": "failed", "reason": reason, "result": result, "trigger": trigger,
                                 "failures": failures, "retry_at": _iso(due) if policy.enabled else None}))

    # -- the scheduler's work ------------------------------------------------------------------
    async def run_due(self, *, limit: int | None = None) -> list[Outcome]:
        """One pass over what is due: orphaned pending versions first, then due rotations."""
        now = self._clock()
        outcomes = []
        for secret in await self._storage.rotation_candidates(now, limit=limit or self.settings.batch):
            try:
                outcomes.append(await self._handle(secret, now))
            except Exception as exc:  # one secret's trouble must not stop the others
                log.error("scheduled rotation of %s failed: %s", secret.path, type(exc).__name__)
                outcomes.append(Outcome(secret.path, "failed", type(exc).__name__))
        return outcomes

    async def _handle(self, secret: SecretRecord, now: datetime) -> Outcome:
        path = secret.path
        if path in self._inflight:
            return Outcome(path, "skipped", "in progress here")
        if secret.pending_version is not None:
            return await self.recover(secret, now)
        policy = RotationPolicy.parse(secret.rotation)
        if not policy.enabled:
            await self._storage.record_rotation(path, None, secret.rotation_status)
            return Outcome(path, "rescheduled", "scheduled rotation is off")
        last_failed = secret.rotation_status.last_result in ("failed", "conflict", "blocked")
        if not last_failed and secret.updated_at + policy.period > now:
            # Written since it was scheduled (a write is a manual rotation): due one period later.
            await self._storage.record_rotation(path, secret.updated_at + policy.period, secret.rotation_status)
            return Outcome(path, "rescheduled", "written since")
        if policy.generator.kind == "supplied":
            reason = "the generator is 'supplied': an operator must rotate it with a value"
            status = secret.rotation_status.replace(last_result="blocked", last_reason=reason,
                                                    last_attempt_at=_iso(now), trigger="schedule")
            due = now + timedelta(seconds=self.settings.retry_max_seconds)
            await self._storage.record_rotation(path, due, status)
            self._events.emit(Event("rotation.failed", now, SYSTEM.client, path, secret.current_version,
                                    {"outcome": "failed", "result": "blocked", "reason": reason,
                                     "trigger": "schedule", "retry_at": _iso(due)}))
            return Outcome(path, "blocked", reason)
        try:
            done = await self.rotate(SYSTEM, path, trigger="schedule")
        except RotationFailedError as exc:
            return Outcome(path, "failed", exc.message)
        except ConflictError as exc:
            return Outcome(path, "conflict", exc.message)
        return Outcome(path, "succeeded", version=done.version)

    async def _record_failure(self, who: Principal, secret: SecretRecord, policy: RotationPolicy, reason: str,
                              trigger: str) -> None:
        """A failure before any pending version existed (a hook missing from the configuration)."""
        now = self._clock()
        failures = secret.rotation_status.failure_count + 1
        due = now + backoff(failures, self.settings) if policy.enabled else secret.rotation_due
        status = secret.rotation_status.replace(last_result="failed", last_reason=reason,
                                                last_attempt_at=_iso(now), failures=failures, trigger=trigger)
        await self._storage.record_rotation(secret.path, due, status)
        self._events.emit(Event("rotation.failed", now, who.client, secret.path, None,
                                {"outcome": "failed", "result": "failed", "reason": reason,
                                 "trigger": trigger, "failures": failures,
                                 "retry_at": _iso(due) if policy.enabled else None}))

    async def recover(self, secret: SecretRecord, now: datetime) -> Outcome:
        """Finish (hook steps again, then promote) or discard a pending version nobody is finishing.

        Only once it is older than ``pending_timeout_seconds``: a younger one may belong to a
        rotation in progress on another replica.
        """
        path, version = secret.path, secret.pending_version
        assert version is not None
        record = await self._storage.get_version(path, version)
        timeout = timedelta(seconds=self.settings.pending_timeout_seconds)
        if record is not None and record.state is VersionState.ACTIVE and record.created_at + timeout > now:
            return Outcome(path, "skipped", "pending version is recent", version)
        policy = RotationPolicy.parse(secret.rotation)
        if record is None or record.state is not VersionState.ACTIVE:
            await self._discard(SYSTEM, secret, version, policy, "the pending version was lost", "recovery",
                                result="failed")
            return Outcome(path, "discarded", "pending version lost", version)
        self._inflight.add(path)
        try:
            try:
                value = (await self._barrier.open_value(record)).decode("utf-8")
                hook = self._hook(policy, path)
            except RotationFailedError as exc:
                await self._discard(SYSTEM, secret, version, policy, exc.message, "recovery", result="failed")
                return Outcome(path, "discarded", exc.message, version)
            try:
                await self._complete(SYSTEM, secret, version, value, policy, hook, "recovery")
            except (RotationFailedError, ConflictError) as exc:
                return Outcome(path, "discarded", exc.message, version)
            return Outcome(path, "recovered", version=version)
        finally:
            self._inflight.discard(path)
