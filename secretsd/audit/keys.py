"""The audit signing key: made at init, its private half sealed under the keyring in storage.

The public half is stored beside it in clear, so ``secretsd audit verify`` and ``audit pubkey``
need no unseal. The per-log HMAC key (to correlate values without recording them) is derived from
the private key (HKDF, its own label), so it exists exactly where signing does.
"""

from __future__ import annotations

import base64
import json

from secretsd.audit.record import Signer
from secretsd.custody.barrier import Barrier, SealedValue, seal_blob
from secretsd.custody.crypto import DataKey, derive_key, hmac_sha256
from secretsd.storage import Storage

AUDIT_KEY_META = "audit_key"
PURPOSE = "audit-signing-key"


def sealed_key_document(signer: Signer, sealed: SealedValue) -> str:
    return json.dumps({
        "term": sealed.term,
        "nonce": base64.b64encode(sealed.nonce).decode("ascii"),
        "ciphertext": base64.b64encode(sealed.ciphertext).decode("ascii"),
        "public_key": signer.public_pem(),
    })


def new_key_document(dek: DataKey, term: int) -> tuple[Signer, str]:
    """At init: a fresh signing key sealed under the first keyring term."""
    signer = Signer.generate()
    return signer, sealed_key_document(signer, seal_blob(dek, term, PURPOSE, signer.private_bytes()))


async def load_signer(storage: Storage, barrier: Barrier) -> Signer:
    """The store's signing key; created now for a store made before audit existed."""
    raw = await storage.get_meta(AUDIT_KEY_META)
    if raw is None:
        signer = Signer.generate()
        document = sealed_key_document(signer, barrier.seal_blob(PURPOSE, signer.private_bytes()))
        if await storage.put_meta(AUDIT_KEY_META, document, only_if_absent=True):
            return signer
        raw = await storage.get_meta(AUDIT_KEY_META)  # another replica made one first: use it
        assert raw is not None
    doc = json.loads(raw)
    sealed = SealedValue(int(doc["term"]), base64.b64decode(doc["nonce"]), base64.b64decode(doc["ciphertext"]))
    return Signer.from_private_bytes(barrier.open_blob(PURPOSE, sealed))


async def public_key_pem(storage: Storage) -> str | None:
    raw = await storage.get_meta(AUDIT_KEY_META)
    return None if raw is None else str(json.loads(raw)["public_key"])


#: The scheme tag of ``value_hmac``: v2 keys come from HKDF. Records written before it say
#: ``hmac-sha256:`` (the key was SHA-256 of a label and the private key); both are in the same logs.
VALUE_HMAC_SCHEME = "hmac-sha256-v2"
VALUE_HMAC_LABEL = "secretsd/audit/value-hmac/v2"


class ValueHasher:
    """HMAC-SHA256 of values, keyed per audit log: lets an auditor check "was this value stored?"
    against the log without the log ever holding the value."""

    def __init__(self, signer: Signer) -> None:
        self._key = derive_key(signer.private_bytes(), VALUE_HMAC_LABEL)

    def __call__(self, value: str | bytes) -> str:
        # Text is hashed as its UTF-8 bytes, so a value gets one HMAC whichever way it was sent.
        data = value if isinstance(value, bytes) else value.encode("utf-8")
        return f"{VALUE_HMAC_SCHEME}:" + hmac_sha256(self._key, data).hex()
