"""serve --workers N: several processes on one port, each a replica with its own audit chain."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, http, init_store, run_cli

pytestmark = pytest.mark.e2e


def test_workers_share_a_port_and_keep_separate_audit_chains(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = init_store(data)
    daemon = DaemonProcess(data, extra_args=["--workers", "2"]).start()
    deadline = time.monotonic() + 30
    while daemon.logs().count("listening on") < 2:  # /readyz proves one worker; wait for both
        assert time.monotonic() < deadline, daemon.logs()
        time.sleep(0.05)
    try:
        for i in range(60):  # each request opens a new connection: the kernel spreads them
            assert http("PUT", f"{daemon.url}/v1/secrets/app/k{i}", token=token, body={"value": f"v{i}"}).status == 200
        for i in range(60):
            assert http("GET", f"{daemon.url}/v1/secrets/app/k{i}", token=token).body["value"] == f"v{i}"
        daemon.signal(signal.SIGHUP)  # forwarded to every worker
        time.sleep(1.0)
    finally:
        assert daemon.stop() == 0, daemon.logs()
    chains = {p.name for p in (data / "audit").glob("*.jsonl")}
    assert chains == {"main-w0.jsonl", "main-w1.jsonl"}
    served = 0
    for chain in ("main-w0", "main-w1"):
        records = [json.loads(line) for line in (data / "audit" / f"{chain}.jsonl").read_text().splitlines()]
        served += sum(1 for r in records if r["action"] in ("secret.write", "secret.read"))
        assert any(r["action"] == "policy.reload" for r in records), chain
        result = run_cli("audit", "verify", "--data-dir", str(data), env=os.environ | {"SECRETSD_AUDIT__CHAIN": chain})
        assert result.returncode == 0, result.stdout + result.stderr
    assert served == 120  # every request recorded exactly once, by the worker that served it


def test_workers_that_cannot_start_make_the_supervisor_fail(tmp_path: Path) -> None:
    import socket

    data = tmp_path / "d"
    init_store(data)
    with socket.socket() as taken:  # someone else holds the port, without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}", "--workers", "2",
                         timeout=60)
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr


def test_workers_auto_is_one_per_cpu_of_the_affinity_mask() -> None:
    import os

    import click

    from secretsd.cli.local import WorkerCount

    assert WorkerCount().convert("auto", None, None) == min(len(os.sched_getaffinity(0)), 64)
    assert WorkerCount().convert("3", None, None) == 3
    for bad in ("0", "65", "many", ""):
        with pytest.raises(click.BadParameter):
            WorkerCount().convert(bad, None, None)


def test_workers_auto_follows_taskset(tmp_path: Path) -> None:
    # Pinned to one CPU, 'auto' is one worker: serve runs as a single process (no supervisor).
    import shutil
    import subprocess
    import sys

    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is not installed")
    code = "import os; from secretsd.cli.local import WorkerCount; print(WorkerCount().convert('auto', None, None))"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "1"


def test_the_workers_supervisor_loads_no_server_stack() -> None:
    # serve --workers N: the supervisor reads the settings and starts children; it imports neither
    # aiohttp nor the storage, crypto or metrics stacks, so it stays small and the workers start sooner.
    import subprocess
    import sys

    code = ("import sys, secretsd.cli.local, secretsd.runtime.config, secretsd.runtime.logs, "
            "secretsd.runtime.process_hardening, secretsd.runtime.workers\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'aiohttp', 'cryptography', 'prometheus_client', 'pkcs11'}), "
            "sorted(m for m in sys.modules if m.startswith(('secretsd.storage', 'secretsd.custody', "
            "'secretsd.runtime.server'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[] []", out.stdout
