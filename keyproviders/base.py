"""The KeyProvider protocol and the self-describing ``WrappedKey`` record.

A key provider holds a key-encryption key (KEK) and wraps/unwraps data keys with it. The KEK may
never leave its store (an HSM), so the protocol only ever moves *wrapped* keys across it.
Providers are synchronous: a PKCS#11 call blocks, so the daemon runs provider calls in a worker
thread and the provider serialises access to its store itself.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

WRAPPED_KEY_FORMAT = 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"wrapped key field {what!r} is not valid base64") from exc


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted under a provider's KEK, with everything needed to unwrap it.

    Every field is always filled so that a record found in a database or a backup says by itself
    which provider, which key and which mechanism can open it. ``params`` carries non-secret,
    provider-specific parameters (a KDF salt and cost, say).
    """

    provider: str
    key_id: str
    mechanism: str
    nonce: bytes
    ciphertext: bytes
    format: int = WRAPPED_KEY_FORMAT
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format != WRAPPED_KEY_FORMAT:
            raise ValueError(f"unsupported wrapped key format {self.format}")
        for name in ("provider", "key_id", "mechanism"):
            if not getattr(self, name):
                raise ValueError(f"wrapped key field {name!r} must not be empty")
        if not self.ciphertext:
            raise ValueError("wrapped key field 'ciphertext' must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "provider": self.provider,
            "key_id": self.key_id,
            "mechanism": self.mechanism,
            "nonce": _b64(self.nonce),
            "ciphertext": _b64(self.ciphertext),
            "params": dict(self.params),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WrappedKey:
        try:
            return cls(
                format=int(data["format"]),
                provider=str(data["provider"]),
                key_id=str(data["key_id"]),
                mechanism=str(data["mechanism"]),
                nonce=_unb64(str(data["nonce"]), "nonce"),
                ciphertext=_unb64(str(data["ciphertext"]), "ciphertext"),
                params=dict(data.get("params") or {}),
            )
        except KeyError as exc:
            raise ValueError(f"wrapped key record lacks field {exc.args[0]!r}") from exc

    @classmethod
    def from_json(cls, text: str) -> WrappedKey:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("wrapped key record must be a JSON object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class ProviderHealth:
    """What ``health()`` reports: ``ok`` plus a short human-readable detail."""

    ok: bool
    detail: str = ""


@runtime_checkable
class KeyProvider(Protocol):
    """Custody of one key-encryption key (and its older versions, for unwrapping)."""

    #: The provider kind, as named in configuration and in ``WrappedKey.provider``.
    name: ClassVar[str]

    def key_id(self) -> str:
        """Identifier of the KEK version that ``wrap`` uses now. Never secret."""
        ...

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        """Encrypt ``key`` under the current KEK, bound to ``aad``."""
        ...

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Decrypt a key wrapped by this provider (any KEK version it still holds)."""
        ...

    def health(self) -> ProviderHealth:
        """Check that the KEK is usable now, without raising."""
        ...

    def rotate(self) -> str:
        """Create a new KEK version, make it current, keep old ones for unwrap; return its id."""
        ...

    def refresh(self) -> None:
        """Pick up KEK versions that another process created since this one was built.

        A daemon calls it before wrapping a new key, so that after ``secretsd keyring rewrap`` it
        never wraps under a version the operator was told may now be destroyed. A provider with
        nothing shared to re-read does nothing.
        """
        ...

    def close(self) -> None:
        """Release sessions and handles. The provider is unusable afterwards."""
        ...


class ProviderFactory(Protocol):
    """What the entry point named in ``secretsd.keyproviders`` must resolve to."""

    name: ClassVar[str]

    def from_config(
        self, options: Mapping[str, Any], *, base_dir: Path, create: bool = False
    ) -> KeyProvider:
        """Build a provider from its configuration table (``kind`` already removed).

        ``base_dir`` anchors relative paths. ``create`` is true when a new store is being
        initialised and the provider may create its key if it has none; otherwise a missing key
        is an error. Providers whose keys are provisioned separately (an HSM) ignore it.
        """
        ...
