"""Unix-socket peer credentials (issue 13 item 2): rules, the socket file, the clients' unix:// address,
and a real daemon reached over its socket by two OS users who get different policies."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from secretsd_client import SecretsClient
from secretsd_client.errors import UnauthenticatedError as ClientUnauthenticatedError
from secretsd_client.operations import Endpoint, unix_socket_path
from secretsd_client.sync import UnixHTTPConnection

from secretsd.auth import AuthenticatorContext, Authenticators, authenticate, authenticator_factory
from secretsd.auth.unix import UnixAuthenticator, parse_rules
from secretsd.cli import main
from secretsd.domain.identity import Credentials, PeerCredentials
from secretsd.errors import ConfigError, UnauthenticatedError
from secretsd.runtime.config import load_settings
from secretsd.runtime.unix_listener import bind_unix, clear_stale_socket, peer_credentials
from tests.helpers import DaemonProcess, http, init_store, run_cli

# Not 65534: the overflow id is refused as an identity (test_auth_unix_attacks.py).
BILLING_UID, OPS_UID, OPS_GID = 1002, 1001, 1001
#: Running a client as another uid, or giving a file another group, takes root (CI runs as root).
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: setpriv to other uids, chown to another group")


def _peer(uid: int, gid: int) -> Credentials:
    return Credentials(peer=PeerCredentials(pid=1234, uid=uid, gid=gid))


def _authenticator(*rules: dict[str, object]) -> UnixAuthenticator:
    return UnixAuthenticator(parse_rules(list(rules)))


# -- the rules ------------------------------------------------------------------------------------
async def test_peer_credentials_map_by_the_first_matching_rule() -> None:
    auth = _authenticator(
        {"uid": 1001, "gid": 50, "client": "both", "policies": ["p-both"]},  # both must match
        {"uid": 1001, "client": "by-uid", "policies": ["p-uid"]},
        {"gid": 50, "client": "by-gid", "policies": ["p-gid"]},
        {"uid": 1001, "client": "shadowed", "policies": ["never"]},
    )
    both = await auth.authenticate(_peer(1001, 50))
    assert both is not None and (both.client, both.policies, both.method) == ("both", ("p-both",), "unix")
    by_uid = await auth.authenticate(_peer(1001, 7))
    assert by_uid is not None and by_uid.client == "by-uid" and by_uid.token_id is None
    by_gid = await auth.authenticate(_peer(2000, 50))
    assert by_gid is not None and by_gid.client == "by-gid"


async def test_no_rule_matched_is_one_bare_refusal() -> None:
    auth = _authenticator({"uid": 1001, "client": "billing", "policies": ["billing"]})
    with pytest.raises(UnauthenticatedError) as caught:
        await auth.authenticate(_peer(0, 0))
    assert type(caught.value) is UnauthenticatedError and str(caught.value) == str(UnauthenticatedError())
    assert "billing" not in str(caught.value) and caught.value.__cause__ is None and caught.value.__context__ is None


async def test_nothing_presented_is_not_mine() -> None:
    assert await _authenticator({"uid": 1, "client": "a", "policies": ["p"]}).authenticate(Credentials()) is None


async def test_a_bearer_token_wins_over_the_peer() -> None:
    """Token first, unix after (the order authenticator_specs builds): a token, even a bad one, decides."""
    class Tokens:
        method = "token"

        async def authenticate(self, credentials: Credentials) -> None:
            if credentials.bearer is not None:
                raise UnauthenticatedError()

    members = Authenticators([Tokens(), _authenticator({"uid": 0, "client": "root-peer", "policies": ["p"]})])
    with pytest.raises(UnauthenticatedError):
        await authenticate(members, Credentials(bearer="sdt_bad", peer=PeerCredentials(1, 0, 0)))
    assert (await authenticate(members, _peer(0, 0))).client == "root-peer"
    assert members.counts == {("token", "failure"): 1, ("unix", "success"): 1}


@pytest.mark.parametrize("rule", [
    {"client": "any", "policies": ["p"]},                        # names nobody: would match everyone
    {"uid": 1, "client": "admin", "policies": ["p"]},            # a reserved client name
    {"uid": 1, "client": "system.x", "policies": ["p"]},
    {"uid": 1, "client": "ok", "policies": []},                  # no policy
    {"uid": -1, "client": "ok", "policies": ["p"]},
    {"uid": 1, "client": "ok", "policies": ["p"], "exe": "/usr/bin/x"},  # no executable matching
])
def test_bad_rules_are_refused_at_start(rule: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"auth\.unix\.rules"):
        parse_rules([rule])


def test_registered_as_an_entry_point() -> None:
    factory = authenticator_factory("unix")
    built = factory.from_config({"rules": [{"gid": 5, "client": "c", "policies": ["p"]}]},
                                AuthenticatorContext(storage=None))  # type: ignore[arg-type]
    assert isinstance(built, UnixAuthenticator) and built.method == "unix"
    with pytest.raises(ConfigError):
        factory.from_config({"rules": [], "bogus": 1}, AuthenticatorContext(storage=None))  # type: ignore[arg-type]


def test_listen_unix_adds_the_unix_method_after_the_token(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('listen_unix = "s.sock"\n[[auth.unix.rules]]\nuid = 1001\nclient = "billing"\n'
                      'policies = ["billing"]\n')
    settings = load_settings(config, data_dir=tmp_path)
    assert settings.listen_unix == tmp_path / "s.sock"  # relative to the file
    specs = settings.authenticator_specs()
    assert [s["method"] for s in specs] == ["token", "unix"]
    assert specs[1]["rules"] == [{"uid": 1001, "client": "billing", "policies": ["billing"]}]
    assert [s["method"] for s in load_settings(None, data_dir=tmp_path).authenticator_specs()] == ["token"]


# -- the socket file ------------------------------------------------------------------------------
def test_a_path_that_is_not_a_socket_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_text("mine")
    with pytest.raises(ConfigError, match="not a socket"):
        clear_stale_socket(path)
    assert path.read_text() == "mine"
    link = tmp_path / "l.sock"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="not a socket"):
        clear_stale_socket(link)


def test_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    with pytest.raises(ConfigError, match="another process is serving"):
        clear_stale_socket(path)
    assert path.exists()
    live.close()  # the file stays, nobody answers: stale
    sock, inode = bind_unix(path, 0o600, None)
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode) and path.lstat().st_ino == inode
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    finally:
        sock.close()


@needs_root
def test_socket_mode_and_group_are_set(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock, _ = bind_unix(path, 0o660, 4321)
    try:
        info = path.lstat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == 4321
    finally:
        sock.close()


def test_peer_credentials_are_the_kernels(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock, _ = bind_unix(path, 0o600, None)
    with sock, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        conn, _ = sock.accept()
        with conn:
            assert peer_credentials(conn) == PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


# -- the clients' address -------------------------------------------------------------------------
@pytest.mark.parametrize("addr", ["unix://host/run/s.sock", "unix:relative.sock", "unix:///run/s.sock?x=1",
                                  "unix://:80/run/s.sock", "unix:///"])
def test_a_unix_address_with_host_parts_is_refused(addr: str) -> None:
    with pytest.raises(ConfigError, match="unix:///ABSOLUTE/PATH"):
        Endpoint(addr, "t")


def test_a_unix_address_names_its_socket() -> None:
    assert unix_socket_path("unix:///run/secretsd/secretsd.sock") == "/run/secretsd/secretsd.sock"
    assert unix_socket_path("http://127.0.0.1:8750") is None


def test_cli_refuses_a_unix_address_with_a_host() -> None:
    result = CliRunner().invoke(main, ["--addr", "unix://host/run/s.sock", "get", "app/x"])
    assert result.exit_code == 2 and "unix:///ABSOLUTE/PATH" in result.output
    assert "Traceback" not in result.output


def test_workers_and_listen_unix_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'listen_unix = "{tmp_path / "s.sock"}"\n')
    result = run_cli("serve", "--data-dir", str(tmp_path / "d"), "--config", str(config), "--workers", "2")
    assert result.returncode != 0 and "listen_unix cannot be combined with --workers" in result.stderr


# -- a real daemon on a real socket, two OS users ------------------------------------------------
_CLIENT_SCRIPT = """
import json, sys
from secretsd_client import SecretsClient
from secretsd_client.errors import UnauthenticatedError as ClientUnauthenticatedError
from secretsd_client.errors import SecretsdError
out = {}
with SecretsClient(sys.argv[1], token="") as c:
    calls = (("whoami", c.whoami), ("billing", lambda: c.get("billing/db")), ("ops", lambda: c.get("ops/db")))
    for name, call in calls:
        try:
            r = call()
            out[name] = r.get("client") or r.get("value")
        except SecretsdError as e:
            out[name] = type(e).__name__
