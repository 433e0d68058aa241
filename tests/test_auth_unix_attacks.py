"""The Unix-socket listener and peer authentication under attack (issue 13 item 2, attacker's H1, H4,
H5 and the unusable Authorization header): each test fails on the code before its defence."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretsd.api.app import bearer_of
from secretsd.auth.unix import OverflowIds, UnixAuthenticator, parse_rules
from secretsd.domain.identity import Credentials, PeerCredentials
from secretsd.errors import ConfigError, UnauthenticatedError
from secretsd.runtime.unix_listener import bind_unix, check_socket_directory
from tests.helpers import DaemonProcess, run_cli
from tests.test_auth_unix import BILLING_UID, unix_daemon  # noqa: F401 (the fixture, shared)

OVERFLOW = OverflowIds.of_this_system()


# -- H1: the overflow id is nobody ----------------------------------------------------------------
@pytest.mark.parametrize("named", ["uid", "gid"])
def test_a_rule_naming_the_overflow_id_is_refused_at_load(named: str) -> None:
    value = OVERFLOW.uid if named == "uid" else OVERFLOW.gid
    with pytest.raises(ConfigError, match=rf"auth\.unix\.rules.*{named} {value}.*overflow"):
        parse_rules([{named: value, "client": "nobody-svc", "policies": ["p"]}])


async def test_an_unmapped_peer_is_nobody() -> None:
    """A peer whose uid or gid the daemon's user namespace cannot map matches no rule, not even one
    on its other, mapped id."""
    auth = UnixAuthenticator(parse_rules([{"gid": 100, "client": "by-gid", "policies": ["p"]},
                                          {"uid": 1001, "client": "by-uid", "policies": ["p"]}]))
    for peer in (PeerCredentials(1, OVERFLOW.uid, 100), PeerCredentials(1, 1001, OVERFLOW.gid)):
        with pytest.raises(UnauthenticatedError):
            await auth.authenticate(Credentials(peer=peer))
    mapped = await auth.authenticate(Credentials(peer=PeerCredentials(1, 1001, 100)))
    assert mapped is not None and mapped.client == "by-gid"


def test_overflow_ids_are_read_from_the_kernel(tmp_path: Path) -> None:
    uid_file, gid_file = tmp_path / "u", tmp_path / "g"
    uid_file.write_text("4000\n")
    gid_file.write_text("4001\n")
    assert OverflowIds.of_this_system((uid_file, gid_file)) == OverflowIds(4000, 4001)
    assert OverflowIds.of_this_system((tmp_path / "none", tmp_path / "none")) == OverflowIds(65534, 65534)
    overflow = OverflowIds(4000, 4001)
    with pytest.raises(ConfigError, match="overflow"):
        parse_rules([{"uid": 4000, "client": "c", "policies": ["p"]}], overflow)
    assert parse_rules([{"uid": 65534, "client": "c", "policies": ["p"]}], overflow)[0].uid == 65534


_USERNS_SERVER = """
import socket, sys
from secretsd.auth.unix import UnixAuthenticator, parse_rules
from secretsd.runtime.unix_listener import peer_credentials
srv = socket.socket(socket.AF_UNIX); srv.bind(sys.argv[1]); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
peer = peer_credentials(conn)
auth = UnixAuthenticator(parse_rules([{"gid": 0, "client": "by-gid", "policies": ["p"]}]))
decided = auth.decide(peer)
print(peer.uid, peer.gid, decided.client if decided else "refused", flush=True)
"""


@pytest.mark.e2e
def test_a_peer_outside_the_daemons_user_namespace_is_refused(shared_dir: Path) -> None:
    """The attacker's H1 with real parts: the listener in `unshare --user --map-root-user`, a peer as
    uid 1234 (unmapped there: seen as the overflow uid) in gid 0 (mapped): a gid rule must not admit it."""
    sock = shared_dir / "s.sock"
    shared_dir.chmod(0o755)
    server = subprocess.Popen(["unshare", "--user", "--map-root-user", sys.executable, "-c", _USERNS_SERVER,
                               str(sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready", server.stderr
        os.chmod(sock, 0o666)  # noqa: S103 (the test peer is another uid)
        client = subprocess.run(["setpriv", "--reuid=1234", "--regid=0", "--clear-groups", sys.executable, "-c",
                                 f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(sock)!r})"],
                                capture_output=True, text=True, timeout=20)
        assert client.returncode == 0, client.stderr
        out, err = server.communicate(timeout=20)
    finally:
        server.kill()
        server.wait()
    assert out.split() == [str(OVERFLOW.uid), "0", "refused"], err


# -- H4: nobody else may write the socket's directory ---------------------------------------------
@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp (tmp_path is 0700: what we test is the directory's own mode)."""
    path = Path(tempfile.mkdtemp(prefix="sd-dir-", dir="/tmp"))
    try:
        yield path
    finally:
        for leftover in path.iterdir():
            leftover.unlink()
        path.rmdir()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o1770, 0o757])
def test_a_socket_directory_others_can_write_is_refused(shared_dir: Path, mode: int) -> None:
    shared_dir.chmod(mode)
    with pytest.raises(ConfigError, match=r"writable by group or others.*/run/secretsd"):
        bind_unix(shared_dir / "secretsd.sock", 0o660, None)
    assert list(shared_dir.iterdir()) == []  # nothing bound, nothing left


def test_a_socket_directory_owned_by_another_user_is_refused(shared_dir: Path) -> None:
    shared_dir.chmod(0o755)
    os.chown(shared_dir, 1234, 1234)
    with pytest.raises(ConfigError, match=r"owned by uid 1234"):
        check_socket_directory(shared_dir)


