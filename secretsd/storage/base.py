"""The storage protocol and the records that cross it.

Storage holds only ciphertext, wrapped keys, token hashes and metadata. Every backend passes the
same conformance suite (``secretsd.storage.testing``); nothing backend-specific belongs here.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from keyproviders import WrappedKey
from secretsd.errors import ConflictError
from secretsd.records import (  # the records that cross the protocol (re-exported)
    KeyringTerm,
    RotationStatus,
    SecretRecord,
    TokenRecord,
    VersionInfo,
    VersionRecord,
    VersionState,
    WriteResult,
)

__all__ = [
    "KeyringTerm", "RotationStatus", "SecretRecord", "TokenRecord", "VersionInfo", "VersionRecord",
    "VersionState", "WriteResult",
]

#: Seals an unconditional write for the secret as its transaction locked it (None: no such secret):
#: returns the version record to write (numbered ``latest_version + 1``) and the old current's grace end.
Seal = Callable[[SecretRecord | None], tuple[VersionRecord, datetime | None]]


@dataclass(frozen=True)
class BatchWrite:
    """One write of a batch (``Storage.write_batch``): sealed inside the transaction like
    ``write_unconditional``, refused (ConflictError) when ``expected_current`` is set and the
    secret's current version is another one (0: the secret must not exist yet)."""

    path: str
    seal: Seal
    expected_current: int | None = None
    metadata: Mapping[str, Any] | None = None

#: Decides, inside the revoking transaction, whether a revocation may go ahead (raise to refuse).
RevokeGuard = Callable[[TokenRecord, Sequence[TokenRecord], datetime], None]


#: What ``export_rows`` yields and ``import_rows`` takes: column -> backend-neutral value
#: (see ``secretsd.storage.rows``, which also lists the tables, in reference order).
ExportRow = dict[str, Any]

#: The leader lock a serving daemon holds (its scheduler's); offline tools that must not run beside a
#: daemon (storage migrate) try it. Named here, in the layer both sides import.
SCHEDULER_LOCK = "scheduler"

#: Change-feed channels: a keyring term was added or re-wrapped (payload: the term number); a
#: token was revoked (payload: its token id, the public part, never the secret).
KEYRING_CHANNEL = "secretsd_keyring"
TOKENS_CHANNEL = "secretsd_tokens"


class ChangeSubscription(Protocol):
    """A live subscription to a change feed (a dedicated connection, for PostgreSQL)."""

    async def ping(self) -> None:
        """Raise ``StorageUnavailableError`` unless the subscription is still connected."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ChangeFeed(Protocol):
    """Optional storage capability: hear, within milliseconds, what other processes changed.

    A backend whose writers announce keyring changes and token revocations on ``KEYRING_CHANNEL``
    and ``TOKENS_CHANNEL`` (PostgreSQL: NOTIFY in the writing transaction) implements it; others
    (SQLite, one host) do not, and replicas fall back to polling (``secretsd.runtime.replication``).
    Notifications are a hint that may be lost (while disconnected): never the only path.
    """

    async def subscribe(
        self, channels: Sequence[str], callback: Callable[[str, str], None]
    ) -> ChangeSubscription:
        """Call ``callback(channel, payload)`` on the event loop for each notification."""
        ...


class LeaderLock(Protocol):
    """Leadership for singleton work (the rotation scheduler, cleanup) among processes sharing a store.

    At most one holder at a time across every process using the store; a holder that dies loses
    it (its connection or file lock goes with it), so another process can take over.
    """

    @property
    def held(self) -> bool: ...

    async def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits. True if this process holds it now."""
        ...

    async def release(self) -> None: ...


class StoreSnapshot(Protocol):
    """The whole store as of one moment (``Storage.snapshot``): every read through it sees the same
    committed state, whatever writers commit meanwhile (``secretsd backup create``)."""

    async def count_rows(self, table: str) -> int: ...

    def export_rows(self, table: str, *, batch_size: int = 500) -> AsyncIterator[list[ExportRow]]:
        """As ``Storage.export_rows``, inside the snapshot's read transaction."""
        ...


