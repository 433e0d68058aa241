"""The Vault KV v2 façade in process (docs/vault-compat.md): one credential, the same policies and
audit, the value mapping through the API, Vault's shapes, and bad input refused without a change."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from secretsd.api import routes
from secretsd.api.app import create_app
from secretsd.errors import ConfigError
from secretsd.problems import PROBLEM_CONTENT_TYPE
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import Daemon, initialize_store
from tests.conftest import Api
from tests.test_audit import records
from tests.test_routes import _document_pairs, _router_pairs
from tests.test_security import db_dump

POLICIES = """
[policies.app]
rules = [
  { path = "app/**", allow = ["read", "write", "list", "delete"] },
  { path = "app/db", deny = ["read", "write"] },
]
"""


@pytest.fixture
async def vapi(tmp_path: Path) -> AsyncIterator[Api]:
    policy = tmp_path / "policies.toml"
    policy.write_text(POLICIES)
    settings = load_settings(None, data_dir=tmp_path / "data", policy_file=policy, max_value_bytes=2048)
    admin = (await initialize_store(settings)).admin_token
    daemon = Daemon(settings)
    await daemon.start()
    client = TestClient(TestServer(create_app(daemon, vault_mount="secret")))
    await client.start_server()
    try:
        yield Api(client, daemon, admin)
    finally:
        await client.close()
        await daemon.stop()


def vt(token: str) -> dict[str, str]:
    return {"X-Vault-Token": token}


async def vault_error(resp: Any, status: int) -> dict[str, Any]:
    """A façade error: our problem document, with Vault's ``errors`` list beside it."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM_CONTENT_TYPE
    doc = dict(await resp.json())
    assert doc["status"] == status and doc["errors"] == [doc["detail"]]
    return doc


# -- one credential at most --------------------------------------------------------------------
async def test_x_vault_token_is_taken_like_a_bearer_token_on_any_route(vapi: Api) -> None:
    await vapi.put("app/a", "v1")
    resp = await vapi.client.get("/v1/secrets/app/a", headers=vt(vapi.admin))
    assert resp.status == 200 and (await resp.json())["value"] == "v1"
    resp = await vapi.client.get("/v1/secret/data/app/a", headers=vt(vapi.admin))
    assert resp.status == 200 and (await resp.json())["data"]["data"] == {"value": "v1"}
    resp = await vapi.client.get("/v1/secret/data/app/a", headers=vt("sdt_0123456789abcdef_" + "A" * 43))
    doc = await vault_error(resp, 403)  # Vault's status for a bad token, our problem type
    assert doc["type"].endswith(":unauthenticated") and "WWW-Authenticate" not in resp.headers


async def test_one_credential_at_most_both_headers_or_two_vault_tokens_is_a_400(vapi: Api) -> None:
    await vapi.put("app/a", "v1")
    both = {"Authorization": f"Bearer {vapi.admin}", "X-Vault-Token": vapi.admin}
    for path in ("/v1/secrets/app/a", "/v1/secret/data/app/a"):
        resp = await vapi.client.get(path, headers=both)
        assert resp.status == 400, await resp.text()
        assert "one credential" in (await resp.json())["detail"]
    resp = await vapi.client.get("/v1/secret/data/app/a",
                                 headers=[("X-Vault-Token", vapi.admin), ("X-Vault-Token", vapi.admin)])
    assert (await vault_error(resp, 400))["detail"].startswith("send one credential")
    # Not even an empty Authorization beside it: which one counts is never guessed.
    resp = await vapi.client.get("/v1/secrets/app/a", headers={"Authorization": "", "X-Vault-Token": vapi.admin})
    assert resp.status == 400


async def test_every_facade_route_refuses_a_missing_token_with_vaults_403_audited_as_401(vapi: Api) -> None:
    app = vapi.client.app
    assert app is not None
    ops = app[routes.OPERATIONS_KEY]
    seen = 0
    for route in app.router.routes():
        op = ops[route]
        if not op.vault or op.public or route.method == "HEAD":
            continue
        path = op.path.replace("{path:.+}", "app/x").replace("{action}", "undelete")
        resp = await vapi.client.request(route.method, path, json={"data": {"a": "b"}})
        doc = await vault_error(resp, 403)
        assert doc["type"].endswith(":unauthenticated") and "app/x" not in json.dumps(doc)
        seen += 1
    assert seen >= 15
    # Recorded as what they are, unauthenticated (401): the budget that bounds them applies.
    refused = [r for r in records(vapi.daemon.settings) if r["action"].startswith("vault.")]
    assert refused and {(r["outcome"], r["client"]) for r in refused} == {(401, None)}


