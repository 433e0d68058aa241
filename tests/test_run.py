"""``secretsd run``: the command's environment, its exit code, and signals passed on to it."""

from __future__ import annotations

import contextlib
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
from click.testing import CliRunner, Result

from secretsd.cli import main
from secretsd.client import SecretsClient
from tests.helpers import DaemonProcess, init_store, run_cli

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


# -- issue 16 item 3: `run` behaves like tini -------------------------------------------------------
# One daemon for the tests below (module scope): they only read, each under its own prefix.
@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    data = tmp_path_factory.mktemp("run-daemon") / "data"
    token = init_store(data)
    daemon = DaemonProcess(data).start()
    try:
        with SecretsClient(daemon.url, token) as c:
            c.put("sig/A", "1")
            c.put("names/stripe-key", "sk_live")
            c.put("names/DOTTED.NAME", "d")
            c.put("names/Mixed_Case", "m")
            c.put("clash/a-b", "x")
            c.put("clash/a_b", "y")
            c.put("clash/OK", "ok")
            c.put("digit/1PASSWORD", "p")
            c.put("digit/GOOD", "g")
            c.put("onlydeleted/X", "x")
            c.delete("onlydeleted/X")
            c.put("onlynested/deeper/X", "x")
        yield {"SECRETSD_ADDR": daemon.url, "SECRETSD_TOKEN": token}
    finally:
        daemon.stop()


# A child that records every signal it gets (one line each, in order) and exits 42 on the one
# named in argv[2]; it says it is ready once its handlers are in place.
RECORDER = """
import os, signal, sys, time, pathlib
marker, last = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def on(sig, frame):
    with marker.open("a") as fh:
        fh.write(f"{sig}\\n")
    if sig == last:
        sys.exit(42)
for s in [int(x) for x in sys.argv[3:]]:
    signal.signal(s, on)
pathlib.Path(sys.argv[1] + ".ready").write_text(str(os.getpid()))
deadline = time.monotonic() + 30  # orphaned (a wrapper that died of the signal): do not linger
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


def kill_orphan(ready: Path) -> None:
    """If `run` died and left its command behind (the bug this guards against), end the command."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(ready.read_text()), signal.SIGKILL)

REQUIRED_SIGNALS = [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGWINCH]
OTHER_FORWARDED = [signal.SIGCONT, signal.SIGALRM, signal.SIGPWR, signal.SIGRTMIN, signal.SIGRTMAX]


def test_forwarded_signals_are_the_documented_set() -> None:
    from secretsd.cli.env import FORWARDED_SIGNALS

    assert set(REQUIRED_SIGNALS + OTHER_FORWARDED) <= set(FORWARDED_SIGNALS)
    never = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
             signal.SIGPIPE, signal.SIGSEGV}
    assert never.isdisjoint(FORWARDED_SIGNALS)


