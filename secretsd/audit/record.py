"""Audit records: canonical bytes, the hash chain, and Ed25519 signatures.

A record is a flat JSON object. Its canonical form is compact JSON with sorted keys, UTF-8, and it
is exactly the line written. A record's hash is SHA-256 of that line; the next record carries it as
``prev_hash``. A signature (``sig``, base64) is over the canonical form of every other field,
``prev_hash`` included, so it vouches for its record and, through the chain, for every record
before it. With ``[audit] sign = "record"`` every record is signed; with the default ``"batch"``
the last record of each group-commit batch is, which costs one signature per fsync instead of one
per request. Either way, editing, removing, inserting or reordering a record breaks a signature or
the chain, and neither can be repaired without the private key; a cut inside a batch leaves
unsigned records at the end, which verification reports.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from secretsd.custody.crypto import SigningKey, VerifyKey

GENESIS_HASH = "0" * 64
FORMAT = 1


# One encoder for every record: json.dumps with options builds a new one per call. Records are flat,
# so the circular-reference check has nothing to find.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, check_circular=False)


def canonical(record: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(record).encode("utf-8")


def record_hash(signed: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(signed)).hexdigest()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_line(raw: bytes) -> tuple[Any, str | None]:
    """A log line's value, and why the line is not exactly the canonical bytes of it (None if it is).

    The rule: a line must be byte for byte ``canonical(record) + b"\n"``. Signatures and hashes are
    over the canonical form, so a line that merely parses to a signed record (extra whitespace,
    other key order, escapes, a duplicate key) would verify while other readers see something
    else: with ``{"client":"mallory","client":"admin",...}`` Python keeps the last value and a
    reader that keeps the first sees "mallory". ``ValueError`` if the line is not JSON at all.
    """
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                duplicates.append(key)
            obj[key] = value
        return obj

    value = json.loads(raw, object_pairs_hook=pairs, parse_constant=_refuse_constant)
    if duplicates:
        return value, f"duplicate key {duplicates[0]!r}: readers disagree on its value (the line was edited)"
    try:
        exact = isinstance(value, dict) and canonical(value) + b"\n" == raw
    except (ValueError, TypeError):  # a lone surrogate escape cannot be encoded back
        exact = False
    if not exact:
        return value, ("the line is not the canonical form of its record (whitespace, key order or "
                       "escapes differ): the line was edited")
    return value, None


class Signer:
    def __init__(self, key: SigningKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> Signer:
        return cls(SigningKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Signer:
        return cls(SigningKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes()

    def public_pem(self) -> str:
        return self._key.verify_key().pem()

    def sign(self, record: dict[str, Any]) -> dict[str, Any]:
        """Return ``record`` with its signature added."""
        return record | {"sig": self.signature(canonical(record))}

    def signature(self, body: bytes) -> str:
        return base64.b64encode(self._key.sign(body)).decode("ascii")


def public_pem(key: VerifyKey) -> str:
    return key.pem()


def load_public_pem(text: str) -> VerifyKey:
    return VerifyKey.from_pem(text)


def signature_valid(key: VerifyKey, signed: dict[str, Any]) -> bool:
    sig = signed.get("sig")
    if not isinstance(sig, str):
        return False
    body = {k: v for k, v in signed.items() if k != "sig"}
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        return False
    return key.verify(raw, canonical(body))
