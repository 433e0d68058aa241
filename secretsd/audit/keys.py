"""The audit signing key: made at init, its private half sealed under the keyring in storage.

The public half is stored beside it in clear, so ``secretsd audit verify`` and ``audit pubkey``
need no unseal. The per-log HMAC key (to correlate values without recording them) is derived from
the private key, so it exists exactly where signing does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from secretsd.audit.record import Signer
from secretsd.barrier import Barrier, SealedValue
from secretsd.crypto import DataKey, blob_aad
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
    nonce, ciphertext = dek.seal(signer.private_bytes(), blob_aad(PURPOSE, term))
    return signer, sealed_key_document(signer, SealedValue(term, nonce, ciphertext))


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


class ValueHasher:
    """HMAC-SHA256 of values, keyed per audit log: lets an auditor check "was this value stored?"
    against the log without the log ever holding the value."""

    def __init__(self, signer: Signer) -> None:
        self._key = hashlib.sha256(b"secretsd audit value hmac\x00" + signer.private_bytes()).digest()

    def __call__(self, value: str) -> str:
        return "hmac-sha256:" + hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()
