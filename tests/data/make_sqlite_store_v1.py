"""Writes tests/data/sqlite_store_v1.db: a SQLite store as secretsd wrote it before the storage engine.

It was run once with the code of commit 27b97fd (before ``secretsd/storage/engine.py`` and
``RotationStatus``): ``git archive 27b97fd | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python
tests/data/make_sqlite_store_v1.py OUT.db``. ``tests/test_storage_engine.py`` opens a copy with
today's code. Values are placeholders (no real key or secret): storage never sees plaintext.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from keyproviders import WrappedKey
from secretsd.storage.base import KeyringTerm, TokenRecord, VersionRecord, VersionState
from secretsd.storage.sqlite import SQLiteStorage

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WRAPPED = WrappedKey(provider="test", key_id="k1", mechanism="none", nonce=b"\0" * 12, ciphertext=b"w" * 48)
STATUS = {"last_result": "failed", "last_reason": "hook timed out", "last_attempt_at": "2026-01-03T00:00:00+00:00",
          "failures": 2, "trigger": "schedule"}
POLICY = {"enabled": True, "period_seconds": 86400, "grace_seconds": 3600, "generator": {"kind": "bytes", "length": 32}}


def version(path: str, n: int, ct: bytes) -> VersionRecord:
    return VersionRecord(path=path, version=n, created_at=T0 + timedelta(hours=n), created_by="svc",
                         state=VersionState.ACTIVE, term=1, nonce=bytes([n]) * 12, ciphertext=ct)


async def main(out: Path) -> None:
    s = SQLiteStorage(out)
    await s.open()
    admin = TokenRecord(token_id="00000000000000ad", secret_hash=b"a" * 32, client="admin", policies=("root",),
                        created_at=T0, created_by="init")
    await s.initialize({"format": "1"}, KeyringTerm(1, (WRAPPED,), T0), admin)
    await s.write_version(version("app/db", 1, b"one"), expected_current=0, metadata={"owner": "team-a"},
                          max_versions=10)
    await s.write_version(version("app/db", 2, b"two"), expected_current=1, metadata=None, max_versions=10)
    await s.write_version(version("app/db", 3, b"three"), expected_current=2, metadata=None, max_versions=10,
                          grace_until=T0 + timedelta(days=7))
    await s.set_rotation("app/db", POLICY, T0 + timedelta(days=1))
    await s.record_rotation("app/db", T0 + timedelta(days=2), STATUS)  # type: ignore[arg-type] # the old API took a dict
    await s.create_pending(version("app/db", 4, b"four"), expected_current=3)
    for n in (1, 2):
        await s.write_version(version("app/old", n, b"old"), expected_current=n - 1, metadata=None, max_versions=10)
    await s.set_version_state("app/old", [1], VersionState.DELETED, T0 + timedelta(days=3))
    await s.set_version_state("app/old", [2], VersionState.DESTROYED, T0 + timedelta(days=4))
    await s.create_token(TokenRecord(token_id="00000000000000bb", secret_hash=b"b" * 32, client="svc",
                                     policies=("read",), created_at=T0, created_by="admin",
                                     expires_at=T0 + timedelta(days=30)))
    await s.revoke_token("00000000000000bb", T0 + timedelta(days=5))
    await s.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
