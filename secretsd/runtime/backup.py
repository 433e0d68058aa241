"""Backups from settings: which store, which key providers, where the file goes, the restore's audit record.

The snapshot, the format and the checks are ``secretsd.backup``; this module only assembles them the
way ``init`` and ``token create-root`` do (``build_storage``, ``provider_set``, the audit chain
helpers of ``secretsd.runtime.recovery``), so no unseal or chain logic is written twice.
"""

from __future__ import annotations

import contextlib
import json
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
from secretsd.backup.restore import (
    RESTORED_META,
    Imported,
    RestoredTokens,
    Verified,
    import_backup,
    restored_marker,
    restored_tokens,
    revoke_restored_tokens,
    verify_backup,
)
from secretsd.clock import Clock, utcnow
from secretsd.custody.barrier import Barrier
from secretsd.domain.policy import ROOT_POLICY
from secretsd.errors import AlreadyInitializedError, ConfigError, NotInitializedError
from secretsd.runtime.config import Settings
from secretsd.runtime.daemon import build_storage, private_data_dir, provider_set
from secretsd.runtime.recovery import (
    _claim_unconfigured,
    _open_audit,
    _os_user,
    audit_chain_for,
    recovery_provider_from_shares,
    restore_public_file,
    shares_settings,
    with_shares,
)
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
    tokens: RestoredTokens
    resumed: bool = False  # an earlier restore of this backup had imported it but not written its record


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


def _require_audit_writable(settings: Settings) -> None:
    """Checked before the target is touched: the restore's record goes to the log's directory, so its
    nearest existing ancestor must be a directory we may write (the record itself is made durable
    before the store may be served: ``require_restore_audited``)."""
    if not settings.audit.enabled:
        return
    log_path = settings.audit.log_path(settings.require_data_dir())
    directory = log_path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"the audit log {log_path} cannot be written ({directory} is not a directory this user "
                          "may write); a restore must write its audit record; nothing was changed")


def _store_file_exists(settings: Settings) -> bool:
    """Whether the target is a store file that exists already (SQLite); a server's database is only
    opened once the file has passed every check."""
    path = getattr(build_storage(settings), "path", None)
    return isinstance(path, Path) and path.exists()


async def _with_storage(settings: Settings, check: Callable[[Storage], Awaitable[None]]) -> None:
    storage = build_storage(settings)
    await storage.open()
    try:
        await check(storage)
    finally:
        await storage.close()


async def _require_empty_or_pending(storage: Storage) -> None:
    """Empty, or holding an unaudited restore (which the restore resumes only for the same backup)."""
    raw = await storage.get_meta(RESTORED_META)
    try:
        pending = raw is not None and json.loads(raw).get("audited") is False
    except (ValueError, AttributeError):
        pending = False
    if not pending:
        await _require_empty(storage, str(getattr(storage, "description", None) or "at the target"))


async def _pending_restore(storage: Storage, verified: Verified) -> bool:
    """Whether the store holds this very backup, imported by a restore whose record was not written."""
    raw = await storage.get_meta(RESTORED_META)
    return raw is not None and raw == restored_marker(verified.manifest, audited=False)


async def restore_backup(settings: Settings, path: Path, *, revoke_tokens: bool = False,
                         clock: Clock = utcnow, recovery_shares: Sequence[str] | None = None) -> Restored:
    """``backup restore``: every check of the file first, then into the configured, empty store.

    Nothing creates the target (no directory, database file or schema) until the file has passed
    every check and the audit log is known to be writable; a store file that exists already is
    opened first only to refuse it as not empty. The import writes ``restored_from``
    (not audited) in its transaction; then the keyring is unsealed from the restored store (the
    proof a daemon will serve it), ``--revoke-tokens`` revokes every restored token, the first
    record of a new audit chain names the backup's manifest digest, and only then is the store
    marked audited, which a daemon requires before serving it. Run again after a failure there, the
    same restore finds its own unaudited import and writes the record.

    ``recovery_shares`` (K of them) unwrap when the configured providers cannot (the HSM was lost
    with the data directory: docs/recovery.md); the restored store gets its ``recovery-shares.pub`` back.
    """
    configured, decorate, recovery = settings, None, None
    if recovery_shares is not None:
        recovery = recovery_provider_from_shares(list(recovery_shares))  # fewer than K: refused here
        settings = shares_settings(settings, recovery)

        def decorate(provider: KeyProvider) -> KeyProvider:
            # Each provider set closes (forgets the key of) what it built: each gets a key of its own.
            return with_shares(settings, recovery_provider_from_shares(list(recovery_shares)))(provider)
    data_dir = settings.require_data_dir()
    if _store_file_exists(settings):
        # An existing store is refused as not empty before the file is read (opening it creates nothing).
        await _with_storage(settings, _require_empty_or_pending)
    group = provider_set(settings, decorate=decorate)
    try:
        verified = await verify_backup(path, await group.ready_any())
    finally:
        group.close()
    if len(verified.unwrapped) != verified.terms:
        missing = verified.terms - len(verified.unwrapped)
        raise BackupKeyError(
            f"the configured key providers unwrap {len(verified.unwrapped)} of the backup's {verified.terms} "
            f"keyring terms ({missing} not): a daemon could not unseal the restored store; nothing was changed")
    _require_audit_writable(settings)
    # Every check on the file holds: only now is the target created and opened.
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_data_dir(data_dir)
    storage = build_storage(settings)
    await storage.open()
    try:
        where = str(getattr(storage, "description", None) or data_dir)
        resumed = await _pending_restore(storage, verified)
        if resumed:
            imported = Imported(rows=verified.manifest.total_rows)
        else:
            await _require_empty(storage, where)
            _require_no_audit_log(settings)
            imported = await import_backup(verified, storage)
        tokens = await restored_tokens(storage, clock(), root_policy=ROOT_POLICY)
        if revoke_tokens:
            tokens = await revoke_restored_tokens(storage, tokens, clock())
        chain, audit_file = await _audit_restore(settings, storage, verified, imported, tokens, clock, decorate)
        # The record is durable: from now on a daemon serves the store.
        await storage.put_meta(RESTORED_META, restored_marker(verified.manifest, audited=True))
        if recovery is not None:
            restore_public_file(configured, recovery)  # the shares opened this store's keyring: its key
        return Restored(verified, imported, chain, audit_file, tokens, resumed)
    finally:
        await storage.close()


async def _audit_restore(settings: Settings, storage: Storage, verified: Verified, imported: Imported,
                         tokens: RestoredTokens, clock: Clock,
                         decorate: Callable[[KeyProvider], KeyProvider] | None = None
                         ) -> tuple[str | None, Path | None]:
    barrier = Barrier(storage, provider_set(settings, decorate=decorate),
                      max_encryptions_per_term=settings.max_encryptions_per_term, clock=clock)
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
                "tokens_restored": len(tokens.active), "root_tokens_restored": tokens.root,
                "tokens_revoked": tokens.revoked,
                "host": platform.node(), "os_user": _os_user(),
            })
        finally:
            await audit.close()
        return conf.chain, conf.log_path(settings.require_data_dir())
    finally:
        barrier.close()
