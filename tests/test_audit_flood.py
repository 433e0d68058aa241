"""Audit volume an unauthenticated peer can cause is bounded (issue 12 item 4): 401s beyond a budget
are summarised (counted, never dropped), and a record copies a bounded number of bytes."""

from __future__ import annotations

import json
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

from secretsd.audit.failures import OTHER_REMOTES, FailureBudget, FailureCounter
from secretsd.audit.verify import log_files
from secretsd.runtime.config import load_settings
from tests.conftest import running
from tests.helpers import DaemonProcess, http, init_store, run_cli

BAD_TOKEN = "sdt_0000000000000000_" + "A" * 43


def records(data: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in log_files(data / "audit" / "main.jsonl"):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


# -- field caps -----------------------------------------------------------------------------------
async def test_a_record_copies_a_bounded_number_of_bytes_from_the_request(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "d")
    nasty = "\x01é\U0001d11e" * 300  # a six-byte escape, two and four UTF-8 bytes: 900 characters
    quoted = urllib.parse.quote(nasty, safe="")
    async with running(settings) as api:
        bad = {"Authorization": f"Bearer {BAD_TOKEN}", "X-Request-Id": "r" * 64}
        resp = await api.client.get(f"/v1/secrets/app/{quoted}", headers=bad)
        assert resp.status == 401
        resp = await api.client.get("/v1/secrets/app/%ED%A0%80x", headers=bad)  # a lone surrogate
        assert resp.status == 401
        resp = await api.client.get(f"/v1/secrets/app/{quoted}", headers=api.auth())
        assert resp.status in (400, 404)
        assert api.daemon.audit is not None
    path = settings.audit.log_path(settings.require_data_dir())
    lines = path.read_bytes().splitlines()
    unauthenticated = [line for line in lines if b'"outcome":401' in line]
    assert len(unauthenticated) == 2
    for line in unauthenticated:
        rec = json.loads(line)
        # A whole 401 record: 128 bytes of path, 64 of request id, a signature, a hash and the rest.
        assert len(line) <= 600, (len(line), line)
        assert len(json.dumps(rec["path"], ensure_ascii=False).encode()) - 2 <= 128
    first = json.loads(unauthenticated[0])
    assert first["path_truncated"] is True and first["path"].startswith("app/\x01é")
    authenticated = json.loads(lines[-1])
    assert authenticated["client"] == "admin" and authenticated["path_truncated"] is True
    assert len(json.dumps(authenticated["path"], ensure_ascii=False).encode()) - 2 <= 1024


# -- summaries ------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unauthenticated_failures_beyond_a_budget_are_summarised_never_dropped() -> None:
    clock = Clock()
    counter = FailureCounter(FailureBudget(burst=3, per_second=1.0, total_per_second=10.0, summary_seconds=5,
                                           max_remotes=4, max_summaries=2), clock=clock, wall=clock)
    own = 0
    sent = 0
    for second in range(5):
        clock.now = 1000.0 + second
        for i in range(8):  # eight remotes, twice the table's size
            for _ in range(10):
                own += counter.admit(f"10.0.0.{i}", "secret.read")
                sent += 1
    summaries = counter.summaries()
    assert own + sum(s["count"] for s in summaries) == sent == 400
    # Five seconds of a total budget of 10/s (plus its initial 10) bound the records of their own.
    assert own <= 10 + 5 * 10
    assert len(summaries) <= 3 and summaries[-1]["remote"] == OTHER_REMOTES and summaries[-1]["remotes"] >= 1
    assert all(s["action"] == "auth.failures" and s["outcome"] == 401 for s in summaries)
    assert counter.summaries() == [] and counter.pending == 0


def test_one_connection_hammering_401s_is_answered_and_every_failure_counted_in_the_log(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = init_store(data)
    config = tmp_path / "c.toml"
    config.write_text("[audit]\nauth_failure_burst = 5\nauth_failure_per_second = 0\n"
                      "auth_failure_summary_seconds = 0.5\n")
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    sent = 120
    try:
        conn = HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        for i in range(sent):
            conn.request("GET", f"/v1/secrets/app/k{i}", headers={"Authorization": f"Bearer {BAD_TOKEN}"})
            resp = conn.getresponse()
            body = resp.read()
            # The answer itself is unchanged: a 401 problem document, whether recorded now or counted.
            assert resp.status == 401 and resp.getheader("WWW-Authenticate") == "Bearer"
            assert json.loads(body)["status"] == 401
        metrics = http("GET", f"{daemon.url}/metrics", token=token).body
        assert f"secretsd_audit_auth_failures_summarised_total {sent - 5}.0" in metrics
    finally:
        assert daemon.stop() == 0
    recs = records(data)
    own = [r for r in recs if r.get("outcome") == 401 and r["action"] == "secret.read"]
    summaries = [r for r in recs if r["action"] == "auth.failures"]
    assert len(own) == 5 and summaries
    assert len(own) + sum(s["count"] for s in summaries) == sent
    assert all(s["remote"] == "127.0.0.1" and s["sample_action"] == "secret.read" for s in summaries)
    assert run_cli("audit", "verify", "--data-dir", str(data)).returncode == 0
