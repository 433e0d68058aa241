"""The conformance suite every storage backend must pass.

Subclass ``StorageConformance`` and provide an async ``storage`` fixture that yields an opened,
empty store (and closes it afterwards). The PostgreSQL backend runs exactly these tests.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from keyproviders import WrappedKey
from secretsd.errors import AlreadyInitializedError, ConflictError
from secretsd.storage.base import KeyringTerm, Storage, TokenRecord, VersionRecord, VersionState

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


class StorageConformance:
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
        for path in ["app", "app/a", "app/b/c", "app0", "apple", "other/x"]:
            await storage.write_version(version(path, 1), expected_current=0, metadata=None, max_versions=3)
        assert [s.path for s in await storage.list_secrets("app")] == ["app", "app/a", "app/b/c"]
        assert [s.path for s in await storage.list_secrets("app/b")] == ["app/b/c"]
        assert len(await storage.list_secrets("")) == 6
        page = await storage.list_secrets("", limit=2)
        assert [s.path for s in page] == ["app", "app/a"]
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