print(json.dumps(out))
"""


@pytest.fixture
def unix_daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, str, Path]]:
    # Under /tmp itself: pytest's tmp_path is 0700, and the other users must reach the socket.
    sock_dir = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))
    sock_dir.chmod(0o755)
    sock = sock_dir / "secretsd.sock"
    policy = tmp_path / "policy.toml"
    policy.write_text('[policies.billing]\nrules = [{ path = "billing/*", allow = ["read"] }]\n'
                      '[policies.ops]\nrules = [{ path = "ops/*", allow = ["read"] }]\n')
    config = tmp_path / "secretsd.toml"
    config.write_text(f'policy_file = "{policy}"\nlisten_unix = "{sock}"\nunix_socket_mode = "0666"\n'
                      f'[[auth.unix.rules]]\nuid = {BILLING_UID}\nclient = "billing"\npolicies = ["billing"]\n'
                      f'[[auth.unix.rules]]\nuid = {OPS_UID}\ngid = {OPS_GID}\nclient = "ops"\npolicies = ["ops"]\n')
    data = tmp_path / "data"
    token = init_store(data)
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    try:
        for path in ("billing/db", "ops/db"):
            put = http("PUT", f"{daemon.url}/v1/secrets/{path}", token=token, body={"value": path})
            assert put.status in (200, 201), put.body
        yield daemon, token, sock
    finally:
        daemon.stop()
        for leftover in sock_dir.iterdir():
            leftover.unlink()
        sock_dir.rmdir()


def _as_user(uid: int, gid: int, sock: Path) -> dict[str, str]:
    client_dir = str(Path(__file__).resolve().parent.parent / "client")
    result = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable, "-c", _CLIENT_SCRIPT,
         f"unix://{sock}"],
        capture_output=True, text=True, timeout=30,
        env={"PYTHONPATH": client_dir, "PATH": os.environ["PATH"], "HOME": "/nonexistent"},
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.e2e
@needs_root
def test_two_os_users_get_their_own_policies_over_the_socket(unix_daemon: tuple[DaemonProcess, str, Path]) -> None:
    daemon, token, sock = unix_daemon
    assert stat.S_IMODE(sock.lstat().st_mode) == 0o666
    assert _as_user(BILLING_UID, BILLING_UID, sock) == {
        "whoami": "billing", "billing": "billing/db", "ops": "PermissionDeniedError"}
    assert _as_user(OPS_UID, OPS_GID, sock) == {
        "whoami": "ops", "billing": "PermissionDeniedError", "ops": "ops/db"}
    # The ops rule needs both uid and gid: the right uid in another group matches nothing.
    assert _as_user(OPS_UID, 4242, sock) == {"whoami": "UnauthenticatedError", "billing": "UnauthenticatedError",
                                             "ops": "UnauthenticatedError"}
    # Root has no rule: one 401 that names no rule.
    with SecretsClient(f"unix://{sock}", token="") as root:
        with pytest.raises(ClientUnauthenticatedError) as caught:
            root.whoami()
        assert "billing" not in str(caught.value) and "ops" not in str(caught.value)
        # The TCP listener beside it knows no peer: the same refusal without a token.
        assert http("GET", f"{daemon.url}/v1/auth/whoami").status == 401
    # A bearer token over the socket wins over the peer (root's, which matches no rule).
    with SecretsClient(f"unix://{sock}", token=token) as admin:
        me = admin.whoami()
        assert me["client"] == "admin" and me["method"] == "token"
    text = http("GET", f"{daemon.url}/metrics", token=token).body
    assert 'secretsd_auth_attempts_total{method="unix",outcome="success"} 6.0' in text
    assert 'secretsd_auth_attempts_total{method="unix",outcome="failure"} 4.0' in text
    # The audit log names the rule's client and the method, never a credential.
    logs = "\n".join(p.read_text() for p in (daemon.data_dir / "audit").glob("*.jsonl"))
    records = [json.loads(line) for line in logs.splitlines() if line.strip()]
    unix = [r for r in records if r.get("auth") == "unix"]
    assert {r["client"] for r in unix} == {"billing", "ops"}
    assert {r["remote"] for r in unix} == {f"unix:uid={BILLING_UID},gid={BILLING_UID}",
                                           f"unix:uid={OPS_UID},gid={OPS_GID}"}
    # A refusal records the identity presented (no client: none was granted).
    refused = {r["remote"] for r in records if r.get("outcome") == 401}
    assert {f"unix:uid={OPS_UID},gid=4242", "unix:uid=0,gid=0"} <= refused


@pytest.mark.e2e
def test_the_socket_file_goes_with_the_daemon_and_a_second_daemon_is_refused(
        unix_daemon: tuple[DaemonProcess, str, Path], tmp_path: Path) -> None:
    daemon, _, sock = unix_daemon
    config = next(daemon.data_dir.parent.glob("secretsd.toml"))
    second = run_cli("serve", "--data-dir", str(tmp_path / "other"), "--config", str(config), "--dev", timeout=60)
    assert second.returncode != 0 and "another process is serving" in second.stderr + second.stdout
    assert sock.exists()
    daemon.stop()
    assert not sock.exists()


@pytest.mark.e2e
def test_listen_none_serves_the_socket_alone(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    config = tmp_path / "c.toml"
    config.write_text(f'listen = "none"\nlisten_unix = "{sock}"\n')
    data = tmp_path / "data"
    token = init_store(data)
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "secretsd", "serve", "--data-dir", str(data), "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        conn = UnixHTTPConnection(str(sock), timeout=5)
        conn.request("GET", "/readyz")
        assert conn.getresponse().status == 200
        conn.close()
        with SecretsClient(f"unix://{sock}", token=token) as client:
            assert client.whoami()["client"] == "admin"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
    text = (tmp_path / "log").read_text()
    assert f"listening on unix://{sock} " in text and "http://" not in text.split("listening on", 1)[1].split("\n")[0]
    assert not sock.exists()
    # Nothing to serve on at all is refused.
    config.write_text('listen = "none"\n')
    result = run_cli("serve", "--data-dir", str(data), "--config", str(config))
    assert result.returncode != 0 and 'listen = "none" needs listen_unix' in result.stderr


@pytest.mark.e2e
@needs_root
def test_sighup_reloads_the_unix_rules(unix_daemon: tuple[DaemonProcess, str, Path]) -> None:
    daemon, _, sock = unix_daemon
    config = daemon.data_dir.parent / "secretsd.toml"
    assert _as_user(BILLING_UID, BILLING_UID, sock)["whoami"] == "billing"
    # The operator gives the billing uid the ops rule instead, and reloads.
    text = config.read_text()
    config.write_text(text.replace(f"uid = {BILLING_UID}\nclient = \"billing\"\npolicies = [\"billing\"]",
                                   f"uid = {BILLING_UID}\nclient = \"ops-batch\"\npolicies = [\"ops\"]"))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while (seen := _as_user(BILLING_UID, BILLING_UID, sock))["whoami"] != "ops-batch":
        assert time.monotonic() < deadline, daemon.logs()
        time.sleep(0.1)
    assert seen == {"whoami": "ops-batch", "billing": "PermissionDeniedError", "ops": "ops/db"}
    # A configuration that no longer parses keeps the rules in force, and says so.
    config.write_text(text.replace('client = "billing"', 'client = "admin"'))  # a reserved name
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "unix rules not reloaded" not in daemon.logs():
        assert time.monotonic() < deadline, daemon.logs()
        time.sleep(0.1)
    assert _as_user(BILLING_UID, BILLING_UID, sock)["whoami"] == "ops-batch"
