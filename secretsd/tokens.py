"""Token format and verification: the rules for bearer tokens live here and nowhere else.

A token reads ``sdt_<id>_<secret>``: the prefix lets secret scanners and people recognise it, the
id (not secret) finds the stored record by an indexed lookup, and the secret part carries 256 random
bits. Only SHA-256 of the secret part is stored: a fast hash is enough for a 256-bit random value
(no dictionary to try), and it keeps verification off the request path's CPU budget.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

TOKEN_PREFIX = "sdt_"  # noqa: S105 - a prefix, not a credential
_SECRET_BYTES = 32
_ID_BYTES = 8
_TOKEN_RE = re.compile(r"sdt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_ID_RE = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class NewToken:
    token: str  # shown to the user exactly once
    token_id: str
    secret_hash: bytes


def hash_secret(secret: bytes) -> bytes:
    return hashlib.sha256(b"secretsd-token\x00" + secret).digest()


def _encode(secret: bytes) -> str:
    return base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")


def generate_token() -> NewToken:
    token_id = secrets.token_hex(_ID_BYTES)
    secret = secrets.token_bytes(_SECRET_BYTES)
    return NewToken(f"{TOKEN_PREFIX}{token_id}_{_encode(secret)}", token_id, hash_secret(secret))


def parse_token(token: str) -> tuple[str, bytes] | None:
    """Split a presented token into (id, secret); None if it is not shaped like one of ours."""
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        return None
    try:
        secret = base64.urlsafe_b64decode(match.group(2) + "=")
    except (binascii.Error, ValueError):
        return None
    # 43 characters carry 258 bits: accept only the one spelling our encoder produces, so that a
    # token has exactly one string form.
    if _encode(secret) != match.group(2):
        return None
    return match.group(1), secret


def secret_matches(secret: bytes, stored_hash: bytes) -> bool:
    """Constant-time comparison of a presented secret with a stored hash (invariant 3)."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def is_token_id(text: str) -> bool:
    return _ID_RE.fullmatch(text) is not None


# Anything shaped like the start of a token's secret: a token pasted (whole or cut) where a path or a
# request id goes. Deliberately loose (any length of secret characters) so a cut token is caught too.
_SECRET_IN_TEXT_RE = re.compile(r"sdt_([0-9a-fA-F]{16})_[A-Za-z0-9_-]+")


def redact_secrets(text: str) -> str:
    """``text`` with the secret part of anything token-shaped replaced: the rule for whatever a caller
    sends that is copied into a record or a log (a path, a prefix). The public id stays, so an
    operator can still tell whose token was pasted there and revoke it."""
    if TOKEN_PREFIX not in text:  # the pattern starts with it (case-sensitive): skip the regex
        return text
    return _SECRET_IN_TEXT_RE.sub(lambda m: f"{TOKEN_PREFIX}{m.group(1)}_[redacted]", text)


def looks_like_token(text: str) -> bool:
    return _SECRET_IN_TEXT_RE.search(text) is not None


def display_id(token_id: str) -> str:
    """How a token is named in lists, logs and audit records: never the secret part."""
    return f"{TOKEN_PREFIX}{token_id}"
