"""Tokens that renew (issue 13 item 4): the renewal rule, POST /v1/auth/tokens/renew-self (and the
Vault façade's renew-self on the same rule), whoami's expiry, and an old store carried forward."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from secretsd.api.app import create_app
from secretsd.domain.identity import Principal
from secretsd.domain.token_service import renewed_expiry
from secretsd.errors import RequestError
from secretsd.records import TokenRecord
from secretsd.storage import migrations as migration_module
from secretsd.storage.sqlite import SQLiteStorage
from tests.conftest import Api

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _record(**fields: object) -> TokenRecord:
    base: dict[str, object] = {"token_id": "0123456789abcdef", "secret_hash": bytes(32), "client": "svc",
                               "policies": ("p",), "created_at": T0, "created_by": "admin"}
    return TokenRecord(**(base | fields))  # type: ignore[arg-type]


def test_renewal_extends_by_ttl_capped_by_max_ttl() -> None:
    record = _record(expires_at=T0 + timedelta(seconds=60), ttl_seconds=60, max_expires_at=T0 + timedelta(seconds=100))
    assert renewed_expiry(record, T0 + timedelta(seconds=30)) == T0 + timedelta(seconds=90)
    assert renewed_expiry(record, T0 + timedelta(seconds=50)) == T0 + timedelta(seconds=100)  # capped
    # Never shortened: renewing early keeps the later expiry it already has.
    later = _record(expires_at=T0 + timedelta(seconds=95), ttl_seconds=60, max_expires_at=T0 + timedelta(seconds=100))
    assert renewed_expiry(later, T0 + timedelta(seconds=1)) == T0 + timedelta(seconds=95)


def test_a_token_without_expiry_or_max_ttl_does_not_move() -> None:
    assert renewed_expiry(_record(), T0) is None
    fixed = _record(expires_at=T0 + timedelta(seconds=60))  # made before renewal existed, or without max_ttl
    assert renewed_expiry(fixed, T0 + timedelta(seconds=30)) == T0 + timedelta(seconds=60)


async def _create(api: Api, **body: object) -> dict[str, object]:
    resp = await api.client.post("/v1/auth/tokens", json={"client": "svc", "policies": ["root"]} | body,
                                 headers=api.auth())
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def _renew(api: Api, token: str, path: str = "/v1/auth/tokens/renew-self") -> tuple[int, dict[str, object]]:
    resp = await api.client.post(path, headers=api.auth(token))
    return resp.status, dict(await resp.json())


async def test_renew_self_moves_expiry_up_to_the_max(api: Api) -> None:
    made = await _create(api, ttl_seconds=2, max_ttl_seconds=3)
    token = str(made["token"])
    first = datetime.fromisoformat(str(made["expires_at"]))
    cap = datetime.fromisoformat(str(made["max_expires_at"]))
    await asyncio.sleep(0.3)
    status, renewed = await _renew(api, token)
    assert status == 200, renewed
    moved = datetime.fromisoformat(str(renewed["expires_at"]))
    assert first < moved <= cap
    who = await (await api.client.get("/v1/auth/whoami", headers=api.auth(token))).json()
    assert who["method"] == "token" and who["client"] == "svc"
    assert datetime.fromisoformat(who["expires_at"]) == moved  # the cached verification saw the renewal
    await asyncio.sleep(1.2)
    status, capped = await _renew(api, token)
    assert status == 200 and datetime.fromisoformat(str(capped["expires_at"])) == cap


async def test_a_renewed_token_outlives_its_first_expiry(api: Api) -> None:
    token = str((await _create(api, ttl_seconds=1, max_ttl_seconds=60))["token"])
    for _ in range(3):
        await asyncio.sleep(0.6)
        assert (await _renew(api, token))[0] == 200
    # 1.8 s after creation, past the first expiry, it still works.
    assert (await api.client.get("/v1/auth/whoami", headers=api.auth(token))).status == 200


async def test_revoked_and_expired_tokens_cannot_renew(api: Api) -> None:
    made = await _create(api, ttl_seconds=60, max_ttl_seconds=600)
    resp = await api.client.delete(f"/v1/auth/tokens/{made['token_id']}", headers=api.auth())
    assert resp.status == 200
    status, body = await _renew(api, str(made["token"]))
    assert status == 401 and "renew" not in str(body.get("detail"))
    short = str((await _create(api, ttl_seconds=1, max_ttl_seconds=600))["token"])
    await asyncio.sleep(1.1)
    assert (await _renew(api, short))[0] == 401


async def test_a_token_that_does_not_renew_answers_its_unchanged_state(api: Api) -> None:
    never = await _create(api)  # no expiry
    status, body = await _renew(api, str(never["token"]))
    assert status == 200 and body["expires_at"] is None
    fixed = await _create(api, ttl_seconds=60)  # no max TTL: its first expiry is its last
    status, body = await _renew(api, str(fixed["token"]))
    assert status == 200 and body["expires_at"] == fixed["expires_at"]


@pytest.mark.parametrize("body", [{"max_ttl_seconds": 60},                      # nothing to renew
                                  {"ttl_seconds": 60, "max_ttl_seconds": 30},   # max below ttl
                                  {"ttl_seconds": 60, "max_ttl_seconds": 0}])
async def test_bad_max_ttl_is_a_400_and_creates_nothing(api: Api, body: dict[str, object]) -> None:
    before = (await (await api.client.get("/v1/auth/tokens", headers=api.auth())).json())["tokens"]
    resp = await api.client.post("/v1/auth/tokens", json={"client": "svc", "policies": ["root"]} | body,
                                 headers=api.auth())
    assert resp.status == 400 and resp.content_type == "application/problem+json"
    assert (await (await api.client.get("/v1/auth/tokens", headers=api.auth())).json())["tokens"] == before


async def test_the_vault_renew_self_follows_the_same_rule(api: Api) -> None:
    made = await _create(api, ttl_seconds=2, max_ttl_seconds=600)
    await asyncio.sleep(0.3)
    vault = TestClient(TestServer(create_app(api.daemon, vault_mount="secret")))
    await vault.start_server()
    try:
        resp = await vault.post("/v1/auth/token/renew-self", headers={"X-Vault-Token": str(made["token"])})
        assert resp.status == 200, await resp.text()
        auth = (await resp.json())["auth"]
    finally:
        await vault.close()
    assert auth["renewable"] is True and auth["lease_duration"] >= 1
    stored = next(t for t in (await (await api.client.get("/v1/auth/tokens", headers=api.auth())).json())["tokens"]
                  if t["token_id"] == made["token_id"])
    assert datetime.fromisoformat(stored["expires_at"]) > datetime.fromisoformat(str(made["expires_at"]))


async def test_an_old_sqlite_store_opens_and_its_tokens_do_not_renew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store made before 0003_token_renewal: migrated at open, its tokens keep their expiry."""
    path = tmp_path / "db.sqlite"
    every = migration_module.load_migrations("sqlite")
    with monkeypatch.context() as m:
        m.setattr("secretsd.storage.sqlite.load_migrations", lambda backend: every[:2])
        old = SQLiteStorage(path)
        await old.open()
        await old.close()
    conn = sqlite3.connect(path)
    assert [r[1] for r in conn.execute("PRAGMA table_info(tokens)")][-1] == "revoked_at"  # the old shape
    conn.execute("INSERT INTO tokens (token_id, secret_hash, client, policies, created_at, created_by, expires_at) "
                 "VALUES ('0123456789abcdef', ?, 'svc', '[\"p\"]', ?, 'admin', ?)",
                 (bytes(32), T0.isoformat(), (T0 + timedelta(days=1)).isoformat()))
    conn.commit()
    conn.close()
    store = SQLiteStorage(path)
    await store.open()
    try:
        record = await store.get_token("0123456789abcdef")
        assert record is not None and record.client == "svc" and record.expires_at == T0 + timedelta(days=1)
        assert record.ttl_seconds is None and record.max_expires_at is None
        assert renewed_expiry(record, T0) == record.expires_at
        assert await store.renew_token("0123456789abcdef", T0 + timedelta(days=2), T0)  # the new column works
        assert (await store.get_token("0123456789abcdef")).expires_at == T0 + timedelta(days=2)  # type: ignore[union-attr]
        assert not await store.renew_token("0123456789abcdef", T0 + timedelta(days=3), T0 + timedelta(days=5))
    finally:
        await store.close()


async def test_a_caller_without_a_token_has_nothing_to_renew(api: Api) -> None:
    """A Unix-socket peer (method unix, no token id) gets a 400 from the one renewal rule, not a 500."""
    with pytest.raises(RequestError, match="only a token renews"):
        await api.daemon.tokens.renew_self(Principal("billing", ("billing",), "unix"))
