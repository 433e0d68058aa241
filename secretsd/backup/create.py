"""``backup create``: one snapshot of the store, written out as it is read.

Everything the store holds travels as stored (ciphertext, wrapped keyring terms, token hashes,
metadata with the audit signing key sealed and the audit chain heads, rotation state): no value is
decrypted, no key leaves the keyring. The one key used is the manifest's (``keys.manifest_key``),
derived from the newest term, which the providers must unwrap before a byte is written.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from keyproviders import KeyProvider
from secretsd.backup.format import SECTIONS, BackupWriter, Manifest, Sink
from secretsd.backup.keys import manifest_key, term_from_row
from secretsd.errors import NotInitializedError
from secretsd.storage import Storage

BATCH_ROWS = 500


async def write_backup(storage: Storage, providers: Sequence[KeyProvider], out: Sink, *, source: str,
                       now: datetime, secretsd_version: str,
                       flush: Callable[[], Awaitable[None]] | None = None) -> Manifest:
    """Write a backup of ``storage`` (open) to ``out``; the manifest is the file's last line.

    ``flush`` is awaited after each batch and at the end (an HTTP response sends what ``out`` holds).
    """
    async with storage.snapshot() as snap:
        terms = [row async for batch in snap.export_rows("keyring_terms") for row in batch]
        if not terms:
            raise NotInitializedError("the store is not initialised (it has no keyring); nothing to back up")
        newest = term_from_row(terms[-1])
        key = await manifest_key(providers, newest)  # before writing: no key, no file
        writer = BackupWriter(out, backup_id=secrets.token_hex(16), created_at=now.isoformat(), source=source)
        for table in SECTIONS:
            writer.section(table)
            if table == "keyring_terms":
                writer.rows(terms)
                continue
            async for batch in snap.export_rows(table, batch_size=BATCH_ROWS):
                writer.rows(batch)
                if flush is not None:
                    await flush()
        manifest = writer.finish(key=key, mac_term=newest.term, secretsd_version=secretsd_version)
    if flush is not None:
        await flush()
    return manifest
