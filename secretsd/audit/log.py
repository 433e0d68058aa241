"""The audit log writer: append-only JSON Lines with group commit, size rotation and a stored head.

Requests hand their record to ``append`` and wait: a writer task takes every record queued so
far, chains and signs them, writes them with one ``fsync``, and only then releases the waiting
requests. So nothing is acknowledged before its record is durable, and the fsync (and, with
``sign = "batch"``, the signature) is shared by everything that arrived meanwhile. A write that
fails or takes longer than the timeout fails its requests (fail closed), and the next batch starts
again from the last durable record. The chain's head (sequence, hash) is copied to storage at most
every ``head_interval`` seconds and at shutdown, off the requests' path, so that a log whose tail
was cut is caught by `audit verify`; records newer than the stored head are the window it cannot see.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secretsd.audit.record import GENESIS_HASH, Signer, canonical, record_hash
from secretsd.audit.verify import Head, log_files
from secretsd.errors import AuditError

log = logging.getLogger("secretsd.audit")

HeadStore = Callable[[Head], Awaitable[None]]
MAX_BATCH = 512


@dataclass
class _Pending:
    fields: dict[str, Any]
    done: asyncio.Future[None]


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of a file (a torn final line from a crash is ignored)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            fh.seek(max(0, end - 65536))
            lines = fh.read().split(b"\n")
    except FileNotFoundError:
        return None
    for raw in reversed(lines):
        if raw.strip():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("seq"), int):
                return record
    return None


def _complete_size(path: Path) -> int:
    """Bytes up to and including the last newline."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            while size > 0:
                start = max(0, size - 65536)
                fh.seek(start)
                chunk = fh.read(size - start)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    return start + cut + 1
                size = start
    except FileNotFoundError:
        pass
    return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    def __init__(
        self,
        path: Path,
        signer: Signer,
        *,
        head_store: HeadStore,
        stored_head: Head | None,
        max_file_bytes: int,
        write_timeout: float,
        mirror: Callable[[str], None] | None = None,
        sign_every_record: bool = False,
        head_interval: float = 1.0,
    ) -> None:
        self.path = path
        self._signer = signer
        self._head_store = head_store
        self._stored_head = stored_head
        self._max_file_bytes = max_file_bytes
        self._write_timeout = write_timeout
        self._mirror = mirror
        self._sign_every = sign_every_record
        self._head_interval = head_interval
        self._head_stored_at = float("-inf")
        self._head_stored = stored_head
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._lock_fd: int | None = None
        self._head_timer: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        self._hash = GENESIS_HASH
        self._durable_size = 0
        self.healthy = True
        self.records_written = 0
        self.errors = 0
        self.on_batch: Callable[[int, float], None] | None = None  # (records, fsync seconds), for metrics

    @property
    def head(self) -> Head:
        return Head(self._seq, self._hash)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            # Two writers on one chain would fork it and cut each other's records off.
            raise AuditError(f"another process is writing the audit log {self.path}; give each daemon "
                             "process its own [audit] chain") from None
        last = None
        for candidate in reversed(log_files(self.path)):
            last = await asyncio.to_thread(_last_record, candidate)
            if last is not None:
                break
        if last is not None:
            self._seq, self._hash = int(last["seq"]), record_hash(last)
        if self._stored_head is not None and self._stored_head.seq > self._seq:
            # The file lost records the store says were written: keep the chain going from the
            # stored head, so `audit verify` shows exactly where the gap is.
            log.critical("audit log %s ends at record %d but the store's head is %d: records were removed",
                         self.path, self._seq, self._stored_head.seq)
            self._seq, self._hash = self._stored_head.seq, self._stored_head.hash
        # A record torn by a crash mid-write was never acknowledged: the next write cuts it off.
        self._durable_size = await asyncio.to_thread(_complete_size, self.path)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            await asyncio.gather(self._head_timer, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            await self._store_head(force=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def append(self, fields: dict[str, Any]) -> None:
        """Queue a record and wait until it is durable; ``AuditError`` if it cannot be."""
        if self._task is None:
            raise AuditError("the audit log is not open")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending({**fields, "time": datetime.now(UTC).isoformat()}, done))
        try:
            async with asyncio.timeout(self._write_timeout):
                await done
        except TimeoutError:
            # The record is still written when the disk comes back, marked "late": its request
            # was answered 503 meanwhile.
            self.healthy = False
            raise AuditError(f"the audit record was not written within {self._write_timeout:g}s") from None

    # -- the writer task ------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            await self._write_batch(batch)

    def _seal(self, batch: list[_Pending]) -> tuple[bytes, Head]:
        seq, prev = self._seq, self._hash
        lines = []
        last = len(batch) - 1
        for i, item in enumerate(batch):
            seq += 1
            # The chain's own fields last, so no caller field can replace them.
            record = {**item.fields, "seq": seq, "prev_hash": prev}
            if item.done.done():
                record["late"] = True
            if self._sign_every or i == last:
                record["sig"] = self._signer.signature(canonical(record))
            line = canonical(record)
            prev = hashlib.sha256(line).hexdigest()  # = record_hash(record): the line is canonical
            lines.append(line)
        return b"\n".join(lines) + b"\n", Head(seq, prev)

    def _write(self, data: bytes) -> None:
        # Opened per batch: a replaced or moved file is noticed at once, and a failed write is
        # cut back to the last durable record before the next attempt.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if os.fstat(fd).st_size != self._durable_size:
                os.ftruncate(fd, self._durable_size)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._mirror:
            # In this thread, not on the event loop: a reader that stops reading makes the audit
            # time out (and fail closed) instead of freezing the daemon.
            for line in data.decode("utf-8").splitlines():
                self._mirror(line)

    def _rotate(self) -> None:
        number = 1 + max((int(p.name.rsplit(".", 1)[1]) for p in log_files(self.path)[:-1]), default=0)
        os.replace(self.path, self.path.with_name(f"{self.path.name}.{number:06d}"))
        _fsync_dir(self.path.parent)
        self._durable_size = 0

    async def _store_head(self, *, force: bool = False) -> None:
        head = self.head
        now = asyncio.get_running_loop().time()
        if head == self._head_stored:
            return
        wait = self._head_interval - (now - self._head_stored_at)
        if not force and wait > 0:
            # A burst followed by silence must not leave the stored head behind for long.
            if self._head_timer is None or self._head_timer.done():
                self._head_timer = asyncio.get_running_loop().create_task(self._store_head_later(wait))
            return
        try:
            await self._head_store(head)
        except Exception as exc:  # the records are durable; only the truncation check lags
            log.error("could not store the audit chain head: %s", exc)
            return
        self._head_stored, self._head_stored_at = head, now

    async def _store_head_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        await self._store_head(force=True)

    async def _write_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            data, head = self._seal(batch)  # inside: a record that cannot be encoded fails its batch only
            await asyncio.to_thread(self._write, data)
        except Exception as exc:  # any failure fails the batch closed; the next batch retries
            self.healthy = False
            self.errors += len(batch)
            log.error("audit write failed for %d record(s): %s", len(batch), exc)
            error = AuditError("the audit record could not be written, so the request was refused")
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(error)
                    item.done.exception()  # mark retrieved: a timed-out waiter is gone
            return
        self._seq, self._hash = head.seq, head.hash
        self._durable_size += len(data)
        self.healthy = True
        self.records_written += len(batch)
        if self.on_batch:
            self.on_batch(len(batch), loop.time() - started)
        for item in batch:
            if not item.done.done():
                item.done.set_result(None)
        await self._store_head()
        if self._durable_size >= self._max_file_bytes:
            try:
                await asyncio.to_thread(self._rotate)
            except OSError as exc:
                log.error("audit log rotation failed (will retry): %s", exc)


def stdout_mirror(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def syslog_mirror() -> Callable[[str], None]:
    import syslog

    syslog.openlog("secretsd-audit", 0, syslog.LOG_AUTH)

    def emit(line: str) -> None:
        syslog.syslog(syslog.LOG_INFO, line)

    return emit
