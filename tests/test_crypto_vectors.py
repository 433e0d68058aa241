"""Known-answer vectors for secretsd's own constructions (tests/data/secretsd_vectors.json).

Stores and audit logs written by earlier releases must keep opening and verifying byte for byte, and
a verifier in another language needs fixed answers to check itself against. Where the standard
library can compute a construction from its documented formula (the AAD layouts, the token hash,
HKDF, HMAC), it is recomputed here too, so the documentation is checked as well as the code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

from secretsd import tokens
from secretsd.audit.keys import VALUE_HMAC_LABEL, ValueHasher
from secretsd.audit.record import Signer, canonical, load_public_pem, record_hash, signature_valid
from secretsd.custody import crypto

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "secretsd_vectors.json").read_text())


def _x(text: str) -> bytes:
    return bytes.fromhex(text)


def test_value_aead_vector_opens_and_its_aad_is_the_documented_layout() -> None:
    v = VECTORS["value_aead"]
    aad = crypto.value_aad(v["path"], v["version"], v["term"])
    assert aad.hex() == v["aad"]
    assert aad == b"secretsd/value\x00" + struct.pack(">BQI", 1, v["version"], v["term"]) + v["path"].encode()
    key = crypto.DataKey(_x(v["dek"]))
    assert key.open(_x(v["nonce"]), _x(v["ciphertext"]), aad) == v["plaintext"].encode()
    assert key.matches(_x(v["dek"])) and not key.matches(bytes(32))


def test_dek_and_blob_aad_vectors() -> None:
    d, b = VECTORS["dek_aad"], VECTORS["blob_aad"]
    assert crypto.dek_aad(d["term"]).hex() == d["aad"]
    assert _x(d["aad"]) == b"secretsd/dek\x00" + struct.pack(">BI", 1, d["term"])
    assert crypto.blob_aad(b["purpose"], b["term"]).hex() == b["aad"]
    assert _x(b["aad"]) == b"secretsd/blob\x00" + struct.pack(">BI", 1, b["term"]) + b["purpose"].encode()


def test_token_hash_vector() -> None:
    v = VECTORS["token_hash"]
    assert tokens.hash_secret(_x(v["secret"])).hex() == v["hash"]
    assert hashlib.sha256(b"secretsd-token\x00" + _x(v["secret"])).hexdigest() == v["hash"]


def test_audit_signature_vector_is_deterministic_and_verifies() -> None:
    v = VECTORS["audit_signature"]
    signer = Signer.from_private_bytes(_x(v["private_key"]))
    assert signer.public_pem() == v["public_pem"]
    assert canonical(v["record"]).decode() == v["canonical"]
    signed = signer.sign(v["record"])
    assert signed["sig"] == v["sig_base64"]  # Ed25519 signatures are deterministic (RFC 8032)
    assert record_hash(signed) == v["record_hash"]
    key = load_public_pem(v["public_pem"])
    assert signature_valid(key, signed)
    forged = dict(signed, client="mallory")
    assert not signature_valid(key, forged)
    assert not signature_valid(key, dict(signed, sig=base64.b64encode(b"x" * 64).decode()))


def test_value_hmac_vector_and_its_hkdf_derivation() -> None:
    v = VECTORS["value_hmac"]
    assert v["label"] == VALUE_HMAC_LABEL
    secret = _x(v["private_key"])
    # RFC 5869 with no salt: PRK = HMAC(zeros, IKM); one block of output: T(1) = HMAC(PRK, info || 0x01).
    prk = hmac.new(bytes(32), secret, hashlib.sha256).digest()
    derived = hmac.new(prk, v["label"].encode() + b"\x01", hashlib.sha256).digest()
    assert derived.hex() == v["derived_key"] == crypto.derive_key(secret, v["label"]).hex()
    assert ValueHasher(Signer.from_private_bytes(secret))(v["value"]) == v["value_hmac"]
    assert v["value_hmac"] == "hmac-sha256-v2:" + hmac.new(derived, v["value"].encode(), hashlib.sha256).hexdigest()


def test_derived_keys_for_different_labels_are_independent() -> None:
    secret = bytes(range(32))
    assert crypto.derive_key(secret, "a") != crypto.derive_key(secret, "b")


def test_only_the_crypto_module_imports_cryptography_hazmat() -> None:
    root = Path(__file__).parent.parent / "secretsd"
    importers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "cryptography.hazmat" in p.read_text())
    assert importers == [str(Path(crypto.__file__).relative_to(root))]
