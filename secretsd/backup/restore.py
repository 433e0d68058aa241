"""``backup verify`` and ``backup restore``: every check before anything is written, then the import.

Verification reads the whole file once: its structure (``format.BackupReader``), then the manifest's
authenticity under the keyring the backup itself carries (its terms are unwrapped by the configured
providers, which is also the proof that they can open the restored store), then every section
against the manifest. Only a file that passes all of it is imported: read a second time, into an
empty store, in one transaction; should the file change between the two reads, the second read's
checks fail inside the transaction and nothing is kept. Then the store is read back and compared
table by table.

The audit chain heads and owners of the source (``audit_head:*``, ``audit_owner:*`` in meta) stay in
the backup but are not imported: the source's log files are not part of it, and the restored store
starts a new chain whose first record names the manifest (``secretsd.runtime.backup``).

The import's transaction also writes the meta row ``restored_from`` with ``audited: false``; a daemon
refuses to serve such a store (``require_restore_audited``) until the restore's audit record is
written and the row says ``audited: true``. So a restore whose record cannot be written (or that is
killed between the two) leaves a store that is never served without that record.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from keyproviders import KeyProvider
from secretsd.audit.chains import HEAD_META, OWNER_META
from secretsd.backup.errors import BackupCorruptError, BackupError, BackupKeyError
from secretsd.backup.format import SECTIONS, BackupReader, Manifest, ReadResult, check_authentic
from secretsd.backup.keys import manifest_key, term_from_row
from secretsd.custody.keyring import unwrap_term
from secretsd.errors import CryptoError, KeyProviderFailure, NotInitializedError, ProviderUnavailable
from secretsd.records import KeyringTerm
from secretsd.storage import Storage
from secretsd.storage.rows import TableDigest


@dataclass(frozen=True)
class Verified:
    """A backup that passed every check, with what the checks found."""

    path: Path
    manifest: Manifest
    mac: str
    terms: int
    unwrapped: tuple[int, ...]  # the terms the configured providers unwrap

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.path), "ok": True, "backup_id": self.manifest.backup_id,
                "created_at": self.manifest.created_at, "source": self.manifest.source,
                "manifest_sha256": self.manifest.sha256, "terms": self.terms, "terms_unwrapped": len(self.unwrapped),
                "sections": [s.to_dict() for s in self.manifest.sections]}


def _terms(result: ReadResult) -> list[KeyringTerm]:
    try:
        return [term_from_row(row) for row in result.keyring]
    except ValueError as exc:
        raise BackupCorruptError(f"the backup's keyring section is malformed ({exc})") from exc


async def _key(providers: Sequence[KeyProvider], term: KeyringTerm) -> bytes:
    try:
        return await manifest_key(providers, term)
    except ProviderUnavailable:
        raise  # retryable: the provider is down, not the wrong one
    except (KeyProviderFailure, CryptoError) as exc:
        raise BackupKeyError(f"no configured key provider unwraps the backup's keyring term {term.term}: "
                             f"{exc.message}") from exc


async def _unwrapped(providers: Sequence[KeyProvider], terms: Sequence[KeyringTerm]) -> tuple[int, ...]:
    opened = []
    for term in terms:
        try:
            await unwrap_term(providers, term)
        except (KeyProviderFailure, CryptoError):
            continue
        opened.append(term.term)
    return tuple(opened)


async def verify_backup(path: Path, providers: Sequence[KeyProvider]) -> Verified:
    """Every check of a backup file, writing nothing: structure, authenticity, integrity, keys."""
    with path.open("rb") as fh:
        result = BackupReader(fh).read_all()
    terms = _terms(result)
    mac_term = next((t for t in terms if t.term == result.manifest.mac_term), None)
    if mac_term is None:
        raise BackupCorruptError(f"the backup's manifest names keyring term {result.manifest.mac_term}, "
                                 "which the backup does not hold")
    check_authentic(await _key(providers, mac_term), result.manifest, result.mac)
    result.check_integrity()
    return Verified(path, result.manifest, result.mac, len(terms), await _unwrapped(providers, terms))


#: The meta row a restore writes in its import transaction: which backup, and whether its audit
#: record is written (a daemon serves the store only then).
RESTORED_META = "restored_from"


def _carried(key: str) -> bool:
    """Whether a meta row of the backup is imported: not the source's audit chain heads and owners,
    nor the source's own ``restored_from`` (this restore writes its own)."""
    return not key.startswith((HEAD_META, OWNER_META)) and key != RESTORED_META


