"""The storage engine: every rule of the store, written once, above the dialects.

A backend (``sqlite.py``, ``postgres.py``) is a *dialect*: SQL text, placeholders, connections,
transactions and durability. Everything a store *decides* lives here: check-and-set and version
allocation, which versions pruning keeps, labels and grace, which state changes a version may
make, encryption counting, rotation bookkeeping, the keyring's compare-and-swap, the revocation
guard, the row codecs (``secret_from_row`` and friends).

Each write is a *plan*: a generator that yields ``Op`` (a row operation by name, with arguments)
and receives the operation's result. The dialect runs the plan inside one transaction of its own,
synchronously on SQLite's writer thread (``run_sync``) or awaiting asyncpg (``run_async``). The
plan never touches a connection, so the same rules run on both without an await on SQLite's
thread or a thread hop per statement; a dialect retrying a transaction just starts a fresh plan.

The row operations a dialect implements (``RowOps`` spells out their signatures):

``lock_secret(path) -> SecretRecord | None``
    The secret's row, locked against concurrent writers until commit where the backend needs it.
``insert_secret(values)`` / ``update_secret(path, values)``
    ``values`` maps ``secrets`` columns to neutral values: ``datetime`` for time columns, JSON
    *text* for JSON columns (``codec``), ints, or None.
``lock_versions(path, versions) -> list[(version, state, deleted_at)]``
    The named versions that exist, locked.
``insert_version(record)`` / ``update_version(path, version, values)``
``prunable_versions(path, upto) -> list[(version, grace_until)]`` / ``delete_versions(path, versions)``
``count_encryption(term, n) -> int | None``
    Add ``n`` to the term's count and return it; None if the term does not exist.
``claim_initialized(at) -> bool``, ``insert_meta(items)``, ``insert_term(term)``
``lock_term_wrappings(term) -> str | None`` / ``update_term_wrappings(term, wrappings_json)``
``insert_token(token)``, ``lock_active_tokens(token_id, now) -> list[TokenRecord]``
``revoke_token(token_id, now) -> bool``
``lock_purgeable_tokens(cutoff, limit) -> list[TokenRecord]`` / ``delete_tokens(token_ids)``
``notify(channel, payload)``
    Announce a change to other processes when the transaction commits (a no-op without a feed).
``savepoint()`` / ``release_savepoint()`` / ``rollback_savepoint()``
    Open the batch item's savepoint; keep its changes; undo them (and leave it). Not nested.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar, get_args

from keyproviders import WrappedKey
from secretsd.errors import AlreadyInitializedError, ConflictError
from secretsd.storage import codec
from secretsd.storage.base import (
    KEYRING_CHANNEL,
    TOKENS_CHANNEL,
    BatchWrite,
    KeyringTerm,
    RevokeGuard,
    RotationStatus,
    Seal,
    SecretRecord,
    TokenRecord,
    VersionInfo,
    VersionRecord,
    VersionState,
    WriteResult,
)

T = TypeVar("T")

OpName = Literal[
    "lock_secret", "insert_secret", "update_secret", "lock_versions", "insert_version", "update_version",
    "prunable_versions", "delete_versions", "count_encryption", "claim_initialized", "insert_meta",
    "insert_term", "lock_term_wrappings", "update_term_wrappings", "insert_token", "lock_active_tokens",
    "lock_purgeable_tokens", "delete_tokens", "revoke_token", "renew_token", "notify", "savepoint",
    "release_savepoint", "rollback_savepoint",
]
OP_NAMES: tuple[str, ...] = get_args(OpName)


@dataclass(frozen=True, slots=True)
class Op:
    """One row operation a plan asks its dialect to run."""

    name: OpName
    args: tuple[Any, ...] = ()


#: A plan: yields row operations, receives their results, returns the outcome.
Plan = Generator[Op, Any, T]

#: Which ``secrets`` column holds each label (docs/rotation.md).
LABEL_COLUMNS: Mapping[str, str] = {
    "current": "current_version", "previous": "previous_version", "pending": "pending_version",
}


class RowOps(Protocol):
    """The synchronous form of a dialect's row operations (SQLite); PostgreSQL's are coroutines."""

    def lock_secret(self, path: str) -> SecretRecord | None: ...
    def insert_secret(self, values: Mapping[str, Any]) -> None: ...
    def update_secret(self, path: str, values: Mapping[str, Any]) -> None: ...
    def lock_versions(self, path: str, versions: Sequence[int]) -> list[tuple[int, str, datetime | None]]: ...
    def insert_version(self, record: VersionRecord) -> None: ...
    def update_version(self, path: str, version: int, values: Mapping[str, Any]) -> None: ...
    def prunable_versions(self, path: str, upto: int) -> list[tuple[int, datetime | None]]: ...
    def delete_versions(self, path: str, versions: Sequence[int]) -> None: ...
    def count_encryption(self, term: int, n: int) -> int | None: ...
    def claim_initialized(self, at: datetime) -> bool: ...
    def insert_meta(self, items: Sequence[tuple[str, str]]) -> None: ...
    def insert_term(self, term: KeyringTerm) -> None: ...
    def lock_term_wrappings(self, term: int) -> str | None: ...
    def update_term_wrappings(self, term: int, wrappings_json: str) -> None: ...
    def insert_token(self, token: TokenRecord) -> None: ...
    def lock_active_tokens(self, token_id: str, now: datetime) -> list[TokenRecord]: ...
    def lock_purgeable_tokens(self, cutoff: datetime, limit: int) -> list[TokenRecord]: ...
    def delete_tokens(self, token_ids: Sequence[str]) -> None: ...
    def revoke_token(self, token_id: str, now: datetime) -> bool: ...
    def renew_token(self, token_id: str, expires_at: datetime, now: datetime) -> bool: ...
    def notify(self, channel: str, payload: str) -> None: ...
    def savepoint(self) -> None: ...
    def release_savepoint(self) -> None: ...
    def rollback_savepoint(self) -> None: ...


# -- running a plan --------------------------------------------------------------------------------
def run_sync(plan: Plan[T], ops: object) -> T:
    """Run ``plan`` against synchronous row operations (inside the caller's transaction)."""
    result: Any = None
    try:
        while True:
            try:
                op = plan.send(result)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            result = getattr(ops, op.name)(*op.args)
    finally:
        plan.close()


async def run_async(plan: Plan[T], ops: object) -> T:
    """Run ``plan`` against coroutine row operations (inside the caller's transaction)."""
    result: Any = None
    try:
        while True:
            try:
                op = plan.send(result)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            call: Callable[..., Awaitable[Any]] = getattr(ops, op.name)
            result = await call(*op.args)
    finally:
        plan.close()


def missing_ops(ops: type) -> list[str]:
    """Row operations a dialect class lacks (its conformance test asserts there are none)."""
    return [name for name in OP_NAMES if not callable(getattr(ops, name, None))]


def ops_are_coroutines(ops: type) -> bool:
    return all(inspect.iscoroutinefunction(getattr(ops, name)) for name in OP_NAMES)


# -- row codecs: a dialect's columns, in the order the dialect selected them -------------------------
#: ``secrets`` columns in the order ``secret_from_row`` reads them.
SECRET_COLUMNS = ("path", "current_version", "created_at", "updated_at", "metadata", "latest_version",
                  "previous_version", "pending_version", "rotation", "rotation_due", "rotation_status")
#: ``secret_versions`` columns in the order ``version_from_row`` reads them.
VERSION_COLUMNS = ("path", "version", "created_at", "created_by", "state", "deleted_at", "term", "nonce",
                   "ciphertext", "expires_at", "grace_until")
#: ``secret_versions`` columns in the order ``version_info_from_row`` reads them.
VERSION_INFO_COLUMNS = ("path", "version", "created_at", "created_by", "state", "deleted_at", "expires_at",
                        "grace_until")
#: ``keyring_terms`` columns in the order ``term_from_row`` reads them.
TERM_COLUMNS = ("term", "wrappings", "created_at", "encryptions")
#: ``tokens`` columns in the order ``token_from_row`` reads them.
TOKEN_COLUMNS = ("token_id", "secret_hash", "client", "policies", "created_at", "created_by", "expires_at",
                 "revoked_at", "ttl_seconds", "max_expires_at")

#: A stored state to its enum member: a dict lookup, not the Enum call (on every read).
_STATES: Mapping[str, VersionState] = {s.value: s for s in VersionState}


def _state(text: str) -> VersionState:
    try:
        return _STATES[text]
    except KeyError:
        return VersionState(text)  # not a state: the Enum's own ValueError names it

#: How a dialect turns a stored time into an aware ``datetime`` (None stays None).
TimeDecoder = Callable[[Any], Any]


def secret_from_row(row: Sequence[Any], when: TimeDecoder) -> SecretRecord:
    """A ``SecretRecord`` from ``SECRET_COLUMNS`` (JSON columns as text)."""
    return SecretRecord(
        path=row[0], current_version=row[1], created_at=when(row[2]), updated_at=when(row[3]),
        metadata=codec.metadata_from_json(row[4]), latest_version=row[5], previous_version=row[6],
        pending_version=row[7], rotation=codec.metadata_from_json(row[8]) if row[8] is not None else None,
        rotation_due=when(row[9]), rotation_status=RotationStatus.of(codec.metadata_from_json(row[10])),
    )


def version_from_row(r: Sequence[Any], when: TimeDecoder) -> VersionRecord:
    """A ``VersionRecord`` from ``VERSION_COLUMNS``."""
    return VersionRecord(
        path=r[0], version=r[1], created_at=when(r[2]), created_by=r[3], state=_state(r[4]),
        deleted_at=when(r[5]), term=r[6], nonce=bytes(r[7]), ciphertext=bytes(r[8]), expires_at=when(r[9]),
        grace_until=when(r[10]),
    )


def version_info_from_row(r: Sequence[Any], when: TimeDecoder) -> VersionInfo:
    """A ``VersionInfo`` from ``VERSION_INFO_COLUMNS``: a version without its sealed value."""
    return VersionInfo(path=r[0], version=r[1], created_at=when(r[2]), created_by=r[3], state=_state(r[4]),
                       deleted_at=when(r[5]), expires_at=when(r[6]), grace_until=when(r[7]))


def term_from_row(r: Sequence[Any], when: TimeDecoder) -> KeyringTerm:
    """A ``KeyringTerm`` from ``TERM_COLUMNS`` (wrappings as JSON text)."""
    return KeyringTerm(term=r[0], wrappings=codec.wrappings_from_json(r[1]), created_at=when(r[2]),
                       encryptions=r[3])


def token_from_row(r: Sequence[Any], when: TimeDecoder) -> TokenRecord:
    """A ``TokenRecord`` from ``TOKEN_COLUMNS`` (policies as JSON text)."""
    return TokenRecord(
        token_id=r[0], secret_hash=bytes(r[1]), client=r[2], policies=codec.policies_from_json(r[3]),
        created_at=when(r[4]), created_by=r[5], expires_at=when(r[6]), revoked_at=when(r[7]),
        ttl_seconds=r[8], max_expires_at=when(r[9]),
    )


def label_column(label: str) -> str:
    """The ``secrets`` column that names the version a label points at; ``ValueError`` if none."""
    try:
        return LABEL_COLUMNS[label]
    except KeyError:
        raise ValueError(f"unknown label {label!r}") from None


# -- the rules --------------------------------------------------------------------------------------
def is_next_version(secret: SecretRecord | None, expected_current: int, version: int) -> bool:
    """The rule of check-and-set: the current version is the one the writer saw (0: no secret),
    and ``version`` is ``latest_version + 1``, so a number once allocated (even to a discarded
    pending version) is never reused."""
    current = secret.current_version if secret else 0
    latest = secret.latest_version if secret else 0
    return current == expected_current and version == latest + 1


def check_and_set(path: str, secret: SecretRecord | None, expected_current: int, version: int) -> None:
    """A new version is sealed against the current version the caller saw, and takes the next number."""
    if not is_next_version(secret, expected_current, version):
        current = secret.current_version if secret else 0
        raise ConflictError(f"check-and-set failed: current version of {path} is {current}, "
                            f"expected {expected_current}")


def versions_to_prune(
    candidates: Sequence[tuple[int, datetime | None]], keep: set[int | None], now: datetime
) -> list[int]:
    """Of the versions beyond ``max_versions``, those pruning drops: never a labelled one (previous,
    pending: ``keep``), never one still in grace at ``now``."""
    return [v for v, grace in candidates if v not in keep and (grace is None or grace <= now)]


def state_change(
    current: str, target: VersionState, deleted_at: datetime | None, now: datetime
) -> dict[str, Any] | None:
    """The columns a version changes to reach ``target``; None when it may not (or is there already).

    Delete only an active version; restore only a deleted one; destroy any that is not destroyed
    yet, wiping its ciphertext and nonce and keeping the first deletion time.
    """
    if target is VersionState.DESTROYED:
        if current == VersionState.DESTROYED:
            return None
        return {"state": VersionState.DESTROYED.value, "nonce": b"", "ciphertext": b"",
                "deleted_at": deleted_at or now}
    if target is VersionState.DELETED:
        return {"state": target.value, "deleted_at": now} if current == VersionState.ACTIVE else None
    return {"state": target.value, "deleted_at": None} if current == VersionState.DELETED else None


def _status_json(status: RotationStatus) -> str:
    return codec.metadata_to_json(RotationStatus.of(status))


def _prune(path: str, newest: int, max_versions: int, keep: set[int | None], now: datetime) -> Plan[None]:
    upto = newest - max_versions
    if upto < 1:  # nothing can be beyond the limit yet: skip the query
        return
    drop = versions_to_prune((yield Op("prunable_versions", (path, upto))), keep, now)
    if drop:
        yield Op("delete_versions", (path, drop))


def count_encryption_plan(term: int, n: int = 1) -> Plan[int]:
    """``n`` more values sealed under ``term`` (the count drives automatic retirement of terms)."""
    count = yield Op("count_encryption", (term, n))
    if count is None:
        raise ConflictError(f"keyring term {term} does not exist")
    return int(count)


# -- plans, one per Storage write ------------------------------------------------------------------------
def initialize(
    meta: Mapping[str, str], first_term: KeyringTerm, admin_token: TokenRecord, now: datetime, where: str
) -> Plan[None]:
    if not (yield Op("claim_initialized", (now,))):
        raise AlreadyInitializedError(f"the store {where} is already initialised")
    yield Op("insert_meta", (list(meta.items()),))
    yield Op("insert_term", (first_term,))
    yield Op("insert_token", (admin_token,))


def add_keyring_term(term: KeyringTerm) -> Plan[None]:
    yield Op("insert_term", (term,))
    yield Op("notify", (KEYRING_CHANNEL, str(term.term)))


def replace_keyring_wrappings(
    term: int, expected: tuple[WrappedKey, ...], wrappings: tuple[WrappedKey, ...]
) -> Plan[None]:
    """Compare-and-swap of a term's wrappings: the DEK stays, only its wrapping changes."""
    if not wrappings:
        raise ValueError("a keyring term needs at least one wrapping")
    current = yield Op("lock_term_wrappings", (term,))
    if current is None or codec.wrappings_from_json(current) != expected:
        raise ConflictError(f"keyring term {term} changed while it was being re-wrapped")
    yield Op("update_term_wrappings", (term, codec.wrappings_to_json(wrappings)))
    yield Op("notify", (KEYRING_CHANNEL, str(term)))


def write_version(
    record: VersionRecord, *, expected_current: int, metadata: Mapping[str, Any] | None, max_versions: int,
    grace_until: datetime | None,
) -> Plan[WriteResult]:
    if max_versions < 1:
        raise ValueError("max_versions must be at least 1")
    secret: SecretRecord | None = yield Op("lock_secret", (record.path,))
    check_and_set(record.path, secret, expected_current, record.version)
    return (yield from _write_next(secret, record, metadata, max_versions, grace_until))


def write_unconditional(
    path: str, seal: Seal, *, metadata: Mapping[str, Any] | None, max_versions: int,
) -> Plan[WriteResult]:
    """A write without check-and-set: ``seal`` makes its record here, against the secret as this
    transaction locked it, so it is never a conflict and costs its caller no read before."""
    if max_versions < 1:
        raise ValueError("max_versions must be at least 1")
    return (yield from _write_sealed(BatchWrite(path, seal, metadata=metadata), max_versions))[0]


def write_batch(items: Sequence[BatchWrite], *, max_versions: int) -> Plan[list[WriteResult | ConflictError]]:
    """Each item as ``write_unconditional`` (or, with ``expected_current``, check-and-set first), in
    a savepoint of its own: a refused item is undone alone and its error takes its place. The
    sealing terms' encryption counts move once per term at the end, by the items written."""
    if max_versions < 1:
        raise ValueError("max_versions must be at least 1")
    results: list[WriteResult | ConflictError] = []
    terms: list[int | None] = []
    for item in items:
        yield Op("savepoint")
        try:
            result, term = yield from _write_sealed(item, max_versions, count=False)
        except ConflictError as exc:
            yield Op("rollback_savepoint")
            results.append(exc)
            terms.append(None)
        else:
            yield Op("release_savepoint")
            results.append(result)
            terms.append(term)
    counts: dict[int, int] = {}
    for term in dict.fromkeys(t for t in terms if t is not None):
        counts[term] = yield from count_encryption_plan(term, terms.count(term))
    return [r if isinstance(r, ConflictError) or t is None else dataclasses.replace(r, term_encryptions=counts[t])
            for r, t in zip(results, terms, strict=True)]


def _write_sealed(item: BatchWrite, max_versions: int, *, count: bool = True) -> Plan[tuple[WriteResult, int]]:
    """Seal ``item`` against its secret as this transaction locked it, and append it; the result
    and the term that sealed it (``count=False``: the caller counts the encryption)."""
    path = item.path
    secret: SecretRecord | None = yield Op("lock_secret", (path,))
    record, grace_until = item.seal(secret)
    if record.path != path:
        raise ValueError("seal must keep the path")
    current = secret.current_version if secret else 0
    check_and_set(path, secret, current if item.expected_current is None else item.expected_current,
                  record.version)
    result = yield from _write_next(secret, record, item.metadata, max_versions, grace_until, count=count)
    return result, record.term


def _write_next(
    secret: SecretRecord | None, record: VersionRecord, metadata: Mapping[str, Any] | None, max_versions: int,
    grace_until: datetime | None, *, count: bool = True,
) -> Plan[WriteResult]:
    """Append ``record`` (already checked to be the next version) and make it current."""
    path = record.path
    meta_json = codec.metadata_to_json(metadata) if metadata is not None else None
    if secret is None:
        # No row to lock yet: of concurrent creators the primary key lets one insert; the others
        # fail with a unique violation, which the dialect reports as ConflictError.
        yield Op("insert_secret", ({
            "path": path, "current_version": record.version, "created_at": record.created_at,
            "updated_at": record.created_at, "metadata": meta_json or "{}", "latest_version": record.version,
        },))
        out = SecretRecord(path=path, current_version=record.version, created_at=record.created_at,
                           updated_at=record.created_at, metadata=codec.metadata_from_json(meta_json or "{}"),
                           latest_version=record.version)
    else:
        # The old current version becomes previous (and, with grace_until, readable until then).
        changes: dict[str, Any] = {"current_version": record.version, "updated_at": record.created_at,
                                   "latest_version": record.version, "previous_version": secret.current_version}
        if meta_json is not None:
            changes["metadata"] = meta_json
        yield Op("update_secret", (path, changes))
        if grace_until is not None:
            yield Op("update_version", (path, secret.current_version, {"grace_until": grace_until}))
        out = dataclasses.replace(
            secret, current_version=record.version, updated_at=record.created_at, latest_version=record.version,
            previous_version=secret.current_version,
            metadata=codec.metadata_from_json(meta_json) if meta_json is not None else secret.metadata,
        )
    yield Op("insert_version", (record,))
    yield from _prune(path, record.version, max_versions, {out.previous_version, out.pending_version},
                      record.created_at)
    if not count:
        return WriteResult(out, 0)
    # Last, so PostgreSQL holds the term's row lock (which every writer needs) only until commit.
    return WriteResult(out, (yield from count_encryption_plan(record.term)))


def create_pending(record: VersionRecord, *, expected_current: int) -> Plan[WriteResult]:
    """A rotation's new value, staged as ``pending``: one at a time, on an existing secret."""
    path = record.path
    secret: SecretRecord | None = yield Op("lock_secret", (path,))
    if (secret is None or secret.current_version != expected_current or secret.pending_version is not None
            or record.version != secret.latest_version + 1):
        raise ConflictError(f"{path} changed, or a rotation of it is in progress")
    yield Op("update_secret", (path, {"pending_version": record.version, "latest_version": record.version}))
    yield Op("insert_version", (record,))
    out = dataclasses.replace(secret, pending_version=record.version, latest_version=record.version)
    return WriteResult(out, (yield from count_encryption_plan(record.term)))


def finish_pending(
    path: str, version: int, *, expected_current: int, now: datetime, grace_until: datetime | None,
    max_versions: int, rotation_due: datetime | None, rotation_status: RotationStatus,
) -> Plan[SecretRecord]:
    """Promote the pending version: only if it is still pending, still active, and current unchanged."""
    secret: SecretRecord | None = yield Op("lock_secret", (path,))
    found = [] if secret is None or secret.pending_version != version else (
        yield Op("lock_versions", (path, [version])))
    if secret is None or not found or found[0][1] != VersionState.ACTIVE \
            or secret.current_version != expected_current:
        raise ConflictError(f"{path} changed while it was being rotated")
    status = RotationStatus.of(rotation_status)
    yield Op("update_secret", (path, {
        "current_version": version, "previous_version": expected_current, "pending_version": None,
        "updated_at": now, "rotation_due": rotation_due, "rotation_status": _status_json(status),
    }))
    yield Op("update_version", (path, expected_current, {"grace_until": grace_until}))
    yield from _prune(path, version, max_versions, {expected_current}, now)
    return dataclasses.replace(secret, current_version=version, previous_version=expected_current,
                               pending_version=None, updated_at=now, rotation_due=rotation_due,
                               rotation_status=status)


def discard_pending(
    path: str, version: int, *, now: datetime, rotation_due: datetime | None, rotation_status: RotationStatus,
) -> Plan[bool]:
    """Destroy a pending version nobody will promote; its number is never reused."""
    secret: SecretRecord | None = yield Op("lock_secret", (path,))
    if secret is None or secret.pending_version != version:
        return False
    yield Op("update_secret", (path, {"pending_version": None, "rotation_due": rotation_due,
                                      "rotation_status": _status_json(rotation_status)}))
    yield from _set_states(path, [version], VersionState.DESTROYED, now)
    return True


def set_rotation(
    path: str, policy: Mapping[str, Any] | None, rotation_due: datetime | None
) -> Plan[SecretRecord | None]:
    secret: SecretRecord | None = yield Op("lock_secret", (path,))
    if secret is None:
        return None
    policy_json = codec.metadata_to_json(policy) if policy is not None else None
    yield Op("update_secret", (path, {"rotation": policy_json, "rotation_due": rotation_due}))
    return dataclasses.replace(
        secret, rotation=codec.metadata_from_json(policy_json) if policy_json is not None else None,
        rotation_due=rotation_due,
    )


def record_rotation(path: str, rotation_due: datetime | None, rotation_status: RotationStatus) -> Plan[None]:
    yield Op("update_secret", (path, {"rotation_due": rotation_due,
                                      "rotation_status": _status_json(rotation_status)}))


def _set_states(path: str, versions: Sequence[int], state: VersionState, now: datetime) -> Plan[list[int]]:
    changed = []
    for version, current, deleted_at in sorted((yield Op("lock_versions", (path, sorted(set(versions)))))):
        values = state_change(current, state, deleted_at, now)
        if values is not None:
            yield Op("update_version", (path, version, values))
            changed.append(version)
    return changed


def set_version_state(path: str, versions: Sequence[int], state: VersionState, now: datetime) -> Plan[list[int]]:
    return (yield from _set_states(path, versions, state, now))


def create_token(token: TokenRecord) -> Plan[None]:
    yield Op("insert_token", (token,))


def renew_token(token_id: str, expires_at: datetime, now: datetime) -> Plan[bool]:
    """Move an active token's expiry; False if it is revoked or expired at ``now`` (or unknown).
    Other processes hear of it on the tokens channel, as of a revocation (their caches drop it)."""
    if not (yield Op("renew_token", (token_id, expires_at, now))):
        return False
    yield Op("notify", (TOKENS_CHANNEL, token_id))
    return True


def revoke_token(token_id: str, now: datetime, guard: RevokeGuard | None) -> Plan[bool]:
    """Revoke once; a guard judges the target against every other active (unrevoked, unexpired at
    ``now``) token, under a lock the dialect holds until commit (so two guarded revocations cannot
    both pass on a stale view). Expired tokens are not read: the guard's work stays with the live set."""
    if guard is not None:
        found: list[TokenRecord] = yield Op("lock_active_tokens", (token_id, now))
        target = next((t for t in found if t.token_id == token_id), None)
        if target is None:
            return False
        guard(target, [t for t in found if t.token_id != token_id], now)
    if not (yield Op("revoke_token", (token_id, now))):
        return False
    yield Op("notify", (TOKENS_CHANNEL, token_id))
    return True


#: Before every stored time: a token listing that includes expired tokens shows those expired after it.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: Rows one purge transaction deletes at most: a sweep of a large backlog never holds the writer long.
PURGE_BATCH = 1000


def is_purgeable(token: TokenRecord, cutoff: datetime, now: datetime) -> bool:
    """The rule: a token row may be deleted once it was revoked or expired at or before ``cutoff``
    (now minus the retention), and never while it is active at ``now``: whatever a row's times say,
    a token that still authenticates (an active root token above all) is never purged."""
    if token.is_active(now) or cutoff > now:
        return False
    return ((token.revoked_at is not None and token.revoked_at <= cutoff)
            or (token.expires_at is not None and token.expires_at <= cutoff))


def purge_tokens(cutoff: datetime, now: datetime, limit: int) -> Plan[int]:
    """Delete one batch (at most ``limit``) of purgeable tokens; return how many were deleted."""
    found: list[TokenRecord] = yield Op("lock_purgeable_tokens", (cutoff, limit))
    doomed = [t.token_id for t in found if is_purgeable(t, cutoff, now)]
    if doomed:
        yield Op("delete_tokens", (doomed,))
    return len(doomed)