class Storage(Protocol):
    """An async store. Methods raise ``secretsd.errors`` storage errors, never driver errors."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""
        ...

    async def close(self) -> None: ...

    def leader_lock(self, name: str) -> LeaderLock:
        """A named leadership lock shared by every process on this store."""
        ...

    async def ping(self) -> None:
        """Raise ``StorageUnavailableError`` unless the store answers now."""
        ...

    # -- initialisation and metadata ----------------------------------------------------------
    async def is_initialized(self) -> bool: ...

    async def initialize(
        self, meta: Mapping[str, str], first_term: KeyringTerm, admin_token: TokenRecord
    ) -> None:
        """Create the store's first state atomically; ``AlreadyInitializedError`` if it has one."""
        ...

    async def get_meta(self, key: str) -> str | None: ...

    async def put_meta(self, key: str, value: str, *, only_if_absent: bool = False) -> bool:
        """Set a metadata value; with ``only_if_absent``, only if the key has none. True if written."""
        ...

    # -- keyring ------------------------------------------------------------------------------
    async def keyring_terms(self) -> list[KeyringTerm]:
        """Every term, oldest first."""
        ...

    async def add_keyring_term(self, term: KeyringTerm) -> None:
        """Add a new term; ``ConflictError`` if that term number exists."""
        ...

    async def replace_keyring_wrappings(
        self, term: int, expected: tuple[WrappedKey, ...], wrappings: tuple[WrappedKey, ...]
    ) -> None:
        """Swap a term's wrappings atomically, if they are still ``expected``; else ``ConflictError``.

        The DEK itself never changes: this is how the master key is rotated or moved to another
        provider without re-encrypting any secret.
        """
        ...

    # -- secrets --------------------------------------------------------------------------------
    async def get_secret(self, path: str) -> SecretRecord | None: ...

    async def get_version(self, path: str, version: int | None) -> VersionRecord | None:
        """A version by number, or the current one when ``version`` is None."""
        ...

    async def write_version(
        self,
        record: VersionRecord,
        *,
        expected_current: int,
        metadata: Mapping[str, Any] | None,
        max_versions: int,
        grace_until: datetime | None = None,
    ) -> WriteResult:
        """Append ``record`` as the newest version and make it current, atomically and durably.

        ``expected_current`` is the current version the caller sealed against (0: the secret
        must not exist); any other current version, or a ``record.version`` other than the
        secret's ``latest_version + 1``, raises ``ConflictError`` and writes nothing.
        ``metadata`` replaces the secret's metadata unless None. The old current version becomes
        ``previous_version``; with ``grace_until`` it also gets that grace end. Versions beyond
        the newest ``max_versions`` are removed, except the previous and pending ones and any in
        grace, and the sealing term's encryption count grows by one.
        """
        ...

    async def write_unconditional(
        self, path: str, seal: Seal, *, metadata: Mapping[str, Any] | None, max_versions: int,
    ) -> WriteResult:
        """A write without check-and-set: inside the transaction, ``seal`` is called with the secret
        as stored (None if there is none) and its record is written as by ``write_version``. Writers
        of one path never conflict: each is sealed for the number it gets. (Two creators of a new
        secret may still meet the primary key on PostgreSQL: ``ConflictError``, try again.)"""
        ...

    async def read_current_page(
        self, prefix: str, *, after: str = "", limit: int = 1000,
    ) -> list[tuple[SecretRecord, VersionRecord | None]]:
        """The page ``list_secrets`` returns, each secret with its current version (None if that
        row is missing), in one read."""
        ...

    async def write_batch(
        self, items: Sequence[BatchWrite], *, max_versions: int,
    ) -> list[WriteResult | ConflictError]:
        """Many writes in one transaction, each in a savepoint of its own: an item refused by its
        check-and-set is rolled back alone and reported in its place; the others commit together,
        with one sync. An error of the transaction itself (disk, connection) fails the whole batch,
        and nothing of it is stored."""
        ...

    async def read_version(
        self, path: str, *, version: int | None = None, label: str = "current"
    ) -> tuple[SecretRecord, VersionRecord] | None:
        """A version with its secret, in one lookup: by number, else by label (current, previous,
        pending). None if there is no such secret, label or version."""
        ...

    async def create_pending(self, record: VersionRecord, *, expected_current: int) -> WriteResult:
        """Add ``record`` as the secret's ``pending`` version, leaving ``current`` alone.

        ``ConflictError`` (writing nothing) unless the secret exists, its current version is
        ``expected_current``, it has no pending version and ``record.version`` is
        ``latest_version + 1``. The sealing term's encryption count grows by one.
        """
        ...

    async def finish_pending(
        self,
        path: str,
        version: int,
        *,
        expected_current: int,
        now: datetime,
        grace_until: datetime | None,
        max_versions: int,
        rotation_due: datetime | None,
        rotation_status: RotationStatus,
    ) -> SecretRecord:
        """Promote pending ``version`` to current; the old current becomes previous.

        Check-and-set: ``ConflictError`` (changing nothing) unless ``version`` is still the
        pending version, still active, and the current version is still ``expected_current``.
        """
        ...

    async def discard_pending(
        self,
        path: str,
        version: int,
        *,
        now: datetime,
        rotation_due: datetime | None,
        rotation_status: RotationStatus,
    ) -> bool:
        """Destroy pending ``version`` and clear the label, recording the rotation outcome.

        False (changing nothing) if ``version`` is not the pending version any more.
        """
        ...

    async def set_rotation(
        self, path: str, policy: Mapping[str, Any] | None, rotation_due: datetime | None
    ) -> SecretRecord | None:
        """Replace the secret's rotation policy and schedule; None if there is no such secret."""
        ...

    async def record_rotation(
        self, path: str, rotation_due: datetime | None, rotation_status: RotationStatus
    ) -> None:
        """Store the schedule and outcome bookkeeping of a rotation attempt."""
        ...

    async def rotation_candidates(self, now: datetime, *, limit: int = 100) -> list[SecretRecord]:
        """Secrets the scheduler must look at: a pending version, or ``rotation_due`` <= ``now``;
        soonest due first."""
        ...

    async def list_secrets(self, prefix: str, *, after: str = "", limit: int = 1000) -> list[SecretRecord]:
        """Secrets at ``prefix`` or below it, by path, starting after ``after``."""
        ...

    async def count_secrets(self) -> int:
        """How many secrets the store holds (for the metrics gauge)."""
        ...

    async def list_versions(self, path: str) -> list[VersionInfo]:
        """Every kept version of ``path``, oldest first."""
        ...

    async def set_version_state(
        self, path: str, versions: Sequence[int], state: VersionState, now: datetime
    ) -> list[int]:
        """Move versions to ``state`` (destroyed wipes the ciphertext); return those changed."""
        ...

    # -- tokens -------------------------------------------------------------------------------
    async def create_token(self, token: TokenRecord) -> None: ...

    async def get_token(self, token_id: str) -> TokenRecord | None: ...

    async def list_tokens(self) -> list[TokenRecord]: ...

    async def list_tokens_page(self, now: datetime, *, after: str = "", limit: int = 1000,
                               include_expired: bool = False) -> list[TokenRecord]:
        """Up to ``limit`` tokens by token id, strictly after ``after``; those expired at ``now``
        only with ``include_expired`` (revoked ones are listed until purged)."""
        ...

    async def purge_tokens(self, cutoff: datetime, now: datetime, *, limit: int = 1000) -> int:
        """Delete at most ``limit`` tokens revoked or expired at or before ``cutoff``, in one
        transaction (``engine.is_purgeable``: never one active at ``now``); return how many."""
        ...

    async def renew_token(self, token_id: str, expires_at: datetime, now: datetime) -> bool:
        """Set an active token's expiry to ``expires_at``; False if it is revoked, expired at
        ``now``, has no expiry, or does not exist. The caller decides the new expiry
        (secretsd.domain.token_service.renewed_expiry)."""
        ...

    async def revoke_token(self, token_id: str, now: datetime, *, guard: RevokeGuard | None = None) -> bool:
        """Mark a token revoked; False if there is no such token or it was revoked already.

        ``guard(target, others, now)`` runs inside the revoking transaction with the target and
        every other active token (unrevoked, unexpired at ``now``), serialised against other
        guarded revocations (on every replica); whatever it raises rolls the revocation back and passes through.
        """
        ...

    # -- copying a whole store (``secretsd storage migrate``) ---------------------------------
    async def count_rows(self, table: str) -> int:
        """How many rows ``table`` (one of ``rows.TABLES``) holds."""
        ...

    def export_rows(self, table: str, *, batch_size: int = 500) -> AsyncIterator[list[ExportRow]]:
        """Every row of ``table`` as stored (ciphertext as is), in key order, in batches.

        Raises ``StorageError`` if the table has columns this version cannot carry
        (``rows.COLUMN_KINDS``), so a copy never silently drops data a newer schema added.
        """
        ...

    def snapshot(self) -> AbstractAsyncContextManager[StoreSnapshot]:
        """One read transaction over every table (a consistent snapshot), on a connection of its own,
        so a backup taken while a daemon serves sees one moment of the store. Writes go on meanwhile."""
        ...

    async def import_rows(self, batches: AsyncIterable[tuple[str, Sequence[ExportRow]]]) -> None:
        """Load rows exported from another store, all in one transaction: all or nothing.

        ``batches`` yields (table, rows) in ``rows.TABLES`` order. Refuses with
        ``AlreadyInitializedError`` (changing nothing) unless this store is empty.
        """
        ...
