"""Requests that fail authentication: recorded one by one up to a budget, then counted and summarised.

Every 401 used to be a durable record of its own, so anyone who can reach the port could make the
daemon write as fast as it answers, fill the disk, and so make the fail-closed log refuse everyone.
Now each remote address gets a token bucket (``burst`` records, refilled at ``per_second``), and all
remotes together another (``total_per_second``), so that many addresses cannot multiply the
budget. A failure with a token in both buckets gets its own record, as before. One without is
counted against its remote and written later in an ``auth.failures`` summary record (count, first
and last time, a sample action), at most ``max_summaries + 1`` summaries per ``summary_seconds``.
The counts of the summaries add up exactly to the failures that had no record of their own:
nothing is dropped without being counted. The table of remotes is bounded; when it is full, new
remotes share one entry, ``remote: "*"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

OTHER_REMOTES = "*"


@dataclass(frozen=True)
class FailureBudget:
    burst: int  # records of its own a remote may have at once
    per_second: float  # and the rate its budget refills
    total_per_second: float  # all remotes together: records of their own per second
    summary_seconds: float  # how often pending counts are written as summaries
    max_remotes: int = 1024
    max_summaries: int = 32  # per round; the rest are merged into one

    @property
    def total_burst(self) -> float:
        return max(float(self.burst), self.total_per_second)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float  # monotonic time of the last refill

    def take(self, capacity: float, rate: float, now: float) -> bool:
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return self.tokens >= 1.0

    def full(self, capacity: float, rate: float, now: float) -> bool:
        return self.tokens + (now - self.stamp) * rate >= capacity


@dataclass(slots=True)
class _Remote:
    bucket: _Bucket
    count: int = 0  # failures since the last summary that have no record of their own
    first: float = 0.0  # wall-clock times of the first and last of them
    last: float = 0.0
    action: str = ""


class FailureCounter:
    """The budget of unauthenticated failures; the event loop's thread only (no locking)."""

    def __init__(self, budget: FailureBudget, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.budget = budget
        self._clock = clock
        self._wall = wall
        self._remotes: dict[str, _Remote] = {}
        self._total = _Bucket(budget.total_burst, clock())
        self._pruned_at = float("-inf")
        self.pending = 0  # counted, not yet handed out in a summary

    def admit(self, remote: str, action: str) -> bool:
        """True: this failure gets a record of its own now. False: it is counted for a summary.

        The rule "unauthenticated failures beyond a budget are summarised, never dropped".
        """
        b, now = self.budget, self._clock()
        entry = self._entry(remote, now)
        if entry.bucket.take(b.burst, b.per_second, now) and self._total.take(b.total_burst, b.total_per_second, now):
            entry.bucket.tokens -= 1
            self._total.tokens -= 1
            return True
        wall = self._wall()
        if entry.count == 0:
            entry.first, entry.action = wall, action
        entry.count += 1
        entry.last = wall
        self.pending += 1
        return False

    def _entry(self, remote: str, now: float) -> _Remote:
        entry = self._remotes.get(remote)
        if entry is not None:
            return entry
        if len(self._remotes) >= self.budget.max_remotes and now - self._pruned_at >= 1.0:
            self._prune(now)
        if len(self._remotes) >= self.budget.max_remotes:
            remote = OTHER_REMOTES  # bounded memory: newcomers share one budget and one count
            entry = self._remotes.get(remote)
            if entry is not None:
                return entry
        entry = _Remote(_Bucket(float(self.budget.burst), now))
        self._remotes[remote] = entry
        return entry

    def _prune(self, now: float) -> None:
        """Forget remotes with nothing pending whose budget is whole again: a fresh entry is the same."""
        self._pruned_at = now
        b = self.budget
        for remote in [r for r, e in self._remotes.items()
                       if e.count == 0 and e.bucket.full(b.burst, b.per_second, now)]:
            del self._remotes[remote]

    def summaries(self) -> list[dict[str, Any]]:
        """Hand out every pending count as ``auth.failures`` records, and start counting afresh."""
        pending = sorted(((r, e) for r, e in self._remotes.items() if e.count), key=lambda item: -item[1].count)
        records = [_summary(remote, e.count, e.first, e.last, e.action) for remote, e in
                   pending[:self.budget.max_summaries]]
        rest = pending[self.budget.max_summaries:]
        if rest:
            merged = _summary(OTHER_REMOTES, sum(e.count for _, e in rest), min(e.first for _, e in rest),
                              max(e.last for _, e in rest), rest[0][1].action)
            records.append(merged | {"remotes": len(rest)})
        for _, entry in pending:
            entry.count = 0
        self.pending = 0
        self._prune(self._clock())
        return records


def _summary(remote: str, count: int, first: float, last: float, action: str) -> dict[str, Any]:
    return {"action": "auth.failures", "client": None, "decision": "deny", "outcome": 401, "remote": remote,
            "count": count, "first": _iso(first), "last": _iso(last), "sample_action": action}


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat()
