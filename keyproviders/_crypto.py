"""The cryptographic constructions of keyproviders, in one private module.

This is the only module of ``keyproviders`` that imports ``cryptography.hazmat`` (a test says so),
and it never imports ``secretsd``: the providers are a standalone library. Each function is one
construction, byte-for-byte what the providers wrote before it was gathered here; the known-answer
vectors in ``tests/data/keyprovider_vectors.json`` pin them, so a store sealed by an older release
keeps opening and another implementation can check itself against the same bytes.

- ``aead_seal`` / ``aead_open``: AES-256-GCM, 96-bit nonce, 128-bit tag appended to the ciphertext
  (the ``file`` and ``env-sealed`` wrapping). A failed open is ``UnwrapError`` and says nothing more.
- ``hkdf_expand``: HKDF-Expand-SHA256 under a label; the label keeps keys derived from one root
  independent (env-sealed's KEK and its public key id).
- ``argon2id`` / ``scrypt``: the memory-hard step of env-sealed.
- ``x25519_seal`` / ``x25519_open``: ECIES to an X25519 public key (the ``recovery-shares``
  wrapping: the daemon wraps new terms for the recovery key without holding it).
- ``kwp_header``: the AAD binding for CKM_AES_KEY_WRAP_PAD (see its docstring); the HSM does the
  wrapping itself, this module only builds the header it wraps.

Foreign exceptions stop here: a KDF this build cannot compute is ``KdfUnsupportedError``, one that
ran out of memory or failed inside OpenSSL is ``KdfFailedError``; the provider turns those into its
own ``keyproviders.errors`` with a message about its configuration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cache
from typing import Any

from cryptography.exceptions import InternalError, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyproviders.errors import UnwrapError

_Argon2id: Callable[..., Any] | None
try:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id as _Argon2id
except ImportError:  # cryptography < 44
    _Argon2id = None

KEY_BYTES = 32
GCM_NONCE_BYTES = 12

#: Domain label of the key-wrap header; a future binding is a new label (and a new record name).
KWP_HEADER_LABEL = b"secretsd/pkcs11/kwp-aad/v1\x00"

#: Whether this cryptography has an Argon2id class at all (OpenSSL may still lack the algorithm).
HAVE_ARGON2ID = _Argon2id is not None


class KdfUnsupportedError(Exception):
    """This build of cryptography/OpenSSL cannot compute the requested KDF."""


class KdfFailedError(Exception):
    """The KDF ran out of memory or failed inside OpenSSL."""


# -- AEAD -------------------------------------------------------------------------------------------
def aead_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ``ciphertext || 16-byte tag`` of ``plaintext`` bound to ``aad``."""
    if len(key) != KEY_BYTES:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aead_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Open what ``aead_seal`` made; any mismatch (key, nonce, AAD, blob) is ``UnwrapError``."""
    if len(key) != KEY_BYTES:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError) as exc:  # ValueError: a nonce of a length GCM refuses
        raise UnwrapError("wrapped key failed authentication") from exc


# -- key derivation ---------------------------------------------------------------------------------
def hkdf_expand(prk: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-SHA256 (RFC 5869) of a uniformly random ``prk`` under ``label`` (the info)."""
    return HKDFExpand(SHA256(), length, label).derive(prk)


@cache
def argon2id_available() -> bool:
    """Whether this build of cryptography/OpenSSL can compute Argon2id (probed once, cheaply)."""
    if _Argon2id is None:
        return False
    try:
        _Argon2id(salt=b"\x00" * 16, length=KEY_BYTES, iterations=1, lanes=1, memory_cost=8).derive(b"probe")
    except UnsupportedAlgorithm:
        return False
    return True


def argon2id(secret: bytes, salt: bytes, *, memory_kib: int, iterations: int, lanes: int,
             length: int = KEY_BYTES) -> bytes:
    """Argon2id v1.3 (RFC 9106), memory cost in KiB. Raises the two Kdf errors above."""
    argon2 = _Argon2id
    if argon2 is None:
        raise KdfUnsupportedError("argon2id")
    return bytes(_run_kdf(lambda: argon2(
        salt=salt, length=length, iterations=iterations, lanes=lanes, memory_cost=memory_kib,
    ).derive(secret)))


