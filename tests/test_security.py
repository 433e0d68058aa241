"""The invariants of DESIGN.md that the core vault touches, proven against a live in-process server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from secretsd.api.app import PUBLIC_ROUTES, create_app
from secretsd.api.routes import login_paths
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import Daemon, initialize_store
from tests.conftest import Api, running
from tests.test_api import problem

POLICY_FILE = """
[policies.reader]
rules = [
  { path = "app/**", allow = ["read", "list"] },
  { path = "app/secret/*", deny = ["read"] },
]

[policies.ops]
rules = [{ path = "sys/tokens", allow = ["admin"] }]

[policies.nothing]
rules = [{ path = "elsewhere/*", allow = ["read"] }]
"""


@pytest.fixture
async def papi(tmp_path: Path) -> AsyncIterator[Api]:
    policy = tmp_path / "policies.toml"
    policy.write_text(POLICY_FILE)
    settings = load_settings(None, data_dir=tmp_path / "data", policy_file=policy, max_body_bytes=4096,
                             max_value_bytes=2048)
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        yield api


def all_routes(api: Api) -> list[tuple[str, str]]:
    out = []
    for route in api.client.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert path is not None, route  # every route of ours is a plain or templated path
        if route.method in ("HEAD", "*") or path in PUBLIC_ROUTES or path in login_paths():
            continue  # public, or a login that authenticates its caller itself (its own test below)
        concrete = path.replace("{path:.+}", "app/x").replace("{path}", "app/x").replace(
            "{action}", "undelete").replace("{token_id}", "sdt_0000000000000000").replace("{name}", "root")
        out.append((route.method, concrete))
    return out


def db_dump(settings: Settings) -> str:
    """Every stored row, except the audit chain's head: recording a refused request is expected."""
    conn = sqlite3.connect(settings.require_data_dir() / "secretsd.db")
    try:
        return "\n".join(line for line in conn.iterdump() if "audit_head:" not in line)
    finally:
        conn.close()


# -- invariant 2: deny by default; the unauthenticated learn nothing -------------------------------
@pytest.mark.parametrize("header", [None, "Bearer sdt_0123456789abcdef_" + "A" * 43, "Bearer nonsense",
                                    "Basic YWRtaW46YWRtaW4=", "Bearer "])
async def test_every_api_route_refuses_missing_or_unknown_tokens(papi: Api, header: str | None) -> None:
    routes = all_routes(papi)
    assert len(routes) >= 13
    headers = {"Authorization": header} if header else {}
    for method, path in routes:
        resp = await papi.client.request(method, path, headers=headers, json={"value": "x"})
        doc = await problem(resp, 401, "unauthenticated")
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert "app/x" not in str(doc)


@pytest.mark.parametrize("header", [None, "Bearer nonsense"])
async def test_a_login_route_mints_nothing_for_a_caller_without_a_valid_credential(
        papi: Api, header: str | None) -> None:
    # A login's body is the credential: a bad body is a 400, a JWT that does not verify (or JWT login
    # not configured at all, as here) the one bare 401; neither mints a token.
    assert login_paths() == {"/v1/auth/jwt/login"}
    headers = {"Authorization": header} if header else {}
    before = db_dump(papi.daemon.settings).count("INSERT INTO \"tokens\"")
    resp = await papi.client.post("/v1/auth/jwt/login", headers=headers, json={"value": "x"})
    await problem(resp, 400, "invalid-request")
    resp = await papi.client.post("/v1/auth/jwt/login", headers=headers, json={"jwt": "e30.e30.sig"})
    doc = await problem(resp, 401, "unauthenticated")
    # The same refusal as any unauthenticated request: it does not say whether JWT login is configured.
    bare = await problem(await papi.client.get("/v1/auth/whoami"), 401, "unauthenticated")
    assert doc["detail"] == bare["detail"]
    assert db_dump(papi.daemon.settings).count("INSERT INTO \"tokens\"") == before


async def test_unauthenticated_cannot_tell_existing_paths_or_routes(papi: Api) -> None:
    await papi.put("app/exists", "v")
    bodies = []
    for path in ("/v1/secrets/app/exists", "/v1/secrets/app/missing", "/v1/no-such-route", "/v1/secrets/a/../b"):
        resp = await papi.client.get(path)
        doc = await problem(resp, 401, "unauthenticated")
        doc.pop("request_id")
        bodies.append(doc)
    assert all(b == bodies[0] for b in bodies)


