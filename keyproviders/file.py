"""The ``file`` key provider: the KEK lives in a local file readable only by its owner.

The file holds every KEK version (newest active) so that keys wrapped before a rotation still
unwrap. It is the embedded default, not HSM custody: anyone who can read the file and the database
can read every secret, which is why looser permissions than 0600 are refused outright.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import stat
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from keyproviders._crypto import GCM_NONCE_BYTES, aead_open, aead_seal
from keyproviders.base import ProviderHealth, WrappedKey
from keyproviders.errors import (
    ProviderConfigError,
    ProviderKeyNotFoundError,
    ProviderUnavailableError,
    UnwrapError,
)

KEY_BYTES = 32
NONCE_BYTES = GCM_NONCE_BYTES
MECHANISM = "AES-256-GCM"
FILE_FORMAT = 1
DEFAULT_FILENAME = "master.key"


def _key_id(key: bytes) -> str:
    # A truncated hash of a 256-bit random key reveals nothing usable about it and lets an
    # operator match wrapped records to key versions.
    return "file-" + hashlib.sha256(b"secretsd-file-kek-id\x00" + key).hexdigest()[:16]


def check_private_file(path: Path) -> None:
    """Refuse a key file that group or others could read or write (the rule: owner-only)."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ProviderKeyNotFoundError(f"key file {path} does not exist") from exc
    except OSError as exc:
        raise ProviderUnavailableError(f"key file {path} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ProviderConfigError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ProviderConfigError(
            f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be readable by its "
            f"owner only: run 'chmod 600 {path}'"
        )


def _write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` atomically with mode 0600 and make the rename durable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileKeyProvider:
    """KEK versions in a JSON file with mode 0600; wraps with AES-256-GCM."""

    name: ClassVar[str] = "file"

    def __init__(self, path: Path, keys: dict[str, bytes], active: str) -> None:
        self._path = path
        self._keys = dict(keys)
        self._active = active
        self._lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, options: Mapping[str, Any], *, base_dir: Path, create: bool = False
    ) -> FileKeyProvider:
        unknown = set(options) - {"path"}
        if unknown:
            raise ProviderConfigError(
                f"file key provider: unknown option(s) {', '.join(sorted(unknown))}; only 'path'"
            )
        raw = options.get("path", DEFAULT_FILENAME)
        if not isinstance(raw, str | os.PathLike) or not str(raw):
            raise ProviderConfigError("file key provider: 'path' must be a file path")
        path = Path(raw)
        if not path.is_absolute():
            path = base_dir / path
        if create and not path.exists():
            return cls.create(path)
        return cls.load(path)

    @classmethod
    def create(cls, path: Path) -> FileKeyProvider:
        if path.exists():
            raise ProviderConfigError(f"key file {path} already exists; refusing to overwrite it")
        key = secrets.token_bytes(KEY_BYTES)
        provider = cls(path, {_key_id(key): key}, _key_id(key))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        provider._save()
        return provider

    @classmethod
    def load(cls, path: Path) -> FileKeyProvider:
        check_private_file(path)
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format") != FILE_FORMAT:
                raise ValueError(f"unsupported format {doc.get('format')!r}")
            keys = {}
            for entry in doc["keys"]:
                key = base64.b64decode(entry["key"], validate=True)
                if len(key) != KEY_BYTES:
                    raise ValueError("a key is not 256 bits")
                keys[_key_id(key)] = key
            active = str(doc["active"])
            if active not in keys:
                raise ValueError("the active key is not among the keys")
        except OSError as exc:
            raise ProviderUnavailableError(f"key file {path} cannot be read: {exc.strerror}") from exc
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise ProviderConfigError(f"key file {path} is not a secretsd key file ({exc})") from None
        return cls(path, keys, active)

    def _save(self) -> None:
        doc = {
            "format": FILE_FORMAT,
            "active": self._active,
            "keys": [
                {"id": kid, "key": base64.b64encode(key).decode("ascii")}
                for kid, key in self._keys.items()
            ],
            "written_at": datetime.now(UTC).isoformat(),
        }
        _write_private_file(self._path, json.dumps(doc, indent=1).encode("utf-8"))

    # -- KeyProvider ----------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    def key_id(self) -> str:
        return self._active

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self._lock:
            kek_id = self._active
            kek = self._keys[kek_id]
        return WrappedKey(
            provider=self.name,
            key_id=kek_id,
            mechanism=MECHANISM,
            nonce=nonce,
            ciphertext=aead_seal(kek, nonce, key, aad),
        )

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if wrapped.provider != self.name or wrapped.mechanism != MECHANISM:
            raise UnwrapError(
                f"this key was wrapped by {wrapped.provider}/{wrapped.mechanism}, not by the file provider"
            )
        with self._lock:
            kek = self._keys.get(wrapped.key_id)
        if kek is None:
            raise ProviderKeyNotFoundError(f"key {wrapped.key_id} is not in key file {self._path}")
        return aead_open(kek, wrapped.nonce, wrapped.ciphertext, aad)

    def health(self) -> ProviderHealth:
        try:
            check_private_file(self._path)
        except Exception as exc:  # health() reports, it never raises
            return ProviderHealth(ok=False, detail=str(exc))
        return ProviderHealth(ok=True, detail=f"key file {self._path}")

    def rotate(self) -> str:
        key = secrets.token_bytes(KEY_BYTES)
        with self._lock:
            kid = _key_id(key)
            self._keys[kid] = key
            previous = self._active
            self._active = kid
            try:
                self._save()
            except BaseException:
                del self._keys[kid]
                self._active = previous
                raise
        return kid

    def refresh(self) -> None:
        # The file is the truth: keys it no longer holds are forgotten, so a replaced file cannot
        # hide behind the genuine keys still in memory (the store-binding proof would pass on them).
        fresh = FileKeyProvider.load(self._path)
        with self._lock:
            self._keys = dict(fresh._keys)
            self._active = fresh._active

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
