"""Scheduled backups (``[backup]``): inside every daemon, taken only by the leader.

Leadership is the rotation scheduler's (``secretsd.runtime.leadership``: the storage lock
``scheduler``, a flock beside SQLite, an advisory lock on PostgreSQL), so in HA or with
``--workers`` one process writes backups. The file is the online ``backup create``'s
(``secretsd.runtime.backup.stream_backup`` over the daemon's open storage and providers): written to
a temporary name in the destination, fsynced, then linked under its final name (never replacing a
file) and the directory fsynced, so a crash never leaves a half file under a final name.

The destination is opened once per run without following a symlink, and must be a directory of our
own user that neither group nor others may write; every later step (create, link, list, remove)
is relative to that open directory, so swapping the path for a symlink mid-run changes nothing.
Retention removes only regular files whose names match ``secretsd-backup-<UTC time>.sdbk``: a file
the daemon did not name never is.

Every run is audited (``backup.scheduled``: file, size, manifest digest; a failure with its reason),
logged and counted in metrics; ``GET /v1/sys/status`` shows the last result.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keyproviders import KeyProvider
from secretsd.clock import Clock, utcnow
from secretsd.errors import ConfigError
from secretsd.runtime.backup_settings import BackupSettings, Schedule
from secretsd.runtime.scheduler import Leader, Sealed
from secretsd.storage import Storage

log = logging.getLogger("secretsd.runtime.backup_schedule")

ACTION = "backup.scheduled"
PREFIX = "secretsd-backup-"
SUFFIX = ".sdbk"
_TIME_FORMAT = "%Y%m%dT%H%M%S"
#: The only names retention may remove: what ``file_name`` makes.
NAME_PATTERN = re.compile(r"^secretsd-backup-(\d{8}T\d{6})-(\d{3})Z\.sdbk$")
#: A run's temporary file; one left by a crash is removed by the next run.
TEMP_PATTERN = re.compile(r"^\.secretsd-backup-\d{8}T\d{6}-\d{3}Z\.sdbk\.partial$")
#: The loop wakes at least this often, to notice leadership and unseal.
MAX_SLEEP_SECONDS = 30.0


def file_name(when: datetime) -> str:
    when = when.astimezone(UTC)
    return f"{PREFIX}{when.strftime(_TIME_FORMAT)}-{when.microsecond // 1000:03d}Z{SUFFIX}"


def time_of(name: str) -> datetime | None:
    """The time a scheduled backup's name says it was taken; None for any other name."""
    m = NAME_PATTERN.match(name)
    if m is None:
        return None
    base = datetime.strptime(m.group(1), _TIME_FORMAT).replace(tzinfo=UTC)
    return base + timedelta(milliseconds=int(m.group(2)))


def open_destination(directory: Path) -> int:
    """The destination, created 0700 if missing, opened as a directory fd; refused (``ConfigError``)
    when it is a symlink, not a directory, another user's, or writable by group or others."""
    if not directory.exists() and not directory.is_symlink():
        directory.mkdir(parents=True, mode=0o700)
        directory.chmod(0o700)  # mkdir's mode passes through the umask
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ConfigError(f"backup directory {directory} is a symlink or not a directory; refused") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ConfigError(f"backup directory {directory} belongs to uid {st.st_uid}, not to this daemon's "
                              f"uid {os.geteuid()}; refused")
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise ConfigError(f"backup directory {directory} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
                              "others may write it (replace or delete backups); refused (chmod go-w)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def ours(dir_fd: int) -> list[str]:
    """Names of the scheduled backups in the directory (regular files only), oldest first."""
    names = []
    for name in os.listdir(dir_fd):
        if NAME_PATTERN.match(name) is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                names.append(name)
    return sorted(names)


def prune(dir_fd: int, keep: int) -> list[str]:
    """Retention: remove all but the newest ``keep`` scheduled backups, and our stale temporary
    files. Nothing else in the directory is touched."""
    removed = []
    names = ours(dir_fd)
    for name in names[:max(0, len(names) - keep)]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
            removed.append(name)
    for name in os.listdir(dir_fd):
        if TEMP_PATTERN.match(name):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=dir_fd)
    return removed


@dataclass
class RunResult:
    ok: bool
    at: datetime
    file: str | None = None
    size: int | None = None
    manifest_sha256: str | None = None
    reason: str | None = None
    removed: tuple[str, ...] = ()


WriteBackup = Callable[[Storage, Sequence[KeyProvider], Callable[[bytes], Awaitable[None]]], Awaitable[Any]]


