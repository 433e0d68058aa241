"""When to send a call again: capped exponential backoff with jitter, shared by both client faces.

A call is retried only if it is idempotent (``Call.idempotent``: the server changes nothing twice)
and the error says it may pass (``SecretsdError.retryable``: sealed, key provider or storage
unavailable, audit unavailable, or the daemon could not be reached). Everything else is raised at
once: retrying a 403 or a 409 only hides the problem.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from secretsd_client.calls import Call
from secretsd_client.errors import SecretsdError


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` counts the first try; ``max_time`` bounds the whole call, sleeps included.

    The n-th wait is ``min(max_delay, base_delay * 2**(n-1))``, of which the upper half is random
    ("equal jitter"), so many clients waiting on one sealed daemon do not come back in step.
    """

    max_attempts: int = 3
    max_time: float = 10.0
    base_delay: float = 0.1
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_time < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("max_time, base_delay and max_delay must not be negative")

    @classmethod
    def never(cls) -> RetryPolicy:
        """One attempt, no retry."""
        return cls(max_attempts=1)

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)  # noqa: S311 - jitter, not a secret

    def next_delay(self, call: Call, error: SecretsdError, attempt: int, elapsed: float) -> float | None:
        """How long to wait before the next attempt, or None to raise ``error`` now."""
        if not call.idempotent or not error.retryable or attempt >= self.max_attempts:
            return None
        wait = self.delay(attempt)
        if elapsed + wait > self.max_time:
            return None
        return wait


DEFAULT_RETRY = RetryPolicy()
