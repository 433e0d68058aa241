"""The HTTP contract's edges (issue 12 items 8 and 9): bounded integers, strict JSON bodies, one
Authorization header, 405 with Allow, a client that leaves mid-body, and a hardened process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from secretsd.api import bodies
from secretsd.problems import PROBLEM_CONTENT_TYPE
from tests.conftest import Api
from tests.helpers import DaemonProcess, free_port, http, init_store


async def problem(resp: Any, status: int, slug: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM_CONTENT_TYPE
    doc = await resp.json()
    assert doc["type"] == f"urn:jarvis-secretsd:problem:{slug}"
    return dict(doc)


def db_dump(api: Api) -> str:
    """Every stored row except the audit chain's head (recording a refused request is expected)."""
    conn = sqlite3.connect(api.daemon.settings.require_data_dir() / "secretsd.db")
    try:
        return "\n".join(line for line in conn.iterdump() if "audit_head:" not in line)
    finally:
        conn.close()


# -- item 8: every integer in every body is bounded ------------------------------------------------
# Where each body model is sent, with the smallest valid body to merge a probe into.
BODY_ROUTES: dict[type[BaseModel], list[tuple[str, str, dict[str, Any]]]] = {
    bodies.PutSecretBody: [("PUT", "/v1/secrets/app/x", {"value": "v"})],
    bodies.RotateBody: [("POST", "/v1/secrets/app/x/rotate", {"value": "v"})],
    bodies.SetMetadataBody: [("PUT", "/v1/metadata/app/x", {"rotation": {}})],
    bodies.VersionsBody: [("POST", f"/v1/secrets/app/x/{a}", {"versions": [1]})
                          for a in ("delete", "undelete", "destroy")],
    bodies.CreateTokenBody: [("POST", "/v1/auth/tokens", {"client": "c", "policies": ["p"]})],
    bodies.BatchWriteBody: [("POST", "/v1/secrets:batch", {"items": [{"path": "app/x", "value": "v"}]})],
    bodies.PolicyCheckBody: [("POST", "/v1/sys/policy/check", {"client": "admin", "capability": "read",
                                                                "path": "app/x"})],
}
OUT_OF_RANGE = [2**31, 2**63, 2**64, 10**40, -1, -(2**63) - 1]

Site = tuple[str, Callable[[int], Any]]


def _as_item(build: Callable[[int], Any]) -> Callable[[int], Any]:
    return lambda n: [build(n)]


def _as_field(build: Callable[[int], Any], key: str, consts: dict[str, Any]) -> Callable[[int], Any]:
    return lambda n: consts | {key: build(n)}


