"""Issue 12, items 5 and 6: reserved client names, the last root token, offline `token create-root`."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from keyproviders.pkcs11 import create_key
from secretsd import tokens
from secretsd.auth.token import TokenAuthenticator
from secretsd.clock import utcnow
from secretsd.domain.identity import Principal
from secretsd.domain.policy import ROOT_POLICY, PolicyStore
from secretsd.domain.token_service import TokenService, check_client_name, refuse_revoking_the_last_root_token
from secretsd.errors import ConflictError, RequestError
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import build_storage, initialize_store
from secretsd.storage import KeyringTerm, TokenRecord
from secretsd.storage.postgres import PostgresStorage
from softhsm.pytest_plugin import SoftHSMToken
from tests.conftest import Api, running
from tests.helpers import DaemonProcess, http, init_store, run_cli
from tests.postgres_fixture import PostgresServer, fresh_database, start_or_skip
from tests.test_api import problem
from tests.test_hsm import write_config

POLICY_FILE = """
[policies.ops]
rules = [{ path = "sys/tokens", allow = ["admin"] }]

[policies.reader]
rules = [{ path = "app/**", allow = ["read"] }]
"""


@pytest.fixture
async def papi(tmp_path: Path) -> AsyncIterator[Api]:
    policy = tmp_path / "policies.toml"
    policy.write_text(POLICY_FILE)
    settings = load_settings(None, data_dir=tmp_path / "data", policy_file=policy)
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        yield api


def token_rows(data_dir: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(data_dir / "secretsd.db")
    try:
        return conn.execute("SELECT token_id, client, revoked_at FROM tokens ORDER BY token_id").fetchall()
    finally:
        conn.close()


async def token_id_of(api: Api, token: str) -> str:
    resp = await api.client.get("/v1/auth/whoami", headers=api.auth(token))
    assert resp.status == 200, await resp.text()
    parsed = tokens.parse_token(token)
    assert parsed is not None
    return tokens.display_id(parsed[0])


# -- item 5: reserved client names ----------------------------------------------------------------
RESERVED = ["admin", "system", "root", "init", "recovery", "Admin", "SYSTEM", "system.scheduler",
            "system-hooks", "secretsd", "secretsd-worker"]
ALLOWED = ["billing", "admin-bob", "ops-admin", "systems-team", "rooted", "svc@example.org"]


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_client_names_cannot_be_given_to_tokens(name: str) -> None:
    with pytest.raises(RequestError, match="reserved"):
        check_client_name(name)


@pytest.mark.parametrize("name", ALLOWED)
def test_ordinary_client_names_are_not_reserved(name: str) -> None:
    check_client_name(name)


async def test_api_refuses_reserved_client_names_from_root_and_delegated_admins(papi: Api) -> None:
    ops = await papi.token("ops-bot", "ops")
    before = token_rows(papi.daemon.settings.require_data_dir())
    for creator in (papi.admin, ops):
        for name in ("admin", "system", "System", "root", "init", "system.rotation"):
            policies = ["root"] if creator == papi.admin else ["ops"]
            resp = await papi.client.post("/v1/auth/tokens", json={"client": name, "policies": policies},
                                          headers=papi.auth(creator))
            doc = await problem(resp, 400, "invalid-request")
            assert "reserved" in str(doc["detail"]) and name in str(doc["detail"])
    assert token_rows(papi.daemon.settings.require_data_dir()) == before


def test_cli_refuses_reserved_client_names(daemon_process: tuple[DaemonProcess, str]) -> None:
    daemon, token = daemon_process
    env = {"SECRETSD_ADDR": daemon.url, "SECRETSD_TOKEN": token}
    result = run_cli("token", "create", "--client", "system", "--policy", "root", env=env)
    assert result.returncode == 1 and "reserved" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_tokens_stored_with_reserved_names_before_this_release_keep_working(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data")
    admin = (await initialize_store(settings)).admin_token
    old = tokens.generate_token()
    storage = build_storage(settings)
    await storage.open()
    await storage.create_token(TokenRecord(
        token_id=old.token_id, secret_hash=old.secret_hash, client="system", policies=(ROOT_POLICY,),
        created_at=utcnow(), created_by="delegate"))
    await storage.close()
    with caplog.at_level(logging.WARNING, logger="secretsd"):
        async with running(settings, admin) as api:
            resp = await api.client.get("/v1/auth/whoami", headers=api.auth(old.token))
            assert resp.status == 200 and (await resp.json())["client"] == "system"
    warned = [r.getMessage() for r in caplog.records if "reserved" in r.getMessage()]
    assert len(warned) == 1 and tokens.display_id(old.token_id) in warned[0]
    assert old.token not in warned[0]
    # The store's own admin token (client "admin", made by init) is not worth a warning.
    assert "'admin'" not in warned[0]


# -- item 6: the last root token ------------------------------------------------------------------
def _record(token_id: str, *policies: str, expires_in: float | None = None,
            revoked: bool = False) -> TokenRecord:
    now = utcnow()
    return TokenRecord(token_id=token_id, secret_hash=b"h" * 32, client="c", policies=policies,
                       created_at=now, created_by="t",
                       expires_at=now + timedelta(seconds=expires_in) if expires_in is not None else None,
                       revoked_at=now if revoked else None)


def test_refuse_revoking_the_last_root_token() -> None:
    now = utcnow()
    target = _record("a" * 16, ROOT_POLICY)
    with pytest.raises(ConflictError, match="create another"):
        refuse_revoking_the_last_root_token(target, [], now)
    # Others that do not count: not root, expired, revoked.
    others = [_record("b" * 16, "ops"), _record("c" * 16, ROOT_POLICY, expires_in=-1),
              _record("d" * 16, ROOT_POLICY, revoked=True)]
    with pytest.raises(ConflictError):
        refuse_revoking_the_last_root_token(target, others, now)
    refuse_revoking_the_last_root_token(target, [*others, _record("e" * 16, ROOT_POLICY, expires_in=60)], now)
    # A token without root, or an expired root token, may always go.
    refuse_revoking_the_last_root_token(_record("f" * 16, "ops"), [], now)
    refuse_revoking_the_last_root_token(_record("f" * 16, ROOT_POLICY, expires_in=-1), [], now)


async def test_the_last_root_token_cannot_revoke_itself(papi: Api) -> None:
    admin_id = await token_id_of(papi, papi.admin)
    resp = await papi.client.delete(f"/v1/auth/tokens/{admin_id}", headers=papi.auth())
    doc = await problem(resp, 409, "conflict")
    assert "create another" in str(doc["detail"]) and "root" in str(doc["detail"])
    assert (await papi.client.get("/v1/auth/tokens", headers=papi.auth())).status == 200  # still works
    assert all(row[2] is None for row in token_rows(papi.daemon.settings.require_data_dir()))


async def test_a_root_token_that_is_not_the_last_can_be_revoked(papi: Api) -> None:
    second = await papi.token("second-admin", "root")
    admin_id = await token_id_of(papi, papi.admin)
    resp = await papi.client.delete(f"/v1/auth/tokens/{admin_id}", headers=papi.auth(second))
    assert resp.status == 200, await resp.text()
    assert (await papi.client.get("/v1/auth/whoami", headers=papi.auth())).status == 401
    # Now `second` is the last one: it cannot revoke itself.
    second_id = await token_id_of(papi, second)
    await problem(await papi.client.delete(f"/v1/auth/tokens/{second_id}", headers=papi.auth(second)),
                  409, "conflict")
    # A short-lived root token does not count once it has expired; one still valid does.
    short = (await (await papi.client.post("/v1/auth/tokens", json={
        "client": "short", "policies": ["root"], "ttl_seconds": 3600}, headers=papi.auth(second))).json())
    resp = await papi.client.delete(f"/v1/auth/tokens/{second_id}", headers=papi.auth(short["token"]))
    assert resp.status == 200, await resp.text()


async def test_two_concurrent_revocations_of_the_last_two_root_tokens_do_not_both_succeed(papi: Api) -> None:
    second = await papi.token("second-admin", "root")
    first_id, second_id = await token_id_of(papi, papi.admin), await token_id_of(papi, second)
    responses = await asyncio.gather(
        papi.client.delete(f"/v1/auth/tokens/{second_id}", headers=papi.auth()),
        papi.client.delete(f"/v1/auth/tokens/{first_id}", headers=papi.auth(second)),
    )
    # 401: one was revoked before the other request was authenticated; never two 200s.
    assert sorted(r.status for r in responses) in ([200, 401], [200, 409])
    active = [r for r in token_rows(papi.daemon.settings.require_data_dir()) if r[2] is None]
    assert len(active) == 1


async def test_two_processes_revoking_the_last_two_root_tokens_at_once_leave_one(tmp_path: Path) -> None:
    """The check and the revocation are one storage transaction: two stores on one file race safely."""

    settings = load_settings(None, data_dir=tmp_path / "data")
    await initialize_store(settings)
    stores = [build_storage(settings) for _ in range(2)]
    for s in stores:
        await s.open()
    try:
        extra = tokens.generate_token()
        await stores[0].create_token(_record(extra.token_id, ROOT_POLICY))
        ids = [t.token_id for t in await stores[0].list_tokens()]
        assert len(ids) == 2
        services = [TokenService(s, PolicyStore(None), TokenAuthenticator(s, cache_seconds=0)) for s in stores]
        root = Principal("admin", (ROOT_POLICY,), "token")
        results = await asyncio.gather(services[0].revoke(root, ids[0]), services[1].revoke(root, ids[1]),
                                       return_exceptions=True)
        assert sum(isinstance(r, ConflictError) for r in results) == 1, results
        assert sum(isinstance(r, str) for r in results) == 1, results
        active = [t for t in await stores[0].list_tokens() if t.revoked_at is None]
        assert len(active) == 1
    finally:
        for s in stores:
            await s.close()


# -- item 6: offline recovery, `secretsd token create-root` ---------------------------------------
def audit_records(data_dir: Path, chain: str = "main") -> list[dict[str, object]]:
    path = data_dir / "audit" / f"{chain}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.e2e
def test_create_root_with_the_daemon_stopped_makes_a_working_audited_admin_token(tmp_path: Path) -> None:
    data = tmp_path / "d"
    first = init_store(data)
    daemon = DaemonProcess(data).start()  # the first unseal makes the audit key
    daemon.stop()
    result = run_cli("token", "create-root", "--data-dir", str(data), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    new = doc["token"]
    assert new.startswith("sdt_") and doc["client"] == "admin" and doc["audit_chain"] == "main"
    records = [r for r in audit_records(data) if r.get("action") == "token.create-root"]
    assert len(records) == 1 and records[0]["subject_token"] == doc["token_id"]
    assert new not in (data / "audit" / "main.jsonl").read_text()
    verified = run_cli("audit", "verify", "--data-dir", str(data))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    daemon = DaemonProcess(data).start()
    try:
        listing = http("GET", f"{daemon.url}/v1/auth/tokens", token=new)
        assert listing.status == 200
        first_id = next(t["token_id"] for t in listing.body["tokens"]
                        if t["client"] == "admin" and t["token_id"] != doc["token_id"])
        assert http("DELETE", f"{daemon.url}/v1/auth/tokens/{first_id}", token=new).status == 200
        assert http("GET", f"{daemon.url}/v1/auth/whoami", token=first).status == 401
    finally:
        daemon.stop()
    verified = run_cli("audit", "verify", "--data-dir", str(data))
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.e2e
def test_create_root_while_the_daemon_serves_writes_its_own_chain(tmp_path: Path) -> None:
    data = tmp_path / "d"
    init_store(data)
    daemon = DaemonProcess(data).start()
    try:
        result = run_cli("token", "create-root", "--data-dir", str(data))
        assert result.returncode == 0, result.stderr
        new = next(line.strip() for line in result.stdout.splitlines() if line.strip().startswith("sdt_"))
        assert "main-offline" in result.stdout
        assert http("GET", f"{daemon.url}/v1/auth/tokens", token=new).status == 200
    finally:
        daemon.stop()
    assert [r["action"] for r in audit_records(data, "main-offline")] == ["token.create-root"]
    for env in ({}, {"SECRETSD_AUDIT__CHAIN": "main-offline"}):
        verified = run_cli("audit", "verify", "--data-dir", str(data), env=env)
        assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.e2e
def test_create_root_with_a_wrong_key_file_fails_and_creates_nothing(tmp_path: Path) -> None:
    data, other = tmp_path / "d", tmp_path / "other"
    init_store(data)
    init_store(other)
    DaemonProcess(data).start().stop()
    shutil.copy2(other / "master.key", data / "master.key")
    before_rows, before_log = token_rows(data), (data / "audit" / "main.jsonl").read_bytes()
    result = run_cli("token", "create-root", "--data-dir", str(data), "--json")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert token_rows(data) == before_rows
    assert (data / "audit" / "main.jsonl").read_bytes() == before_log


@pytest.mark.e2e
def test_create_root_on_a_store_that_is_not_initialised_fails_cleanly(tmp_path: Path) -> None:
    result = run_cli("token", "create-root", "--data-dir", str(tmp_path / "none"))
    assert result.returncode == 1 and "not initialised" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()


@pytest.mark.e2e
def test_create_root_with_a_softhsm_key_needs_the_token(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    label = f"kek-{secrets.token_hex(4)}"
    create_key(softhsm_token.provider_options(label), base_dir=softhsm_token.conf.parent)
    spec = {"kind": "pkcs11", **softhsm_token.provider_options(label)}
    config = write_config(tmp_path / "hsm.toml", spec, data_dir=str(tmp_path / "d"))
    run_cli("init", "--config", str(config), "--json", check=True)
    # The token without its PIN is as good as absent: refused, one line, nothing stored.
    bad = write_config(tmp_path / "bad.toml", spec | {"pin_env": "SECRETSD_TEST_BAD_PIN"},
                       data_dir=str(tmp_path / "d"))
    before = token_rows(tmp_path / "d")
    refused = run_cli("token", "create-root", "--config", str(bad), env={"SECRETSD_TEST_BAD_PIN": "000000"})
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert token_rows(tmp_path / "d") == before and not (tmp_path / "d" / "audit").exists()
    # Another key under another label is not the store's key either.
    other = f"kek-{secrets.token_hex(4)}"
    create_key(softhsm_token.provider_options(other), base_dir=softhsm_token.conf.parent)
    impostor = write_config(tmp_path / "other.toml", spec | {"key_label": other}, data_dir=str(tmp_path / "d"))
    refused = run_cli("token", "create-root", "--config", str(impostor))
    assert refused.returncode == 1 and token_rows(tmp_path / "d") == before

    result = run_cli("token", "create-root", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["providers"] == ["pkcs11"]
    verified = run_cli("audit", "verify", "--config", str(config))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    daemon = DaemonProcess(tmp_path / "d", extra_args=["--config", str(config)]).start()
    try:
        assert http("POST", f"{daemon.url}/v1/sys/keyring/rotate", token=doc["token"]).status == 200
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    server = start_or_skip()
    try:
        yield server
    finally:
        server.stop()


async def test_two_replicas_revoking_the_last_two_root_tokens_at_once_leave_one(pg_server: PostgresServer) -> None:
    """PostgreSQL HA: the guard reads the unrevoked tokens FOR UPDATE, so replicas queue behind each other."""
    async with fresh_database(pg_server) as name:
        replicas = [PostgresStorage(pg_server.dsn(name), pool_max=2) for _ in range(2)]
        for r in replicas:
            await r.open()
        try:
            first, second = tokens.generate_token(), tokens.generate_token()
            await replicas[0].initialize({"format": "1"}, KeyringTerm(1, (), utcnow()),
                                         _record(first.token_id, ROOT_POLICY))
            await replicas[0].create_token(_record(second.token_id, ROOT_POLICY))
            services = [TokenService(r, PolicyStore(None), TokenAuthenticator(r, cache_seconds=0))
                        for r in replicas]
            root = Principal("admin", (ROOT_POLICY,), "token")
            results = await asyncio.gather(services[0].revoke(root, second.token_id),
                                           services[1].revoke(root, first.token_id), return_exceptions=True)
            assert sorted(type(r).__name__ for r in results) == ["ConflictError", "str"], results
            assert len([t for t in await replicas[1].list_tokens() if t.revoked_at is None]) == 1
        finally:
            for r in replicas:
                await r.close()
