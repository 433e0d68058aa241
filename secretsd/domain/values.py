"""Rules for what a stored value and its version may be: text that encodes, an expiry that fits."""

from __future__ import annotations

from datetime import UTC, datetime

from secretsd.errors import RequestError

MAX_EXPIRY_YEAR = 9000


def validate_expiry(expires_at: datetime | None, now: datetime) -> datetime | None:
    """A version's expiry: in the future, and a date every backend can store (normalised to UTC)."""
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        raise RequestError("expires_at needs a UTC offset (RFC 3339)")
    if not 1970 < expires_at.year < MAX_EXPIRY_YEAR:
        raise RequestError(f"expires_at must fall between 1970 and {MAX_EXPIRY_YEAR}")
    expires_at = expires_at.astimezone(UTC)
    if expires_at <= now:
        raise RequestError("expires_at must be in the future")
    return expires_at


def encodable(value: str, what: str = "value") -> bytes:
    """UTF-8 bytes of a string from JSON; lone surrogates (valid JSON, not text) are a 400."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"the {what} is not valid Unicode text (a lone surrogate?)") from None