def integer_sites(schema: dict[str, Any], defs: dict[str, Any], where: str = "") -> Iterator[Site]:
    """Every integer a body may hold, as (where, build): ``build(n)`` is the JSON fragment with ``n``
    there (and the ``const`` fields, e.g. a generator's ``kind``, that make the branch valid)."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    if schema.get("type") == "integer":
        yield where, lambda n: n
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            yield from integer_sites(sub, defs, where)
    if "items" in schema:
        for name, build in integer_sites(schema["items"], defs, where + "[0]"):
            yield name, _as_item(build)
    props: dict[str, Any] = schema.get("properties", {})
    consts = {k: p["const"] for k, p in props.items() if "const" in p}
    for key, sub in props.items():
        for name, build in integer_sites(sub, defs, f"{where}.{key}"):
            yield name, _as_field(build, key, consts)


def merge(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        return base | {k: merge(base.get(k), v) for k, v in extra.items()}
    return extra


def all_body_models() -> set[type[BaseModel]]:
    return {m for m in vars(bodies).values()
            if isinstance(m, type) and issubclass(m, bodies._Body) and m is not bodies._Body}


def test_every_body_model_has_a_route_in_the_walk() -> None:
    assert all_body_models() == set(BODY_ROUTES)


async def test_every_integer_in_every_body_is_bounded(api: Api) -> None:
    await api.put("app/x", "original")
    before = db_dump(api)
    probed = []
    for model, routes in BODY_ROUTES.items():
        schema = model.model_json_schema()
        for where, build in integer_sites(schema, schema.get("$defs", {})):
            for method, url, base in routes:
                probed.append(f"{model.__name__}{where}")
                for n in OUT_OF_RANGE:
                    body = merge(base, build(n))
                    resp = await api.client.request(method, url, json=body, headers=api.auth())
                    assert resp.status == 400, (method, url, body, resp.status, await resp.text())
                    await problem(resp, 400, "invalid-request")
    # The walk reached the integers we know of (and any added later).
    assert {"PutSecretBody.cas", "VersionsBody.versions[0]", "CreateTokenBody.ttl_seconds",
            "SetMetadataBody.rotation.period_seconds", "SetMetadataBody.rotation.generator.length"} <= set(probed)
    assert db_dump(api) == before


@pytest.mark.parametrize(("url", "query"), [
    ("/v1/secrets/app/x", "version=2147483648"),
    ("/v1/secrets/app/x", "version=0"),
    ("/v1/secrets/app/x", "version=999999999999"),
    ("/v1/secrets", "limit=0"),
    ("/v1/secrets", "limit=1001"),
    ("/v1/secrets", "limit=99999999999"),
])
async def test_query_integers_are_bounded(api: Api, url: str, query: str) -> None:
    await api.put("app/x", "original")
    resp = await api.client.get(f"{url}?{query}", headers=api.auth())
    await problem(resp, 400, "invalid-request")


async def test_query_integers_at_the_bounds_are_accepted(api: Api) -> None:
    await api.put("app/x", "original")
    resp = await api.client.get("/v1/secrets?limit=1000", headers=api.auth())
    assert resp.status == 200
    resp = await api.client.get("/v1/secrets/app/x?version=2147483647", headers=api.auth())
    await problem(resp, 404, "not-found")


# -- item 9: strict body models --------------------------------------------------------------------
@pytest.mark.parametrize(("method", "url", "body"), [
    ("PUT", "/v1/metadata/app/x", {"rotation": {"enabled": "true"}}),
    ("PUT", "/v1/metadata/app/x", {"rotation": {"enabled": 1}}),
    ("PUT", "/v1/metadata/app/x", {"rotation": {"period_seconds": "86400"}}),
    ("PUT", "/v1/metadata/app/x", {"rotation": {"grace_seconds": 3600.0}}),
    ("PUT", "/v1/metadata/app/x", {"rotation": {"generator": {"kind": "bytes", "length": "32"}}}),
    ("PUT", "/v1/secrets/app/x", {"value": "v", "cas": "1"}),
    ("PUT", "/v1/secrets/app/x", {"value": 5}),
    ("POST", "/v1/secrets/app/x/delete", {"versions": ["1"]}),
    ("POST", "/v1/auth/tokens", {"client": "c", "policies": ["p"], "ttl_seconds": "60"}),
])
async def test_body_models_are_strict(api: Api, method: str, url: str, body: dict[str, Any]) -> None:
    await api.put("app/x", "original")
    before = db_dump(api)
    resp = await api.client.request(method, url, json=body, headers=api.auth())
    await problem(resp, 400, "invalid-request")
    assert db_dump(api) == before


# -- item 9: JSON only, UTF-8 only, one value per key ---------------------------------------------
@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx", "multipart/form-data",
    "application/json; charset=utf-16", "application/json; charset=latin-1", "application/problem+json",
])
async def test_bodies_must_be_application_json(api: Api, content_type: str | None) -> None:
    await api.put("app/x", "original")
    before = db_dump(api)
    headers = api.auth() | ({"Content-Type": content_type} if content_type else {})
    resp = await api.client.put("/v1/secrets/app/x", data=b'{"value": "new"}', headers=headers,
                                skip_auto_headers=["Content-Type"])
    await problem(resp, 415, "unsupported-media-type")
    assert db_dump(api) == before


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON; charset=UTF-8", 'application/json;charset="utf-8"'])
async def test_json_content_types_are_accepted(api: Api, content_type: str) -> None:
    resp = await api.client.put("/v1/secrets/app/x", data=b'{"value": "new"}',
                                headers=api.auth() | {"Content-Type": content_type})
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("raw", [
    b'\xef\xbb\xbf{"value": "new"}',
    '{"value": "new"}'.encode("utf-16"),
    '{"value": "new"}'.encode("utf-16-le"),
    '{"value": "new"}'.encode("utf-32"),
    b'{"value": "caf\xe9"}',
    b'{"value": "\xed\xa0\x80"}',
])
async def test_a_bom_or_non_utf8_body_is_refused(api: Api, raw: bytes) -> None:
    await api.put("app/x", "original")
    before = db_dump(api)
    resp = await api.client.put("/v1/secrets/app/x", data=raw,
                                headers=api.auth() | {"Content-Type": "application/json"})
    await problem(resp, 400, "invalid-request")
    assert db_dump(api) == before


@pytest.mark.parametrize(("method", "url", "raw"), [
    ("PUT", "/v1/secrets/app/x", b'{"value": "a", "value": "b"}'),
    ("PUT", "/v1/secrets/app/x", b'{"value": "a", "metadata": {"k": "1", "k": "2"}}'),
    ("PUT", "/v1/metadata/app/x", b'{"rotation": {"enabled": false, "enabled": true}}'),
    ("PUT", "/v1/metadata/app/x", b'{"rotation": {"generator": {"kind": "bytes", "length": 20, "length": 40}}}'),
    ("POST", "/v1/auth/tokens", b'{"client": "c", "client": "admin", "policies": ["p"]}'),
    ("POST", "/v1/secrets/app/x/destroy", b'{"versions": [{"a": 1, "a": 2}]}'),
])
async def test_duplicate_json_keys_are_refused_at_any_depth(api: Api, method: str, url: str, raw: bytes) -> None:
    await api.put("app/x", "original")
    before = db_dump(api)
    resp = await api.client.request(method, url, data=raw, headers=api.auth() | {"Content-Type": "application/json"})
    doc = await problem(resp, 400, "invalid-request")
    assert "duplicate" in doc["detail"]
    assert db_dump(api) == before


# -- item 9: one Authorization header --------------------------------------------------------------
def audit_lines(api: Api) -> str:
    path = api.daemon.settings.require_data_dir() / "audit"
    return "\n".join(p.read_text() for p in sorted(path.glob("*.jsonl"))) if path.is_dir() else ""


@pytest.mark.parametrize("second", ["Bearer sdt_bogus_token_value", "same", "Basic YWRtaW46YWRtaW4="])
async def test_two_authorization_headers_are_refused(api: Api, second: str) -> None:
    from multidict import CIMultiDict

    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("Authorization", f"Bearer {api.admin}")
    headers.add("Authorization", f"Bearer {api.admin}" if second == "same" else second)
    before = db_dump(api)
    for method, url in (("PUT", "/v1/secrets/app/x"), ("GET", "/v1/auth/whoami"), ("GET", "/v1/nothing")):
        resp = await api.client.request(method, url, json={"value": "new"}, headers=headers)
        doc = await problem(resp, 400, "invalid-request")
        assert "Authorization" in doc["detail"]
        assert api.admin not in json.dumps(doc) and "bogus" not in json.dumps(doc)
        assert "WWW-Authenticate" not in resp.headers
    assert db_dump(api) == before
    assert api.admin not in audit_lines(api) and "bogus" not in audit_lines(api)
    assert '"client":"admin"' not in audit_lines(api).replace(" ", "")


async def test_two_request_ids_are_replaced_by_a_fresh_one(api: Api) -> None:
    from multidict import CIMultiDict

    headers: CIMultiDict[str] = CIMultiDict(api.auth())
    headers.add("X-Request-Id", "first-id")
    headers.add("X-Request-Id", "second-id")
    resp = await api.client.get("/v1/auth/whoami", headers=headers)
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] not in ("first-id", "second-id")
    resp = await api.client.get("/v1/auth/whoami", headers=api.auth() | {"X-Request-Id": "only-id"})
    assert resp.headers["X-Request-Id"] == "only-id"


# -- item 9: 405 says what is allowed, to those who may know ----------------------------------------
async def test_method_not_allowed_has_an_allow_header(api: Api) -> None:
    resp = await api.client.patch("/v1/secrets/app/x", json={}, headers=api.auth())
    await problem(resp, 405, "method-not-allowed")
    allowed = {m.strip() for m in resp.headers["Allow"].split(",")}
    assert {"GET", "PUT", "DELETE"} <= allowed and "PATCH" not in allowed
    # The unauthenticated still learn nothing: 401 first, and no Allow.
    resp = await api.client.patch("/v1/secrets/app/x", json={})
    await problem(resp, 401, "unauthenticated")
    assert "Allow" not in resp.headers


# -- item 9: a client that leaves mid-body is not an error ------------------------------------------
def audit_records(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted((data_dir / "audit").glob("*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]


@pytest.mark.e2e
@pytest.mark.parametrize("abort", [False, True])
def test_a_client_leaving_mid_body_is_quiet_and_still_audited(daemon_process: tuple[DaemonProcess, str],
                                                               abort: bool) -> None:
    daemon, token = daemon_process
    head = (f"PUT /v1/secrets/app/gone HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", daemon.port)) as s:
            s.sendall(head + b'{"value": "' + b"x" * 5000)
            time.sleep(0.2)
            if abort:  # an RST rather than a FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gone = [r for r in audit_records(daemon.data_dir) if r.get("path") == "app/gone"]
        if len(gone) == 3:
            break
        time.sleep(0.1)
    assert len(gone) == 3, daemon.logs()
    assert all((r["client"], r["action"], r["outcome"]) == ("admin", "secret.write", 499) for r in gone), gone
    # The daemon is fine, nothing was written, and the log says nothing alarming.
    assert http("GET", f"{daemon.url}/v1/secrets/app/gone", token=token).status == 404
    logs = daemon.logs()
    assert "unhandled" not in logs and "Traceback" not in logs and "ERROR" not in logs, logs


async def test_a_cancelled_handler_of_a_gone_client_is_still_audited(api: Api,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # aiohttp's test server cancels the handler when its client goes (handler_cancellation=True):
    # the other path a gone client takes through the middleware.
    import asyncio

    assert api.client.server.runner is not None and api.client.server.runner.server is not None
    assert api.client.server.runner.server.handler_cancellation
    _reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    writer.write((f"PUT /v1/secrets/app/cancelled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.admin}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"value\": \"").encode())
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    data_dir = api.daemon.settings.require_data_dir()
    for _ in range(100):
        gone = [r for r in audit_records(data_dir) if r.get("path") == "app/cancelled"]
        if gone:
            break
        await asyncio.sleep(0.05)
    assert [(r["client"], r["action"], r["outcome"]) for r in gone] == [("admin", "secret.write", 499)]
    assert "unhandled" not in caplog.text


# -- item 9: no core dump, not dumpable, optionally no swap ----------------------------------------
NOBODY = 65534


def _as_nobody(*args: str) -> list[str]:
    # A core limit the daemon must lower itself, and a memlock limit too small to lock anything.
    return ["prlimit", "--core=unlimited:unlimited", "--memlock=65536:65536",
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-m", "secretsd",
            *args]


def _reachable_by_others(path: Path) -> bool:
    """Every directory from / down to ``path`` lets other users through (o+x)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _proc_status(pid: int, field: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith(field + ":"))


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("prlimit")),
                    reason="starts the daemon as another user: needs root, setpriv and prlimit")