async def test_denied_client_gets_403_without_existence_hint(papi: Api) -> None:
    await papi.put("app/secret/k", "classified")
    reader = await papi.token("svc", "reader")
    docs = []
    for path in ("app/secret/k", "app/secret/missing"):
        doc = await problem(await papi.client.get(f"/v1/secrets/{path}", headers=papi.auth(reader)),
                            403, "permission-denied")
        docs.append(doc["detail"].replace(path, "P"))
    assert docs[0] == docs[1]
    assert (await papi.get("app/secret/k"))["value"] == "classified"  # admin still can


async def test_policy_grants_only_what_it_says(papi: Api) -> None:
    await papi.put("app/a", "va")
    reader = await papi.token("svc", "reader")
    assert (await papi.get("app/a", token=reader))["value"] == "va"
    resp = await papi.client.put("/v1/secrets/app/a", json={"value": "x"}, headers=papi.auth(reader))
    await problem(resp, 403, "permission-denied")
    resp = await papi.client.get("/v1/secrets", params={"prefix": "app"}, headers=papi.auth(reader))
    assert resp.status == 200
    resp = await papi.client.get("/v1/secrets", params={"prefix": ""}, headers=papi.auth(reader))
    await problem(resp, 403, "permission-denied")
    for method, path in [("GET", "/v1/sys/status"), ("POST", "/v1/sys/keyring/rotate"),
                         ("GET", "/v1/auth/tokens"), ("DELETE", "/v1/secrets/app/a")]:
        await problem(await papi.client.request(method, path, headers=papi.auth(reader)), 403, "permission-denied")
    assert (await papi.get("app/a"))["version"] == 1


async def test_token_with_unrelated_policy_is_denied_everywhere(papi: Api) -> None:
    nothing = await papi.token("svc", "nothing")
    for method, path in all_routes(papi):
        if path == "/v1/auth/whoami":
            continue
        if path == "/v1/auth/tokens/renew-self":
            # A token's own renewal needs no policy (as Vault's default policy grants it): it gains
            # no right, and a token made without a max TTL does not move (tests/test_token_renewal.py).
            resp = await papi.client.request(method, path, headers=papi.auth(nothing))
            assert resp.status == 200 and (await resp.json())["expires_at"] is None
            continue
        if path == "/v1/secrets:batch":
            # Decided per item, on each item's path: every item is refused, nothing is written.
            resp = await papi.client.request(method, path, headers=papi.auth(nothing),
                                             json={"items": [{"path": "app/a", "value": "x"}]})
            assert resp.status == 200 and [r["status"] for r in (await resp.json())["results"]] == [403]
            continue
        resp = await papi.client.request(method, path, headers=papi.auth(nothing), json={"value": "x"})
        assert resp.status == 403, (method, path, resp.status)


async def test_token_admin_cannot_mint_root(papi: Api) -> None:
    ops = await papi.token("ops-bot", "ops")
    resp = await papi.client.post("/v1/auth/tokens", json={"client": "evil", "policies": ["root"]},
                                  headers=papi.auth(ops))
    await problem(resp, 403, "permission-denied")
    resp = await papi.client.post("/v1/auth/tokens", json={"client": "helper", "policies": ["ops"]},
                                  headers=papi.auth(ops))
    assert resp.status == 201


async def test_policy_check_names_the_deciding_rule(papi: Api) -> None:
    await papi.token("svc", "reader")
    resp = await papi.client.post("/v1/sys/policy/check", json={"client": "svc", "capability": "read",
                                                                 "path": "app/secret/k"}, headers=papi.auth())
    body = await resp.json()
    assert body["allowed"] is False and body["rule"] == {"policy": "reader", "index": 2, "path": "app/secret/*",
                                                          "effect": "deny"}
    resp = await papi.client.post("/v1/sys/policy/check", json={"client": "svc", "capability": "write",
                                                                 "path": "app/x"}, headers=papi.auth())
    body = await resp.json()
    assert body["allowed"] is False and body["rule"] is None and "default" in body["explanation"]
    resp = await papi.client.post("/v1/sys/policy/check", json={"client": "ghost", "capability": "read",
                                                                 "path": "app/x"}, headers=papi.auth())
    await problem(resp, 404, "not-found")


