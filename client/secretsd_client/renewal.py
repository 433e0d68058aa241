"""Background token renewal (``auto_renew=True`` on the sync and async clients).

One rule for both faces, in ``RenewalPlan``: renew at once, then again when two thirds of the time
left has passed (about 2/3 of the token's TTL, since a renewal extends it by its TTL); stop for good
when the token no longer renews (no expiry, no max TTL, or its max reached) or the daemon refuses it
(revoked, expired: a 4xx); after a failure that may pass (unreachable, sealed, 5xx) wait longer each
time, doubling from 2 s to 5 minutes, and never past the token's own expiry. It never hammers.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from secretsd_client.errors import AuthError, ConfigError, RequestError, SecretsdError

#: The shortest wait between two renewals that succeeded (a TTL of a second still renews at most once a second).
MIN_DELAY_SECONDS = 1.0
#: The longest wait after failures.
MAX_BACKOFF_SECONDS = 300.0


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


class RenewalPlan:
    """When to renew next: each answer (or error) in, the seconds to wait (None: stop) out."""

    def __init__(self) -> None:
        self.failures = 0
        self.expires_at: datetime | None = None
        #: Renewals that succeeded (for tests and for a caller who wants to know).
        self.renewals = 0

    def after_answer(self, answer: Mapping[str, Any], now: datetime | None = None) -> float | None:
        now = now or datetime.now(UTC)
        self.failures = 0
        self.renewals += 1
        expires_at, cap = _time(answer.get("expires_at")), _time(answer.get("max_expires_at"))
        self.expires_at = expires_at
        if expires_at is None or cap is None or expires_at >= cap:
            return None  # nothing (more) to renew: its expiry is final
        return max(MIN_DELAY_SECONDS, (expires_at - now).total_seconds() * 2 / 3)

    def after_error(self, error: SecretsdError, now: datetime | None = None) -> float | None:
        if isinstance(error, AuthError | RequestError | ConfigError):
            return None  # refused (revoked, expired, not a token): asking again changes nothing
        now = now or datetime.now(UTC)
        self.failures += 1
        delay = min(MAX_BACKOFF_SECONDS, 2.0 ** self.failures)
        if self.expires_at is not None:
            left = (self.expires_at - now).total_seconds()
            if left <= 0:
                return None  # expired meanwhile: it cannot renew any more
            delay = min(delay, max(MIN_DELAY_SECONDS, left / 2))
        return delay
