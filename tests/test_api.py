"""The HTTP contract, against an in-process daemon behind a real aiohttp server."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse

from secretsd.auth.token import TokenAuthenticator
from secretsd.problems import PROBLEM_CONTENT_TYPE
from tests.conftest import Api


async def problem(resp: ClientResponse, status: int, slug: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM_CONTENT_TYPE
    doc = await resp.json()
    assert doc["type"] == f"urn:jarvis-secretsd:problem:{slug}"
    assert doc["status"] == status and doc["title"] and doc["detail"]
    return dict(doc)


def db_rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(data_dir / "secretsd.db")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# -- secrets --------------------------------------------------------------------------------------
async def test_put_then_get(api: Api) -> None:
    put = await api.put("app/db-password", "hunter2")
    assert put["path"] == "app/db-password" and put["version"] == 1 and put["created_at"]
    got = await api.get("app/db-password")
    assert got["value"] == "hunter2" and got["version"] == 1 and got["created_by"] == "admin"


async def test_versions_and_reading_an_old_one(api: Api) -> None:
    for i in range(3):
        await api.put("app/k", f"v{i}")
    assert (await api.get("app/k"))["value"] == "v2"
    assert (await api.get("app/k", version=1))["value"] == "v0"
    resp = await api.client.get("/v1/secrets/app/k", params={"version": "9"}, headers=api.auth())
    await problem(resp, 404, "not-found")


async def test_unicode_and_empty_values(api: Api) -> None:
    await api.put("app/u", "pässwörd 🔑\n\ttab")
    assert (await api.get("app/u"))["value"] == "pässwörd 🔑\n\ttab"
    await api.put("app/empty", "")
    assert (await api.get("app/empty"))["value"] == ""


async def test_check_and_set(api: Api) -> None:
    await api.put("app/cas", "a", cas=0)
    resp = await api.client.put("/v1/secrets/app/cas", json={"value": "b", "cas": 0}, headers=api.auth())
    await problem(resp, 409, "conflict")
    await api.put("app/cas", "b", cas=1)
    resp = await api.client.put("/v1/secrets/app/cas", json={"value": "c", "cas": 1}, headers=api.auth())
    await problem(resp, 409, "conflict")
    assert (await api.get("app/cas"))["value"] == "b"


async def test_list_shows_paths_and_versions_never_values(api: Api) -> None:
    await api.put("app/a", "value-a")
    await api.put("app/b/c", "value-c")
    await api.put("app/b/c", "value-c2")
    await api.put("other/x", "value-x")
    resp = await api.client.get("/v1/secrets", params={"prefix": "app"}, headers=api.auth())
    body = await resp.json()
    assert [(s["path"], s["current_version"]) for s in body["secrets"]] == [("app/a", 1), ("app/b/c", 2)]
    assert "value" not in json.dumps(body)
    resp = await api.client.get("/v1/secrets", headers=api.auth())
    assert len((await resp.json())["secrets"]) == 3


async def test_list_paginates(api: Api) -> None:
    for i in range(5):
        await api.put(f"p/{i}", "x")
    resp = await api.client.get("/v1/secrets", params={"prefix": "p", "limit": "2"}, headers=api.auth())
    page = await resp.json()
    assert [s["path"] for s in page["secrets"]] == ["p/0", "p/1"] and page["next_after"] == "p/1"
    resp = await api.client.get("/v1/secrets", params={"prefix": "p", "after": "p/1", "limit": "10"},
                                headers=api.auth())
    page = await resp.json()
    assert [s["path"] for s in page["secrets"]] == ["p/2", "p/3", "p/4"] and page["next_after"] is None


async def test_metadata(api: Api) -> None:
    await api.put("app/m", "1", metadata={"owner": "team-a"})
    await api.put("app/m", "2")
    resp = await api.client.get("/v1/metadata/app/m", headers=api.auth())
    body = await resp.json()
    assert body["current_version"] == 2 and body["metadata"] == {"owner": "team-a"}
    assert [(v["version"], v["state"], v["created_by"]) for v in body["versions"]] == [
        (1, "active", "admin"), (2, "active", "admin")]
    assert body["max_versions"] == 10
    assert "value" not in body


async def test_delete_undelete_destroy(api: Api) -> None:
    await api.put("app/d", "one")
    await api.put("app/d", "two")
    resp = await api.client.delete("/v1/secrets/app/d", headers=api.auth())
    assert (await resp.json())["deleted"] == [2]
    await problem(await api.client.get("/v1/secrets/app/d", headers=api.auth()), 404, "not-found")
    assert (await api.get("app/d", version=1))["value"] == "one"
    resp = await api.client.post("/v1/secrets/app/d/undelete", json={"versions": [2]}, headers=api.auth())
    assert (await resp.json())["undeleted"] == [2]
    assert (await api.get("app/d"))["value"] == "two"
    resp = await api.client.post("/v1/secrets/app/d/destroy", json={"versions": [1]}, headers=api.auth())
    assert (await resp.json())["destroyed"] == [1]
    await problem(await api.client.get("/v1/secrets/app/d?version=1", headers=api.auth()), 404, "not-found")
    resp = await api.client.post("/v1/secrets/app/d/undelete", json={"versions": [1]}, headers=api.auth())
    assert (await resp.json())["undeleted"] == []
    rows = db_rows(api.daemon.settings.require_data_dir(), "SELECT length(ciphertext), state FROM secret_versions "
                   "WHERE path='app/d' ORDER BY version")
    assert rows == [(0, "destroyed"), (rows[1][0], "active")]
    resp = await api.client.post("/v1/secrets/app/d/delete", json={"versions": [1, 2]}, headers=api.auth())
    assert (await resp.json())["deleted"] == [2]


async def test_delete_of_missing_secret_is_404(api: Api) -> None:
    await problem(await api.client.delete("/v1/secrets/app/none", headers=api.auth()), 404, "not-found")


async def test_keeps_at_most_max_versions(api: Api) -> None:
    for i in range(12):
        await api.put("app/many", f"v{i}")
    resp = await api.client.get("/v1/metadata/app/many", headers=api.auth())
    assert [v["version"] for v in (await resp.json())["versions"]] == list(range(3, 13))
    await problem(await api.client.get("/v1/secrets/app/many?version=2", headers=api.auth()), 404, "not-found")


# -- keyring and status -------------------------------------------------------------------------
async def test_keyring_rotation_keeps_old_values_readable(api: Api) -> None:
    await api.put("app/r", "before")
    resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
    assert (await resp.json())["active_term"] == 2
    await api.put("app/r", "after")
    assert (await api.get("app/r", version=1))["value"] == "before"
    assert (await api.get("app/r"))["value"] == "after"
    terms = db_rows(api.daemon.settings.require_data_dir(), "SELECT term FROM secret_versions ORDER BY version")
    assert terms == [(1,), (2,)]


async def test_status(api: Api) -> None:
    resp = await api.client.get("/v1/sys/status", headers=api.auth())
    body = await resp.json()
    assert body["initialized"] is True and body["sealed"] is False
    assert body["provider"] == "file" and body["key_id"].startswith("file-")
    assert body["active_term"] == 1 and body["version"]


async def test_health_and_ready_need_no_token(api: Api) -> None:
    assert (await api.client.get("/healthz")).status == 200
    resp = await api.client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_openapi_document(api: Api) -> None:
    resp = await api.client.get("/v1/openapi.json")
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/secrets/{path}", "/v1/auth/tokens", "/v1/sys/status"} <= set(doc["paths"])


# -- tokens ---------------------------------------------------------------------------------------
async def test_token_lifecycle(api: Api) -> None:
    resp = await api.client.post("/v1/auth/tokens", json={"client": "svc", "policies": ["root"], "ttl_seconds": 60},
                                 headers=api.auth())
    assert resp.status == 201
    created = await resp.json()
    token = created["token"]
    assert token.startswith("sdt_") and created["expires_at"]
    assert (await api.client.get("/v1/auth/whoami", headers=api.auth(token))).status == 200
    listing = await (await api.client.get("/v1/auth/tokens", headers=api.auth())).json()
    assert token not in json.dumps(listing)
    assert created["token_id"] in [t["token_id"] for t in listing["tokens"]]
    resp = await api.client.delete(f"/v1/auth/tokens/{created['token_id']}", headers=api.auth())
    assert resp.status == 200
    await problem(await api.client.get("/v1/auth/whoami", headers=api.auth(token)), 401, "unauthenticated")
    await problem(await api.client.delete(f"/v1/auth/tokens/{created['token_id']}", headers=api.auth()),
                  404, "not-found")


async def test_tokens_are_stored_only_as_hashes(api: Api) -> None:
    token = await api.token("svc", "root")
    secret_part = token.split("_", 2)[2]
    dump = "\n".join(sqlite3.connect(api.daemon.settings.require_data_dir() / "secretsd.db").iterdump())
    assert token not in dump and secret_part not in dump and api.admin.split("_", 2)[2] not in dump


async def test_expired_token_is_refused(api: Api) -> None:
    resp = await api.client.post("/v1/auth/tokens", json={"client": "svc", "policies": ["root"], "ttl_seconds": 1},
                                 headers=api.auth())
    token = (await resp.json())["token"]
    from datetime import timedelta

    token_auth = next(a for a in api.daemon.authenticators if isinstance(a, TokenAuthenticator))
    real = token_auth._clock
    token_auth._clock = lambda: real() + timedelta(seconds=5)
    await problem(await api.client.get("/v1/auth/whoami", headers=api.auth(token)), 401, "unauthenticated")


@pytest.mark.parametrize("body", [
    {"client": "svc", "policies": []},
    {"client": "bad name", "policies": ["root"]},
    {"client": "svc", "policies": ["no-such-policy"]},
    {"client": "svc", "policies": ["root"], "ttl_seconds": 0},
    {"client": "svc"},
])
async def test_bad_token_requests(api: Api, body: dict[str, object]) -> None:
    await problem(await api.client.post("/v1/auth/tokens", json=body, headers=api.auth()), 400, "invalid-request")