# -- invariant 5: bad input is a 4xx problem and changes nothing -----------------------------------
BAD_REQUESTS = [
    ("PUT", "/v1/secrets/app/k", b"{not json", 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b"[1, 2]", 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b"", 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b'{"value": 5}', 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b'{"value": "x", "cas": -1}', 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b'{"value": "x", "cas": "1"}', 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b'{"value": "x", "surprise": 1}', 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b'{"value": "x", "metadata": {"a": 1}}', 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b"\xff\xfe", 400, "invalid-request"),
    ("PUT", "/v1/secrets/app/k", b'{"value": "' + b"x" * 3000 + b'"}', 413, "payload-too-large"),
    ("PUT", "/v1/secrets/app/k", b'{"value": "' + b"x" * 9000 + b'"}', 413, "payload-too-large"),
    ("PUT", "/v1/secrets/app//k", b'{"value": "x"}', 400, "invalid-path"),
    ("PUT", "/v1/secrets/app/%2E%2E/k", b'{"value": "x"}', 400, "invalid-path"),
    ("PUT", "/v1/secrets/app/%2E/k", b'{"value": "x"}', 400, "invalid-path"),
    ("PUT", "/v1/secrets/app/k%20x", b'{"value": "x"}', 400, "invalid-path"),
    ("PUT", "/v1/secrets/sys/status", b'{"value": "x"}', 400, "invalid-path"),
    ("PUT", "/v1/secrets/" + "a/" * 20 + "b", b'{"value": "x"}', 400, "invalid-path"),
    ("GET", "/v1/secrets/app/k?version=abc", None, 400, "invalid-request"),
    ("GET", "/v1/secrets/app/k?version=0", None, 400, "invalid-request"),
    ("GET", "/v1/secrets?prefix=a//b", None, 400, "invalid-path"),
    ("GET", "/v1/secrets?limit=0", None, 400, "invalid-request"),
    ("GET", "/v1/secrets?limit=5000", None, 400, "invalid-request"),
    ("POST", "/v1/secrets/app/k/destroy", b'{"versions": []}', 400, "invalid-request"),
    ("POST", "/v1/secrets/app/k/destroy", b'{"versions": [0]}', 400, "invalid-request"),
    ("POST", "/v1/secrets/app/k/undelete", b'{"versions": "1"}', 400, "invalid-request"),
    ("POST", "/v1/sys/policy/check", b'{"client": "a", "capability": "fly", "path": "x"}', 400, "invalid-request"),
    ("PATCH", "/v1/secrets/app/k", b"{}", 405, "method-not-allowed"),
    ("GET", "/v1/nothing-here", None, 404, "not-found"),
]


@pytest.mark.parametrize(("method", "path", "raw", "status", "slug"), BAD_REQUESTS)
async def test_bad_input_is_a_problem_document_and_changes_nothing(
    papi: Api, method: str, path: str, raw: bytes | None, status: int, slug: str
) -> None:
    await papi.put("app/k", "original")
    before = db_dump(papi.daemon.settings)
    from yarl import URL

    resp = await papi.client.request(method, URL(path, encoded=True), data=raw,
                                     headers=papi.auth() | {"Content-Type": "application/json"})
    doc = await problem(resp, status, slug)
    assert "original" not in str(doc) and "xxxx" not in str(doc)
    assert db_dump(papi.daemon.settings) == before
    assert (await papi.get("app/k"))["value"] == "original"


async def test_validation_errors_never_echo_the_value(papi: Api) -> None:
    resp = await papi.client.put("/v1/secrets/app/k", json={"value": "hunter2-secret", "cas": "not-a-number"},
                                 headers=papi.auth())
    doc = await problem(resp, 400, "invalid-request")
    assert "hunter2" not in str(doc) and "cas" in doc["detail"]


