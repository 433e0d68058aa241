"""The Unix-domain socket listener (``listen_unix``): the socket file, and the peer of each connection.

The socket file is prepared with care because its path is a name others can race for:

- a path that exists and is not a socket (a file, a directory, a symlink) is refused, never removed;
- a socket another live daemon answers on is refused (two daemons, one name: the later would steal
  the name from the earlier's clients);
- a socket nobody answers on (the file a killed daemon left) is replaced;
- the socket's directory, and every directory above it, must be owned by root or the daemon's user
  and not writable by anyone else (``check_socket_directory``): in a directory others can write, one
  of them could take the name first (and collect the tokens clients send) or swap the file under us;
- the socket is bound inside a private directory (0700, made beside the final name), its mode
  (``unix_socket_mode``) and group (``unix_socket_group``) are set there through a descriptor of
  the file itself (``O_PATH|O_NOFOLLOW``, then ``/proc/self/fd``: never by a path a symlink could be
  swapped into; ``fchmod`` on the socket's own descriptor would change the sockfs inode, not the
  file), and only then is it hard-linked to its final name (``link()`` never replaces an entry), so
  the name never shows a looser mode or the wrong group, and ``listen()`` comes after;
- at stop the file is removed only if it is still the one this process bound (same inode), so a
  daemon stopping never removes a successor's socket.

Each accepted connection's peer credentials (``SO_PEERCRED``: pid, uid, gid, recorded by the kernel
at ``connect()``) are read once, here, and kept on the connection's handler; every request on the
connection presents them (secretsd.api.app reads ``request.protocol.peer``).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from secretsd.auth.unix import UnixAuthenticator, parse_rules
from secretsd.domain.identity import PeerCredentials
from secretsd.errors import ConfigError
from secretsd.runtime.config import Settings
from secretsd.runtime.edge import Edge, EdgeHandler
from secretsd.runtime.edge_listener import ACCEPT_BATCH, EdgeListener, EdgeSite

log = logging.getLogger("secretsd")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(conn: socket.socket) -> PeerCredentials:
    """The connected peer as the kernel recorded it at ``connect()`` (Linux ``SO_PEERCRED``)."""
    pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def reload_unix_rules(authenticator: UnixAuthenticator, load: Callable[[], Settings]) -> bool:
    """SIGHUP: the ``[[auth.unix.rules]]`` read again from the configuration. A configuration that
    no longer loads, or rules that do not parse, keep the rules in force (logged, False)."""
    try:
        specs = load().authenticator_specs()
        rules = parse_rules(next((s.get("rules", []) for s in specs if s["method"] == "unix"), []))
    except ConfigError as exc:
        log.error("unix rules not reloaded, the previous ones stay in force: %s", exc)
        return False
    authenticator.replace_rules(rules)
    log.info("unix rules reloaded (%d rules)", len(rules))
    return True


def parse_mode(text: str) -> int:
    mode = int(text, 8)
    if mode & ~0o777:
        raise ConfigError(f"unix_socket_mode {text!r} is not a permission mode like 0660")
    return mode


def resolve_group(group: str | None) -> int | None:
    """``unix_socket_group`` as a gid: a group name, or a number; None keeps the process's own."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"unix_socket_group {group!r}: no such group") from None


def clear_stale_socket(path: Path) -> None:
    """The rule for what may stand at ``listen_unix`` before we bind: nothing, or a dead socket.

    Refuses (ConfigError) a path that is not a socket, and a socket a live process answers on.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"listen_unix {path} exists and is not a socket; refusing to replace it "
                          "(remove it yourself if it is yours)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"listen_unix {path}: cannot tell whether a daemon serves there "
                              f"({exc.strerror}); refusing to replace it") from exc
    else:
        raise ConfigError(f"listen_unix {path}: another process is serving on this socket; "
                          "refusing to take its place (stop it, or choose another path)")
    finally:
        probe.close()
    log.info("removing the stale socket %s (nothing answers on it)", path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _unsafe_directory(info: os.stat_result, *, final: bool) -> str | None:
    """Why a directory on the socket's path is not safe for it, or None."""
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {info.st_uid}, neither root nor the daemon's user"
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    # Above the socket's own directory a sticky bit suffices (/tmp): others cannot rename or remove
    # what is not theirs. In the socket's own directory it does not: they could take the name first.
    if writable and (final or not info.st_mode & stat.S_ISVTX):
        return "is writable by group or others"
    return None