class BackupScheduler:
    """Runs ``[backup]``: ``run`` is the daemon's task; ``run_once`` is one backup (tests call it)."""

    def __init__(self, settings: BackupSettings, storage: Storage, providers: Callable[[], Sequence[KeyProvider]],
                 barrier: Sealed, leadership: Leader, write: WriteBackup,
                 record: Callable[[dict[str, Any]], Awaitable[None]], *, clock: Clock = utcnow) -> None:
        self.settings = settings
        self.schedule: Schedule = settings.parsed
        self._storage = storage
        self._providers = providers
        self._barrier = barrier
        self._leadership = leadership
        self._write = write
        self._record = record
        self._clock = clock
        self.last_success: RunResult | None = None
        self.last_failure: RunResult | None = None
        self.failures = 0
        self._retry_at: datetime | None = None

    @property
    def directory(self) -> Path:
        assert self.settings.directory is not None
        return self.settings.directory

    def status(self) -> dict[str, Any]:
        ok, bad = self.last_success, self.last_failure
        last = max((r for r in (ok, bad) if r is not None), key=lambda r: r.at, default=None)
        return {
            "enabled": self.settings.enabled,
            "schedule": self.settings.schedule,
            "directory": str(self.settings.directory) if self.settings.directory else None,
            "retention": self.settings.retention,
            "last_result": None if last is None else ("ok" if last.ok else "failed"),
            "last_success_at": ok.at.isoformat() if ok else None,
            "last_file": ok.file if ok else None,
            "last_size_bytes": ok.size if ok else None,
            "last_failure_at": bad.at.isoformat() if bad else None,
            "last_error": bad.reason if bad else None,
            "failures": self.failures,
        }

    def _newest_taken(self) -> datetime | None:
        try:
            fd = open_destination(self.directory)
        except (OSError, ConfigError):
            return None  # the run itself reports why
        try:
            names = ours(fd)
        finally:
            os.close(fd)
        return time_of(names[-1]) if names else None

    def due(self, now: datetime) -> datetime:
        if self._retry_at is not None:
            return self._retry_at
        newest = self._newest_taken()
        if self.last_success is not None and (newest is None or self.last_success.at > newest):
            newest = self.last_success.at
        return self.schedule.next_due(newest, now)

    async def tick(self) -> RunResult | None:
        """A backup if one is due, this process leads and the keyring is unsealed."""
        if self._barrier.sealed or not self._leadership.is_leader:
            return None
        now = self._clock()
        if await asyncio.to_thread(self.due, now) > now:
            return None
        return await self.run_once()

    async def run_once(self) -> RunResult:
        started = self._clock()
        try:
            result = await self._take(started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is reported: log line, audit record, metric
            reason = _reason(exc)
            result = RunResult(False, started, reason=reason)
            self.failures += 1
            self.last_failure = result
            self._retry_at = started + self.schedule.retry_after()
            log.error("scheduled backup into %s failed: %s", self.directory, reason)
            await self._audit({"outcome": "error", "reason": reason, "directory": str(self.directory)})
            return result
        self.last_success = result
        self._retry_at = None
        log.info("scheduled backup %s written (%d bytes)%s", result.file, result.size or 0,
                 f"; removed {len(result.removed)} older" if result.removed else "")
        await self._audit({"outcome": "ok", "file": result.file, "size": result.size,
                           "manifest_sha256": result.manifest_sha256, "directory": str(self.directory),
                           "removed": list(result.removed)})
        return result

    async def _audit(self, fields: dict[str, Any]) -> None:
        try:
            await self._record({"action": ACTION, "client": "system", "decision": "allow", **fields})
        except Exception as exc:  # the log line and the metric still say it
            log.error("could not audit the scheduled backup (%s): %s", fields.get("outcome"), _reason(exc))

    async def _take(self, started: datetime) -> RunResult:
        dir_fd = await asyncio.to_thread(open_destination, self.directory)
        try:
            name = file_name(started)
            temp = f".{name}.partial"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            size = 0
            try:
                with os.fdopen(fd, "wb") as fh:
                    async def send(data: bytes) -> None:
                        nonlocal size
                        await asyncio.to_thread(fh.write, data)
                        size += len(data)

                    manifest = await self._write(self._storage, self._providers(), send)
                    await asyncio.to_thread(_flush_and_sync, fh)
                # A link, not a rename: a file that appeared under the name meanwhile is never replaced.
                os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=dir_fd)
            await asyncio.to_thread(os.fsync, dir_fd)
            removed = await asyncio.to_thread(prune, dir_fd, self.settings.retention)
        finally:
            os.close(dir_fd)
        return RunResult(True, started, file=name, size=size, manifest_sha256=str(manifest.sha256),
                         removed=tuple(removed))

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failed round
                log.error("backup scheduler round failed: %s", type(exc).__name__)
            await asyncio.sleep(await self._sleep_seconds())

    async def _sleep_seconds(self) -> float:
        now = self._clock()
        if self._barrier.sealed or not self._leadership.is_leader:
            return min(1.0, MAX_SLEEP_SECONDS)
        wait = (await asyncio.to_thread(self.due, now) - now).total_seconds()
        return min(max(wait, 0.05), MAX_SLEEP_SECONDS)


def _flush_and_sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _reason(exc: BaseException) -> str:
    """One line for the log, the audit record and status: the error's type and message (our errors
    and OSErrors name files and causes, never key material)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