def scrypt(secret: bytes, salt: bytes, *, n: int, r: int, p: int, length: int = KEY_BYTES) -> bytes:
    """scrypt (RFC 7914). Raises the two Kdf errors above."""
    return bytes(_run_kdf(lambda: Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(secret)))


def _run_kdf(derive: Callable[[], bytes]) -> bytes:
    try:
        return derive()
    except UnsupportedAlgorithm as exc:
        raise KdfUnsupportedError(str(exc)) from exc
    except (MemoryError, InternalError) as exc:
        raise KdfFailedError(type(exc).__name__) from exc


# -- the key-wrap AAD header --------------------------------------------------------------------------
def kwp_header(nonce: bytes, aad: bytes) -> bytes:
    """The AAD binding for CKM_AES_KEY_WRAP_PAD, which has no AAD input of its own.

    Refusing AAD would make the mechanism useless (secretsd always binds the DEK's term and
    purpose), and ignoring it would silently let a wrapped DEK be replayed in another context.
    Instead the wrapped plaintext is ``SHA-256(domain, nonce, aad) || DEK``: RFC 5649 key wrap is a
    deterministic authenticated cipher over the whole plaintext, so a blob unwraps to the right
    header only in the context it was made for, and any other AAD is caught by a constant-time
    compare after unwrapping. The random nonce makes each wrap of the same DEK differ (KWP alone
    is deterministic and would reveal equal DEKs). The header also makes the plaintext 32 + 32
    bytes, a multiple of 8, which sidesteps SoftHSM's wrong RFC 5649 padding for other lengths.
    """
    return hashlib.sha256(KWP_HEADER_LABEL + len(nonce).to_bytes(1, "big") + nonce + aad).digest()


# -- public-key wrapping (recovery-shares) ------------------------------------------------------------
#: Domain labels of the recovery-shares construction; a future scheme is a new label.
X25519_KEY_LABEL = b"secretsd recovery-shares v1 x25519 private key"
X25519_WRAP_LABEL = b"secretsd recovery-shares v1 wrap key\x00"


def x25519_private_from_secret(secret: bytes) -> bytes:
    """The X25519 private key (raw 32 bytes) derived from a 256-bit recovery secret.

    Derived, not the secret itself, so the secret that the shares carry is used for one purpose
    under one label; X25519 clamps any 32 bytes into a valid scalar.
    """
    if len(secret) != KEY_BYTES:
        raise ValueError("the recovery secret must be 32 bytes")
    return hkdf_expand(secret, X25519_KEY_LABEL, KEY_BYTES)


def x25519_public(private: bytes) -> bytes:
    """The raw 32-byte public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _x25519_wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    # The KDF binds both public keys (as age and HPKE's DHKEM do), so a ciphertext cannot be
    # re-pointed at another recipient or ephemeral key.
    return HKDF(SHA256(), KEY_BYTES, salt=ephemeral + recipient, info=X25519_WRAP_LABEL).derive(shared)


def x25519_seal(recipient: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """Encrypt to a raw X25519 public key: ``(ephemeral public key, AES-256-GCM ciphertext)``.

    ECIES in the shape of age's X25519 recipient and HPKE's base mode: a fresh ephemeral key per
    call, ECDH, HKDF-SHA256 over the shared secret bound to both public keys, AES-256-GCM with
    ``aad``. Only the holder of the private key can open it; the sender needs no secret.
    """
    try:
        peer = X25519PublicKey.from_public_bytes(recipient)
    except ValueError as exc:
        raise ValueError("an X25519 public key is 32 bytes") from exc
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = ephemeral.exchange(peer)
    return ephemeral_public, aead_seal(_x25519_wrap_key(shared, ephemeral_public, recipient), nonce, plaintext, aad)


def x25519_open(private: bytes, ephemeral_public: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Open what ``x25519_seal`` made; any mismatch is ``UnwrapError``."""
    key = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError as exc:  # a malformed or low-order ephemeral key
        raise UnwrapError("wrapped key failed authentication") from exc
    recipient = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return aead_open(_x25519_wrap_key(shared, ephemeral_public, recipient), nonce, ciphertext, aad)
