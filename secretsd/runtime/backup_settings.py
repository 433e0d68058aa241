"""``[backup]``: scheduled backups (the schedule's two forms and when a run is due).

Kept apart from the scheduler (``secretsd.runtime.backup_schedule``) so that the configuration can
import it without importing the daemon. Times are UTC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_INTERVAL = re.compile(r"^([1-9][0-9]{0,6})(s|m|h|d)$")
_DAILY = re.compile(r"^daily ([01][0-9]|2[0-3]):([0-5][0-9])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DAY = timedelta(days=1)
#: A failed run is retried after the schedule's period, but at least this often.
MAX_RETRY = timedelta(minutes=5)


@dataclass(frozen=True)
class Schedule:
    """Either every ``interval``, or once a day at ``at`` (UTC)."""

    interval: timedelta | None = None
    at: time | None = None

    @property
    def period(self) -> timedelta:
        return self.interval if self.interval is not None else DAY

    def latest_slot(self, now: datetime) -> datetime | None:
        """The latest scheduled instant at or before ``now`` (daily form); None for an interval."""
        if self.at is None:
            return None
        today = now.replace(hour=self.at.hour, minute=self.at.minute, second=0, microsecond=0)
        return today if today <= now else today - DAY

    def next_due(self, last: datetime | None, now: datetime) -> datetime:
        """When the next backup is due, given the newest one taken (``last``): with none, now.

        Interval: ``last + interval``. Daily: due as soon as no backup was taken since the latest
        HH:MM slot, otherwise at the next slot. Either way a restarted daemon neither repeats a
        backup it already has nor skips one it missed.
        """
        if last is None:
            return now
        if self.interval is not None:
            return last + self.interval
        slot = self.latest_slot(now)
        assert slot is not None
        return now if last < slot else slot + DAY

    def retry_after(self) -> timedelta:
        return min(self.period, MAX_RETRY)


def parse_schedule(value: str) -> Schedule:
    """``"30m"``, ``"6h"``, ``"1d"``, ``"90s"`` (an interval), or ``"daily HH:MM"`` (UTC)."""
    text = value.strip()
    if m := _INTERVAL.match(text):
        return Schedule(interval=timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2)]))
    if m := _DAILY.match(text):
        return Schedule(at=time(int(m.group(1)), int(m.group(2))))
    raise ValueError("schedule must be an interval such as '30m', '6h', '1d' or 'daily HH:MM' (UTC)")


class BackupSettings(BaseModel):
    """``[backup]``: backups the daemon takes itself (the leader only), into ``directory``."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    #: An interval ("90s", "30m", "6h", "1d") or "daily HH:MM" (UTC).
    schedule: str = "daily 03:00"
    #: Where the files go; created 0700 if missing; refused when group- or other-writable, a
    #: symlink, or owned by another user. Relative paths are relative to the config file.
    directory: Path | None = None
    #: Keep the newest N scheduled backups; older ones (only files named like ours) are removed.
    retention: int = Field(default=7, ge=1, le=100_000)

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @model_validator(mode="after")
    def _needs_directory(self) -> BackupSettings:
        if self.enabled and self.directory is None:
            raise ValueError("[backup] enabled = true needs a directory")
        return self

    @property
    def parsed(self) -> Schedule:
        return parse_schedule(self.schedule)