def check_socket_directory(directory: Path) -> None:
    """The rule "the socket's directory is trusted": it, and every directory above it (as written and
    as resolved), are owned by root or the daemon's user and not writable by others (above it, a
    sticky bit is enough). Otherwise another local user could bind the name first and collect the
    bearer tokens clients send, or replace the socket while we run (ConfigError)."""
    try:
        resolved = directory.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"listen_unix: the directory {directory} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"listen_unix: cannot examine {directory} ({exc.strerror})") from exc
    written = directory.absolute()
    for chain in ((written, *written.parents), (resolved, *resolved.parents)):
        for index, ancestor in enumerate(chain):
            try:
                problem = _unsafe_directory(ancestor.stat(), final=index == 0)
            except OSError as exc:
                problem = f"cannot be examined ({exc.strerror})"
            if problem is not None:
                raise ConfigError(
                    f"listen_unix {directory}: {ancestor} {problem}; another local user could take the "
                    "socket's name or replace it. Use a private directory such as /run/secretsd "
                    "(owned by the daemon's user, mode 0750; systemd: RuntimeDirectory=secretsd, "
                    "RuntimeDirectoryMode=0750)")


def _set_mode_and_group(path: Path, mode: int, gid: int | None) -> int:
    """Mode and group of the socket file at ``path``, set on that very file; returns its inode.

    The file is opened without following a symlink (``O_PATH|O_NOFOLLOW``) and checked to be a
    socket; the changes go through ``/proc/self/fd/N``, which names the opened inode, whatever is at
    ``path`` by then. (``fchmod`` on the socket's own descriptor changes the sockfs inode, not the
    file's mode.)
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode):
            raise ConfigError(f"listen_unix {path}: the file we bound was replaced before its mode was set; "
                              "refusing to start")
        handle = f"/proc/self/fd/{fd}"
        os.chmod(handle, mode)
        if gid is not None:
            os.chown(handle, -1, gid)
        return info.st_ino
    finally:
        os.close(fd)


def bind_unix(path: Path, mode: int, gid: int | None) -> tuple[socket.socket, int]:
    """A listening socket at ``path`` with ``mode`` and group ``gid``; returns it and the file's inode."""
    check_socket_directory(path.parent)
    clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bound in a directory only we can enter, finished there, then linked to the public name.
        private = Path(tempfile.mkdtemp(prefix=".secretsd-bind-", dir=path.parent))
        try:
            staged = private / "s"
            sock.bind(str(staged))
            inode = _set_mode_and_group(staged, mode, gid)
            try:
                os.link(staged, path)  # never replaces: an entry that appeared since is not ours to take
            except FileExistsError:
                raise ConfigError(f"listen_unix {path}: something took the name while we prepared the socket; "
                                  "refusing to start") from None
        finally:
            with contextlib.suppress(OSError):
                (private / "s").unlink()
            with contextlib.suppress(OSError):
                private.rmdir()
        # Until listen() every connect() is refused.
        sock.listen(ACCEPT_BATCH * 8)
    except ConfigError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix socket {path}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock, inode


class UnixEdgeSite(EdgeSite):
    """The Unix-socket listener: the edge's gate and deadlines, plus each connection's peer."""

    __slots__ = ("_gid", "_inode", "_mode", "_path")

    def __init__(self, runner: web.BaseRunner, path: Path, edge: Edge, *, mode: int, gid: int | None) -> None:
        super().__init__(runner, str(path), 0, edge)
        self._path = path
        self._mode = mode
        self._gid = gid
        self._inode: int | None = None

    @property
    def name(self) -> str:
        return f"unix://{self._path}"

    def make_handler(self, conn: socket.socket | None = None) -> EdgeHandler:
        handler = super().make_handler(conn)
        if conn is not None:
            handler.peer = peer_credentials(conn)  # once per connection
        return handler

    async def start(self) -> None:
        await web.BaseSite.start(self)
        sock, self._inode = bind_unix(self._path, self._mode, self._gid)
        self._listener = EdgeListener(sock, self._edge, self)
        self._listener.start()

    async def stop(self) -> None:
        await super().stop()
        # Only our own file: a successor may have replaced it after we stopped answering.
        with contextlib.suppress(OSError):
            if self._inode is not None and self._path.lstat().st_ino == self._inode:
                self._path.unlink()
