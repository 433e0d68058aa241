"""Policies as first-class objects (issue 16 item 6): validate offline, list, show, check a policy,
reload over HTTP or SIGHUP (one code path, all or nothing), and the policy file in status and metrics.

In-process daemons behind a real aiohttp server; the CLI through click's CliRunner (a thread, so
the daemon's loop keeps serving while the sync client waits).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from secretsd.cli import main
from secretsd.cli.exits import Exit
from secretsd.domain.policy import Capability, PolicySet, PolicyStore
from secretsd.errors import PolicyFileError
from secretsd.runtime.server import _reload_policies
from tests.conftest import Api, make_settings, running
from tests.test_audit import records

GOOD = '''[policies.svc]
description = "the service"
rules = [
  { path = "app/*", allow = ["read", "list"] },
  { path = "app/admin", deny = ["read"] },
]

[policies.ops]
rules = [{ path = "sys/policy", allow = ["admin"] }]
'''
# The first policy would widen svc to everything; the second fails half-way through the file.
WIDER_THEN_BROKEN = '''[policies.svc]
rules = [{ path = "**", allow = ["read", "write", "list"] }]

[policies.ops]
rules = [{ path = "sys/policy", allow = ["fly"] }]
'''


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args: str, env: dict[str, Any] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env or {}, catch_exceptions=False)


# -- the domain: one load, all or nothing -----------------------------------------------------------
def test_a_reload_that_fails_half_way_never_widens_access(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(GOOD)
    store = PolicyStore(policy)
    before = store.current
    assert before.digest == sha256(policy)
    policy.write_text(WIDER_THEN_BROKEN)
    with pytest.raises(PolicyFileError, match="policy 'ops' rule 1: unknown capability 'fly'"):
        store.reload()
    assert store.current is before  # nothing of the half-parsed file is in force
    assert not store.current.decide(["svc"], Capability.WRITE, "app/k").allowed
    assert not store.last_reload.ok and "unknown capability 'fly'" in (store.last_reload.error or "")
    policy.write_text(GOOD.replace('"read", "list"', '"read"'))
    store.reload()
    assert store.last_reload.ok and store.current.digest == sha256(policy) != before.digest


def test_the_digest_is_of_the_bytes_parsed() -> None:
    data = GOOD.encode()
    assert PolicySet.parse(data, "x").digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert PolicySet.empty().digest is None


# -- policy validate: offline, the daemon's parser --------------------------------------------------
def test_policy_validate_accepts_a_valid_file_with_a_one_line_summary(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(GOOD)
    result = invoke("policy", "validate", str(policy))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{policy}: valid, 3 policies (ops, root, svc), {sha256(policy)}\n"
    doc = json.loads(invoke("policy", "validate", str(policy), "--json").stdout)
    assert doc == {"valid": True, "file": str(policy), "digest": sha256(policy), "policies": ["ops", "root", "svc"]}


@pytest.mark.parametrize(("text", "reason"), [
    ('[policies.svc]\nrules = [{ path = "app/*", allow = ["read"] ]\n', "line 2"),
    (WIDER_THEN_BROKEN, "policy 'ops' rule 1: unknown capability 'fly'"),
    ('[policies.root]\nrules = []\n', "'root' is built in"),
    ('[policies.svc]\nrules = [{ path = "app/**x", allow = ["read"] }]\n', "policy 'svc'"),
    ("[policies.svc]\nrules = 3\n", "'rules' must be a list"),
])
def test_policy_validate_refuses_an_invalid_file_with_a_one_line_error(tmp_path: Path, text: str,
                                                                       reason: str) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(text)
    result = invoke("policy", "validate", str(policy))
    assert result.exit_code == Exit.ERROR and result.stdout == ""
    line, = result.stderr.splitlines()
    assert line.startswith("error: ") and str(policy) in line and reason in line, line
    doc = json.loads(invoke("policy", "validate", str(policy), "--json").stdout)
    assert doc == {"error": {"type": "invalid-policy-file", "status": None, "detail": line.removeprefix("error: "),
                             "exit_code": 1}}


def test_policy_validate_of_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    assert invoke("policy", "validate", str(tmp_path / "nope.toml")).exit_code == Exit.USAGE


# -- the daemon: reload, list, show, check, status, metrics ------------------------------------------
@pytest.fixture
async def papi(tmp_path: Path) -> AsyncIterator[Api]:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD)
    async with running(make_settings(tmp_path / "data", policy_file=policy)) as api:
        await api.put("app/k", "v")
        yield api


def policy_file(api: Api) -> Path:
    path = api.daemon.settings.policy_file
    assert path is not None
    return path


async def status(api: Api) -> dict[str, Any]:
    resp = await api.client.get("/v1/sys/status", headers=api.auth())
    assert resp.status == 200
    policy: dict[str, Any] = (await resp.json())["policy"]
    return policy


async def metrics(api: Api) -> str:
    resp = await api.client.get("/metrics", headers=api.auth())
    assert resp.status == 200
    return await resp.text()


async def test_policy_reload_route_swaps_the_policies_and_reports_the_new_digest(papi: Api) -> None:
    svc = await papi.token("svc", "svc")
    assert (await papi.client.get("/v1/secrets/app/k", headers=papi.auth(svc))).status == 200
    path = policy_file(papi)
    path.write_text(GOOD.replace('allow = ["read", "list"]', 'deny = ["read"]'))
    resp = await papi.client.post("/v1/sys/policy/reload", headers=papi.auth())
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["digest"] == sha256(path) and body["policies"] == ["ops", "root", "svc"]
    assert body["last_reload"]["result"] == "ok" and body["file"] == str(path)
    assert (await papi.client.get("/v1/secrets/app/k", headers=papi.auth(svc))).status == 403


async def test_a_refused_reload_answers_422_with_the_reason_and_keeps_the_policies(papi: Api) -> None:
    svc = await papi.token("svc", "svc")
    before = await status(papi)
    policy_file(papi).write_text(WIDER_THEN_BROKEN)
    resp = await papi.client.post("/v1/sys/policy/reload", headers=papi.auth())
    assert resp.status == 422 and resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["type"].endswith(":invalid-policy-file")
    assert "policy 'ops' rule 1: unknown capability 'fly'" in problem["detail"]
    # Still the old policies: svc reads app/k but does not get the write the broken file granted.
    assert (await papi.client.get("/v1/secrets/app/k", headers=papi.auth(svc))).status == 200
    put = await papi.client.put("/v1/secrets/app/k", json={"value": "x"}, headers=papi.auth(svc))
    assert put.status == 403
    after = await status(papi)
    assert after["digest"] == before["digest"] and after["loaded_at"] == before["loaded_at"]
    assert after["last_reload"]["result"] == "error" and "unknown capability 'fly'" in after["last_reload"]["error"]
    page = await metrics(papi)
    assert "secretsd_policy_reload_success 0.0" in page
    assert f'secretsd_policy_info{{digest="{before["digest"]}"}} 1.0' in page
    await papi.daemon.stop()
    reloads = [r for r in records(papi.daemon.settings) if r["action"] == "policy.reload"]
    assert [(r["client"], r["outcome"]) for r in reloads] == [("admin", 422)]


async def test_sighup_reload_takes_the_same_path_and_is_recorded_the_same_way(papi: Api) -> None:
    policy_file(papi).write_text("not toml [")
    _reload_policies(papi.daemon)  # what the daemon's SIGHUP handler calls
    failed = await status(papi)
    assert failed["last_reload"]["result"] == "error" and "not valid TOML" in failed["last_reload"]["error"]
    assert "secretsd_policy_reload_success 0.0" in await metrics(papi)
    policy_file(papi).write_text(GOOD + '\n[policies.extra]\nrules = [{ path = "x/*", allow = ["read"] }]\n')
    _reload_policies(papi.daemon)
    ok = await status(papi)
    assert ok["last_reload"]["result"] == "ok" and ok["digest"] == sha256(policy_file(papi)) and ok["policies"] == 4
    page = await metrics(papi)
    assert "secretsd_policy_reload_success 1.0" in page and f'digest="{ok["digest"]}"' in page
    assert "secretsd_policy_last_reload_timestamp_seconds" in page
    await papi.daemon.stop()
    reloads = [r for r in records(papi.daemon.settings) if r["action"] == "policy.reload"]
    assert [(r["client"], r.get("outcome")) for r in reloads] == [("system", "failed"), ("system", "ok")]


async def test_policy_routes_need_admin_on_sys_policy(papi: Api) -> None:
    svc = await papi.token("svc", "svc")
    ops = await papi.token("ops", "ops")
    for method, url in (("POST", "/v1/sys/policy/reload"), ("GET", "/v1/sys/policies"),
                        ("GET", "/v1/sys/policies/svc")):
        assert (await papi.client.request(method, url, headers=papi.auth(svc))).status == 403
        assert (await papi.client.request(method, url, headers=papi.auth(ops))).status == 200
        assert (await papi.client.request(method, url)).status == 401


async def test_policy_list_show_and_check_a_policy(papi: Api) -> None:
    listed = await (await papi.client.get("/v1/sys/policies", headers=papi.auth())).json()
    svc = next(p for p in listed["policies"] if p["name"] == "svc")
    assert svc == {"name": "svc", "description": "the service", "rules": 2, "paths": 2,
                   "capabilities": ["list", "read"]}
    shown = await (await papi.client.get("/v1/sys/policies/svc", headers=papi.auth())).json()
    assert shown["rules"][1] == {"index": 2, "path": "app/admin", "allow": [], "deny": ["read"]}
    missing = await papi.client.get("/v1/sys/policies/nope", headers=papi.auth())
    assert missing.status == 404 and missing.content_type == "application/problem+json"
    check = await papi.client.post("/v1/sys/policy/check", headers=papi.auth(),
                                   json={"policies": ["svc"], "capability": "read", "path": "app/admin"})
    body = await check.json()
    assert body["allowed"] is False and body["rule"]["index"] == 2 and body["policies"] == ["svc"]
    for bad in ({"policies": ["nope"], "capability": "read", "path": "app/k"},
                {"client": "svc", "policies": ["svc"], "capability": "read", "path": "app/k"},
                {"capability": "read", "path": "app/k"}):
        resp = await papi.client.post("/v1/sys/policy/check", headers=papi.auth(), json=bad)
        assert resp.status == 400, bad


# -- the CLI over HTTP --------------------------------------------------------------------------------
async def cli(api: Api, *args: str) -> Result:
    env = {"SECRETSD_ADDR": str(api.client.make_url("/")).rstrip("/"), "SECRETSD_TOKEN": api.admin}
    return await asyncio.to_thread(invoke, *args, env=env)


async def test_policy_cli_list_show_reload_check_and_status(papi: Api) -> None:
    listed = await cli(papi, "policy", "list")
    assert listed.exit_code == 0 and "svc\t2\t2\tlist,read\tthe service" in listed.stdout.splitlines()
    shown = await cli(papi, "policy", "show", "svc")
    assert shown.exit_code == 0 and "2\tapp/admin\t\tread" in shown.stdout.splitlines()
    assert (await cli(papi, "policy", "show", "nope")).exit_code == Exit.NOT_FOUND
    reloaded = await cli(papi, "policy", "reload")
    assert reloaded.exit_code == 0 and reloaded.stdout.startswith(f"reloaded {policy_file(papi)}: ops, root, svc")
    denied = await cli(papi, "policy", "check", "--policy", "svc", "read", "app/admin")
    assert denied.exit_code == 1 and denied.stdout.startswith("DENY: denied by policy 'svc' rule 2")
    assert (await cli(papi, "policy", "check", "--policy", "svc", "read", "app/k")).exit_code == 0
    assert (await cli(papi, "policy", "check", "svc", "read")).exit_code == Exit.USAGE  # CLIENT needs 3
    assert (await cli(papi, "policy", "check", "--policy", "svc", "x", "read", "app/k")).exit_code == Exit.USAGE
    policy_file(papi).write_text(WIDER_THEN_BROKEN)
    refused = await cli(papi, "policy", "reload")
    assert refused.exit_code == Exit.ERROR and refused.stdout == ""
    assert "unknown capability 'fly'" in refused.stderr and len(refused.stderr.splitlines()) == 1
    shown_status = await cli(papi, "status")
    rows = dict(line.split("\t", 1) for line in shown_status.stdout.splitlines())
    assert rows["policy.last_reload.result"] == "error" and rows["policy.digest"].startswith("sha256:")
    doc = json.loads((await cli(papi, "status", "--json")).stdout)
    assert doc["policy"]["last_reload"]["result"] == "error"