@pytest.mark.parametrize("sig", REQUIRED_SIGNALS + OTHER_FORWARDED, ids=lambda s: signal.Signals(s).name)
def test_every_forwardable_signal_reaches_the_command(shared_env: dict[str, str], tmp_path: Path, sig: int) -> None:
    """The signal goes to `secretsd run` only (not its process group); the command records it and
    exits 42, which `run` reproduces: neither dies, nothing is orphaned."""
    marker = tmp_path / "signals"
    proc = subprocess.Popen(
        [sys.executable, "-m", "secretsd", "run", "--prefix", "sig", "--", sys.executable, "-c", RECORDER,
         str(marker), str(int(sig)), str(int(sig))],
        env=os.environ | shared_env,
    )
    ready = Path(str(marker) + ".ready")
    try:
        wait_for(ready, proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 42
        assert marker.read_text().split() == [str(int(sig))]
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_orphan(ready)


def test_several_signals_in_a_row_reach_the_command_in_order(shared_env: dict[str, str], tmp_path: Path) -> None:
    """QUIT, USR1, USR2, HUP then TERM to one `run` (gunicorn's and nginx's vocabulary): the wrapper
    survives each and the command gets each, once, in order."""
    marker = tmp_path / "signals"
    sequence = [signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGWINCH, signal.SIGTERM]
    proc = subprocess.Popen(
        [sys.executable, "-m", "secretsd", "run", "--prefix", "sig", "--", sys.executable, "-c", RECORDER,
         str(marker), str(int(signal.SIGTERM)), *(str(int(s)) for s in sequence)],
        env=os.environ | shared_env,
    )
    ready = Path(str(marker) + ".ready")
    try:
        wait_for(ready, proc)
        for n, sig in enumerate(sequence, 1):
            proc.send_signal(sig)
            deadline = time.monotonic() + 20
            while not (marker.exists() and len(marker.read_text().split()) == n):
                assert proc.poll() is None or sig == signal.SIGTERM, f"run exited on {signal.Signals(sig).name}"
                assert time.monotonic() < deadline, f"{signal.Signals(sig).name} never arrived"
                time.sleep(0.02)
        assert proc.wait(timeout=20) == 42
        assert marker.read_text().split() == [str(int(s)) for s in sequence]
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_orphan(ready)


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGUSR1], ids=lambda s: signal.Signals(s).name)
def test_command_killed_by_a_forwarded_signal_gives_128_plus_it(shared_env: dict[str, str], tmp_path: Path,
                                                                 sig: int) -> None:
    ready = tmp_path / "ready"
    script = f"import os, pathlib, time; pathlib.Path({str(ready)!r}).write_text(str(os.getpid())); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-m", "secretsd", "run", "--prefix", "sig", "--",
                             sys.executable, "-c", script], env=os.environ | shared_env)
    try:
        wait_for(ready, proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 128 + sig
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_orphan(ready)


# In-process (CliRunner): the command is a real process that would leave a file if it started.
def invoke(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def started_marker(tmp_path: Path) -> list[str]:
    return ["--", sys.executable, "-c", f"import pathlib; pathlib.Path({str(tmp_path / 'started')!r}).touch()"]


@pytest.mark.parametrize("prefix", ["typo", "onlydeleted", "onlynested"])
def test_run_refuses_an_empty_or_unknown_prefix(shared_env: dict[str, str], tmp_path: Path, prefix: str) -> None:
    result = invoke(shared_env, "run", "--prefix", prefix, *started_marker(tmp_path))
    assert result.exit_code == 3  # not found, per the contract
    assert len(result.stderr.splitlines()) == 1 and f"nothing under the prefix '{prefix}'" in result.stderr
    assert "--allow-empty" in result.stderr
    assert not (tmp_path / "started").exists()


def test_run_allow_empty_runs_the_command(shared_env: dict[str, str], tmp_path: Path) -> None:
    result = invoke(shared_env, "run", "--prefix", "typo", "--allow-empty", *started_marker(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "started").exists()


def dump_env_to(path: Path) -> list[str]:
    """The command's environment goes to a file: CliRunner captures our stdout, not the child's."""
    return ["--", sys.executable, "-c", f"import json, os; json.dump(dict(os.environ), open({str(path)!r}, 'w'))"]


def test_environment_names_map_dash_and_dot_to_underscore(shared_env: dict[str, str], tmp_path: Path) -> None:
    result = invoke(shared_env, "run", "--prefix", "names", *dump_env_to(tmp_path / "env.json"))
    assert result.exit_code == 0, result.output
    child = json.loads((tmp_path / "env.json").read_text())
    assert (child["stripe_key"], child["DOTTED_NAME"], child["Mixed_Case"]) == ("sk_live", "d", "m")
    assert "stripe-key" not in child and "DOTTED.NAME" not in child


@pytest.mark.parametrize(("prefix", "named"), [("clash", "clash/a-b and clash/a_b would all be the variable a_b"),
                                               ("digit", "digit/1PASSWORD has no valid environment variable name")])
def test_environment_names_never_injected_silently(shared_env: dict[str, str], tmp_path: Path, prefix: str,
                                                   named: str) -> None:
    result = invoke(shared_env, "run", "--prefix", prefix, *started_marker(tmp_path))
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1 and named in result.stderr
    assert not (tmp_path / "started").exists()
    assert "sk_live" not in result.stderr and "'x'" not in result.stderr
    skipped = invoke(shared_env, "run", "--prefix", prefix, "--skip-invalid", *dump_env_to(tmp_path / "env.json"))
    assert skipped.exit_code == 0, skipped.output
    child = json.loads((tmp_path / "env.json").read_text())
    assert "warning: " + named in skipped.stderr
    assert {k for k in child if k in ("a_b", "a-b", "OK", "1PASSWORD", "GOOD")} == (
        {"OK"} if prefix == "clash" else {"GOOD"})


def test_map_name_must_be_a_posix_name(shared_env: dict[str, str], tmp_path: Path) -> None:
    result = invoke(shared_env, "run", "--map", "stripe-key=names/stripe-key", *started_marker(tmp_path))
    assert result.exit_code == 2 and "not a valid environment variable name" in result.stderr
    assert not (tmp_path / "started").exists()