def restored_marker(manifest: Manifest, *, audited: bool) -> str:
    return json.dumps({"manifest_sha256": manifest.sha256, "backup_id": manifest.backup_id,
                       "backup_created_at": manifest.created_at, "audited": audited}, sort_keys=True)


async def require_restore_audited(storage: Storage) -> None:
    """The rule "a restored store is served only after its restore is audited": a store whose
    ``restored_from`` row says the restore's audit record was not written is refused."""
    raw = await storage.get_meta(RESTORED_META)
    if raw is None:
        return
    try:
        audited = json.loads(raw).get("audited") is True
    except (ValueError, AttributeError):
        audited = False
    if not audited:
        raise NotInitializedError(
            "this store was restored from a backup but the restore's audit record was never written; it is "
            "not served: run the same 'secretsd backup restore' again (it writes the record), or empty the store")


@dataclass
class Imported:
    rows: int = 0
    previous_heads: dict[str, str] = field(default_factory=dict)  # the source's audit chain heads


@dataclass(frozen=True)
class RestoredTokens:
    """The tokens a restore makes valid again: every one active in the backup, including any revoked
    since it was taken (the store cannot know those)."""

    active: tuple[str, ...]
    root: int  # of them, holding the root policy
    revoked: int = 0  # revoked by this restore (--revoke-tokens)


async def restored_tokens(storage: Storage, now: datetime, *, root_policy: str) -> RestoredTokens:
    """``root_policy``: the policy that makes a token root (the domain's rule, passed down: the backup
    layer sits below the domain)."""
    active = [t for t in await storage.list_tokens() if t.is_active(now)]
    return RestoredTokens(tuple(t.token_id for t in active), sum(root_policy in t.policies for t in active))


async def revoke_restored_tokens(storage: Storage, tokens: RestoredTokens, now: datetime) -> RestoredTokens:
    """``--revoke-tokens``: revoke every token the restore brought back (a new root comes from
    ``secretsd token create-root``); done before the store may be served."""
    revoked = 0
    for token_id in tokens.active:
        revoked += await storage.revoke_token(token_id, now)
    return RestoredTokens(tokens.active, tokens.root, revoked)


async def import_backup(verified: Verified, storage: Storage, *, batch_size: int = 500) -> Imported:
    """Load a verified backup into the empty ``storage`` (one transaction, with the ``restored_from``
    row saying it is not yet audited), then read it back."""
    imported = Imported()
    meta = TableDigest("meta")

    async def batches() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
        with verified.path.open("rb") as fh:
            reader = BackupReader(fh, batch_size=batch_size)
            for table, batch in reader.batches():
                if table == "meta":
                    for row in batch:
                        if not _carried(row["key"]) and row["key"].startswith(HEAD_META):
                            imported.previous_heads[row["key"][len(HEAD_META):]] = str(row.get("value"))
                    batch = [row for row in batch if _carried(row["key"])]
                    meta.add(batch)
                imported.rows += len(batch)
                yield table, batch
            again = reader.result
            assert again is not None
            # The file as read now must be the file verified: raising here rolls the import back.
            if (again.manifest, again.mac) != (verified.manifest, verified.mac):
                raise BackupCorruptError("the backup file changed after it was verified; nothing was restored")
            again.check_integrity()
        yield "meta", [{"key": RESTORED_META, "value": restored_marker(verified.manifest, audited=False)}]

    await storage.import_rows(batches())
    for table in SECTIONS:
        found = TableDigest(table)
        async for batch in storage.export_rows(table, batch_size=batch_size):
            found.add([row for row in batch if table != "meta" or row["key"] != RESTORED_META])
        declared = verified.manifest.section(table)
        want = (meta.rows, meta.sha256) if table == "meta" else (declared.rows, declared.sha256)
        if (found.rows, found.sha256) != want:
            raise BackupError(f"the restored table {table} differs from the backup ({found.rows} rows, "
                              f"expected {want[0]}); do not serve this store")
    return imported