def test_the_daemon_writes_no_core_dump_and_is_not_dumpable() -> None:
    # The daemon runs as nobody from this checkout's virtualenv: a checkout inside a private
    # directory (a 0700 mktemp -d, say) is out of nobody's reach, which says nothing about us.
    for where in (Path(sys.prefix), Path(__file__).resolve().parents[1]):
        if not _reachable_by_others(where):
            pytest.skip(f"{where} is not reachable by an unprivileged user (a directory above it is private)")
    base = Path(tempfile.mkdtemp(prefix="secretsd-dumpable-"))
    os.chown(base, NOBODY, NOBODY)
    data = base / "data"
    env = os.environ.copy() | {"HOME": str(base), "SECRETSD_LOCK_MEMORY": "true"}
    port = free_port()
    proc = None
    try:
        subprocess.run(_as_nobody("init", "--data-dir", str(data), "--json"), env=env, check=True,
                       capture_output=True, timeout=60)
        log_path = base / "daemon.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(_as_nobody("serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"),
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if http("GET", f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, log_path.read_text()
        pid = proc.pid  # prlimit and setpriv exec, so this is the daemon
        assert _proc_status(pid, "Uid").split()[0] == str(NOBODY)
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.MULTILINE), limits
        # Not dumpable: the kernel gives its /proc entries to root, out of reach of the same uid.
        assert os.stat(f"/proc/{pid}/environ").st_uid == 0
        # lock_memory could not be honoured under a 64 KiB memlock limit: a warning, and it serves.
        text = log_path.read_text()
        assert "memory is NOT locked" in text and _proc_status(pid, "VmLck") == "0 kB", text
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="mlockall without a memlock limit needs CAP_IPC_LOCK")
def test_lock_memory_keeps_the_daemon_out_of_swap(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init_store(data)
    daemon = DaemonProcess(data, env={"SECRETSD_LOCK_MEMORY": "true"}).start()
    try:
        assert daemon.proc is not None
        locked_kb = int(_proc_status(daemon.proc.pid, "VmLck").split()[0])
        assert locked_kb > 1024 and locked_kb * 2 > int(_proc_status(daemon.proc.pid, "VmRSS").split()[0])
        assert "memory locked" in daemon.logs()
    finally:
        daemon.stop()


def test_hardening_functions_in_a_fresh_process() -> None:
    code = ("from secretsd.runtime.process_hardening import disable_core_dumps, is_dumpable; import resource; "
            "assert is_dumpable(); disable_core_dumps(); "
            "print(is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE))")
    out = subprocess.run(["prlimit", "--core=unlimited:unlimited", sys.executable, "-c", code],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert out.strip() == "False (0, 0)"


# -- item 9: the OpenAPI document describes the real contract ---------------------------------------
def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            elif key == "mapping" and isinstance(value, dict):
                yield from (v for v in value.values() if isinstance(v, str))
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_openapi_references_all_resolve(api: Api) -> None:
    doc = await (await api.client.get("/v1/openapi.json")).json()
    refs = set(_refs(doc))
    assert "#/components/schemas/RotationPolicy" in refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        node: Any = doc
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]
    assert "$defs" not in json.dumps(doc)


async def test_openapi_path_parameter_carries_the_path_rule(api: Api) -> None:
    import random

    from secretsd.errors import InvalidPathError
    from secretsd.paths import validate_path

    doc = await (await api.client.get("/v1/openapi.json")).json()
    params = [p for item in doc["paths"].values() for p in item.get("parameters", []) if p["name"] == "path"]
    assert params and all(p["schema"] == params[0]["schema"] for p in params)
    schema = params[0]["schema"]
    pattern = re.compile(schema["pattern"])
    # Every path the daemon takes matches the pattern; a path that does not match is refused.
    rng = random.Random(12)
    samples = ["app/db", "a", ".x", "..x", "...", "a/./b", "a/../b", ".", "..", "a//b", "/a", "a/", "sys/x",
               "a b", "a/" * 16 + "a", "a/" * 15 + "a", "x" * 129, "é", "a\nb"]
    samples += ["".join(rng.choice("ab._-/") for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    for sample in samples:
        try:
            validate_path(sample)
        except InvalidPathError:
            continue
        assert pattern.search(sample) and len(sample) <= schema["maxLength"], sample
    for sample in samples:
        if not pattern.search(sample):
            with pytest.raises(InvalidPathError):
                validate_path(sample)
    for bad in (".", "..", "a/./b", "a/..", "a//b", "/a", "a/", "a b", "a/" * 16 + "a"):
        assert not pattern.search(bad), bad


async def test_openapi_documents_each_status_an_operation_can_answer(api: Api) -> None:
    doc = await (await api.client.get("/v1/openapi.json")).json()
    assert "415" in doc["paths"]["/v1/secrets/{path}"]["put"]["responses"]
    assert "410" in doc["paths"]["/v1/secrets/{path}"]["get"]["responses"]
    assert "502" in doc["paths"]["/v1/secrets/{path}/rotate"]["post"]["responses"]


@pytest.mark.e2e
def test_two_authorization_headers_cannot_flood_the_audit_log(tmp_path: Path) -> None:
    # Refused before authentication, like a 401: within the same per-remote budget, then only counted.
    from http.client import HTTPConnection

    data = tmp_path / "d"
    token = init_store(data)
    config = tmp_path / "c.toml"
    config.write_text("[audit]\nauth_failure_burst = 3\nauth_failure_per_second = 0\n"
                      "auth_failure_summary_seconds = 0.5\n")
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    sent = 60
    try:
        conn = HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        for i in range(sent):
            conn.putrequest("GET", f"/v1/secrets/app/k{i}")
            conn.putheader("Authorization", f"Bearer {token}")
            conn.putheader("Authorization", "Bearer x")
            conn.endheaders()
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 400
        time.sleep(1.0)  # a summary is due after auth_failure_summary_seconds
    finally:
        assert daemon.stop() == 0
    recs = audit_records(data)
    own = [r for r in recs if r.get("path", "").startswith("app/k")]
    summaries = [r for r in recs if r["action"] == "auth.failures"]
    assert len(own) == 3, own
    assert len(own) + sum(s["count"] for s in summaries) == sent
    assert token not in json.dumps(recs)


async def test_openapi_prefix_and_after_carry_the_path_rule(api: Api) -> None:
    import random

    from secretsd.errors import InvalidPathError
    from secretsd.paths import validate_path, validate_prefix

    doc = await (await api.client.get("/v1/openapi.json")).json()
    params = {p["name"]: p["schema"] for p in doc["paths"]["/v1/secrets"]["get"]["parameters"]}
    status = {p["name"]: p["schema"] for p in doc["paths"]["/v1/rotation/status"]["get"]["parameters"]}
    assert status["prefix"] == params["prefix"]
    rng = random.Random(7)
    samples = ["", "/", "app", "app/", "app//", "//", "a/./", "a/../b/", ".", "sys/", "a b"]
    samples += ["".join(rng.choice("ab._-/") for _ in range(rng.randint(0, 10))) for _ in range(5000)]
    for rule, check in ((params["prefix"], validate_prefix), (params["after"], validate_path)):
        pattern = re.compile(rule["pattern"])
        for sample in samples:
            try:
                check(sample)
            except InvalidPathError:
                continue
            assert pattern.search(sample), (check.__name__, sample)
        for sample in samples:
            if not pattern.search(sample) and not (check is validate_path and sample == ""):
                with pytest.raises(InvalidPathError):
                    check(sample)
