"""Prometheus metrics: scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Api, running
from tests.helpers import DaemonProcess, free_port, http, init_store


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def scrape(api: Api) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    resp = await api.client.get("/metrics", headers=api.auth())
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    return text, parse(text)


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_values_change_as_requests_happen(api: Api) -> None:
    _, before = await scrape(api)
    await api.put("app/a", "1")
    await api.put("app/a", "2")
    await api.get("app/a")
    await api.client.get("/v1/secrets/app/a", headers=api.auth("sdt_0000000000000000_" + "A" * 43))
    await api.token("svc", "root")
    _, after = await scrape(api)

    def grew(name: str, by: float, **labels: str) -> None:
        assert value(after, name, **labels) - value(before, name, **labels) == by, (name, labels)

    grew("secretsd_secret_operations_total", 1, operation="created")
    grew("secretsd_secret_operations_total", 1, operation="updated")
    grew("secretsd_secret_operations_total", 1, operation="read")
    grew("secretsd_encrypt_operations_total", 2)
    grew("secretsd_decrypt_operations_total", 1)
    grew("secretsd_http_requests_total", 2, route="/v1/secrets/{path}", method="PUT", status_class="2xx")
    grew("secretsd_http_requests_total", 1, route="/v1/secrets/{path}", method="GET", status_class="4xx")
    grew("secretsd_policy_decisions_total", 5, decision="allow")  # 3 secret calls, token create, 1 scrape
    assert value(after, "secretsd_secrets") == 1
    assert value(after, "secretsd_tokens") == 2
    assert value(after, "secretsd_sealed") == 0
    assert value(after, "secretsd_keyring_active_term") == 1
    assert value(after, "secretsd_keyring_term_encryptions") == 2
    assert value(after, "secretsd_key_provider_up", provider="file", role="primary") == 1
    assert value(after, "secretsd_audit_records_total") >= 6
    assert value(after, "secretsd_audit_fsync_seconds_count") >= 1
    assert value(after, "secretsd_audit_batch_records_count") >= 1
    assert value(after, "secretsd_key_provider_operation_seconds_count", provider="file", operation="unwrap") >= 1
    assert value(after, "secretsd_http_request_duration_seconds_count", route="/v1/secrets/{path}",
                 method="PUT") >= 2


async def test_no_secret_value_or_path_in_any_label(api: Api) -> None:
    await api.put("team-x/very-distinctive-path", "very-distinctive-value-29f1")
    await api.get("team-x/very-distinctive-path")
    await api.client.get("/v1/secrets/team-x/missing-distinctive", headers=api.auth())
    text, samples = await scrape(api)
    for needle in ("distinctive", "team-x", api.admin.split("_", 2)[2]):
        assert needle not in text
    routes = {dict(labels)["route"] for (_, labels) in samples if "route" in dict(labels)}
    templates = {r.resource.canonical for r in api.client.app.router.routes() if r.resource}
    assert routes and routes <= templates | {"(unmatched)"}


async def test_metrics_need_a_token_with_read_on_sys_metrics(tmp_path: Path) -> None:

    from secretsd.runtime.config import load_settings
    from secretsd.runtime.daemon import initialize_store

    policy = tmp_path / "p.toml"
    policy.write_text('[policies.prom]\nrules = [{ path = "sys/metrics", allow = ["read"] }]\n'
                      '[policies.other]\nrules = [{ path = "app/*", allow = ["read"] }]\n')
    settings = load_settings(None, data_dir=tmp_path / "d", policy_file=policy)
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        client = api.client
        assert (await client.get("/metrics")).status == 401
        other = await api.token("x", "other")
        assert (await client.get("/metrics", headers=api.auth(other))).status == 403
        prom = await api.token("prometheus", "prom")
        assert (await client.get("/metrics", headers=api.auth(prom))).status == 200


@pytest.mark.e2e
def test_separate_unauthenticated_metrics_listener(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = init_store(data)
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    try:
        http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": "v"})
        resp = http("GET", f"http://127.0.0.1:{port}/metrics")
        assert resp.status == 200
        samples = parse(resp.body if isinstance(resp.body, str) else str(resp.body))
        assert value(samples, "secretsd_secret_operations_total", operation="created") == 1
        assert http("GET", f"http://127.0.0.1:{port}/v1/secrets/app/k", token=token).status == 404
        assert http("GET", f"{daemon.url}/metrics").status == 401
    finally:
        daemon.stop()
