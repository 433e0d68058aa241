"""SQLite's one writer, with group commit: the writes that queue up while a commit syncs go
together into the next transaction, and one sync makes them all durable.

SQLite allows one writer per database, and with ``synchronous=FULL`` every COMMIT waits for the
disk. Committing each write alone makes the disk's sync time the ceiling on writes per second;
committing the queue at once divides that cost by the batch size, without weakening durability: no
write's caller hears back before the COMMIT that holds it has returned.

Each write runs inside its own SAVEPOINT, so one that fails (a check-and-set conflict, a rule the
engine refuses) is rolled back alone and the others of its batch still commit: a write's outcome
is the same as if it had run in a transaction of its own, in queue order. An error that ends the
whole transaction (a full disk, an I/O error) fails every write of the batch: none was answered,
none is stored.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

#: The most writes one transaction takes: bounds how long a batch holds SQLite's write lock.
MAX_BATCH = 128

_Write = Callable[[sqlite3.Connection], Any]


class _TransactionLost(Exception):
    """A write's error took the whole transaction with it (SQLite rolled it back itself)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class GroupCommitWriter:
    """Runs writes on one connection in one thread, batching those that wait into one transaction."""

    def __init__(self, conn: sqlite3.Connection, executor: Executor, *, max_batch: int = MAX_BATCH) -> None:
        self.conn = conn
        self._executor = executor
        self._max_batch = max_batch
        self._queue: list[tuple[_Write, asyncio.Future[Any]]] = []
        self._busy = False
        self._closed = False
        #: Transactions committed and writes they held (``bench/`` and the tests read them).
        self.transactions = 0
        self.writes = 0

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a write transaction; return once that transaction has committed."""
        if self._closed:
            raise sqlite3.ProgrammingError("the writer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, future))
        if not self._busy:
            self._start(loop)
        return await future

    def close(self) -> None:
        """Refuse new writes and fail the queued ones (the batch in flight still finishes)."""
        self._closed = True
        queued, self._queue = self._queue, []
        for _, future in queued:
            if not future.done():
                future.set_exception(sqlite3.ProgrammingError("the store was closed before the write ran"))

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch:]
        self._busy = True
        fns = [fn for fn, _ in batch]
        done = loop.run_in_executor(self._executor, self._commit, fns)
        done.add_done_callback(lambda f: self._finish(loop, batch, f))

    def _finish(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[_Write, asyncio.Future[Any]]],
        done: asyncio.Future[list[tuple[bool, Any]]],
    ) -> None:
        self._busy = False
        error: BaseException | None = (
            sqlite3.OperationalError("the write was cancelled with its executor") if done.cancelled()
            else done.exception())
        outcomes = done.result() if error is None else [(False, error)] * len(batch)
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled; the write stands or falls with its batch
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        if self._queue and not self._closed:
            self._start(loop)

    def _commit(self, fns: list[_Write]) -> list[tuple[bool, Any]]:
        """On the writer thread: one transaction, a savepoint per write, one COMMIT."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[tuple[bool, Any]] = []
        try:
            for fn in fns:
                outcomes.append(self._one(conn, fn))
            conn.execute("COMMIT")
        except _TransactionLost as lost:
            # The writes before it were undone with it: none of them is stored, so all fail.
            return [(False, lost.cause)] * len(fns)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.transactions += 1
        self.writes += len(fns)
        return outcomes

    @staticmethod
    def _one(conn: sqlite3.Connection, fn: _Write) -> tuple[bool, Any]:
        conn.execute("SAVEPOINT write")
        try:
            result = fn(conn)
        except Exception as exc:
            if not conn.in_transaction:
                raise _TransactionLost(exc) from exc
            conn.execute("ROLLBACK TO write")
            conn.execute("RELEASE write")
            return False, exc
        conn.execute("RELEASE write")
        return True, result
