"""End-to-end: a real daemon process, real HTTP, real signals."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, http, init_store, run_cli

pytestmark = pytest.mark.e2e


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = init_store(data)
    daemon = DaemonProcess(data).start()
    acknowledged: dict[str, str] = {}
    acks: list[str] = []  # every acknowledged write, as its request id
    stop = threading.Event()
    errors: list[str] = []

    def writer(worker: int) -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            path, value = f"load/w{worker}/k{i % 50}", f"value-{worker}-{i}"
            try:
                resp = http("PUT", f"{daemon.url}/v1/secrets/{path}", token=token, body={"value": value}, timeout=5)
            except OSError:
                return  # the daemon died mid-request: that write was never acknowledged
            if resp.status == 200:
                acknowledged[path] = value
                acks.append(resp.headers["x-request-id"])
            else:
                errors.append(f"{resp.status}")
            i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon.kill9()  # SIGKILL while writers are mid-flight
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    assert len(acknowledged) >= 150
    snapshot = dict(acknowledged)

    restarted = DaemonProcess(data).start()
    try:
        for path, value in snapshot.items():
            resp = http("GET", f"{restarted.url}/v1/secrets/{path}", token=token)
            assert resp.status == 200, (path, resp.body)
            # A later write to the same key may have been committed but not yet acknowledged when
            # the process died; an acknowledged value can only have been superseded, never lost.
            if resp.body["value"] != value:
                meta = http("GET", f"{restarted.url}/v1/metadata/{path}", token=token).body
                assert meta["current_version"] > 1
                n = value.rsplit("-", 1)[1]
                assert int(resp.body["value"].rsplit("-", 1)[1]) > int(n)
    finally:
        restarted.stop()
    # No write was acknowledged before its audit record was durable, and the log the kill cut
    # off mid-stream still verifies once the restarted daemon has written after it.
    logged = set()
    for log_file in sorted((data / "audit").glob("*.jsonl*")):
        logged |= {r["request_id"] for r in map(json.loads, log_file.read_text().splitlines())
                   if r.get("action") == "secret.write" and r.get("outcome") == 200}
    assert set(acks) <= logged
    result = run_cli("audit", "verify", "--data-dir", str(data))
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_secret_or_token_in_logs_or_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = init_store(data)
    daemon = DaemonProcess(data, env={"SECRETSD_LOG_LEVEL": "DEBUG"}).start()
    marker = "MARKER-secret-value-9d2e"
    try:
        http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": marker})
        assert http("GET", f"{daemon.url}/v1/secrets/app/k", token=token).body["value"] == marker
        http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": marker, "cas": "bad"})
        http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, raw=b'{"value": "' + marker.encode() + b'",')
        http("GET", f"{daemon.url}/v1/secrets/app/k", token="sdt_0123456789abcdef_" + "B" * 43)
        created = http("POST", f"{daemon.url}/v1/auth/tokens", token=token,
                       body={"client": "svc", "policies": ["root"]}).body["token"]
    finally:
        daemon.stop()
    logs = daemon.logs()
    assert "PUT /v1/secrets/{path} 200" in logs
    for needle in (marker, token, token.split("_", 2)[2], created.split("_", 2)[2]):
        assert needle not in logs
        for f in data.iterdir():
            if f.is_file() and f.name != "dev-admin-token":
                assert needle.encode() not in f.read_bytes(), f.name


def test_sighup_reloads_policies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    policy = tmp_path / "policy.toml"
    policy.write_text('[policies.svc]\nrules = [{ path = "app/*", allow = ["read"] }]\n')
    config = tmp_path / "secretsd.toml"
    config.write_text(f'policy_file = "{policy}"\n')
    token = init_store(data)
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    try:
        http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": "v"})
        svc = http("POST", f"{daemon.url}/v1/auth/tokens", token=token,
                   body={"client": "svc", "policies": ["svc"]}).body["token"]
        assert http("GET", f"{daemon.url}/v1/secrets/app/k", token=svc).status == 200
        policy.write_text('[policies.svc]\nrules = [{ path = "app/*", deny = ["read"] }]\n')
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while http("GET", f"{daemon.url}/v1/secrets/app/k", token=svc).status != 403:
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.05)
        # A broken file is refused and the previous policies stay in force.
        policy.write_text("this is not toml [")
        daemon.signal(signal.SIGHUP)
        time.sleep(0.5)
        assert http("GET", f"{daemon.url}/v1/secrets/app/k", token=svc).status == 403
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert "policy reload failed" in daemon.logs()
    finally:
        daemon.stop()


def test_starts_sealed_without_its_key_and_unseals_when_it_returns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = init_store(data)
    daemon = DaemonProcess(data).start()
    http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": "kept"})
    daemon.stop()
    key = data / "master.key"
    hidden = tmp_path / "master.key.away"
    key.rename(hidden)
    sealed = DaemonProcess(data, env={"SECRETSD_UNSEAL_RETRY_MAX_SECONDS": "0.5"}).start(wait_ready=False)
    try:
        assert http("GET", f"{sealed.url}/healthz").status == 200
        ready = http("GET", f"{sealed.url}/readyz")
        assert ready.status == 503 and ready.body["checks"]["barrier"] == "sealed"
        resp = http("GET", f"{sealed.url}/v1/secrets/app/k", token=token)
        assert resp.status == 503 and resp.body["type"].endswith(":sealed")
        for method, route in [("GET", "/v1/secrets?prefix=app"), ("GET", "/v1/metadata/app/k"),
                              ("GET", "/v1/auth/tokens"), ("DELETE", "/v1/secrets/app/k")]:
            assert http(method, sealed.url + route, token=token).status == 503, route
        status = http("GET", f"{sealed.url}/v1/sys/status", token=token).body
        assert status["sealed"] is True and "does not exist" in status["seal_error"]
        assert http("GET", f"{sealed.url}/v1/secrets/app/k").status == 401  # still authenticates first
        hidden.rename(key)
        sealed.wait_for("/readyz", timeout=15)
        assert http("GET", f"{sealed.url}/v1/secrets/app/k", token=token).body["value"] == "kept"
    finally:
        sealed.stop()


def test_serve_refuses_uninitialised_store_with_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--data-dir", str(tmp_path / "empty"), "--listen", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: the store in {tmp_path / 'empty'} is not initialised; "
        f"run 'secretsd init --data-dir {tmp_path / 'empty'}'"
    ]


def test_refuses_plaintext_listener_off_loopback(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init_store(data)
    result = run_cli("serve", "--data-dir", str(data), "--listen", "0.0.0.0:18999")
    assert result.returncode == 1 and "without TLS" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dev_mode_initialises_once_and_prints_a_ready_example(tmp_path: Path) -> None:
    from tests.helpers import free_port

    port = free_port()
    data = tmp_path / "dev"
    import subprocess
    import sys

    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "secretsd", "serve", "--dev", "--data-dir", str(data), "--listen",
             f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=os.environ.copy(),
        )
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(8)]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        text = "".join(banner)
        token = next(line.split()[-1] for line in banner if line.startswith("Admin token:"))
        assert f"export SECRETSD_TOKEN={token}" in text and "secretsd get app/db-password" in text
        assert (data / "dev-admin-token").stat().st_mode & 0o777 == 0o600
    assert json.loads(run_cli("init", "--data-dir", str(data), "--json").stdout or "{}") == {}


def test_a_reload_signal_during_start_up_does_not_kill_the_daemon(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import free_port

    data = tmp_path / "data"
    init_store(data)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "secretsd", "serve", "--data-dir", str(data), "--listen",
                             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # inside start-up: imports, unseal, before the daemon's SIGHUP handler exists
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"the daemon died of SIGHUP (exit {proc.returncode})"
            try:
                if http("GET", f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
