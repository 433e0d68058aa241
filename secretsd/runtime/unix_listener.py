"""The Unix-domain socket listener (``listen_unix``): the socket file, and the peer of each connection.

The socket file is prepared with care because its path is a name others can race for:

- a path that exists and is not a socket (a file, a directory, a symlink) is refused, never removed;
- a socket another live daemon answers on is refused (two daemons, one name: the later would steal
  the name from the earlier's clients);
- a socket nobody answers on (the file a killed daemon left) is replaced;
- the mode (``unix_socket_mode``) and group (``unix_socket_group``) are set between ``bind()`` and
  ``listen()``: until ``listen()`` every ``connect()`` is refused, so no peer connects through a
  looser mode in between;
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
from pathlib import Path

from aiohttp import web

from secretsd.domain.identity import PeerCredentials
from secretsd.errors import ConfigError
from secretsd.runtime.edge import Edge, EdgeHandler
from secretsd.runtime.edge_listener import ACCEPT_BATCH, EdgeListener, EdgeSite

log = logging.getLogger("secretsd")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(conn: socket.socket) -> PeerCredentials:
    """The connected peer as the kernel recorded it at ``connect()`` (Linux ``SO_PEERCRED``)."""
    pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


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


def bind_unix(path: Path, mode: int, gid: int | None) -> tuple[socket.socket, int]:
    """A listening socket at ``path`` with ``mode`` and group ``gid``; returns it and the file's inode."""
    if not path.parent.is_dir():
        raise ConfigError(f"listen_unix {path}: the directory {path.parent} does not exist")
    clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Before listen(): until then every connect() is refused, whatever the mode.
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        inode = path.lstat().st_ino
        sock.listen(ACCEPT_BATCH * 8)
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
