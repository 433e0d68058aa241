"""Data encryption: the only module of secretsd that touches ``cryptography.hazmat``.

Secret values are sealed with AES-256-GCM under a data-encryption key (DEK) of the keyring, with
a fresh 96-bit random nonce each time and associated data that binds the ciphertext to its path,
version and keyring term: a ciphertext copied to another row or path fails to open.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secretsd.errors import CryptoError

FORMAT_VERSION = 1
DEK_BYTES = 32
NONCE_BYTES = 12


def value_aad(path: str, version: int, term: int) -> bytes:
    """Canonical associated data of one secret version.

    Fixed-width integers first and the path last, so no two (path, version, term) triples can
    produce the same bytes.
    """
    return b"secretsd/value\x00" + struct.pack(">BQI", FORMAT_VERSION, version, term) + path.encode()


def dek_aad(term: int) -> bytes:
    """Associated data binding a wrapped DEK to its purpose and term."""
    return b"secretsd/dek\x00" + struct.pack(">BI", FORMAT_VERSION, term)


def blob_aad(purpose: str, term: int) -> bytes:
    """Associated data for a daemon-internal secret sealed under the keyring (e.g. the audit key)."""
    return b"secretsd/blob\x00" + struct.pack(">BI", FORMAT_VERSION, term) + purpose.encode()


def _fingerprint(key: bytes) -> bytes:
    return hashlib.sha256(b"secretsd/dek-fingerprint\x00" + key).digest()


def new_dek() -> bytes:
    return secrets.token_bytes(DEK_BYTES)


class DataKey:
    """One DEK, ready to seal and open values; the AESGCM object is built once per key."""

    __slots__ = ("_aead", "_fingerprint")

    def __init__(self, key: bytes) -> None:
        if len(key) != DEK_BYTES:
            raise ValueError("a data key must be 256 bits")
        self._aead = AESGCM(key)
        # Lets a key provider's unwrap be checked against the key in memory without keeping a
        # second copy of the key; a hash of 256 random bits reveals nothing about them.
        self._fingerprint = _fingerprint(key)

    def matches(self, key: bytes) -> bool:
        """Whether ``key`` is this data key (constant-time)."""
        return hmac.compare_digest(self._fingerprint, _fingerprint(key))

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError) as exc:
            # Opaque on purpose: which check failed is nobody's business but the tamperer's.
            raise CryptoError("stored value failed authentication") from exc
