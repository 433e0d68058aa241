"""The conformance suite every storage backend must pass.

Subclass ``StorageConformance`` and provide an async ``storage`` fixture that yields an opened,
empty store (and closes it afterwards). The PostgreSQL backend runs exactly these tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyproviders import WrappedKey
from secretsd.errors import AlreadyInitializedError, ConflictError
from secretsd.storage.base import (
    BatchWrite,
    KeyringTerm,
    RotationStatus,
    SecretRecord,
    Storage,
    TokenRecord,
    VersionRecord,
    VersionState,
    WriteResult,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def wrapped(tag: bytes = b"x") -> WrappedKey:
    return WrappedKey(provider="test", key_id="k1", mechanism="none", nonce=b"\0" * 12, ciphertext=tag * 48)


def term(n: int = 1) -> KeyringTerm:
    return KeyringTerm(n, (wrapped(bytes([n])),), T0 + timedelta(minutes=n))


def token(token_id: str = "00000000000000aa", **kw: object) -> TokenRecord:
    fields: dict[str, object] = dict(token_id=token_id, secret_hash=b"h" * 32, client="svc",
                                     policies=("a", "b"), created_at=T0, created_by="admin")
    fields.update(kw)
    return TokenRecord(**fields)  # type: ignore[arg-type]


def version(path: str, n: int, term_no: int = 1, ct: bytes = b"c") -> VersionRecord:
    return VersionRecord(path=path, version=n, created_at=T0 + timedelta(seconds=n), created_by="svc",
                         state=VersionState.ACTIVE, term=term_no, nonce=b"n" * 12, ciphertext=ct * 20)


async def initialized(storage: Storage) -> Storage:
    await storage.initialize({"format": "1"}, term(1), token("00000000000000ad", client="admin"))
    return storage


async def export_all(storage: Storage) -> dict[str, list[dict[str, Any]]]:
    from secretsd.storage.rows import TABLES

    out: dict[str, list[dict[str, Any]]] = {}
    for table in TABLES:
        out[table] = [row async for batch in storage.export_rows(table, batch_size=2) for row in batch]
    return out


def copy_rows() -> list[tuple[str, list[dict[str, Any]]]]:
    """A small store as neutral rows (secretsd.storage.rows), in reference order."""
    w = wrapped(b"k").to_dict()
    t1, t2 = T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)
    return [
        ("meta", [{"key": "format", "value": "1"}, {"key": "initialized_at", "value": T0.isoformat()},
                  {"key": "audit_head:main", "value": '{"seq": 3, "hash": "ab"}'}]),
        ("keyring_terms", [{"term": 1, "wrappings": [w], "created_at": T0, "encryptions": 7}]),
        ("secrets", [{"path": "a/b", "current_version": 2, "created_at": t1, "updated_at": t2,
                      "metadata": {"owner": "x"}}]),
        ("secret_versions", [
            {"path": "a/b", "version": 1, "term": 1, "nonce": b"n" * 12, "ciphertext": b"", "created_at": t1,
             "created_by": "svc", "state": "destroyed", "deleted_at": t2},
            {"path": "a/b", "version": 2, "term": 1, "nonce": b"m" * 12, "ciphertext": b"\x00\xff" * 10,
             "created_at": t2, "created_by": "svc", "state": "active", "deleted_at": None},
        ]),
        ("tokens", [{"token_id": "00000000000000ad", "secret_hash": b"h" * 32, "client": "admin",
                     "policies": ["root"], "created_at": T0, "created_by": "init", "expires_at": None,
                     "revoked_at": t2}]),
    ]


async def as_batches(
    given: list[tuple[str, list[dict[str, Any]]]], *, fail_at: str | None = None
) -> AsyncIterator[tuple[str, Sequence[dict[str, Any]]]]:
    for table, rows in given:
        if table == fail_at:
            raise RuntimeError("the source went away")
        yield table, rows


class CopyConformance:
    """``export_rows`` / ``import_rows`` / ``count_rows``: what ``secretsd storage migrate`` relies on."""

    async def test_export_yields_every_row_as_stored(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.add_keyring_term(term(2))
        for n in (1, 2, 3):
            await storage.write_version(version("p/q", n, term_no=2, ct=bytes([n])), expected_current=n - 1,
                                        metadata={"n": str(n)}, max_versions=5)
        await storage.set_version_state("p/q", [1], VersionState.DESTROYED, T0)
        await storage.create_token(token("00000000000000bb", expires_at=T0 + timedelta(hours=1)))
        await storage.revoke_token("00000000000000bb", T0)
        rows = await export_all(storage)
        for table, found in rows.items():
            assert len(found) == await storage.count_rows(table), table
        assert [r["term"] for r in rows["keyring_terms"]] == [1, 2]
        assert rows["keyring_terms"][1]["encryptions"] == 3
        assert rows["keyring_terms"][1]["wrappings"] == [w.to_dict() for w in term(2).wrappings]
        assert [(r["version"], r["state"], r["ciphertext"]) for r in rows["secret_versions"]] == [
            (1, "destroyed", b""), (2, "active", b"\x02" * 20), (3, "active", b"\x03" * 20)]
        assert rows["secret_versions"][2]["created_at"] == T0 + timedelta(seconds=3)
        assert rows["secrets"][0]["metadata"] == {"n": "3"}
        revoked = next(r for r in rows["tokens"] if r["token_id"] == "00000000000000bb")
        assert revoked["revoked_at"] == T0 and revoked["secret_hash"] == b"h" * 32
        assert revoked["policies"] == ["a", "b"]
        keys = [r["key"] for r in rows["meta"]]
        assert keys == sorted(keys, key=lambda k: k.encode()) and "initialized_at" in keys

    async def test_import_into_an_empty_store(self, storage: Storage) -> None:
        given = copy_rows()
        await storage.import_rows(as_batches(given))
        assert await storage.is_initialized()
        current = await storage.get_version("a/b", None)
        assert current is not None and current.ciphertext == b"\x00\xff" * 10 and current.nonce == b"m" * 12
        assert (await storage.keyring_terms())[0].encryptions == 7
        got = await storage.get_token("00000000000000ad")
        assert got is not None and got.revoked_at == T0 + timedelta(seconds=2) and got.policies == ("root",)
        assert await storage.get_meta("audit_head:main") == '{"seq": 3, "hash": "ab"}'
        exported = await export_all(storage)
        for table, rows in given:
            wanted = sorted(rows, key=lambda r: [str(r[k]) for k in sorted(r)])
            found = sorted(({k: r[k] for k in rows[0]} for r in exported[table]),
                           key=lambda r: [str(r[k]) for k in sorted(r)])
            assert found == wanted, table

    async def test_import_refuses_a_store_with_data(self, storage: Storage) -> None:
        await initialized(storage)
        with pytest.raises(AlreadyInitializedError):
            await storage.import_rows(as_batches(copy_rows()))
        assert await storage.get_secret("a/b") is None
        assert await storage.count_rows("meta") == 2

    async def test_import_is_all_or_nothing(self, storage: Storage) -> None:
        with pytest.raises(RuntimeError):
            await storage.import_rows(as_batches(copy_rows(), fail_at="secret_versions"))
        assert not await storage.is_initialized()
        for table in ("meta", "keyring_terms", "secrets"):
            assert await storage.count_rows(table) == 0
        await initialized(storage)  # and the store is usable afterwards


    async def test_snapshot_sees_one_moment(self, storage: Storage) -> None:
        """``snapshot``: every read through it sees the store as it was when it began (a backup's rule)."""
        await initialized(storage)
        await storage.write_version(version("a/1", 1), expected_current=0, metadata=None, max_versions=5)
        async with storage.snapshot() as snap:
            first = [r["path"] async for batch in snap.export_rows("secrets") for r in batch]
            await storage.write_version(version("a/2", 1), expected_current=0, metadata=None, max_versions=5)
            await storage.put_meta("written-during-the-snapshot", "x")
            again = [r["path"] async for batch in snap.export_rows("secrets", batch_size=1) for r in batch]
            meta = [r["key"] async for batch in snap.export_rows("meta") for r in batch]
            assert first == again == ["a/1"]
            assert await snap.count_rows("secrets") == 1 and await snap.count_rows("secret_versions") == 1
            assert "written-during-the-snapshot" not in meta
        assert await storage.count_rows("secrets") == 2


class StorageConformance(CopyConformance):
    async def test_fresh_store_is_not_initialized(self, storage: Storage) -> None:
        assert not await storage.is_initialized()
        await storage.ping()

    async def test_initialize_once(self, storage: Storage) -> None:
        await initialized(storage)
        assert await storage.is_initialized()
        assert await storage.get_meta("format") == "1"
        assert [t.term for t in await storage.keyring_terms()] == [1]
        with pytest.raises(AlreadyInitializedError):
            await storage.initialize({"format": "1"}, term(1), token("00000000000000af"))
        assert [t.token_id for t in await storage.list_tokens()] == ["00000000000000ad"]

    async def test_keyring_terms_round_trip(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.add_keyring_term(term(2))
        terms = await storage.keyring_terms()
        assert [t.term for t in terms] == [1, 2]
        assert terms[1].wrappings == term(2).wrappings
        assert terms[1].created_at == term(2).created_at
        with pytest.raises(ConflictError):
            await storage.add_keyring_term(term(2))

    async def test_meta_put_and_put_if_absent(self, storage: Storage) -> None:
        await initialized(storage)
        assert await storage.put_meta("k", "v1")
        assert await storage.get_meta("k") == "v1"
        assert await storage.put_meta("k", "v2")
        assert await storage.get_meta("k") == "v2"
        assert not await storage.put_meta("k", "v3", only_if_absent=True)
        assert await storage.get_meta("k") == "v2"
        assert await storage.put_meta("other", "x", only_if_absent=True)
        assert await storage.get_meta("other") == "x"

    async def test_leader_lock_has_one_holder(self, storage: Storage) -> None:
        await initialized(storage)
        first, second = storage.leader_lock("scheduler"), storage.leader_lock("scheduler")
        other = storage.leader_lock("cleanup")
        try:
            assert await first.try_acquire() and first.held
            assert await first.try_acquire()  # re-entrant for its holder
            assert not await second.try_acquire() and not second.held
            assert await other.try_acquire()  # names are independent
            await first.release()
            assert not first.held
            assert await second.try_acquire()
        finally:
            for lock in (first, second, other):
                await lock.release()

    async def test_replace_wrappings_is_compare_and_swap(self, storage: Storage) -> None:
        await initialized(storage)
        old = term(1).wrappings
        new = (wrapped(b"n"), wrapped(b"m"))
        await storage.replace_keyring_wrappings(1, old, new)
        assert (await storage.keyring_terms())[0].wrappings == new
        with pytest.raises(ConflictError):
            await storage.replace_keyring_wrappings(1, old, (wrapped(b"z"),))
        with pytest.raises(ConflictError):
            await storage.replace_keyring_wrappings(7, old, new)
        assert (await storage.keyring_terms())[0].wrappings == new

    async def test_write_and_read_versions(self, storage: Storage) -> None:
        await initialized(storage)
        r1 = await storage.write_version(version("a/b", 1), expected_current=0, metadata={"owner": "x"},
                                         max_versions=10)
        assert r1.secret.current_version == 1 and r1.term_encryptions == 1
        r2 = await storage.write_version(version("a/b", 2, ct=b"d"), expected_current=1, metadata=None,
                                         max_versions=10)
        assert r2.secret.current_version == 2 and r2.term_encryptions == 2
        assert r2.secret.metadata == {"owner": "x"}  # None keeps the metadata
        current = await storage.get_version("a/b", None)
        assert current is not None and current.version == 2 and current.ciphertext == b"d" * 20
        first = await storage.get_version("a/b", 1)
        assert first is not None and first.ciphertext == b"c" * 20 and first.nonce == b"n" * 12
        assert first.created_at == T0 + timedelta(seconds=1)
        assert await storage.get_version("a/b", 3) is None
        assert await storage.get_version("nope", None) is None

    async def test_check_and_set_conflict_writes_nothing(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=10)
        with pytest.raises(ConflictError):
            await storage.write_version(version("p", 2), expected_current=0, metadata=None, max_versions=10)
        with pytest.raises(ConflictError):
            await storage.write_version(version("p", 1), expected_current=1, metadata=None, max_versions=10)
        assert [v.version for v in await storage.list_versions("p")] == [1]
        assert (await storage.keyring_terms())[0].encryptions == 1

    async def test_concurrent_writers_one_wins(self, storage: Storage) -> None:
        await initialized(storage)
        results = await asyncio.gather(
            *[storage.write_version(version("race", 1, ct=bytes([65 + i])), expected_current=0, metadata=None,
                                    max_versions=10) for i in range(8)],
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, ConflictError) for r in results if isinstance(r, BaseException))

    async def test_write_unconditional_seals_inside_the_transaction_for_the_next_number(
            self, storage: Storage) -> None:
        await initialized(storage)
        seen: list[SecretRecord | None] = []

        def seal(secret: SecretRecord | None) -> tuple[VersionRecord, datetime | None]:
            seen.append(secret)
            n = (secret.latest_version if secret else 0) + 1
            return version("p", n, ct=bytes([96 + n])), T0 + timedelta(days=1)

        first = await storage.write_unconditional("p", seal, metadata={"o": "x"}, max_versions=10)
        assert seen == [None] and first.secret.current_version == 1 and first.secret.metadata == {"o": "x"}
        second = await storage.write_unconditional("p", seal, metadata=None, max_versions=10)
        assert [s.current_version if s else None for s in seen] == [None, 1]
        assert second.secret.current_version == 2 and second.secret.previous_version == 1
        assert second.secret.metadata == {"o": "x"} and second.term_encryptions == 2
        stored = await storage.get_version("p", None)
        assert stored is not None and stored.version == 2 and stored.ciphertext == bytes([98]) * 20
        older = await storage.get_version("p", 1)
        assert older is not None and older.grace_until == T0 + timedelta(days=1)

    async def test_write_unconditional_refuses_a_record_that_is_not_the_next_version(
            self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=10)
        with pytest.raises(ConflictError):
            await storage.write_unconditional("p", lambda s: (version("p", 1), None), metadata=None,
                                              max_versions=10)
        assert [v.version for v in await storage.list_versions("p")] == [1]

    async def test_concurrent_unconditional_writers_all_win(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("hot", 1), expected_current=0, metadata=None, max_versions=100)

        def seal(secret: SecretRecord | None) -> tuple[VersionRecord, datetime | None]:
            assert secret is not None
            return version("hot", secret.latest_version + 1), None

        results = await asyncio.gather(*[
            storage.write_unconditional("hot", seal, metadata=None, max_versions=100) for _ in range(8)])
        assert sorted(r.secret.current_version for r in results) == list(range(2, 10))
        assert [v.version for v in await storage.list_versions("hot")] == list(range(1, 10))

    async def test_a_batch_writes_each_item_or_reports_why_not(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("b/old", 1), expected_current=0, metadata=None, max_versions=10)

        def next_of(path: str) -> Callable[[SecretRecord | None], tuple[VersionRecord, datetime | None]]:
            return lambda secret: (version(path, (secret.latest_version if secret else 0) + 1, ct=b"z"), None)

        results = await storage.write_batch([
            BatchWrite("b/new", next_of("b/new"), metadata={"o": "n"}),
            BatchWrite("b/old", next_of("b/old")),                       # unconditional: version 2
            BatchWrite("b/cas-ok", next_of("b/cas-ok"), expected_current=0),
            BatchWrite("b/old", next_of("b/old"), expected_current=1),   # stale: b/old is at 2 by now
            BatchWrite("b/exists", next_of("b/exists"), expected_current=5),
        ], max_versions=10)
        assert [r.secret.current_version if isinstance(r, WriteResult) else type(r).__name__ for r in results] == [
            1, 2, 1, "ConflictError", "ConflictError"]
        # The term's count moved once, by the three written: each result carries the count after them.
        assert {r.term_encryptions for r in results if isinstance(r, WriteResult)} == {4}
        assert [p.path for p in await storage.list_secrets("b")] == ["b/cas-ok", "b/new", "b/old"]
        assert [v.version for v in await storage.list_versions("b/old")] == [1, 2]
        new = await storage.get_secret("b/new")
        assert new is not None and new.metadata == {"o": "n"}
        assert await storage.get_secret("b/exists") is None  # the refused item left nothing behind

    async def test_read_current_page_is_the_listing_with_each_current_version(self, storage: Storage) -> None:
        await initialized(storage)
        for path, versions in (("r", 1), ("r/a", 1), ("r/b", 2), ("r/c", 1), ("rr", 1), ("s/x", 1)):
            for n in range(1, versions + 1):
                await storage.write_version(version(path, n, ct=bytes([96 + n])), expected_current=n - 1,
                                            metadata=None, max_versions=10)
        listed = [s.path for s in await storage.list_secrets("r", after="r/a", limit=2)]
        found = await storage.read_current_page("r", after="r/a", limit=2)
        assert [s.path for s, _ in found] == listed == ["r/b", "r/c"]
        assert [(s.current_version, v.version if v else None, v.ciphertext if v else None) for s, v in found] == [
            (2, 2, b"b" * 20), (1, 1, b"a" * 20)]
        assert [s.path for s, _ in await storage.read_current_page("r")] == ["r", "r/a", "r/b", "r/c"]
        assert await storage.read_current_page("t") == []

    async def test_an_empty_batch_writes_nothing(self, storage: Storage) -> None:
        await initialized(storage)
        assert await storage.write_batch([], max_versions=10) == []

    async def test_old_versions_are_pruned(self, storage: Storage) -> None:
        await initialized(storage)
        for n in range(1, 6):
            await storage.write_version(version("p", n), expected_current=n - 1, metadata=None, max_versions=3)
        assert [v.version for v in await storage.list_versions("p")] == [3, 4, 5]

    async def test_unknown_term_is_refused(self, storage: Storage) -> None:
        await initialized(storage)
        with pytest.raises(ConflictError):
            await storage.write_version(version("p", 1, term_no=9), expected_current=0, metadata=None,
                                        max_versions=3)
        assert await storage.get_secret("p") is None

    async def test_list_by_prefix(self, storage: Storage) -> None:
        await initialized(storage)
        # app-x and app.y sort between "app" and "app/": siblings, never under the prefix.
        for path in ["app", "app-x", "app.y", "app/a", "app/b/c", "app0", "apple", "other/x"]:
            await storage.write_version(version(path, 1), expected_current=0, metadata=None, max_versions=3)
        assert [s.path for s in await storage.list_secrets("app")] == ["app", "app/a", "app/b/c"]
        assert [s.path for s in await storage.list_secrets("app", after="app")] == ["app/a", "app/b/c"]
        assert [s.path for s, _ in await storage.read_current_page("app", limit=2)] == ["app", "app/a"]
        assert await storage.count_secrets() == 8
        assert [s.path for s in await storage.list_secrets("app/b")] == ["app/b/c"]
        assert len(await storage.list_secrets("")) == 8
        page = await storage.list_secrets("", limit=2)
        assert [s.path for s in page] == ["app", "app-x"]
        rest = await storage.list_secrets("", after="app/a", limit=10)
        assert [s.path for s in rest] == ["app/b/c", "app0", "apple", "other/x"]

    async def test_version_states(self, storage: Storage) -> None:
        await initialized(storage)
        for n in (1, 2):
            await storage.write_version(version("p", n), expected_current=n - 1, metadata=None, max_versions=5)
        now = T0 + timedelta(days=1)
        assert await storage.set_version_state("p", [2], VersionState.DELETED, now) == [2]
        assert await storage.set_version_state("p", [2], VersionState.DELETED, now) == []
        v2 = await storage.get_version("p", 2)
        assert v2 is not None and v2.state is VersionState.DELETED and v2.deleted_at == now
        assert await storage.set_version_state("p", [2, 7], VersionState.ACTIVE, now) == [2]
        assert await storage.set_version_state("p", [1], VersionState.DESTROYED, now) == [1]
        v1 = await storage.get_version("p", 1)
        assert v1 is not None and v1.state is VersionState.DESTROYED and v1.ciphertext == b""
        assert await storage.set_version_state("p", [1], VersionState.ACTIVE, now) == []

    async def test_tokens(self, storage: Storage) -> None:
        await initialized(storage)
        expires = T0 + timedelta(hours=1)
        await storage.create_token(token("00000000000000bb", expires_at=expires))
        got = await storage.get_token("00000000000000bb")
        assert got is not None and got.policies == ("a", "b") and got.expires_at == expires
        assert got.secret_hash == b"h" * 32
        with pytest.raises(ConflictError):
            await storage.create_token(token("00000000000000bb"))
        assert await storage.revoke_token("00000000000000bb", T0)
        assert not await storage.revoke_token("00000000000000bb", T0)
        assert not await storage.revoke_token("0000000000000000", T0)
        again = await storage.get_token("00000000000000bb")
        assert again is not None and again.revoked_at == T0
        assert len(await storage.list_tokens()) == 2

    async def test_renewal_columns_round_trip_and_only_an_active_token_renews(self, storage: Storage) -> None:
        await initialized(storage)
        cap = T0 + timedelta(hours=10)
        await storage.create_token(token("00000000000000bb", expires_at=T0 + timedelta(hours=1), ttl_seconds=3600,
                                         max_expires_at=cap))
        got = await storage.get_token("00000000000000bb")
        assert got is not None and got.ttl_seconds == 3600 and got.max_expires_at == cap
        assert await storage.renew_token("00000000000000bb", T0 + timedelta(hours=2), T0 + timedelta(minutes=30))
        got = await storage.get_token("00000000000000bb")
        assert got is not None and got.expires_at == T0 + timedelta(hours=2)
        # Expired at ``now``: no renewal, the expiry stays.
        assert not await storage.renew_token("00000000000000bb", T0 + timedelta(hours=9), T0 + timedelta(hours=2))
        await storage.create_token(token("00000000000000cc", expires_at=T0 + timedelta(hours=1)))
        assert await storage.revoke_token("00000000000000cc", T0)
        assert not await storage.renew_token("00000000000000cc", T0 + timedelta(hours=2), T0)  # revoked
        await storage.create_token(token("00000000000000dd"))
        assert not await storage.renew_token("00000000000000dd", T0 + timedelta(hours=2), T0)  # no expiry
        assert not await storage.renew_token("0000000000000000", T0 + timedelta(hours=2), T0)  # unknown
        never = await storage.get_token("00000000000000dd")
        assert never is not None and never.expires_at is None

    async def test_a_revoked_token_keeps_its_first_revocation_time(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.create_token(token("00000000000000bb"))
        assert await storage.revoke_token("00000000000000bb", T0 + timedelta(hours=1))
        assert not await storage.revoke_token("00000000000000bb", T0 + timedelta(hours=2))
        got = await storage.get_token("00000000000000bb")
        assert got is not None and got.revoked_at == T0 + timedelta(hours=1)

    async def test_a_guarded_revocation_sees_the_other_active_tokens_and_can_refuse(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.create_token(token("00000000000000cc"))
        await storage.create_token(token("00000000000000dd", revoked_at=T0))
        seen: list[tuple[str, list[str]]] = []

        def refuse(target: TokenRecord, others: Sequence[TokenRecord], now: datetime) -> None:
            seen.append((target.token_id, sorted(t.token_id for t in others)))
            raise ConflictError("refused")

        with pytest.raises(ConflictError, match="refused"):
            await storage.revoke_token("00000000000000cc", T0, guard=refuse)
        assert seen == [("00000000000000cc", ["00000000000000ad"])]  # revoked tokens are not offered
        still = await storage.get_token("00000000000000cc")
        assert still is not None and still.revoked_at is None  # the refusal rolled it back
        assert not await storage.revoke_token("00000000000000dd", T0, guard=refuse)  # revoked already
        assert await storage.revoke_token("00000000000000cc", T0, guard=lambda *_: None)
        assert len(seen) == 1

    async def test_a_guarded_revocation_reads_no_expired_tokens(self, storage: Storage) -> None:
        """The rows a guarded revocation reads stay with the live set however many expired tokens
        pile up (counted through what the guard is offered, not by time); an expired root is no root."""
        await initialized(storage)
        for n in range(50):
            await storage.create_token(token(f"{n:014x}e0", expires_at=T0 - timedelta(seconds=n + 1),
                                             policies=("root",)))
        await storage.create_token(token("00000000000000cc", policies=("root",)))
        seen: list[int] = []

        def count(target: TokenRecord, others: Sequence[TokenRecord], now: datetime) -> None:
            seen.append(len(others))
            assert all(t.is_active(now) for t in others)

        assert await storage.revoke_token("00000000000000cc", T0, guard=count)
        assert seen == [1]  # the admin token only: 50 expired rows are not read
        # An expired target is still found (revoking it is allowed), the others still live only.
        assert await storage.revoke_token("00000000000003e0", T0, guard=count)
        assert seen == [1, 1]

    async def test_purge_deletes_only_tokens_dead_before_the_cutoff_in_batches(self, storage: Storage) -> None:
        await initialized(storage)
        now = T0 + timedelta(days=30)
        cutoff = now - timedelta(days=7)
        old = [f"{n:014x}a0" for n in range(5)]
        for t in old[:3]:
            await storage.create_token(token(t, expires_at=T0))  # expired long ago
        for t in old[3:]:
            await storage.create_token(token(t, revoked_at=T0, expires_at=now + timedelta(days=1)))  # revoked
        await storage.create_token(token("00000000000000b1", expires_at=now - timedelta(days=1)))  # recently expired
        await storage.create_token(token("00000000000000b2", revoked_at=now - timedelta(days=1)))  # recently revoked
        await storage.create_token(token("00000000000000b3", expires_at=now + timedelta(hours=1)))  # active
        await storage.create_token(token("00000000000000b4", policies=("root",)))  # the only root: never expires
        assert await storage.purge_tokens(cutoff, now, limit=2) == 2
        assert await storage.purge_tokens(cutoff, now, limit=2) == 2
        assert await storage.purge_tokens(cutoff, now, limit=2) == 1
        assert await storage.purge_tokens(cutoff, now, limit=2) == 0
        left = sorted(t.token_id for t in await storage.list_tokens())
        assert left == ["00000000000000ad", "00000000000000b1", "00000000000000b2", "00000000000000b3",
                        "00000000000000b4"]

    async def test_purge_never_deletes_an_active_token(self, storage: Storage) -> None:
        """A cutoff past ``now`` (a clock gone wrong) deletes nothing: active tokens are never purged."""
        await initialized(storage)
        await storage.create_token(token("00000000000000b3", expires_at=T0 + timedelta(hours=1)))
        assert await storage.purge_tokens(T0 + timedelta(days=1), T0) == 0
        assert len(await storage.list_tokens()) == 2

    async def test_token_pages_follow_the_cursor_and_hide_expired(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.create_token(token("00000000000000b1", expires_at=T0 - timedelta(seconds=1)))
        await storage.create_token(token("00000000000000b2", expires_at=T0))  # expires at its instant
        await storage.create_token(token("00000000000000b3", expires_at=T0 + timedelta(seconds=1)))
        await storage.create_token(token("00000000000000b4", revoked_at=T0))
        ids = [t.token_id for t in await storage.list_tokens_page(T0)]
        assert ids == ["00000000000000ad", "00000000000000b3", "00000000000000b4"]
        every = [t.token_id for t in await storage.list_tokens_page(T0, include_expired=True)]
        assert every == ["00000000000000ad", "00000000000000b1", "00000000000000b2", "00000000000000b3",
                         "00000000000000b4"]
        first = await storage.list_tokens_page(T0, limit=2, include_expired=True)
        second = await storage.list_tokens_page(T0, after=first[-1].token_id, limit=2, include_expired=True)
        third = await storage.list_tokens_page(T0, after=second[-1].token_id, limit=2, include_expired=True)
        assert [t.token_id for t in first + second + third] == every
        assert await storage.list_tokens_page(T0, after=every[-1]) == []

    # -- lifecycle: labels, pending versions, rotation schedule (docs/rotation.md) ---------------
    async def test_labels_grace_and_latest_version(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=10)
        grace = T0 + timedelta(days=14)
        r2 = await storage.write_version(version("p", 2, ct=b"d"), expected_current=1, metadata=None,
                                         max_versions=10, grace_until=grace)
        assert (r2.secret.current_version, r2.secret.previous_version, r2.secret.latest_version) == (2, 1, 2)
        assert r2.secret.pending_version is None and r2.secret.rotation is None
        found = await storage.read_version("p", label="previous")
        assert found is not None
        secret, old = found
        assert secret.current_version == 2 and old.version == 1 and old.grace_until == grace
        assert old.ciphertext == b"c" * 20
        cur = await storage.read_version("p")
        assert cur is not None and cur[1].version == 2 and cur[1].grace_until is None
        by_number = await storage.read_version("p", version=1, label="current")  # a number wins
        assert by_number is not None and by_number[1].version == 1
        assert await storage.read_version("p", label="pending") is None
        assert await storage.read_version("p", version=9) is None
        assert await storage.read_version("nope") is None
        infos = await storage.list_versions("p")
        assert [(v.version, v.grace_until) for v in infos] == [(1, grace), (2, None)]

    async def test_expires_at_round_trips(self, storage: Storage) -> None:
        await initialized(storage)
        rec = VersionRecord(path="e", version=1, created_at=T0, created_by="svc", state=VersionState.ACTIVE,
                            term=1, nonce=b"n" * 12, ciphertext=b"c" * 20, expires_at=T0 + timedelta(hours=2))
        await storage.write_version(rec, expected_current=0, metadata=None, max_versions=3)
        got = await storage.get_version("e", 1)
        assert got is not None and got.expires_at == T0 + timedelta(hours=2)
        assert (await storage.list_versions("e"))[0].expires_at == T0 + timedelta(hours=2)

    async def test_pending_version_then_finish(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=10)
        with pytest.raises(ConflictError):  # no such secret
            await storage.create_pending(version("q", 1), expected_current=0)
        with pytest.raises(ConflictError):  # stale expectation
            await storage.create_pending(version("p", 2), expected_current=0)
        made = await storage.create_pending(version("p", 2, ct=b"p"), expected_current=1)
        assert (made.secret.current_version, made.secret.pending_version, made.secret.latest_version) == (1, 2, 2)
        assert made.term_encryptions == 2
        with pytest.raises(ConflictError):  # one pending version at a time
            await storage.create_pending(version("p", 3), expected_current=1)
        cur = await storage.read_version("p")
        assert cur is not None and cur[1].version == 1  # readers still get the old current
        pending = await storage.read_version("p", label="pending")
        assert pending is not None and pending[1].ciphertext == b"p" * 20
        due = T0 + timedelta(days=90)
        status = RotationStatus(last_result="succeeded")
        grace = T0 + timedelta(days=14)
        with pytest.raises(ConflictError):
            await storage.finish_pending("p", 2, expected_current=0, now=T0, grace_until=grace,
                                         max_versions=10, rotation_due=due, rotation_status=status)
        done = await storage.finish_pending("p", 2, expected_current=1, now=T0, grace_until=grace,
                                            max_versions=10, rotation_due=due, rotation_status=status)
        assert (done.current_version, done.previous_version, done.pending_version) == (2, 1, None)
        assert done.rotation_due == due and done.rotation_status == status
        old = await storage.get_version("p", 1)
        assert old is not None and old.grace_until == grace and old.state is VersionState.ACTIVE
        with pytest.raises(ConflictError):  # finished once only
            await storage.finish_pending("p", 2, expected_current=1, now=T0, grace_until=grace,
                                         max_versions=10, rotation_due=due, rotation_status=status)

    async def test_a_write_during_a_rotation_wins_and_the_rotation_cannot_finish(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=10)
        await storage.create_pending(version("p", 2), expected_current=1)
        with pytest.raises(ConflictError):  # the pending version has number 2
            await storage.write_version(version("p", 2), expected_current=1, metadata=None, max_versions=10)
        w = await storage.write_version(version("p", 3, ct=b"w"), expected_current=1, metadata=None,
                                        max_versions=10)
        assert (w.secret.current_version, w.secret.pending_version, w.secret.latest_version) == (3, 2, 3)
        with pytest.raises(ConflictError):
            await storage.finish_pending("p", 2, expected_current=1, now=T0, grace_until=None, max_versions=10,
                                         rotation_due=None, rotation_status=RotationStatus())
        assert await storage.discard_pending("p", 2, now=T0, rotation_due=T0,
                                             rotation_status=RotationStatus(failures=1))
        assert not await storage.discard_pending("p", 2, now=T0, rotation_due=T0, rotation_status=RotationStatus())
        secret = await storage.get_secret("p")
        assert secret is not None and secret.pending_version is None and secret.current_version == 3
        assert secret.rotation_status == {"failures": 1}
        gone = await storage.get_version("p", 2)
        assert gone is not None and gone.state is VersionState.DESTROYED and gone.ciphertext == b""
        # The discarded number is never reused.
        w4 = await storage.write_version(version("p", 4), expected_current=3, metadata=None, max_versions=10)
        assert w4.secret.latest_version == 4

    async def test_a_destroyed_pending_version_cannot_become_current(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=10)
        await storage.create_pending(version("p", 2), expected_current=1)
        await storage.set_version_state("p", [2], VersionState.DESTROYED, T0)
        with pytest.raises(ConflictError):
            await storage.finish_pending("p", 2, expected_current=1, now=T0, grace_until=None, max_versions=10,
                                         rotation_due=None, rotation_status=RotationStatus())

    async def test_concurrent_rotations_one_pending(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=10)
        results = await asyncio.gather(
            *[storage.create_pending(version("p", 2, ct=bytes([65 + i])), expected_current=1) for i in range(6)],
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, ConflictError) for r in results if isinstance(r, BaseException))

    async def test_pruning_keeps_previous_pending_and_grace(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=1)
        grace = T0 + timedelta(days=30)
        await storage.write_version(version("p", 2), expected_current=1, metadata=None, max_versions=1,
                                    grace_until=grace)
        assert [v.version for v in await storage.list_versions("p")] == [1, 2]  # 1 is previous
        await storage.create_pending(version("p", 3), expected_current=2)
        await storage.finish_pending("p", 3, expected_current=2, now=T0 + timedelta(days=1),
                                     grace_until=grace, max_versions=1, rotation_due=None,
                                     rotation_status=RotationStatus())
        # 1 is still in grace, 2 is previous.
        assert [v.version for v in await storage.list_versions("p")] == [1, 2, 3]
        await storage.write_version(version("p", 4), expected_current=3, metadata=None, max_versions=1)
        # 1 is still in grace (the write's time is T0 + 4s), 3 is previous; 2 had grace until `grace` too.
        assert [v.version for v in await storage.list_versions("p")] == [1, 2, 3, 4]
        late = VersionRecord(path="p", version=5, created_at=grace + timedelta(days=1), created_by="svc",
                             state=VersionState.ACTIVE, term=1, nonce=b"n" * 12, ciphertext=b"c" * 20)
        await storage.write_version(late, expected_current=4, metadata=None, max_versions=1)
        assert [v.version for v in await storage.list_versions("p")] == [4, 5]

    async def test_pruning_keeps_the_previous_and_pending_versions_without_grace(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=1)
        await storage.create_pending(version("p", 2), expected_current=1)
        await storage.write_version(version("p", 3), expected_current=1, metadata=None, max_versions=1)
        assert [v.version for v in await storage.list_versions("p")] == [1, 2, 3]  # previous, pending
        await storage.write_version(version("p", 4), expected_current=3, metadata=None, max_versions=1)
        assert [v.version for v in await storage.list_versions("p")] == [2, 3, 4]  # 1 is no longer previous
        await storage.discard_pending("p", 2, now=T0, rotation_due=None, rotation_status=RotationStatus())
        await storage.create_pending(version("p", 5), expected_current=4)
        await storage.finish_pending("p", 5, expected_current=4, now=T0, grace_until=None, max_versions=1,
                                     rotation_due=None, rotation_status=RotationStatus())
        assert [v.version for v in await storage.list_versions("p")] == [4, 5]  # 4 is previous now

    async def test_rotation_policy_schedule_and_candidates(self, storage: Storage) -> None:
        await initialized(storage)
        for path in ("a", "b", "c"):
            await storage.write_version(version(path, 1), expected_current=0, metadata={"k": "v"}, max_versions=5)
        assert await storage.set_rotation("nope", {"enabled": True}, T0) is None
        policy = {"enabled": True, "period_seconds": 86400, "generator": {"kind": "bytes", "length": 32}}
        a = await storage.set_rotation("a", policy, T0 + timedelta(days=1))
        assert a is not None and a.rotation == policy and a.rotation_due == T0 + timedelta(days=1)
        assert a.metadata == {"k": "v"}  # user metadata untouched
        await storage.set_rotation("b", policy, T0 + timedelta(days=3))
        assert await storage.rotation_candidates(T0) == []
        assert [s.path for s in await storage.rotation_candidates(T0 + timedelta(days=1))] == ["a"]
        assert [s.path for s in await storage.rotation_candidates(T0 + timedelta(days=5))] == ["a", "b"]
        assert [s.path for s in await storage.rotation_candidates(T0 + timedelta(days=5), limit=1)] == ["a"]
        await storage.create_pending(version("c", 2), expected_current=1)  # pending: always a candidate
        assert [s.path for s in await storage.rotation_candidates(T0)] == ["c"]
        await storage.record_rotation("a", T0 + timedelta(days=9), RotationStatus(last_result="failed", failures=2))
        got = await storage.get_secret("a")
        assert got is not None and got.rotation_status == {"last_result": "failed", "failures": 2}
        assert got.rotation_due == T0 + timedelta(days=9)
        cleared = await storage.set_rotation("a", None, None)
        assert cleared is not None and cleared.rotation is None and cleared.rotation_due is None

    # -- the read rules, one answer on every backend (secretsd.storage.queries) ---------------------
    async def test_rotation_candidates_pending_first_then_due_order_then_path_and_the_limit(
        self, storage: Storage
    ) -> None:
        await initialized(storage)
        policy = {"enabled": True, "period_seconds": 86400}
        now = T0 + timedelta(days=5)
        due = {"d1": T0 + timedelta(days=1), "pd": T0 + timedelta(days=1, hours=12), "d2b": T0 + timedelta(days=2),
               "d2a": T0 + timedelta(days=2), "edge": now, "later": T0 + timedelta(days=10),
               "pfuture": T0 + timedelta(days=30), "pnull": None}
        for path in [*due, "none"]:
            await storage.write_version(version(path, 1), expected_current=0, metadata=None, max_versions=5)
        for path, when in due.items():
            await storage.set_rotation(path, policy, when)
        for path in ("pd", "pfuture", "pnull"):  # a pending version: a candidate whenever it is due
            await storage.create_pending(version(path, 2), expected_current=1)
        want = ["pnull", "d1", "pd", "d2a", "d2b", "edge", "pfuture"]  # no due time first; due <= now; path
        assert [s.path for s in await storage.rotation_candidates(now)] == want
        for limit in (1, 2, 3, 6, 7, 100):
            assert [s.path for s in await storage.rotation_candidates(now, limit=limit)] == want[:limit]
        just_before = now - timedelta(microseconds=1)  # the due time's boundary, to the microsecond
        assert "edge" not in [s.path for s in await storage.rotation_candidates(just_before)]
        assert [s.path for s in await storage.rotation_candidates(T0)] == ["pnull", "pd", "pfuture"]

    async def test_list_secrets_prefix_cursor_and_limit_edges(self, storage: Storage) -> None:
        await initialized(storage)
        top = "a\U0010ffff"  # a prefix that ends in the last code point
        paths = ["b", "a/b/c", top, "a0", "a", "a.x", f"{top}/z", "a-y", "a/b"]
        for path in paths:
            await storage.write_version(version(path, 1), expected_current=0, metadata=None, max_versions=3)

        async def listed(prefix: str, after: str = "", limit: int = 1000) -> list[str]:
            return [s.path for s in await storage.list_secrets(prefix, after=after, limit=limit)]

        # Code point order, which is UTF-8 byte order: '-' and '.' sort before '/', '0' right after it.
        assert await listed("") == ["a", "a-y", "a.x", "a/b", "a/b/c", "a0", top, f"{top}/z", "b"]
        assert await listed("a") == ["a", "a/b", "a/b/c"]  # not a-y, a.x or a0: siblings, not below
        assert await listed("a", after="a") == ["a/b", "a/b/c"]  # a cursor equal to the prefix
        assert await listed("a", after="a/b") == ["a/b/c"]
        assert await listed("a", after="a/b/c") == []
        assert await listed("a", after="a-y") == ["a/b", "a/b/c"]  # a cursor outside the prefix
        assert await listed("a", limit=1) == ["a"]
        assert await listed("a", after="a", limit=1) == ["a/b"]
        assert await listed("a", limit=0) == []
        assert await listed(top) == [top, f"{top}/z"]
        assert await listed(top, after=top) == [f"{top}/z"]
        assert await listed("", after=top) == [f"{top}/z", "b"]
        assert await listed("a/b") == ["a/b", "a/b/c"]
        assert await listed("a/b/c/d") == []
        assert await listed("zz") == []

    async def test_list_tokens_by_creation_time_then_id(self, storage: Storage) -> None:
        await initialized(storage)  # its admin token 00000000000000ad was created at T0
        made = {"00000000000000ff": T0, "00000000000000ee": T0 + timedelta(seconds=1),
                "00000000000000cc": T0 + timedelta(microseconds=1), "00000000000000bb": T0 + timedelta(seconds=1),
                "00000000000000aa": T0 + timedelta(milliseconds=500)}
        for token_id, at in made.items():
            await storage.create_token(token(token_id, created_at=at))
        assert [t.token_id for t in await storage.list_tokens()] == [
            "00000000000000ad", "00000000000000ff", "00000000000000cc", "00000000000000aa",
            "00000000000000bb", "00000000000000ee"]

    async def test_rotation_status_is_typed_and_keeps_the_stored_json(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=5)
        fresh = await storage.get_secret("p")
        assert fresh is not None and fresh.rotation_status == RotationStatus() and not fresh.rotation_status
        # A key a newer release wrote, and a known key holding another type, survive a read and a write.
        stored = RotationStatus.of({"last_result": "failed", "failures": 3, "from_the_future": [1, 2],
                                    "last_version": "7"})
        await storage.record_rotation("p", None, stored)
        got = await storage.get_secret("p")
        assert got is not None and isinstance(got.rotation_status, RotationStatus)
        assert got.rotation_status.last_result == "failed" and got.rotation_status.failure_count == 3
        assert dict(got.rotation_status) == {"last_result": "failed", "failures": 3, "from_the_future": [1, 2],
                                             "last_version": "7"}
        again = got.rotation_status.replace(failures=4, last_version=2)
        await storage.record_rotation("p", None, again)
        got = await storage.get_secret("p")
        assert got is not None and dict(got.rotation_status) == {
            "last_result": "failed", "failures": 4, "from_the_future": [1, 2], "last_version": 2}
        exported = await export_all(storage)
        assert exported["secrets"][0]["rotation_status"] == dict(got.rotation_status)

    # -- the engine's results are what a reader then finds (secretsd.storage.engine) -------------
    async def test_what_a_write_returns_is_what_is_stored(self, storage: Storage) -> None:
        await initialized(storage)
        made = await storage.write_version(version("p", 1), expected_current=0, metadata={"k": ["v", 1]},
                                           max_versions=2)
        assert made.secret == await storage.get_secret("p")
        kept = await storage.write_version(version("p", 2), expected_current=1, metadata=None, max_versions=2,
                                           grace_until=T0 + timedelta(days=1))
        assert kept.secret == await storage.get_secret("p")
        changed = await storage.write_version(version("p", 3), expected_current=2, metadata={"n": 3},
                                              max_versions=2)
        assert changed.secret == await storage.get_secret("p")
        policy = {"enabled": True, "period_seconds": 60}
        assert await storage.set_rotation("p", policy, T0) == await storage.get_secret("p")
        pending = await storage.create_pending(version("p", 4), expected_current=3)
        assert pending.secret == await storage.get_secret("p")
        done = await storage.finish_pending("p", 4, expected_current=3, now=T0 + timedelta(hours=1),
                                            grace_until=None, max_versions=2, rotation_due=T0 + timedelta(days=2),
                                            rotation_status=RotationStatus(last_result="succeeded", failures=0))
        assert done == await storage.get_secret("p")

    async def test_a_destroyed_version_keeps_its_first_deletion_time(self, storage: Storage) -> None:
        await initialized(storage)
        for n in (1, 2):
            await storage.write_version(version("p", n), expected_current=n - 1, metadata=None, max_versions=5)
        deleted_at, later = T0 + timedelta(days=1), T0 + timedelta(days=2)
        assert await storage.set_version_state("p", [1], VersionState.DELETED, deleted_at) == [1]
        assert await storage.set_version_state("p", [1, 2, 9], VersionState.DESTROYED, later) == [1, 2]
        assert await storage.set_version_state("p", [1], VersionState.DESTROYED, later) == []
        v1, v2 = await storage.get_version("p", 1), await storage.get_version("p", 2)
        assert v1 is not None and v1.deleted_at == deleted_at and v1.nonce == b"" and v1.ciphertext == b""
        assert v2 is not None and v2.deleted_at == later and v2.state is VersionState.DESTROYED

    async def test_pruning_counts_deleted_and_destroyed_versions(self, storage: Storage) -> None:
        await initialized(storage)
        for n in (1, 2):
            await storage.write_version(version("p", n), expected_current=n - 1, metadata=None, max_versions=2)
        await storage.set_version_state("p", [1], VersionState.DELETED, T0)
        await storage.write_version(version("p", 3), expected_current=2, metadata=None, max_versions=2)
        # 1 is beyond the newest two and not previous (2 is): pruned, whatever its state.
        assert [v.version for v in await storage.list_versions("p")] == [2, 3]

    async def test_rotation_bookkeeping_of_a_missing_secret_changes_nothing(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.record_rotation("nope", T0, RotationStatus(failures=1))
        assert await storage.get_secret("nope") is None
        assert not await storage.discard_pending("nope", 1, now=T0, rotation_due=None,
                                                 rotation_status=RotationStatus())
        with pytest.raises(ConflictError):
            await storage.finish_pending("nope", 1, expected_current=0, now=T0, grace_until=None, max_versions=2,
                                         rotation_due=None, rotation_status=RotationStatus())

    async def test_reading_by_an_unknown_label_is_a_programming_error(self, storage: Storage) -> None:
        await initialized(storage)
        await storage.write_version(version("p", 1), expected_current=0, metadata=None, max_versions=2)
        with pytest.raises(ValueError, match="unknown label"):
            await storage.read_version("p", label="latest")
        by_number = await storage.read_version("p", version=1, label="ignored-with-a-number")
        assert by_number is not None and by_number[1].version == 1