# -- the AEAD binding: a ciphertext moved to another row fails to open -----------------------------
async def test_ciphertext_copied_to_another_path_or_version_fails(papi: Api) -> None:
    await papi.put("app/a", "value-a")
    await papi.put("app/b", "value-b")
    await papi.put("app/b", "value-b2")
    db = papi.daemon.settings.require_data_dir() / "secretsd.db"

    def edit(sql: str) -> None:
        conn = sqlite3.connect(db)
        conn.execute(sql)
        conn.commit()
        conn.close()

    # Another path's ciphertext and nonce, pasted over app/b version 2:
    edit("UPDATE secret_versions SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM secret_versions "
         "WHERE path='app/a' AND version=1) WHERE path='app/b' AND version=2")
    resp = await papi.client.get("/v1/secrets/app/b", headers=papi.auth())
    doc = await problem(resp, 500, "internal")
    assert "value-a" not in str(doc)
    # The same path's older version, pasted over the newer one:
    edit("UPDATE secret_versions SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM secret_versions "
         "WHERE path='app/b' AND version=1) WHERE path='app/b' AND version=2")
    await problem(await papi.client.get("/v1/secrets/app/b", headers=papi.auth()), 500, "internal")
    # A row relabelled with another term:
    edit("UPDATE secret_versions SET term = 2 WHERE path='app/a'")
    await papi.client.post("/v1/sys/keyring/rotate", headers=papi.auth())
    await problem(await papi.client.get("/v1/secrets/app/a", headers=papi.auth()), 500, "internal")
    assert (await papi.get("app/b", version=1))["value"] == "value-b"


# -- invariant 1: no plaintext at rest ---------------------------------------------------------------
async def test_no_plaintext_value_or_token_in_database_files(papi: Api) -> None:
    marker = "PLAINTEXT-MARKER-7f3a9c"
    for i in range(5):
        await papi.put(f"app/p{i}", f"{marker}-{i}")
    token = await papi.token("svc", "reader")
    await asyncio.sleep(0)
    data_dir = papi.daemon.settings.require_data_dir()
    files = [p for p in data_dir.iterdir() if p.is_file()]
    assert any(p.name.endswith("-wal") for p in files)
    for path in files:
        blob = path.read_bytes()
        assert marker.encode() not in blob, path.name
        assert token.encode() not in blob and token.split("_", 2)[2].encode() not in blob, path.name
        assert papi.admin.split("_", 2)[2].encode() not in blob, path.name


# -- findings of the first review, each pinned by a test ------------------------------------------------
@pytest.mark.parametrize("query", ["version=%C2%B2", "version=%D9%A3", "version=1e3", "version=-1"])
async def test_non_ascii_digits_are_a_400_not_a_500(papi: Api, query: str) -> None:
    await papi.put("app/k", "v")
    from yarl import URL

    resp = await papi.client.get(URL(f"/v1/secrets/app/k?{query}", encoded=True), headers=papi.auth())
    await problem(resp, 400, "invalid-request")
    resp = await papi.client.get(URL("/v1/secrets?limit=%D9%A3", encoded=True), headers=papi.auth())
    await problem(resp, 400, "invalid-request")


