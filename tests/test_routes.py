"""The route table (secretsd/api/routes.py) is the one declaration of every operation: the router,
the audit actions, the public and sealed paths and the OpenAPI document all come from it, and the
capability it names is the one the handler checks."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from secretsd.api import openapi, routes
from secretsd.api.app import PUBLIC_ROUTES, SEALED_ROUTES
from secretsd.api.routes import OPERATIONS, Operation, Variant
from secretsd.domain.identity import Principal
from secretsd.domain.policy import Capability
from secretsd.domain.secret_service import MAX_LIST_SCANS
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import initialize_store
from tests.conftest import Api, running

METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}
_ALTERNATION = re.compile(r"\(\?P<(\w+)>((?:[\w-]+\|)*[\w-]+)\)")


def _router_pairs(app: web.Application) -> set[tuple[str, str]]:
    """(method, documented path) of every route the app's router serves; a segment matching a
    fixed set of words (``{action:delete|undelete|destroy}``) is one path per word."""
    pairs = set()
    gets = {r.resource for r in app.router.routes() if r.method == "GET"}
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        if route.method == "HEAD":  # aiohttp's companion of a GET, not an operation of its own
            assert resource in gets, resource.canonical
            continue
        paths = [resource.canonical]
        pattern = resource.get_info().get("pattern")
        for name, words in _ALTERNATION.findall(pattern.pattern if pattern is not None else ""):
            paths = [p.replace("{" + name + "}", word) for p in paths for word in words.split("|")]
        pairs |= {(route.method, p) for p in paths}
    return pairs


def _document_pairs(doc: dict[str, object]) -> set[tuple[str, str]]:
    paths = doc["paths"]
    assert isinstance(paths, dict)
    return {(method.upper(), path) for path, item in paths.items() for method in item if method in METHODS}


async def test_openapi_lists_exactly_the_routes_of_the_router(api: Api) -> None:
    doc = await (await api.client.get("/v1/openapi.json")).json()
    assert api.client.app is not None
    served = _router_pairs(api.client.app)
    documented = _document_pairs(doc)
    assert served == documented, (served - documented, documented - served)
    assert {("GET", "/metrics"), ("GET", "/v1/openapi.json"), ("GET", "/healthz"), ("GET", "/readyz"),
            ("POST", "/v1/secrets/{path}/destroy")} <= served


async def test_every_route_has_an_audit_action_or_is_public(api: Api) -> None:
    app = api.client.app
    assert app is not None
    ops = app[routes.OPERATIONS_KEY]
    actions = set()
    for route in app.router.routes():
        op = ops.get(route)
        assert op is not None, f"{route.method} {route.resource} has no operation"
        if op.public:
            assert op.path in PUBLIC_ROUTES
            continue
        assert op.path not in PUBLIC_ROUTES
        for values in [{"action": v.value} for v in op.variants] or [{}]:
            action = op.audit_action(values)
            assert re.fullmatch(r"[a-z]+\.[a-z]+", action) and action != "http.unknown", (op.path, action)
            actions.add(action)
    assert {"secret.read", "secret.destroy", "sys.metrics", "auth.whoami"} <= actions


async def test_each_request_is_recorded_under_its_operations_audit_action(api: Api) -> None:
    from tests.test_audit import records

    await api.put("app/a", "v1")
    await api.get("app/a")
    assert (await api.client.post("/v1/secrets/app/a/undelete", json={"versions": [1]},
                                  headers=api.auth())).status == 200
    assert (await api.client.head("/v1/secrets/app/a", headers=api.auth())).status == 200
    assert (await api.client.get("/v1/secrets/app/a/destroy", headers=api.auth())).status == 404
    assert (await api.client.post("/v1/no-such-route", headers=api.auth())).status == 404
    assert (await api.client.post("/v1/sys/status", headers=api.auth())).status == 405
    seen = [(r["action"], r.get("path")) for r in records(api.daemon.settings)
            if (r.get("path") or "").startswith("app/") or r["action"] == "http.unknown"]
    assert seen == [("secret.write", "app/a"), ("secret.read", "app/a"), ("secret.undelete", "app/a"),
                    ("secret.read", "app/a"), ("secret.read", "app/a/destroy"),
                    ("http.unknown", None), ("http.unknown", None)], seen


def test_the_sealed_paths_are_the_operators_own() -> None:
    assert {"/v1/sys/status", "/v1/auth/whoami"} == SEALED_ROUTES
    assert {"/healthz", "/readyz", "/v1/openapi.json"} == PUBLIC_ROUTES


def test_a_route_without_an_audit_action_cannot_be_declared() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    with pytest.raises(ValueError, match="audit action"):
        Operation("GET", "/v1/x", handler, "x", None)
    with pytest.raises(ValueError, match="public"):
        Operation("GET", "/v1/x", handler, "x", "x.read", public=True)
    with pytest.raises(ValueError, match="variants"):
        Operation("POST", "/v1/x/{action}", handler, "x", "x.do")
    with pytest.raises(ValueError, match="each variant names the audit action"):
        Operation("POST", "/v1/x/{action}", handler, "x", "x.do", variants=(Variant("a", "x.a", Capability.READ, "A"),))


async def test_adding_an_endpoint_is_one_table_entry() -> None:
    # One entry (and its handler): it is routed, documented and given its audit action.
    actions = []

    async def hello(request: web.Request) -> web.Response:
        actions.append(routes.action_of(request))
        return web.json_response({"hello": request.match_info["action"]})

    extra = Operation("POST", "/v1/hello/{action}", hello, "Greet", None, variants=(
        Variant("wave", "hello.wave", Capability.READ, "Wave"),
        Variant("bow", "hello.bow", Capability.ADMIN, "Bow")))
    table = (*OPERATIONS, extra)
    app = web.Application()
    routes.register(app, table)
    doc = openapi.build(table)
    assert _router_pairs(app) == _document_pairs(doc)
    assert doc["paths"]["/v1/hello/bow"]["post"]["description"] == "Requires the `admin` capability."
    async with TestClient(TestServer(app)) as client:
        assert await (await client.post("/v1/hello/wave")).json() == {"hello": "wave"}
        assert (await client.post("/v1/hello/bow")).status == 200
        assert (await client.post("/v1/hello/curtsey")).status == 404
    assert actions == ["hello.wave", "hello.bow"]


def test_the_body_model_each_operation_declares_is_the_one_its_handler_reads() -> None:
    import inspect

    for op in OPERATIONS:
        read = re.findall(r"read_body\(request, (\w+)\)", inspect.getsource(op.handler))
        assert read == ([op.body.__name__] if op.body else []), (op.method, op.path, read)


# -- the capability in the table is the one the handler checks ------------------------------------
def _cases() -> list[tuple[str, str, Capability]]:
    out = []
    for op in OPERATIONS:
        url = (op.path.replace("{path:.+}", "app/x").replace("{token_id}", "sdt_0000000000000000")
               .replace("{name}", "root"))
        for v in op.variants:
            out.append((op.method, url.replace("{action}", v.value), v.capability))
        if not op.variants and op.capability is not None:
            out.append((op.method, url, op.capability))
    return out


@pytest.fixture(scope="module")
def capability_policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    every = [c.value for c in Capability]
    lines = ['[policies.nothing]\nrules = [{ path = "elsewhere/*", allow = ["read"] }]\n']
    for cap in Capability:
        others = ", ".join(f'"{c}"' for c in every if c != cap.value)
        # A wildcard does not reach system resources: they get a rule of their own.
        lines.append(f'[policies.but_{cap.value}]\nrules = [{{ path = "**", allow = [{others}] }}, '
                     f'{{ path = "sys/*", allow = [{others}] }}]\n')
        lines.append(f'[policies.only_{cap.value}]\nrules = [{{ path = "**", allow = ["{cap.value}"] }}, '
                     f'{{ path = "sys/*", allow = ["{cap.value}"] }}]\n')
    path = tmp_path_factory.mktemp("policies") / "policies.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
async def capi(tmp_path: Path, capability_policies: Path) -> AsyncIterator[Api]:
    settings = load_settings(None, data_dir=tmp_path / "data", policy_file=capability_policies)
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        yield api


async def test_the_capability_each_operation_declares_is_the_one_its_handler_checks(capi: Api) -> None:
    tokens = {}
    for cap in Capability:
        tokens["but", cap] = await capi.token(f"but-{cap.value}", f"but_{cap.value}")
        tokens["only", cap] = await capi.token(f"only-{cap.value}", f"only_{cap.value}")
    cases = _cases()
    assert len(cases) >= 18
    for method, url, cap in cases:
        # Everything but the declared capability: refused.
        resp = await capi.client.request(method, url, headers=capi.auth(tokens["but", cap]))
        assert resp.status == 403, (method, url, cap, resp.status, await resp.text())
        # The declared capability alone: not refused for want of a capability.
        resp = await capi.client.request(method, url, headers=capi.auth(tokens["only", cap]))
        assert resp.status != 403, (method, url, cap, await resp.text())
    # An operation without a capability needs only a valid token (a batch's items are each decided
    # on their own path: here, each is refused).
    nothing = await capi.token("nobody", "nothing")
    bodies = {"/v1/secrets:batch": {"items": [{"path": "app/x", "value": "v"}]}}
    for op in OPERATIONS:
        # (A login authenticates by its body, not a token: tests/test_auth_jwt.py.)
        if op.capability is None and not op.variants and not op.public and not op.login:
            resp = await capi.client.request(op.method, op.path, json=bodies.get(op.path),
                                             headers=capi.auth(nothing))
            assert resp.status == 200, (op.path, await resp.text())
            if op.path in bodies:
                assert [r["status"] for r in (await resp.json())["results"]] == [403]


# -- listing lives in the service ------------------------------------------------------------------
async def test_list_page_fills_the_page_past_hidden_paths_and_never_names_one(api: Api) -> None:
    for i in range(12):
        await api.put(f"l/{i:02d}", "v")
    # The service does not look at who lists (the filter decides what it may see).
    me = Principal(client="test", policies=("root",), method="token")
    shown_only = {"l/03", "l/07", "l/11"}
    calls = []

    def visible(paths: list[str]) -> set[str]:
        calls.append(list(paths))
        return {p for p in paths if p in shown_only}

    page = await api.daemon.secrets.list_page(me, "l/", limit=2, visible=visible)
    assert [s.path for s in page.secrets] == ["l/03", "l/07"] and page.next_after == "l/07"
    assert len(calls) == 4  # storage pages of 2 were scanned until the page was full
    page = await api.daemon.secrets.list_page(me, "l/", after="l/07", limit=2, visible=visible)
    assert [s.path for s in page.secrets] == ["l/11"] and page.next_after is None
    # At most MAX_LIST_SCANS storage pages per request, however much is hidden (and no cursor,
    # since a cursor may only name a shown path).
    for i in range(MAX_LIST_SCANS + 5):
        await api.put(f"m/{i:02d}", "v")
    calls.clear()

    def hide_all(paths: list[str]) -> set[str]:
        calls.append(paths)
        return set()

    page = await api.daemon.secrets.list_page(me, "m/", limit=1, visible=hide_all)
    assert page.secrets == [] and page.next_after is None
    assert len(calls) == MAX_LIST_SCANS
