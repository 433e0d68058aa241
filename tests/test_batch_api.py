"""The batch routes (issue 16 item 2): POST /v1/secrets:batch writes, GET /v1/secrets:read reads.

Each item is decided, written or read, and audited exactly as its own PUT or GET would be; the
batch only saves the round trips and (for writes) the syncs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import initialize_store
from tests.conftest import Api, running
from tests.test_audit import records

POLICY = """
[policies.app-writer]
rules = [
  { path = "app", allow = ["list"] },
  { path = "app/*", allow = ["read", "write", "list"] },
  { path = "app/locked/*", deny = ["write", "read"] },
]
"""


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    policy = tmp_path / "policies.toml"
    policy.write_text(POLICY)
    settings = load_settings(None, data_dir=tmp_path / "d", policy_file=policy)
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        yield api


async def batch(api: Api, items: list[dict[str, Any]], token: str | None = None, status: int = 200) -> Any:
    resp = await api.client.post("/v1/secrets:batch", json={"items": items}, headers=api.auth(token))
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_a_batch_writes_every_item_and_answers_per_item(api: Api) -> None:
    await api.put("app/old", "v1")
    out = await batch(api, [
        {"path": "app/a", "value": "A"},
        {"path": "app/old", "value": "v2"},
        {"path": "app/b", "value": "B", "cas": 0, "metadata": {"owner": "ops"}},
    ])
    assert [(r["path"], r["status"], r["version"]) for r in out["results"]] == [
        ("app/a", 200, 1), ("app/old", 200, 2), ("app/b", 200, 1)]
    assert (await api.get("app/a"))["value"] == "A"
    assert (await api.get("app/old"))["value"] == "v2"
    assert (await api.get("app/b"))["value"] == "B"


async def test_a_failed_item_is_reported_and_written_nowhere_the_others_are(api: Api) -> None:
    await api.put("app/cas", "one")
    out = await batch(api, [
        {"path": "app/cas", "value": "stale", "cas": 0},       # 409: it exists
        {"path": "app/ok", "value": "fine"},
        {"path": "no//good", "value": "x"},                     # 400: not a path
        {"path": "app/big", "value": "x" * (600 * 1024)},       # 413: over the value limit (512 KiB)
    ])
    statuses = [(r["path"], r["status"]) for r in out["results"]]
    assert statuses == [("app/cas", 409), ("app/ok", 200), ("no//good", 400), ("app/big", 413)]
    assert out["results"][0]["error"]["type"].endswith(":conflict")
    assert (await api.get("app/cas"))["value"] == "one"
    assert (await api.get("app/ok"))["value"] == "fine"
    assert (await api.client.get("/v1/secrets/app/big", headers=api.auth())).status == 404


async def test_each_item_is_authorized_on_its_own_path(api: Api) -> None:
    writer = await api.token("svc", "app-writer")
    out = await batch(api, [
        {"path": "app/mine", "value": "m"},
        {"path": "app/locked/key", "value": "no"},
        {"path": "other/key", "value": "no"},
    ], token=writer)
    assert [r["status"] for r in out["results"]] == [200, 403, 403]
    assert "permission denied" in out["results"][1]["error"]["detail"]
    for path in ("app/locked/key", "other/key"):
        assert (await api.client.get(f"/v1/secrets/{path}", headers=api.auth())).status == 404


async def test_each_item_has_its_own_audit_record_and_no_value(api: Api) -> None:
    writer = await api.token("svc", "app-writer")
    await batch(api, [{"path": "app/x", "value": "MARKER-1"}, {"path": "other/y", "value": "MARKER-2"}],
                token=writer)
    recs = [r for r in records(api.daemon.settings) if r["action"] in ("secret.write", "batch.write")]
    assert [(r["action"], r["path"], r["outcome"], r["decision"], r.get("batch_item")) for r in recs] == [
        ("secret.write", "app/x", 200, "allow", 0),
        ("secret.write", "other/y", 403, "deny", 1),
        ("batch.write", None, 200, "allow", None),
    ]
    assert len({r["request_id"] for r in recs}) == 1 and all(r["client"] == "svc" for r in recs)
    assert recs[0]["version"] == 1 and recs[0]["value_hmac"]
    text = json.dumps(records(api.daemon.settings))
    assert "MARKER" not in text


@pytest.mark.parametrize("body", [
    {},
    {"items": []},
    {"items": [{"path": "app/a"}]},
    {"items": [{"path": "app/a", "value": "x", "extra": 1}]},
    {"items": [{"path": "app/a", "value": "x"}] * 1001},
    {"items": "app/a=x"},
])
async def test_a_malformed_batch_is_a_400_and_writes_nothing(api: Api, body: dict[str, Any]) -> None:
    resp = await api.client.post("/v1/secrets:batch", json=body, headers=api.auth())
    assert resp.status in (400, 413), await resp.text()
    assert resp.content_type == "application/problem+json"
    listed = await api.client.get("/v1/secrets", params={"prefix": "app"}, headers=api.auth())
    assert (await listed.json())["secrets"] == []


async def test_a_batch_needs_a_token(api: Api) -> None:
    resp = await api.client.post("/v1/secrets:batch", json={"items": [{"path": "app/a", "value": "x"}]})
    assert resp.status == 401


# -- batch read: GET /v1/secrets:read --------------------------------------------------------------
async def test_a_batch_read_returns_every_value_the_caller_may_read(api: Api) -> None:
    await batch(api, [{"path": f"app/k{i:02d}", "value": f"v{i}"} for i in range(5)]
                + [{"path": "app/locked/secret", "value": "hidden"}, {"path": "zzz/other", "value": "o"}])
    writer = await api.token("svc", "app-writer")
    resp = await api.client.get("/v1/secrets:read", params={"prefix": "app"}, headers=api.auth(writer))
    assert resp.status == 200, await resp.text()
    out = await resp.json()
    assert [(s["path"], s["value"], s["version"]) for s in out["secrets"]] == [
        (f"app/k{i:02d}", f"v{i}", 1) for i in range(5)]
    assert out["skipped"] == [] and out["next_after"] is None


async def test_a_batch_read_pages_and_reports_what_it_cannot_serve(api: Api) -> None:
    await batch(api, [{"path": f"app/k{i}", "value": f"v{i}"} for i in range(3)])
    resp = await api.client.delete("/v1/secrets/app/k1", headers=api.auth())
    assert resp.status == 200
    first = await (await api.client.get("/v1/secrets:read", params={"prefix": "app", "limit": "2"},
                                        headers=api.auth())).json()
    assert [s["path"] for s in first["secrets"]] == ["app/k0"]
    assert [(s["path"], s["status"]) for s in first["skipped"]] == [("app/k1", 404)]
    assert first["next_after"] == "app/k1"
    rest = await (await api.client.get("/v1/secrets:read", params={"prefix": "app", "after": first["next_after"]},
                                       headers=api.auth())).json()
    assert [s["path"] for s in rest["secrets"]] == ["app/k2"] and rest["next_after"] is None


async def test_a_batch_read_needs_list_on_the_prefix_and_is_audited_per_item(api: Api) -> None:
    await batch(api, [{"path": "app/a", "value": "A"}, {"path": "app/b", "value": "B"}])
    writer = await api.token("svc", "app-writer")
    denied = await api.client.get("/v1/secrets:read", params={"prefix": "other"}, headers=api.auth(writer))
    assert denied.status == 403
    ok = await api.client.get("/v1/secrets:read", params={"prefix": "app"}, headers=api.auth(writer))
    assert ok.status == 200
    recs = [r for r in records(api.daemon.settings)
            if r["client"] == "svc" and r["action"] in ("secret.read", "batch.read")]
    assert [(r["action"], r["path"], r["outcome"]) for r in recs] == [
        ("batch.read", "other", 403),
        ("secret.read", "app/a", 200), ("secret.read", "app/b", 200), ("batch.read", "app", 200)]


async def test_a_children_read_decrypts_and_records_only_the_direct_children(api: Api) -> None:
    # What `secretsd run --prefix app` injects: app/a, not app/deep/b (never read, never recorded).
    await batch(api, [{"path": "app/a", "value": "A"}, {"path": "app/deep/b", "value": "B"}])
    resp = await api.client.get("/v1/secrets:read", params={"prefix": "app", "children": "1"}, headers=api.auth())
    assert [s["path"] for s in (await resp.json())["secrets"]] == ["app/a"]
    reads = [r["path"] for r in records(api.daemon.settings) if r["action"] == "secret.read"]
    assert reads == ["app/a"]
    bad = await api.client.get("/v1/secrets:read", params={"prefix": "app", "children": "2"}, headers=api.auth())
    assert bad.status == 400


def test_is_child_is_one_segment_below() -> None:
    from secretsd.paths import is_child

    assert is_child("app", "app/a") and is_child("", "top") and is_child("app/", "app/a")
    assert not is_child("app", "app") and not is_child("app", "app/a/b") and not is_child("app", "apple/a")
    assert not is_child("", "a/b")
