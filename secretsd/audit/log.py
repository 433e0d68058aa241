"""The audit log writer: append-only JSON Lines with group commit, size rotation and a stored head.

Requests hand their record to ``append`` and wait. A writer thread of the log's own takes every
record queued so far, chains and signs them, and writes them with one ``O_DSYNC`` write; only then
does it hand the batch back to the event loop, which releases the waiting requests. So nothing is
acknowledged before its record is durable, and the sync (and, with ``sign = "batch"``, the
signature) is shared by everything that arrived meanwhile. A write that fails fails its requests
(fail closed); one that takes longer than the timeout has its requests refused by a single timer on
the loop, so a stuck disk stalls the writer thread, never the daemon. The next batch starts again
from the last durable record. The chain's head (sequence, hash) is copied to storage at most every
``head_interval`` seconds and a moment after the last batch, off the requests' path, so that a log
whose tail was cut is caught by `audit verify`; records newer than the stored head are the window
it cannot see.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secretsd.audit import files
from secretsd.audit.failures import FailureBudget, FailureCounter
from secretsd.audit.record import GENESIS_HASH, Signer, canonical, record_hash
from secretsd.audit.verify import Head, log_files
from secretsd.errors import AuditError

log = logging.getLogger("secretsd.audit")

HeadStore = Callable[[Head], Awaitable[None]]
MAX_BATCH = 512


@dataclass(slots=True)
class _Pending:
    fields: dict[str, Any]
    done: asyncio.Future[None]
    wall: float  # when the request was recorded (time.time())
    deadline: float  # loop time after which its request is refused
    sealed_late: bool = False  # its request had ended before the record was sealed
    #: Whether its durability settles ``done``. A batch's records share one future that only the
    #: last one settles: records are written in order, so the last being durable means all are,
    #: while any record's failure settles it at once (and a later success cannot undo that).
    last: bool = True


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
        failure_budget: FailureBudget | None = None,
        keep_rotated_files: int | None = None,
        keep_rotated_bytes: int | None = None,
        lock_fd: int | None = None,
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
        # An already held lock on the file's .lock (a derived chain, secretsd.audit.chains): ours to close.
        self._lock_fd: int | None = lock_fd
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Loop side: records waiting for the next batch, the batch being written, and the one timer
        # that refuses overdue requests.
        self._waiting: list[_Pending] = []
        self._writing: list[_Pending] = []
        self._flush_soon = False
        self._closed = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._head_task: asyncio.Task[None] | None = None
        self._head_stored_at = float("-inf")
        self._head_stored = stored_head
        self._seq = 0  # the last durable record, as the loop knows it
        self._hash = GENESIS_HASH
        # Writer-thread side: only the thread touches these once it runs.
        self._queue: queue.SimpleQueue[tuple[bytes, Head, list[_Pending]] | None] = queue.SimpleQueue()
        self._fd: int | None = None
        self._fd_id: tuple[int, int] | None = None
        self._durable_size = 0
        self._cut_to: tuple[tuple[int, int], int] | None = None  # (file, size) a failed write must be cut back to
        self._mirror_failing = False
        self.healthy = True
        self.records_written = 0
        self.errors = 0
        self.on_batch: Callable[[int, float], None] | None = None  # (records, write seconds), for metrics
        # Unauthenticated failures beyond their budget: counted here, written as summaries.
        self._failures = FailureCounter(failure_budget) if failure_budget is not None else None
        self._summary_timer: asyncio.TimerHandle | None = None
        self.failures_summarised = 0
        # Retention of rotated files: None keeps them all.
        self._keep_files = keep_rotated_files
        self._keep_bytes = keep_rotated_bytes
        self._prune_task: asyncio.Task[None] | None = None
        self._prune_again = False
        self._closing = False

    @property
    def head(self) -> Head:
        return Head(self._seq, self._hash)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._lock_fd is None:
            self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                # Two writers on one chain would fork it and cut each other's records off.
                raise AuditError(f"another process is writing the audit log {self.path}; give each daemon "
                                 "process its own [audit] chain") from None
        try:
            last = None
            for candidate in reversed(log_files(self.path)):
                last = await asyncio.to_thread(files.last_record, candidate)
                if last is not None:
                    break
        except BaseException as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            if isinstance(exc, OSError):
                raise AuditError(f"cannot read the audit log {self.path}: {exc.strerror or exc}") from exc
            raise
        if last is not None:
            self._seq, self._hash = int(last["seq"]), record_hash(last)
        if self._stored_head is not None and self._stored_head.seq > self._seq:
            # The file lost records the store says were written: keep the chain going from the
            # stored head, so `audit verify` shows exactly where the gap is.
            log.critical("audit log %s ends at record %d but the store's head is %d: records were removed",
                         self.path, self._seq, self._stored_head.seq)
            self._seq, self._hash = self._stored_head.seq, self._stored_head.hash
        self._loop = asyncio.get_running_loop()
        # A thread of its own rather than a pool hand-off per batch: a request costs the event loop
        # one queue put and one wake-up, and a stuck disk stalls this thread, never the loop.
        self._thread = threading.Thread(target=self._run, name=f"audit-{self.path.name}", daemon=True)
        self._thread.start()
        self._start_pruning()  # a retention lowered since the last run applies now

    async def close(self) -> None:
        if self._thread is not None and self._loop is not None:
            if self._summary_timer is not None:
                self._summary_timer.cancel()
            self._closing = True
            if self._prune_task is not None:  # a file named by audit.pruned but not yet removed is harmless
                self._prune_task.cancel()
                await asyncio.gather(self._prune_task, return_exceptions=True)
            self._write_summaries()  # counted failures reach the log before it closes
            # Write what requests are still waiting for, unless the disk is stuck.
            deadline = self._loop.time() + self._write_timeout
            while (self._writing or self._waiting) and self._loop.time() < deadline:
                await asyncio.sleep(0.005)
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join, 1.0)
            if self._thread.is_alive():
                log.error("the audit writer is still stuck on a write; closing without it")
            self._thread = None
            self._closed = True  # a stuck write that finishes later changes nothing any more
            self._fail_waiting(AuditError("the audit log was closed before the record was written"))
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            if self._head_task is not None:
                self._head_task.cancel()
                await asyncio.gather(self._head_task, return_exceptions=True)
            await self._store_head()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def append(self, fields: dict[str, Any]) -> None:
        """Queue a record and wait until it is durable; ``AuditError`` if it cannot be."""
        loop = self._loop
        if self._thread is None or loop is None:
            raise AuditError("the audit log is not open")
        item = self._enqueue(fields)
        if self._watchdog is None:
            self._watchdog = loop.call_at(item.deadline, self._refuse_overdue)
        await item.done

    async def append_many(self, records: list[dict[str, Any]]) -> None:
        """Queue records in order and wait until every one is durable (a batch request's items:
        futures, not a task per record); the first failure is raised once all are settled."""
        loop = self._loop
        if self._thread is None or loop is None:
            raise AuditError("the audit log is not open")
        if not records:
            return
        done: asyncio.Future[None] = loop.create_future()
        wall = time.time()  # one request: one time for all its records
        items = [self._enqueue(fields, done=done, wall=wall, last=False) for fields in records]
        items[-1].last = True
        if self._watchdog is None:
            self._watchdog = loop.call_at(items[0].deadline, self._refuse_overdue)
        await done

    def summarised(self, fields: dict[str, Any]) -> bool:
        """For a request's record: True if it is an unauthenticated failure beyond its budget, now
        counted for an ``auth.failures`` summary instead of written (see ``failures.py``); False if
        the caller must write it as usual."""
        # Refused before authentication: 401, or 400 for two Authorization headers (api/app.py).
        if (self._failures is None or self._loop is None or self._closed or fields.get("outcome") not in (400, 401)
                or fields.get("client") is not None):
            return False
        if self._failures.admit(str(fields.get("remote")), str(fields.get("action"))):
            return False
        self.failures_summarised += 1
        if self._summary_timer is None:
            self._summary_timer = self._loop.call_later(self._failures.budget.summary_seconds,
                                                        self._write_summaries)
        return True

    def _write_summaries(self) -> None:
        self._summary_timer = None
        if self._failures is None or not self._failures.pending:
            return
        for record in self._failures.summaries():
            event = self._enqueue(record)
            event.done.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits on it

    # -- retention -----------------------------------------------------------------------------
    def _start_pruning(self) -> None:
        if (self._keep_files is None and self._keep_bytes is None) or self._closing or self._loop is None:
            return
        if self._prune_task is not None and not self._prune_task.done():
            self._prune_again = True  # rotated again meanwhile: look once more when done
            return
        self._prune_task = self._loop.create_task(self._prune())

    async def _prune(self) -> None:
        """Remove the oldest rotated files beyond retention, each only once a durable ``audit.pruned``
        record names it (its last record's sequence and hash), so `audit verify` can tell pruning
        from deletion: a log that starts after record 1 must be accounted for by such a record."""
        while True:
            self._prune_again = False
            try:
                for victim in await asyncio.to_thread(self._beyond_retention):
                    await self.append({"action": "audit.pruned", "client": "system", "decision": "allow",
                                       "outcome": "ok", **victim.describe()})
                    await asyncio.to_thread(files.remove, victim.path)
                    log.info("audit retention removed %s (records %d to %d)", victim.path, victim.first_seq,
                             victim.last_seq)
            except (AuditError, OSError) as exc:  # kept, and tried again after the next rotation
                log.error("audit retention could not prune rotated files: %s", exc)
                return
            if not self._prune_again:
                return

    def _beyond_retention(self) -> list[files.Rotated]:
        """The oldest rotated files that keep_rotated_files / keep_rotated_bytes leave no room for.

        The newest rotated file is always kept: rotation numbers the next file after it, so numbers
        never repeat and a shipper copying files by name never overwrites an older one."""
        rotated = [p for p in log_files(self.path) if p != self.path]
        sizes = [p.stat().st_size for p in rotated]
        victims: list[files.Rotated] = []
        while len(rotated) > 1 and ((self._keep_files is not None and len(rotated) > self._keep_files)
                           or (self._keep_bytes is not None and sum(sizes) > self._keep_bytes)):
            path = rotated.pop(0)
            sizes.pop(0)
            first, last = files.first_record(path), files.last_record(path)
            if first is None or last is None:
                raise AuditError(f"{path} holds no readable record; it is kept for `audit verify` to report")
            victims.append(files.Rotated(path, int(first["seq"]), int(last["seq"]), record_hash(last)))
        return victims

    # -- event-loop side -----------------------------------------------------------------------
    def _enqueue(self, fields: dict[str, Any], *, done: asyncio.Future[None] | None = None,
                 wall: float | None = None, last: bool = True) -> _Pending:
        assert self._loop is not None
        item = _Pending(fields, self._loop.create_future() if done is None else done,
                        time.time() if wall is None else wall, self._loop.time() + self._write_timeout, last=last)
        self._waiting.append(item)
        self._flush_later()
        return item

    def _flush_later(self) -> None:
        """Seal at the loop's next turn, so one batch takes every record of this turn; while a batch
        is being written, its completion calls this again."""
        if self._waiting and not self._writing and not self._flush_soon and self._loop is not None:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Seal what is waiting into the next batch and hand it to the writer thread.

        One batch at a time: records arriving during a write form the next batch, so a slow disk
        makes batches bigger rather than queueing writes. Sealing on the loop keeps the writer
        thread's share of the interpreter lock to a few calls per batch.
        """
        self._flush_soon = False
        if self._writing or not self._waiting or self._closed:
            return
        batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
        data, head, sealed = self._seal(batch)
        if not sealed:  # every record failed to encode: nothing to write
            self._flush_later()
            return
        self._writing = sealed
        self._queue.put((data, head, sealed))

    def _seal(self, batch: list[_Pending]) -> tuple[bytes, Head, list[_Pending]]:
        """Chain and sign a batch; a record that cannot be encoded fails its own request only."""
        seq, prev = self._seq, self._hash
        entries: list[tuple[_Pending, dict[str, Any], bytes]] = []
        wall, stamp = -1.0, ""
        for item in batch:
            if item.wall != wall:  # a batch request's records share one time: format it once
                wall, stamp = item.wall, datetime.fromtimestamp(item.wall, UTC).isoformat()
            # The chain's own fields last, so no caller field can replace them.
            record = {**item.fields, "time": stamp, "seq": seq + 1, "prev_hash": prev}
            if item.done.done():
                record["late"] = True  # its request had ended (refused, abandoned) before this was sealed
                item.sealed_late = True
            try:
                line = canonical(record)
                if self._sign_every:
                    record["sig"] = self._signer.signature(line)
                    line = canonical(record)
            except Exception as exc:
                self.errors += 1
                log.error("audit record for %s could not be encoded: %s", record.get("action"), exc)
                if not item.done.done():
                    item.done.set_exception(AuditError("the audit record could not be encoded"))
                continue
            seq += 1
            prev = hashlib.sha256(line).hexdigest()  # = record_hash(record): the line is canonical
            entries.append((item, record, line))
        if entries and not self._sign_every:
            # One signature for the batch, on its last record: through prev_hash it covers the rest.
            item, record, line = entries[-1]
            record["sig"] = self._signer.signature(line)
            line = canonical(record)
            prev = hashlib.sha256(line).hexdigest()
            entries[-1] = (item, record, line)
        data = b"".join(line + b"\n" for _, _, line in entries)
        return data, Head(seq, prev), [item for item, _, _ in entries]

    def _refuse_overdue(self) -> None:
        # One timer for all waiting requests instead of one per request. A refused record is still
        # written when the disk comes back (see _finish).
        self._watchdog = None
        assert self._loop is not None
        now = self._loop.time()
        for item in [*self._writing, *self._waiting]:  # oldest first
            if item.deadline > now:
                self._watchdog = self._loop.call_at(item.deadline, self._refuse_overdue)
                break
            if not item.done.done():
                if self.healthy:
                    log.error("the audit write to %s has not finished after %gs (stuck disk?): refusing "
                              "requests until it does", self.path, self._write_timeout)
                self.healthy = False
                item.done.set_exception(
                    AuditError(f"the audit record was not written within {self._write_timeout:g}s"))

    def _fail_waiting(self, error: AuditError) -> None:
        for item in [*self._writing, *self._waiting]:
            if not item.done.done():
                item.done.set_exception(error)
        self._writing, self._waiting = [], []

    def _finish(self, batch: list[_Pending], head: Head | None, seconds: float, error: str | None) -> None:
        """The writer's report on one batch, run on the event loop."""
        self._writing = []
        if self._closed:
            return
        if head is None:
            self.healthy = False
            self.errors += len(batch)
            log.error("audit write failed for %d record(s): %s", len(batch), error)
            failure = AuditError("the audit record could not be written, so the request was refused")
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(failure)
        else:
            self._seq, self._hash = head.seq, head.hash
            self.healthy = True
            self.records_written += len(batch)
            first = head.seq - len(batch) + 1
            # Sealed in time but durable too late: their requests had already been refused (or
            # abandoned), so those records' outcomes are not what the clients were told.
            ended = [first + i for i, item in enumerate(batch)
                     if item.done.done() and not item.sealed_late and item.fields.get("action") != "audit.late"]
            for item in batch:
                if item.last and not item.done.done():
                    item.done.set_result(None)
            if ended:
                event = self._enqueue({"action": "audit.late", "client": "system", "decision": "allow",
                                       "outcome": "ok", "records": ended})
                event.done.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits on it
            if self._head_task is None or self._head_task.done():
                assert self._loop is not None
                self._head_task = self._loop.create_task(self._store_head_soon())
            if self.on_batch:
                try:
                    self.on_batch(len(batch), seconds)
                except Exception:  # metrics must never cost a request its answer
                    log.exception("audit batch metrics failed")
        self._flush_later()

    async def _store_head_soon(self) -> None:
        # At most every head_interval, and until the stored head has caught up with the log: a
        # batch that lands while a store is running is stored by the next round.
        assert self._loop is not None
        while self.head != self._head_stored and not self._closed:
            await asyncio.sleep(max(0.0, self._head_interval - (self._loop.time() - self._head_stored_at)))
            if not await self._store_head():
                await asyncio.sleep(max(self._head_interval, 1.0))

    async def _store_head(self) -> bool:
        head = self.head
        if head == self._head_stored:
            return True
        try:
            await self._head_store(head)
        except Exception as exc:  # the records are durable; only the truncation check lags
            log.error("could not store the audit chain head: %s", exc)
            return False
        assert self._loop is not None
        self._head_stored, self._head_stored_at = head, self._loop.time()
        return True

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            data, head, batch = job
            started = time.monotonic()
            error: str | None = None
            try:
                self._write(data)
            except Exception as exc:  # any failure fails the batch closed; the next batch retries
                error = f"{self.path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
            else:
                if self._durable_size >= self._max_file_bytes:
                    try:
                        self._rotate()
                    except Exception as exc:  # the batch is durable; rotation is retried after the next one
                        log.error("audit log rotation failed (will retry): %s", exc)
                    else:
                        assert self._loop is not None
                        with contextlib.suppress(RuntimeError):
                            self._loop.call_soon_threadsafe(self._start_pruning)
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is gone: the daemon is exiting
                self._loop.call_soon_threadsafe(
                    self._finish, batch, None if error else head, time.monotonic() - started, error)
        self._close_file()

    def _write(self, data: bytes) -> None:
        fd = self._file()
        start = self._durable_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)  # O_DSYNC: durable when it returns, one call per batch
                view = view[written:]
        except OSError:
            # Whole records of this batch may be in the file (a short write, a failed sync), and the
            # chain goes on from the last durable record: cut the file back to where it stood.
            self._cut_back(fd, start)
            raise
        self._durable_size += len(data)
        if self._mirror:
            # In this thread, not on the event loop: a reader that stops reading makes the audit
            # time out (and fail closed) instead of freezing the daemon. The batch is durable
            # either way, so a failing mirror is logged, never turned into a failed batch.
            try:
                for line in data.decode("utf-8").splitlines():
                    self._mirror(line)
            except Exception as exc:
                if not self._mirror_failing:
                    log.error("the audit mirror failed (records are still written to %s): %s", self.path, exc)
                self._mirror_failing = True
            else:
                self._mirror_failing = False

    def _cut_back(self, fd: int, size: int) -> None:
        assert self._fd_id is not None
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            self._cut_to = (self._fd_id, size)  # done on reopen, before anything else is written
        self._close_file()

    def _file(self) -> int:
        """The open log file, reopened when the path no longer names it (moved, replaced, removed)."""
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if self._fd is not None and current == self._fd_id:
            return self._fd
        self._close_file()
        # O_NONBLOCK only for the open: a FIFO in the log's place must not hang the writer.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_DSYNC | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(self.path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                # A device such as /dev/null would swallow records and report success.
                raise OSError("not a regular file; the audit log must be one")
            os.set_blocking(fd, True)
            identity = (st.st_dev, st.st_ino)
            if self._cut_to is not None and self._cut_to[0] == identity:
                size = min(self._cut_to[1], st.st_size)  # a failed write's records, cut back
            else:
                size = files.complete_size(self.path)  # a record torn by a crash was never acknowledged
            if size != st.st_size:
                os.ftruncate(fd, size)
                os.fsync(fd)
            self._cut_to = None
            if current is None:
                files.fsync_dir(self.path.parent)  # the new file's name must survive a crash too
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._fd_id, self._durable_size = fd, identity, size
        return fd

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._fd_id = None

    def _rotate(self) -> None:
        self._close_file()
        rotated = [p for p in log_files(self.path) if p != self.path]
        number = 1 + max((int(p.name.rsplit(".", 1)[1]) for p in rotated), default=0)
        os.replace(self.path, self.path.with_name(f"{self.path.name}.{number:06d}"))
        files.fsync_dir(self.path.parent)
        self._durable_size = 0