async def test_a_token_has_exactly_one_spelling(papi: Api) -> None:
    import base64

    token = papi.admin
    prefix, last = token[:-1], token[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    siblings = [prefix + c for c in alphabet if c != last
                and base64.urlsafe_b64decode(token.split("_", 2)[2][:-1] + c + "=")
                == base64.urlsafe_b64decode(token.split("_", 2)[2] + "=")]
    assert siblings  # the padding bits give every token three aliases unless they are refused
    for alias in siblings:
        await problem(await papi.client.get("/v1/auth/whoami", headers=papi.auth(alias)), 401, "unauthenticated")


async def test_listing_hides_paths_a_deny_rule_covers(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[policies.lister]\nrules = [{ path = "billing/**", allow = ["list"] },'
                      ' { path = "billing/admin/*", deny = ["list"] }]\n')
    settings = load_settings(None, data_dir=tmp_path / "d", policy_file=policy)
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        client = api.client
        for path in ("billing/a", "billing/admin/key", "billing/b/c"):
            await api.put(path, "v")
        lister = await api.token("l", "lister")
        resp = await client.get("/v1/secrets", params={"prefix": "billing"}, headers=api.auth(lister))
        assert [s["path"] for s in (await resp.json())["secrets"]] == ["billing/a", "billing/b/c"]


async def test_destroy_needs_admin_not_just_delete(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[policies.deleter]\nrules = [{ path = "app/**", allow = ["delete", "read"] }]\n')
    settings = load_settings(None, data_dir=tmp_path / "d", policy_file=policy)
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        client = api.client
        await api.put("app/k", "v1")
        await api.put("app/k", "v2")
        deleter = await api.token("d", "deleter")
        resp = await client.post("/v1/secrets/app/k/delete", json={"versions": [1]}, headers=api.auth(deleter))
        assert resp.status == 200
        resp = await client.post("/v1/secrets/app/k/destroy", json={"versions": [1]}, headers=api.auth(deleter))
        await problem(resp, 403, "permission-denied")
        resp = await client.post("/v1/secrets/app/k/undelete", json={"versions": [1]}, headers=api.auth(deleter))
        assert (await resp.json())["undeleted"] == [1]


async def test_token_admin_cannot_revoke_tokens_with_policies_it_lacks(papi: Api) -> None:
    ops = await papi.token("ops-bot", "ops")
    listing = await (await papi.client.get("/v1/auth/tokens", headers=papi.auth())).json()
    admin_id = next(t["token_id"] for t in listing["tokens"] if t["client"] == "admin")
    await problem(await papi.client.delete(f"/v1/auth/tokens/{admin_id}", headers=papi.auth(ops)),
                  403, "permission-denied")
    assert (await papi.client.get("/v1/auth/whoami", headers=papi.auth())).status == 200
    peer = await (await papi.client.post("/v1/auth/tokens", json={"client": "peer", "policies": ["ops"]},
                                         headers=papi.auth(ops))).json()
    assert (await papi.client.delete(f"/v1/auth/tokens/{peer['token_id']}", headers=papi.auth(ops))).status == 200


async def test_a_token_cannot_outlive_its_creator(papi: Api) -> None:
    resp = await papi.client.post("/v1/auth/tokens", json={"client": "tmp", "policies": ["ops"], "ttl_seconds": 60},
                                  headers=papi.auth())
    short = (await resp.json())["token"]
    for body in ({"client": "x", "policies": ["ops"]}, {"client": "x", "policies": ["ops"], "ttl_seconds": 3600}):
        resp = await papi.client.post("/v1/auth/tokens", json=body, headers=papi.auth(short))
        doc = await problem(resp, 403, "permission-denied")
        assert "outlive" in doc["detail"]
    resp = await papi.client.post("/v1/auth/tokens", json={"client": "x", "policies": ["ops"], "ttl_seconds": 30},
                                  headers=papi.auth(short))
    assert resp.status == 201


async def test_readyz_is_public_so_it_names_no_files(papi: Api) -> None:
    await papi.daemon.storage.close()
    resp = await papi.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["checks"]["storage"] == "unavailable"
    assert "/" not in json.dumps(body["checks"])


async def test_failed_automatic_rotation_does_not_fail_a_committed_write(tmp_path: Path) -> None:
    from keyproviders import ProviderUnavailableError

    settings = load_settings(None, data_dir=tmp_path / "d", max_encryptions_per_term=3)
    admin = (await initialize_store(settings)).admin_token
    daemon = Daemon(settings)
    await daemon.start()
    client = TestClient(TestServer(create_app(daemon)))
    await client.start_server()
    api = Api(client, daemon, admin)
    provider = daemon.providers.available()[0]
    real_wrap = provider.wrap
    try:
        await api.put("app/a", "1")
        await api.put("app/a", "2")

        def broken(key: bytes, aad: bytes) -> object:  # a fault we cannot otherwise provoke
            raise ProviderUnavailableError("token gone")

        provider.wrap = broken  # type: ignore[method-assign, assignment]
        await api.put("app/a", "3")  # reaches the limit; rotation fails; the write still succeeded
        await api.put("app/a", "4")
        assert daemon.barrier.active_term == 1
        provider.wrap = real_wrap  # type: ignore[method-assign]
        await api.put("app/a", "5")
        assert daemon.barrier.active_term == 2
        assert [(await api.get("app/a", version=v))["value"] for v in range(1, 6)] == ["1", "2", "3", "4", "5"]
    finally:
        await client.close()
        await daemon.stop()


def test_client_maps_problem_types_back_to_the_right_classes() -> None:
    from secretsd import errors
    from secretsd.problems import PROBLEMS, error_from_problem

    assert type(error_from_problem({"type": "urn:jarvis-secretsd:problem:internal"}, 500)) is errors.SecretsdError
    assert type(error_from_problem({"type": "urn:jarvis-secretsd:problem:provider-unavailable"}, 503)) \
        is errors.ProviderUnavailable
    for cls, ptype in PROBLEMS.items():
        back = error_from_problem({"type": ptype.uri, "detail": "d"}, ptype.status)
        assert isinstance(back, errors.SecretsdError) and back.message == "d"
        if ptype.slug not in ("internal", "provider-unavailable", "permission-denied"):
            assert type(back) is cls or issubclass(cls, type(back)), (cls, back)


async def test_a_term_past_its_hard_limit_stops_sealing_when_no_new_term_can_be_made(tmp_path: Path) -> None:
    from keyproviders import ProviderUnavailableError

    settings = load_settings(None, data_dir=tmp_path / "d", max_encryptions_per_term=2)
    async with running(settings) as api:
        provider = api.daemon.providers.available()[0]

        def broken(key: bytes, aad: bytes) -> object:  # a provider down for good: inject it
            raise ProviderUnavailableError("token gone")

        provider.wrap = broken  # type: ignore[method-assign, assignment]
        for i in range(4):  # the limit is 2, the hard limit 4: these still succeed
            await api.put("app/a", str(i))
        resp = await api.client.put("/v1/secrets/app/a", json={"value": "5"}, headers=api.auth())
        doc = await problem(resp, 503, "provider-unavailable")
        assert "hard" not in doc["type"] and "sealed 4 values" in doc["detail"]
        assert (await api.get("app/a"))["value"] == "3"


# -- findings of the second review, each pinned by a test ------------------------------------------------
async def test_list_cursor_never_names_a_hidden_path(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[policies.app]\nrules = [{ path = "app/**", allow = ["list"] },'
                      ' { path = "app/hidden/**", deny = ["list"] }]\n')
    async with running(load_settings(None, data_dir=tmp_path / "d", policy_file=policy)) as api:
        for path in ("app/a", "app/b", "app/hidden/x", "app/hidden/y", "app/z"):
            await api.put(path, "v")
        token = await api.token("app", "app")
        seen, after = [], ""
        for _ in range(10):
            resp = await api.client.get("/v1/secrets", params={"prefix": "app", "limit": "2", "after": after},
                                        headers=api.auth(token))
            page = await resp.json()
            assert "hidden" not in json.dumps(page)
            seen += [s["path"] for s in page["secrets"]]
            after = page["next_after"]
            if not after:
                break
        assert seen == ["app/a", "app/b", "app/z"]


@pytest.mark.parametrize("body", [
    b'{"value": "\\ud800x"}',
    b'{"value": "x", "metadata": {"k": "a\\u0000b"}}',
    b'{"value": "x", "expires_at": "9999-12-31T23:59:59-14:00"}',
    b'{"value": "x", "expires_at": 1.5}',
    b'{"value": "x", "expires_at": "2000-01-01T00:00:00Z"}',
    b"[" * 100_000 + b"]" * 100_000,
])
async def test_odd_json_is_a_400_on_write_and_rotate(papi: Api, body: bytes) -> None:
    await papi.put("app/k", "original")
    for method, path in (("PUT", "/v1/secrets/app/k"), ("POST", "/v1/secrets/app/k/rotate")):
        resp = await papi.client.request(method, path, data=body,
                                         headers=papi.auth() | {"Content-Type": "application/json"})
        assert resp.status in (400, 413), (method, body[:40], resp.status, await resp.text())
    assert (await papi.get("app/k"))["value"] == "original"


async def test_wildcards_for_secrets_never_grant_system_resources(tmp_path: Path) -> None:
    from secretsd.domain.policy import Capability, PolicySet

    policies = PolicySet.from_mapping({"policies": {
        "broad": {"rules": [{"path": "**", "allow": ["read", "admin", "list"]},
                            {"path": "*/*", "allow": ["admin"]}]},
        "ops": {"rules": [{"path": "sys/tokens", "allow": ["admin"]}]},
    }})
    for resource in ("sys/tokens", "sys/keyring", "sys/policy", "sys/status", "sys/metrics"):
        for cap in (Capability.READ, Capability.ADMIN):
            assert not policies.decide(["broad"], cap, resource).allowed, resource
    assert policies.decide(["broad"], Capability.READ, "app/x").allowed
    assert policies.decide(["ops"], Capability.ADMIN, "sys/tokens").allowed
    assert policies.decide(["root"], Capability.ADMIN, "sys/keyring").allowed


async def test_revoking_with_a_whole_token_never_echoes_its_secret(papi: Api) -> None:
    token = await papi.token("svc", "reader")
    secret_part = token.split("_", 2)[2]
    resp = await papi.client.delete(f"/v1/auth/tokens/{token}", headers=papi.auth())
    assert resp.status == 200 and secret_part not in await resp.text()
    resp = await papi.client.delete(f"/v1/auth/tokens/{token}", headers=papi.auth())
    assert resp.status == 404 and secret_part not in await resp.text()
    resp = await papi.client.delete("/v1/auth/tokens/sdt_zz_" + secret_part, headers=papi.auth())
    assert resp.status == 404 and secret_part not in await resp.text()
    log = papi.daemon.settings.audit.log_path(papi.daemon.settings.require_data_dir()).read_text()
    assert secret_part not in log


async def test_rule_a_token_pasted_into_a_path_or_request_id_is_never_recorded(
    papi: Api, caplog: pytest.LogCaptureFixture
) -> None:
    token = await papi.token("svc", "reader")
    token_id, secret_part = token.split("_", 2)[1:]
    cut = token[:40]  # part of a token is still part of a token
    for path in (f"app/{token}", f"app/{cut}", f"{token}/x"):
        for headers in (papi.auth(), {}):  # by an admin, and by nobody
            resp = await papi.client.get(f"/v1/secrets/{path}", headers=headers)
            assert resp.status in (401, 404), await resp.text()
            assert secret_part[:8] not in await resp.text()
    resp = await papi.client.get("/v1/secrets/app/x", headers={**papi.auth(), "X-Request-Id": token})
    assert resp.headers["X-Request-Id"] != token and secret_part[:8] not in str(resp.headers)
    log = papi.daemon.settings.audit.log_path(papi.daemon.settings.require_data_dir()).read_text()
    for text in (log, caplog.text):
        assert secret_part[:8] not in text and cut[-8:] not in text
    assert f"sdt_{token_id}_[redacted]" in log  # whose token it was stays visible, to revoke it


def test_a_malformed_client_token_is_refused_without_echoing_it() -> None:
    from secretsd.client import SecretsClient
    from secretsd.errors import ConfigError

    token = "sdt_0123456789abcdef_" + "A" * 43
    with pytest.raises(ConfigError) as info:
        SecretsClient("http://127.0.0.1:1", token + "\r")
    assert token not in str(info.value) and "A" * 10 not in str(info.value)


async def test_a_hook_serves_only_the_paths_it_was_configured_for(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[policies.rot]\nrules = [{ path = "app/**", allow = ["read", "rotate"] }]\n')
    settings = load_settings(None, data_dir=tmp_path / "d", policy_file=policy, rotation={
        "scheduler": False,
        "hooks": {"db-users": {"paths": ["db/**"], "command": ["/bin/true"]},
                  "app-hook": {"paths": ["app/**"], "command": ["/bin/true"]}},
    })
    async with running(settings) as api:
        await api.put("app/a", "v")
        rot = await api.token("rot", "rot")
        resp = await api.client.put("/v1/metadata/app/a", json={"rotation": {"hook": "db-users"}},
                                    headers=api.auth(rot))
        doc = await problem(resp, 400, "invalid-request")
        assert "app-hook" not in doc["detail"]  # no list of the other hooks
        resp = await api.client.put("/v1/metadata/app/a", json={"rotation": {"hook": "no-such"}},
                                    headers=api.auth(rot))
        assert (await resp.json())["detail"].replace("no-such", "db-users") == doc["detail"]
        resp = await api.client.put("/v1/metadata/app/a", json={"rotation": {"hook": "app-hook"}},
                                    headers=api.auth(rot))
        assert resp.status == 200
        # Choosing the value needs `write` too; letting the generator choose needs only `rotate`.
        resp = await api.client.post("/v1/secrets/app/a/rotate", json={"value": "mine"}, headers=api.auth(rot))
        await problem(resp, 403, "permission-denied")
        resp = await api.client.post("/v1/secrets/app/a/rotate", headers=api.auth(rot))
        assert resp.status == 200, await resp.text()


def test_recovery_waits_longer_than_the_slowest_hook() -> None:
    from secretsd.domain.rotation_settings import RotationSettings

    with pytest.raises(ValueError, match="pending_timeout_seconds"):
        # As the configuration file gives it: the hook as a table, validated into HookSettings.
        RotationSettings.model_validate({"pending_timeout_seconds": 100, "hooks": {
            "h": {"paths": ["a/*"], "command": ["/bin/true"], "timeout_seconds": 60}}})


async def test_deeply_nested_json_is_a_400(api: Api) -> None:
    resp = await api.client.put("/v1/secrets/app/k", data=b"[" * 50_000 + b"]" * 50_000,
                                headers=api.auth() | {"Content-Type": "application/json"})
    await problem(resp, 400, "invalid-request")