def test_a_socket_directory_under_a_writable_directory_is_refused(shared_dir: Path) -> None:
    """Above the socket's directory, a non-sticky writable directory lets others rename ours away."""
    inner = shared_dir / "run"
    inner.mkdir(mode=0o750)
    shared_dir.chmod(0o777)
    try:
        with pytest.raises(ConfigError, match=rf"{shared_dir} is writable"):
            check_socket_directory(inner)
        shared_dir.chmod(0o1777)  # sticky, like /tmp: others cannot rename what is not theirs
        check_socket_directory(inner)
    finally:
        inner.rmdir()


def test_a_symlink_to_a_writable_directory_is_refused(shared_dir: Path, tmp_path: Path) -> None:
    shared_dir.chmod(0o1777)
    link = tmp_path / "run"
    link.symlink_to(shared_dir)
    with pytest.raises(ConfigError, match="writable by group or others"):
        check_socket_directory(link)


def test_a_private_socket_directory_is_accepted(shared_dir: Path) -> None:
    shared_dir.chmod(0o750)
    sock, _ = bind_unix(shared_dir / "secretsd.sock", 0o660, None)
    sock.close()


def test_serve_refuses_a_socket_in_a_world_writable_directory(shared_dir: Path, tmp_path: Path) -> None:
    """The squatter's directory (the attacker's H4): the daemon does not start, and says where to go."""
    shared_dir.chmod(0o1777)
    config = tmp_path / "c.toml"
    config.write_text(f'listen = "none"\nlisten_unix = "{shared_dir / "secretsd.sock"}"\n')
    result = run_cli("serve", "--data-dir", str(tmp_path / "d"), "--config", str(config), "--dev", timeout=30)
    assert result.returncode != 0
    assert "writable by group or others" in result.stderr and "/run/secretsd" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert list(shared_dir.iterdir()) == []


# -- H5: the mode is set on our socket, never through a swapped name ------------------------------
def _hook_bind(monkeypatch: pytest.MonkeyPatch, after_bind: object) -> None:
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: str) -> None:
        real_bind(self, address)
        after_bind(address)  # type: ignore[operator]

    monkeypatch.setattr(socket.socket, "bind", bind)


def test_socket_mode_is_never_set_through_a_swapped_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker's sock_symlink_race.py: right after bind() the new socket file is replaced by a
    symlink to a file of root's; the daemon must not chmod/chown the link's target."""
    victim = tmp_path / "victim"
    victim.write_text("root only")
    victim.chmod(0o600)

    def swap(address: str) -> None:
        os.unlink(address)
        os.symlink(victim, address)

    _hook_bind(monkeypatch, swap)
    path = tmp_path / "secretsd.sock"
    with pytest.raises(ConfigError):
        bind_unix(path, 0o666, 4321)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600 and victim.stat().st_gid == 0
    assert not path.exists() and not path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]  # no staging directory left


def test_the_socket_name_appears_with_its_final_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody can reach the socket under its public name before its mode and group are set."""
    path = tmp_path / "secretsd.sock"
    seen: list[bool] = []
    _hook_bind(monkeypatch, lambda address: seen.append(path.exists()))
    sock, inode = bind_unix(path, 0o640, 4321)
    sock.close()
    assert seen == [False]
    info = path.lstat()
    assert stat.S_ISSOCK(info.st_mode) and info.st_ino == inode
    assert stat.S_IMODE(info.st_mode) == 0o640 and info.st_gid == 4321
    assert [p.name for p in tmp_path.iterdir()] == ["secretsd.sock"]


def test_a_name_taken_during_the_bind_is_kept_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secretsd.sock"
    _hook_bind(monkeypatch, lambda address: path.write_text("someone else's"))
    with pytest.raises(ConfigError, match="took the name"):
        bind_unix(path, 0o660, None)
    assert path.read_text() == "someone else's"


# -- a present but unusable credential is refused, never a fall-back to the peer ------------------
@pytest.mark.parametrize("header", ["Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer   ", "Token sdt_x", "", "  "])
def test_an_unusable_authorization_header_is_refused(header: str) -> None:
    with pytest.raises(UnauthenticatedError):
        bearer_of(header)


def test_a_bearer_header_gives_its_token() -> None:
    assert bearer_of("Bearer sdt_abc") == "sdt_abc" and bearer_of("bearer  sdt_abc ") == "sdt_abc"


_RAW_REQUEST = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(("GET /v1/auth/whoami HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n" + sys.argv[2]
           + "\\r\\n\\r\\n").encode())
out = b""
while (d := s.recv(65536)):
    out += d
print(out.split(b" ", 2)[1].decode())
"""


@pytest.mark.e2e
def test_an_unusable_credential_over_the_socket_never_falls_back_to_the_peer(
        unix_daemon: tuple[DaemonProcess, str, Path]) -> None:  # noqa: F811 (the imported fixture)
    """A peer with a rule (billing) that sends a credential we cannot use gets 401, not billing's access."""
    _, _, sock = unix_daemon

    def status(header: str) -> str:
        result = subprocess.run(
            ["setpriv", f"--reuid={BILLING_UID}", f"--regid={BILLING_UID}", "--clear-groups", sys.executable, "-c",
             _RAW_REQUEST, str(sock), header], capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert status("X-Peer: none") == "200"  # the peer alone is billing
    for header in ("Authorization: Basic YmlsbGluZzp4", "Authorization: Bearer", "Authorization: Bearer  ",
                   "X-Vault-Token: "):
        assert status(header) in ("401", "403"), header  # the Vault façade answers 403, as Vault does