# -- the same policies and the same audit ---------------------------------------------------------
async def test_a_policy_denying_app_db_denies_secret_data_app_db_and_the_audit_names_the_vault_operation(
        vapi: Api) -> None:
    await vapi.put("app/db", "s3cret")
    await vapi.put("app/other", "fine")
    token = await vapi.token("svc", "app")
    resp = await vapi.client.get("/v1/secret/data/app/db", headers=vt(token))
    assert (await vault_error(resp, 403))["type"].endswith(":permission-denied")
    resp = await vapi.client.post("/v1/secret/data/app/db", headers=vt(token), json={"data": {"value": "x"}})
    await vault_error(resp, 403)
    resp = await vapi.client.get("/v1/secret/data/app/other", headers=vt(token))
    assert resp.status == 200
    assert (await vapi.get("app/db"))["value"] == "s3cret"  # the refused write changed nothing
    vault = [(r["action"], r["path"], r["decision"], r["outcome"]) for r in records(vapi.daemon.settings)
             if r["action"].startswith("vault.")]
    assert vault == [("vault.kv.read", "app/db", "deny", 403), ("vault.kv.write", "app/db", "deny", 403),
                     ("vault.kv.read", "app/other", "allow", 200)]
    assert "s3cret" not in json.dumps(records(vapi.daemon.settings))


async def test_each_facade_operation_is_audited_under_its_own_action(vapi: Api) -> None:
    h = vt(vapi.admin)
    c = vapi.client
    assert (await c.post("/v1/secret/data/app/a", headers=h, json={"data": {"u": "1"}})).status == 200
    assert (await c.patch("/v1/secret/data/app/a", headers=h, json={"data": {"p": "2"}})).status == 200
    assert (await c.get("/v1/secret/metadata/app/a", headers=h)).status == 200
    assert (await c.get("/v1/secret/metadata/app", headers=h, params={"list": "true"})).status == 200
    assert (await c.post("/v1/secret/delete/app/a", headers=h, json={"versions": [1]})).status == 204
    assert (await c.put("/v1/secret/undelete/app/a", headers=h, json={"versions": ["1"]})).status == 204
    assert (await c.post("/v1/secret/destroy/app/a", headers=h, json={"versions": [1]})).status == 204
    assert (await c.delete("/v1/secret/data/app/a", headers=h)).status == 204
    assert (await c.delete("/v1/secret/metadata/app/a", headers=h)).status == 204
    seen = [(r["action"], r["path"]) for r in records(vapi.daemon.settings) if r["action"].startswith("vault.")]
    assert seen == [("vault.kv.write", "app/a"), ("vault.kv.patch", "app/a"), ("vault.kv.metadata", "app/a"),
                    ("vault.kv.list", "app"), ("vault.kv.delete", "app/a"), ("vault.kv.undelete", "app/a"),
                    ("vault.kv.destroy", "app/a"), ("vault.kv.delete", "app/a"),
                    ("vault.kv.delete-metadata", "app/a")]


async def test_an_audit_record_names_what_was_acted_on_never_a_prefix_the_caller_chose(vapi: Api) -> None:
    # A ?prefix= query is the record's path only on an operation that reads one; a Vault list records
    # the prefix it listed, not the spelling of its URL.
    h = vt(vapi.admin)
    c = vapi.client
    assert (await c.post("/v1/secret/data/app/a", headers=h, json={"data": {"u": "1"}})).status == 200
    assert (await c.get("/v1/secret/metadata/", headers=h, params={"list": "true", "prefix": "decoy/x"})).status == 200
    assert (await c.get("/v1/secret/metadata/app/", headers=h, params={"list": "true", "prefix": "decoy/x"})
            ).status == 200
    assert (await c.get("/v1/auth/whoami", headers=h, params={"prefix": "decoy/x"})).status == 200
    assert (await c.get("/v1/secrets", headers=h, params={"prefix": "app"})).status == 200
    seen = [(r["action"], r["path"]) for r in records(vapi.daemon.settings)
            if r["action"] in ("vault.kv.list", "auth.whoami", "secret.list")]
    assert seen == [("vault.kv.list", ""), ("vault.kv.list", "app"), ("auth.whoami", None), ("secret.list", "app")]


