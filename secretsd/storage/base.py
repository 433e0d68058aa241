"""The storage protocol and the records that cross it.

Storage holds only ciphertext, wrapped keys, token hashes and metadata. Every backend passes the
same conformance suite (``secretsd.storage.testing``); nothing backend-specific belongs here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from keyproviders import WrappedKey


class VersionState(enum.StrEnum):
    ACTIVE = "active"
    DELETED = "deleted"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class KeyringTerm:
    """One DEK term, wrapped once per unseal provider; any one wrapping unseals it."""

    term: int
    wrappings: tuple[WrappedKey, ...]
    created_at: datetime
    encryptions: int = 0


@dataclass(frozen=True)
class VersionInfo:
    """A secret version without its ciphertext: what metadata listings show."""

    path: str
    version: int
    created_at: datetime
    created_by: str
    state: VersionState
    deleted_at: datetime | None = None


@dataclass(frozen=True)
class VersionRecord(VersionInfo):
    """A stored secret version: the sealed value and the keyring term that sealed it."""

    term: int = 0
    nonce: bytes = b""
    ciphertext: bytes = b""


@dataclass(frozen=True)
class SecretRecord:
    path: str
    current_version: int
    created_at: datetime
    updated_at: datetime
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenRecord:
    """A token as stored: an id to look it up by and the hash of its secret part, never the token."""

    token_id: str
    secret_hash: bytes
    client: str
    policies: tuple[str, ...]
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class WriteResult:
    secret: SecretRecord
    #: How many values the sealing term has encrypted, this one included (across all replicas).
    term_encryptions: int


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
    ) -> WriteResult:
        """Append ``record`` as the newest version, atomically and durably.

        ``expected_current`` is the current version the caller sealed against (0: the secret
        must not exist); any other current version raises ``ConflictError`` and writes nothing.
        ``metadata`` replaces the secret's metadata unless None. Versions beyond the newest
        ``max_versions`` are removed, and the sealing term's encryption count grows by one.
        """
        ...

    async def list_secrets(self, prefix: str, *, after: str = "", limit: int = 1000) -> list[SecretRecord]:
        """Secrets at ``prefix`` or below it, by path, starting after ``after``."""
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

    async def revoke_token(self, token_id: str, now: datetime) -> bool:
        """Mark a token revoked; False if there is no such token or it was revoked already."""
        ...
