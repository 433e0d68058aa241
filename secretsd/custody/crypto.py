"""Every cryptographic construction of secretsd: the only module that touches ``cryptography.hazmat``.

* Secret values are sealed with AES-256-GCM under a data-encryption key (DEK) of the keyring, with a
  fresh 96-bit random nonce each time and associated data that binds the ciphertext to its path,
  version and keyring term: a ciphertext copied to another row or path fails to open.
* Audit records are signed with Ed25519 (``SigningKey``, ``VerifyKey``).
* Keys derived from other keys use HKDF-SHA256 with a label of their own (``derive_key``), so no two
  purposes ever share key material.

Known-answer vectors for each construction are in ``tests/data/secretsd_vectors.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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


def binding_message(term: int, provider: str, key_id: str, public_key: bytes) -> bytes:
    """What a keyring binding tag covers: a wrap-only provider's public key, its name and id, and the term.

    Length-prefixed fields after a fixed-width header, so no two inputs produce the same bytes.
    """
    fields = (provider.encode(), key_id.encode(), public_key)
    return (b"secretsd/provider-binding\x00" + struct.pack(">BI", FORMAT_VERSION, term)
            + b"".join(struct.pack(">H", len(f)) + f for f in fields))


def _fingerprint(key: bytes) -> bytes:
    return hashlib.sha256(b"secretsd/dek-fingerprint\x00" + key).digest()


def new_dek() -> bytes:
    return secrets.token_bytes(DEK_BYTES)


class DataKey:
    """One DEK, ready to seal and open values; the AESGCM object is built once per key."""

    __slots__ = ("_aead", "_binding_key", "_fingerprint")

    def __init__(self, key: bytes) -> None:
        if len(key) != DEK_BYTES:
            raise ValueError("a data key must be 256 bits")
        self._aead = AESGCM(key)
        # Lets a key provider's unwrap be checked against the key in memory without keeping a
        # second copy of the key; a hash of 256 random bits reveals nothing about them.
        self._fingerprint = _fingerprint(key)
        # A key of its own (HKDF, own label) for binding tags: only a holder of this DEK can make one.
        self._binding_key = derive_key(key, "secretsd/provider-binding")

    def binding_tag(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under a key derived from this DEK (``binding_message``)."""
        return hmac_sha256(self._binding_key, message)

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


# -- derived keys -----------------------------------------------------------------------------
def derive_key(secret: bytes, label: str, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``secret`` (no salt: it is already a uniformly random key) for one purpose.

    ``label`` names the purpose and goes into HKDF's info, so keys derived for different purposes
    from one secret are independent.
    """
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label.encode("utf-8")).derive(secret)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


# -- signatures ---------------------------------------------------------------------------------
class VerifyKey:
    """An Ed25519 public key: checks signatures, and travels as PEM (SubjectPublicKeyInfo)."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key

    @classmethod
    def from_pem(cls, text: str) -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise ValueError("not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the audit public key must be an Ed25519 key")
        return cls(key)

    def pem(self) -> str:
        pem = self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return pem.decode("ascii")

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """An Ed25519 private key. Its raw 32 bytes are what gets sealed under the keyring."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SigningKey:
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)
