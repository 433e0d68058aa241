"""Backups from settings: which store, which key providers, where the file goes, the restore's audit record.

The snapshot, the format and the checks are ``secretsd.backup``; this module only assembles them the
way ``init`` and ``token create-root`` do (``build_storage``, ``provider_set``, the audit chain
helpers of ``secretsd.runtime.recovery``), so no unseal or chain logic is written twice.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from keyproviders import KeyProvider
from secretsd import __version__
from secretsd.backup.create import write_backup
from secretsd.backup.errors import BackupKeyError
from secretsd.backup.format import Manifest
from secretsd.backup.restore import Imported, Verified, import_backup, verify_backup
from secretsd.clock import Clock, utcnow
from secretsd.custody.barrier import Barrier
from secretsd.errors import AlreadyInitializedError, NotInitializedError
from secretsd.runtime.config import Settings
from secretsd.runtime.daemon import build_storage, private_data_dir, provider_set
from secretsd.runtime.recovery import _claim_unconfigured, _open_audit, _os_user, audit_chain_for
from secretsd.storage import Storage
from secretsd.storage.rows import TABLES

ACTION_RESTORE = "backup.restore"
RESTORE_CLIENT = "backup-restore"
#: How many of the source's chain heads the restore's record lists (each is one short line).
MAX_HEADS_RECORDED = 64


def source_of(settings: Settings) -> str:
    return str(settings.storage.backend)


async def create_backup(settings: Settings, out: Path, *, clock: Clock = utcnow) -> Manifest:
    """Write a backup of the configured store to ``out`` (which must not exist), via a temporary file
    beside it: a failure leaves no file under that name, a success a complete, synced one."""
    if out.exists():
        raise AlreadyInitializedError(f"{out} exists; refusing to overwrite it (choose another --out)")
    data_dir = settings.require_data_dir()
    if not data_dir.is_dir():
        raise NotInitializedError(f"the store in {data_dir} is not initialised (no such directory)")
    storage = build_storage(settings)
    await storage.open()
    try:
        group = provider_set(settings)
        try:
            providers = await group.ready_any()
            partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as fh:
                    manifest = await write_backup(storage, providers, fh, source=source_of(settings), now=clock(),
                                                  secretsd_version=__version__)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(partial, out)  # never replaces a file that appeared meanwhile
            finally:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
            _sync_dir(out.parent)
            return manifest
        finally:
            group.close()
    finally:
        await storage.close()


class _Pending:
    """The file-like end ``write_backup`` writes to when the bytes go out over HTTP: it holds what was
    written since the last flush (one batch of rows, compressed), never the whole file."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


async def stream_backup(storage: Storage, providers: Sequence[KeyProvider], send: Callable[[bytes], Awaitable[None]],
                        *, source: str, clock: Clock = utcnow) -> Manifest:
    """Online ``backup create`` (``GET /v1/sys/backup``): the same snapshot and file as the offline
    command, sent a batch at a time. A client that gets less than the whole file holds no manifest
    (it is the last line), so ``backup verify`` refuses it."""
    pending = _Pending()

    async def flush() -> None:
        data = pending.take()
        if data:
            await send(data)

    return await write_backup(storage, providers, pending, source=source, now=clock(),
                              secretsd_version=__version__, flush=flush)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def verify_backup_file(settings: Settings, path: Path) -> Verified:
    """``backup verify``: every check, with the configured providers; no store is opened, nothing written."""
    group = provider_set(settings)
    try:
        return await verify_backup(path, await group.ready_any())
    finally:
        group.close()


@dataclass(frozen=True)
class Restored:
    verified: Verified
    imported: Imported
    audit_chain: str | None
    audit_file: Path | None


async def _require_empty(storage: Storage, where: str) -> None:
    for table in TABLES:
        if await storage.count_rows(table):
            raise AlreadyInitializedError(f"the store {where} is not empty (table {table} has rows); a backup is "
                                          "restored only into an empty store; nothing was changed")


def _require_no_audit_log(settings: Settings) -> None:
    """A restore starts a new audit chain: an old store's log in the data directory would be continued."""
    if not settings.audit.enabled:
        return
    log_path = settings.audit.log_path(settings.require_data_dir())
    if log_path.exists() and log_path.stat().st_size:
        raise AlreadyInitializedError(f"{log_path} holds another store's audit chain; a restore starts a new "
                                      "one: move the old log away first; nothing was changed")


async def restore_backup(settings: Settings, path: Path, *, clock: Clock = utcnow) -> Restored:
    """``backup restore``: into the configured, empty store; every check first, nothing written on failure.

    After the import the keyring is unsealed from the restored store (the proof a daemon will serve
    it) and the first record of a new audit chain names the backup's manifest digest.
    """
    data_dir = settings.require_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_data_dir(data_dir)
    storage = build_storage(settings)
    await storage.open()
    try:
        await _require_empty(storage, str(getattr(storage, "description", None) or data_dir))
        _require_no_audit_log(settings)
        group = provider_set(settings)
        try:
            verified = await verify_backup(path, await group.ready_any())
            if len(verified.unwrapped) != verified.terms:
                missing = verified.terms - len(verified.unwrapped)
                raise BackupKeyError(
                    f"the configured key providers unwrap {len(verified.unwrapped)} of the backup's {verified.terms} "
                    f"keyring terms ({missing} not): a daemon could not unseal the restored store; nothing was changed")
            imported = await import_backup(verified, storage)
        finally:
            group.close()
        chain, audit_file = await _audit_restore(settings, storage, verified, imported, clock)
        return Restored(verified, imported, chain, audit_file)
    finally:
        await storage.close()


async def _audit_restore(settings: Settings, storage: Storage, verified: Verified, imported: Imported,
                         clock: Clock) -> tuple[str | None, Path | None]:
    barrier = Barrier(storage, provider_set(settings), max_encryptions_per_term=settings.max_encryptions_per_term,
                      clock=clock)
    try:
        await barrier.unseal()  # every term of the restored store opens: the daemon will serve it
        if not settings.audit.enabled:
            return None, None
        conf, claim = settings.audit, None
        if not settings.audit.chain_configured:
            conf, claim = await _claim_unconfigured(settings, storage)
        else:
            conf = audit_chain_for(settings)
        audit = await _open_audit(settings, conf, storage, barrier, claim)
        try:
            manifest = verified.manifest
            heads = sorted(imported.previous_heads.items())[:MAX_HEADS_RECORDED]
            await audit.append({
                "action": ACTION_RESTORE, "client": RESTORE_CLIENT, "decision": "allow", "outcome": "ok",
                "manifest_sha256": manifest.sha256, "backup_id": manifest.backup_id,
                "backup_created_at": manifest.created_at, "backup_source": manifest.source,
                "rows": imported.rows, "previous_chain_heads": dict(heads),
                "host": platform.node(), "os_user": _os_user(),
            })
        finally:
            await audit.close()
        return conf.chain, conf.log_path(settings.require_data_dir())
    finally:
        barrier.close()
