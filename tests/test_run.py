"""``secretsd run``: the command's environment, its exit code, and signals passed on to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secretsd.client import SecretsClient
from tests.helpers import DaemonProcess, run_cli

pytestmark = pytest.mark.e2e

DUMP_ENV = "import json, os, sys; json.dump(dict(os.environ), sys.stdout)"

# A child that says it is ready, then waits; on SIGTERM/SIGHUP/SIGINT it records which and exits 42.
TRAP = """
import signal, sys, time, pathlib
marker = pathlib.Path(sys.argv[1])
def on(sig, frame):
    marker.write_text(signal.Signals(sig).name)
    sys.exit(42)
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, on)
pathlib.Path(sys.argv[1] + ".ready").write_text("ready")
time.sleep(60)
"""


@pytest.fixture
def env(daemon_process: tuple[DaemonProcess, str]) -> Iterator[dict[str, str]]:
    daemon, token = daemon_process
    with SecretsClient(daemon.url, token) as c:
        c.put("svc/DATABASE_URL", "postgres://u:p@db/app")
        c.put("svc/MULTI", "line1\nline2 'q' \"dq\" $HOME ünï")
        c.put("svc/EMPTY", "")
        c.put("svc/nested/DEEP", "not directly under svc")
        c.put("other/api-key", "k-123")
        c.put("svc/GONE", "x")
        c.delete("svc/GONE")
    yield {"SECRETSD_ADDR": daemon.url, "SECRETSD_TOKEN": token}


def test_env_content(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("run", "--prefix", "svc", "--map", "API_KEY=other/api-key", "--",
                     sys.executable, "-c", DUMP_ENV, env=env | {"DATABASE_URL": "from-parent", "KEEP": "me"})
    assert result.returncode == 0, result.stderr
    child = json.loads(result.stdout)
    assert child["DATABASE_URL"] == "postgres://u:p@db/app"  # a secret wins over the parent's variable
    assert child["MULTI"] == "line1\nline2 'q' \"dq\" $HOME ünï"
    assert child["EMPTY"] == "" and child["API_KEY"] == "k-123" and child["KEEP"] == "me"
    assert "DEEP" not in child and "nested" not in json.dumps(list(child)) and "GONE" not in child
    assert "SECRETSD_TOKEN" not in child  # the operator's token is not handed on
    kept = run_cli("run", "--pass-token", "--map", "X=other/api-key", "--", sys.executable, "-c", DUMP_ENV, env=env)
    assert json.loads(kept.stdout)["SECRETSD_TOKEN"] == env["SECRETSD_TOKEN"]


def test_exit_codes_and_errors(env: dict[str, str], tmp_path: Path) -> None:
    assert run_cli("run", "--prefix", "svc", "--", sys.executable, "-c", "raise SystemExit(7)", env=env).returncode == 7
    killed = run_cli("run", "--prefix", "svc", "--", sys.executable, "-c",
                     "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", env=env)
    assert killed.returncode == 128 + signal.SIGKILL
    missing = run_cli("run", "--prefix", "svc", "--", "no-such-command-xyz", env=env)
    assert missing.returncode == 127 and missing.stderr.strip() == "error: command not found: no-such-command-xyz"
    unknown = run_cli("run", "--map", "X=other/none", "--", "true", env=env)
    assert unknown.returncode == 3 and unknown.stderr.startswith("error: ")  # not found
    assert run_cli("run", "--", "true", env=env).returncode == 2  # neither --prefix nor --map
    # nothing written to disk: the working directory stays empty
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "secretsd", "run", "--prefix", "svc", "--", "true"], cwd=work,
                   env=os.environ | env, check=True, timeout=60)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_are_forwarded_to_the_command(env: dict[str, str], tmp_path: Path, sig: int) -> None:
    marker = tmp_path / "got-signal"
    proc = subprocess.Popen(
        [sys.executable, "-m", "secretsd", "run", "--prefix", "svc", "--", sys.executable, "-c", TRAP, str(marker)],
        env=os.environ | env, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(Path(str(marker) + ".ready"), proc)
        proc.send_signal(sig)  # to `secretsd run` only, not its process group
        assert proc.wait(timeout=20) == 42, proc.stderr.read() if proc.stderr else ""
        assert marker.read_text() == signal.Signals(sig).name
    finally:
        if proc.poll() is None:
            proc.kill()


def test_child_killed_by_forwarded_signal_gives_128_plus_signal(env: dict[str, str], tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = f"import pathlib, time; pathlib.Path({str(ready)!r}).write_text('x'); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-m", "secretsd", "run", "--prefix", "svc", "--",
                             sys.executable, "-c", script], env=os.environ | env)
    try:
        wait_for(ready, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_for(path: Path, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "child never became ready"
        time.sleep(0.02)
