"""Copy a whole store to another backend (``secretsd storage migrate``), offline, and verify the copy.

Rows travel as stored: ciphertext, nonces, wrapped keyring terms and token hashes are never
decrypted or re-encrypted, so no key provider is needed. The target is loaded in one transaction
(all or nothing) and must be empty. Then both stores are read back table by table and compared:
row counts and a SHA-256 over each table's canonical rows (``secretsd.storage.rows``), in key order.

Offline means no daemon serves the source: every daemon holds (or keeps trying to take) the
``scheduler`` leader lock, so the copy takes that lock on the source and refuses if it cannot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from secretsd.errors import NotInitializedError, StorageError
from secretsd.storage import Storage
from secretsd.storage.base import SCHEDULER_LOCK, ExportRow
from secretsd.storage.rows import TABLES, TableDigest

#: progress(done_rows, total_rows, phase) with phase "copy" or "verify"
Progress = Callable[[int, int, str], None]


class StoreInUseError(StorageError):
    """A daemon is serving the store: a copy would miss its later writes."""


@dataclass
class TableReport:
    table: str
    source_rows: int
    target_rows: int
    source_sha256: str
    target_sha256: str

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows and self.source_sha256 == self.target_sha256


@dataclass
class MigrationReport:
    source: str
    target: str
    tables: list[TableReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)

    @property
    def rows(self) -> int:
        return sum(t.source_rows for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "ok": self.ok, "rows": self.rows,
            "tables": [{"table": t.table, "source_rows": t.source_rows, "target_rows": t.target_rows,
                        "source_sha256": t.source_sha256, "target_sha256": t.target_sha256, "ok": t.ok}
                       for t in self.tables],
        }


def describe(storage: Storage) -> str:
    return str(getattr(storage, "description", None) or getattr(storage, "path", None) or storage)


async def _digest(storage: Storage, table: str, tick: Callable[[int], None]) -> TableDigest:
    digest = TableDigest(table)
    async for batch in storage.export_rows(table):
        digest.add(batch)
        tick(len(batch))
    return digest


async def copy_store(
    source: Storage, target: Storage, *, progress: Progress | None = None, batch_size: int = 500
) -> MigrationReport:
    """Copy ``source`` into the empty ``target`` (both open), then verify; see the module docstring."""
    if not await source.is_initialized():
        raise NotInitializedError(f"the source store {describe(source)} is not initialised; nothing to copy")
    lock = source.leader_lock(SCHEDULER_LOCK)
    if not await lock.try_acquire():
        raise StoreInUseError(
            f"a daemon is serving the source store {describe(source)} (it holds the {SCHEDULER_LOCK} lock); "
            "stop every daemon that uses it, then run the migration again"
        )
    try:
        counts = {table: await source.count_rows(table) for table in TABLES}
        total = sum(counts.values())
        done = 0

        def tick(phase: str, scale: int) -> Callable[[int], None]:
            def advance(n: int) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(done, total * scale, phase)
            return advance

        copied: dict[str, TableDigest] = {}
        advance = tick("copy", 1)

        async def batches() -> AsyncIterator[tuple[str, Sequence[ExportRow]]]:
            for table in TABLES:
                digest = copied[table] = TableDigest(table)
                async for batch in source.export_rows(table, batch_size=batch_size):
                    digest.add(batch)
                    yield table, batch
                    advance(len(batch))

        await target.import_rows(batches())
        # Verify: read the target back, and the source again (nothing may have changed meanwhile).
        done = 0
        advance = tick("verify", 2)
        report = MigrationReport(describe(source), describe(target))
        for table in TABLES:
            again = await _digest(source, table, advance)
            landed = await _digest(target, table, advance)
            first = copied[table]
            if (again.rows, again.sha256) != (first.rows, first.sha256):
                raise StorageError(f"table {table} of the source changed during the copy; is a daemon running?")
            report.tables.append(TableReport(table, first.rows, landed.rows, first.sha256, landed.sha256))
        return report
    finally:
        await lock.release()