async def test_with_the_facade_off_x_vault_token_authenticates_nothing(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data")
    admin = (await initialize_store(settings)).admin_token
    daemon = Daemon(settings)
    await daemon.start()
    try:
        async with TestClient(TestServer(create_app(daemon, vault_mount=None))) as client:
            assert (await client.get("/v1/auth/whoami", headers=vt(admin))).status == 401
            # Beside a bearer token it is not a second credential either: the façade is not there.
            both = {"Authorization": f"Bearer {admin}"} | vt(admin)
            assert (await client.get("/v1/auth/whoami", headers=both)).status == 200
    finally:
        await daemon.stop()


# -- the value mapping through the API -------------------------------------------------------------
async def test_values_map_both_ways_between_the_native_api_and_the_facade(vapi: Api) -> None:
    h = vt(vapi.admin)
    c = vapi.client
    assert (await c.put("/v1/secret/data/app/plain", headers=h, json={"data": {"value": "x"}})).status == 200
    assert (await vapi.get("app/plain"))["value"] == "x"
    assert (await c.put("/v1/secret/data/app/map", headers=h, json={"data": {"user": "a", "pass": "b"}})).status == 200
    assert (await vapi.get("app/map"))["value"] == '{"pass":"b","user":"a"}'
    await vapi.put("app/native", "hello")
    await vapi.put("app/nativemap", '{"k": "v"}')
    await vapi.put("app/numbers", '{"k": 1}')
    resp = await c.put("/v1/secrets/app/bin", headers=vapi.auth(), json={"value_base64": "/wA="})
    assert resp.status == 200
    for path, data in [("app/native", {"value": "hello"}), ("app/nativemap", {"k": "v"}),
                       ("app/numbers", {"value": '{"k": 1}'}), ("app/bin", {"value_base64": "/wA="}),
                       ("app/map", {"user": "a", "pass": "b"})]:
        resp = await c.get(f"/v1/secret/data/{path}", headers=h)
        assert (await resp.json())["data"]["data"] == data, path


async def test_vault_shapes_of_read_write_and_metadata(vapi: Api) -> None:
    h = vt(vapi.admin)
    c = vapi.client
    written = await (await c.post("/v1/secret/data/app/a", headers=h, json={"data": {"u": "1"}})).json()
    assert written["data"]["version"] == 1 and written["data"]["destroyed"] is False
    assert written["data"]["created_time"].endswith("Z") and written["data"]["deletion_time"] == ""
    await c.post("/v1/secret/data/app/a", headers=h, json={"data": {"u": "2"}, "options": {"cas": 1}})
    read = await (await c.get("/v1/secret/data/app/a", headers=h, params={"version": "1"})).json()
    assert read["data"]["data"] == {"u": "1"} and read["data"]["metadata"]["version"] == 1
    meta = (await (await c.get("/v1/secret/metadata/app/a", headers=h)).json())["data"]
    assert meta["current_version"] == 2 and set(meta["versions"]) == {"1", "2"}
    listed = await (await c.get("/v1/secret/metadata/", headers=h, params={"list": "true"})).json()
    assert listed["data"]["keys"] == ["app/"]
    resp = await c.get("/v1/secret/metadata/nothing/here", headers=h, params={"list": "true"})
    await vault_error(resp, 404)
    cfg = await (await c.get("/v1/secret/config", headers=h)).json()
    assert cfg["data"]["max_versions"] == 10
    ui = await (await c.get("/v1/sys/internal/ui/mounts/secret/app/a", headers=h)).json()
    assert ui["data"]["options"] == {"version": "2"} and ui["data"]["path"] == "secret/"
    await vault_error(await c.get("/v1/sys/internal/ui/mounts/other/app", headers=h), 404)
    mounts = await (await c.get("/v1/sys/mounts", headers=h)).json()
    assert mounts["data"]["secret/"]["type"] == "kv"


async def test_sys_health_is_public_with_vaults_codes(vapi: Api) -> None:
    resp = await vapi.client.get("/v1/sys/health")
    assert resp.status == 200 and (await resp.json())["sealed"] is False
    assert (await vapi.client.get("/v1/sys/health", params={"activecode": "299"})).status == 299
    assert (await vapi.client.get("/v1/sys/health", params={"activecode": "99"})).status == 400
    assert (await vapi.client.get("/v1/sys/health", params={"activecode": "x"})).status == 400


async def test_token_lookup_self_and_renew_self_never_echo_the_token(vapi: Api) -> None:
    token = await vapi.token("svc", "app")
    resp = await vapi.client.get("/v1/auth/token/lookup-self", headers=vt(token))
    data = (await resp.json())["data"]
    assert data["policies"] == ["app"] and data["meta"] == {"client": "svc"} and data["id"].startswith("sdt_")
    assert token not in await resp.text()
    resp = await vapi.client.post("/v1/auth/token/renew-self", headers=vt(token), json={"increment": "1h"})
    body = await resp.text()
    assert resp.status == 200 and token not in body
    assert json.loads(body)["auth"]["renewable"] is False


# -- bad input: 4xx, Vault's errors, nothing changed -----------------------------------------------
BAD_WRITES: list[tuple[str, str, bytes, dict[str, str], int]] = [
    ("POST", "data/app/a", b'{"data": {"port": 5432}}', {"Content-Type": "application/json"}, 400),
    ("POST", "data/app/a", b'{"data": {"u": "1"}, "options": {"cas": 7}}', {}, 400),
    ("POST", "data/app/a", b'{"data": {"u": "1"}, "options": {"cas": -1}}', {}, 400),
    ("POST", "data/app/a", b'{"data": {"u": "1"}, "extra": 1}', {}, 400),
    ("POST", "data/app/a", b'{"data": {"u": "1"}}', {"Content-Type": "text/plain"}, 415),
    ("POST", "data/app/a", b'{"data": {"u": "1"}, "data": {"u": "2"}}', {}, 400),
    ("POST", "data/app/a", b"", {}, 400),
    ("POST", "data/app/a", b"[]", {}, 400),
    ("POST", "data/app/a", b'{"data": {"v": "' + b"x" * 4000 + b'"}}', {}, 413),
    ("PUT", "data/sys/a", b'{"data": {"u": "1"}}', {}, 400),
    ("PATCH", "data/app/a", b'{"data": {"u": 1}}', {"Content-Type": "application/merge-patch+json"}, 400),
    ("PATCH", "data/app/none", b'{"data": {"u": "1"}}', {}, 404),
    ("POST", "destroy/app/a", b'{"versions": ["one"]}', {}, 400),
    ("POST", "delete/app/a", b'{"versions": []}', {}, 400),
    ("PUT", "undelete/app/a", b'{"versions": [0]}', {}, 400),
    ("POST", "delete/app/a", b'{"versions": [true]}', {}, 400),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status"), BAD_WRITES)
async def test_bad_input_is_a_4xx_with_vaults_errors_and_changes_nothing(
        vapi: Api, method: str, path: str, body: bytes, headers: dict[str, str], status: int) -> None:
    await vapi.put("app/a", '{"u":"0"}')
    before = db_dump(vapi.daemon.settings)
    headers = vt(vapi.admin) | {"Content-Type": "application/json"} | headers
    resp = await vapi.client.request(method, f"/v1/secret/{path}", data=body, headers=headers)
    await vault_error(resp, status)
    assert db_dump(vapi.daemon.settings) == before


async def test_bad_queries_are_4xx(vapi: Api) -> None:
    await vapi.put("app/a", "x")
    h = vt(vapi.admin)
    for path, params in [("/v1/secret/data/app/a", {"version": "-1"}), ("/v1/secret/data/app/a", {"version": "x"}),
                         ("/v1/secret/data/app/a", {"version": "99999999999"}),
                         ("/v1/secret/metadata/", {}), ("/v1/secret/metadata/app//a", {"list": "true"})]:
        resp = await vapi.client.get(path, headers=h, params=params)
        assert 400 <= resp.status < 500, (path, params, resp.status)
    await vault_error(await vapi.client.get("/v1/secret/data/app/a", headers=h, params={"version": "3"}), 404)


# -- the router, the document and the configuration ------------------------------------------------
async def test_the_facades_routes_are_documented_and_answered_where_configured(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data")
    admin = (await initialize_store(settings)).admin_token
    daemon = Daemon(settings)
    await daemon.start()
    try:
        for mount, other in (("kv", "secret"), (None, "secret")):
            app = create_app(daemon, vault_mount=mount)
            async with TestClient(TestServer(app)) as client:
                doc = await (await client.get("/v1/openapi.json")).json()
                assert _router_pairs(app) == _document_pairs(doc)
                h = vt(admin)
                resp = await client.put(f"/v1/{other}/data/app/a", headers=h, json={"data": {"a": "b"}})
                # With the façade off, X-Vault-Token is no credential at all: unauthenticated first.
                assert resp.status == (404 if mount is not None else 401)
                if mount is not None:
                    assert ("GET", "/v1/kv/data/{path}") in _router_pairs(app)
                    resp = await client.put("/v1/kv/data/app/a", headers=h, json={"data": {"a": "b"}})
                    assert resp.status == 200
                else:
                    assert (await client.get("/v1/sys/health")).status == 401  # no façade, no public route
    finally:
        await daemon.stop()


def test_vault_settings_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[vault]\nenabled = false\nkv_mount = "kv"\n')
    settings = load_settings(config)
    assert settings.vault.enabled is False and settings.vault.kv_mount == "kv"
    assert load_settings(None).vault.kv_mount == "secret" and load_settings(None).vault.enabled
    for bad in ('kv_mount = "sys"', 'kv_mount = "secrets"', 'kv_mount = "a/b"', 'kv_mount = ""', "nope = 1"):
        config.write_text(f"[vault]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_settings(config)


def test_handlers_are_thin_web_handlers() -> None:
    # Every façade operation answers through a coroutine taking only the request (as the native ones).
    import inspect

    from secretsd.api.vault_routes import operations

    for op in operations("secret"):
        assert inspect.iscoroutinefunction(op.handler)
        assert list(inspect.signature(op.handler).parameters) == ["request"], op.path


async def test_a_vault_list_reads_a_bounded_number_of_pages(vapi: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # Vault's LIST has no pages: one request reads at most MAX_LIST_PAGES pages of ours, then refuses.
    from secretsd.api import vault

    for first in (0, 1000):
        items = [{"path": f"app/many/s{n:04d}", "value": "x"} for n in range(first, min(first + 1000, 1001))]
        resp = await vapi.client.post("/v1/secrets:batch", json={"items": items}, headers=vapi.auth())
        assert resp.status == 200, await resp.text()
    h = vt(vapi.admin)
    listed = await vapi.client.get("/v1/secret/metadata/app/many", headers=h, params={"list": "true"})
    assert len((await listed.json())["data"]["keys"]) == 1001
    monkeypatch.setattr(vault, "MAX_LIST_PAGES", 1)
    refused = await vapi.client.get("/v1/secret/metadata/app/many", headers=h, params={"list": "true"})
    assert "page through GET /v1/secrets" in (await vault_error(refused, 400))["detail"]


async def test_sealed_sys_health_is_503_and_the_kv_routes_answer_sealed(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data", unseal_retry_max_seconds=0.5)
    admin = (await initialize_store(settings)).admin_token
    (tmp_path / "data" / "master.key").rename(tmp_path / "master.key.away")  # the key provider cannot unwrap
    daemon = Daemon(settings)
    await daemon.start()
    try:
        async with TestClient(TestServer(create_app(daemon, vault_mount="secret"))) as client:
            resp = await client.get("/v1/sys/health")
            assert resp.status == 503 and (await resp.json())["sealed"] is True
            assert (await client.get("/v1/sys/health", params={"sealedcode": "200"})).status == 200
            resp = await client.get("/v1/secret/data/app/a", headers=vt(admin))
            assert (await vault_error(resp, 503))["type"].endswith(":sealed")
    finally:
        await daemon.stop()
