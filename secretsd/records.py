"""The records the store keeps and the domain services hand out.

They sit below every layer: storage persists them, the services return them, the HTTP surface
renders them. Keeping them here (and not in ``secretsd.storage``) lets the layers above see a
secret or a token without importing the storage package.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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
    #: From then on the value is not served to anyone (see docs/rotation.md).
    expires_at: datetime | None = None
    #: Set when rotation superseded this version: ordinary readers may read it until then.
    grace_until: datetime | None = None


@dataclass(frozen=True)
class VersionRecord(VersionInfo):
    """A stored secret version: the sealed value and the keyring term that sealed it."""

    term: int = 0
    nonce: bytes = b""
    ciphertext: bytes = b""


_STATUS_FIELDS: dict[str, type] = {
    "last_result": str, "last_reason": str, "last_attempt_at": str, "last_success_at": str,
    "failures": int, "last_version": int, "trigger": str,
}


@dataclass(frozen=True, eq=False)
class RotationStatus(Mapping[str, Any]):
    """Outcome bookkeeping of a secret's last rotations (``secretsd.domain.rotation`` writes it).

    Stored as the JSON object it reads as (a ``Mapping`` of the keys that are set), exactly the
    format the untyped dict had: an unset field is an absent key. Keys this version does not know,
    or known keys holding another type (a newer release's, or an explicit null), are kept in
    ``extra`` and written back unchanged, so nothing on disk is lost by reading it.
    """

    last_result: str | None = None
    last_reason: str | None = None
    last_attempt_at: str | None = None  # ISO 8601 text, as stored
    last_success_at: str | None = None
    failures: int | None = None
    last_version: int | None = None
    trigger: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Mapping[str, Any] | None) -> RotationStatus:
        """The typed status of a stored (or caller-given) JSON object."""
        if not value:  # no rotation yet: most secrets, on every read of one
            return _NO_STATUS
        if isinstance(value, RotationStatus):
            return value
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, item in value.items():
            kind = _STATUS_FIELDS.get(key)
            # bool is an int subclass, but a stored true is not a count: keep it verbatim.
            if kind is not None and isinstance(item, kind) and not isinstance(item, bool):
                known[key] = item
            else:
                extra[key] = item
        return cls(**known, extra=extra)

    @property
    def failure_count(self) -> int:
        """Consecutive failures so far (0 when none were recorded)."""
        return self.failures or 0

    def replace(self, **changes: Any) -> RotationStatus:
        """A copy with ``changes`` set (a key set here no longer comes from ``extra``)."""
        unknown = set(changes) - set(_STATUS_FIELDS)
        if unknown:
            raise TypeError(f"RotationStatus has no field(s) {', '.join(sorted(unknown))}")
        extra = {k: v for k, v in self.extra.items() if k not in changes}
        return dataclasses.replace(self, **changes, extra=extra)

    def _as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _STATUS_FIELDS if getattr(self, k) is not None}
        out.update(self.extra)
        return out

    def __getitem__(self, key: str) -> Any:
        return self._as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_dict())

    def __len__(self) -> int:
        return len(self._as_dict())

    def __repr__(self) -> str:
        return f"RotationStatus({self._as_dict()!r})"


#: The status of a secret never rotated (shared: the record is immutable).
_NO_STATUS = RotationStatus()


@dataclass(frozen=True)
class SecretRecord:
    path: str
    current_version: int
    created_at: datetime
    updated_at: datetime
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: The highest version number allocated so far (a new version is this + 1).
    latest_version: int = 0
    #: Staging labels besides ``current`` (docs/rotation.md).
    previous_version: int | None = None
    pending_version: int | None = None
    #: The rotation policy as stored (JSON object), None when the secret has none.
    rotation: Mapping[str, Any] | None = None
    #: When the scheduler should next look at this secret (rotation due, or a retry).
    rotation_due: datetime | None = None
    #: Outcome bookkeeping of the last rotations (see ``RotationStatus``).
    rotation_status: RotationStatus = field(default_factory=RotationStatus)


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
    #: What a renewal extends the token by (its creation TTL); None: it does not renew.
    ttl_seconds: int | None = None
    #: The end no renewal passes (creation time + max TTL); None: its first expiry is its last.
    max_expires_at: datetime | None = None

    def is_active(self, now: datetime) -> bool:
        """The rule "a token is active": not revoked, and not expired at ``now`` (its expiry
        instant itself is already past it). Authentication, policy checks, the last-root-token
        guard and the metrics all ask this one method."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class WriteResult:
    secret: SecretRecord
    #: How many values the sealing term has encrypted, this one included (across all replicas).
    term_encryptions: int
