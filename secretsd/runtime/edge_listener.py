"""Accepting connections: only when the connection gate has room, and never in a tight error loop.

asyncio's own accept loop takes a backlog's worth of connections per wake-up before any is looked
at, and on EMFILE logs a traceback per attempt (issue 12, item 3). This listener asks
``ConnectionGate.make_room`` before each accept (closing the stalest waiting connection at the cap,
or pausing until one closes), counts TLS handshakes in progress against the cap, and reports
accept failures through ``BoundedLog``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl

from aiohttp import web

from secretsd.runtime.edge import Edge, EdgeHandler

#: Connections taken per wake-up of the listening socket: at most this many descriptors are in
#: flight beyond the cap (closing connections release theirs on the next loop iteration).
ACCEPT_BATCH = 16
#: After the process runs out of descriptors, accepting resumes this much later (as asyncio does).
RETRY_SECONDS = 1.0
#: At the cap with every connection busy, accepting is retried this often.
FULL_RETRY_SECONDS = 0.05
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class EdgeListener:
    """One listening socket whose accepted connections are ``EdgeHandler``s admitted by the gate."""

    def __init__(self, sock: socket.socket, edge: Edge, site: EdgeSite) -> None:
        self._sock = sock
        self._edge = edge
        self._site = site
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._resume()

    def close(self) -> None:
        self._closed = True
        self._pause()
        self._sock.close()

    def _resume(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._edge.gate.make_room():
                # Every connection is busy answering: new ones wait in the kernel's backlog until
                # one closes, or one finishes its request and turns idle (hence the retry too).
                self._pause()
                self._edge.gate.when_room(self._resume)
                self._loop.call_later(FULL_RETRY_SECONDS, self._resume)
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                self._edge.bounded.note(
                    "accept", "cannot accept connections: %s; raise the file-descriptor limit or lower "
                    "[http] max_connections", exc.strerror or "out of resources")
                self._pause()
                self._loop.call_later(RETRY_SECONDS, self._resume)
                return
            conn.setblocking(False)
            try:
                handler = self._site.make_handler(conn)
            except OSError:  # the peer left before its credentials could be read
                conn.close()
                continue
            handler.sock = conn
            self._edge.gate.add(handler)
            task = self._loop.create_task(self._connect(handler, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, handler: EdgeHandler, conn: socket.socket) -> None:
        context = self._site.ssl_context
        try:
            if context is None:
                await self._loop.connect_accepted_socket(lambda: handler, conn)
            else:
                await self._loop.connect_accepted_socket(
                    lambda: handler, conn, ssl=context,
                    # A TLS handshake is part of the head: the same deadline.
                    ssl_handshake_timeout=self._edge.settings.header_timeout_seconds)
        except OSError:
            # A failed or timed-out TLS handshake (SSLError, TimeoutError), or a peer already gone.
            self._edge.gate.release(handler)
            with contextlib.suppress(OSError):
                conn.close()


class EdgeSite(web.BaseSite):
    """A TCP listener whose connections go through the edge (aiohttp's TCPSite, plus the gate)."""

    __slots__ = ("_edge", "_host", "_listener", "_port", "_reuse_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, edge: Edge, *,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._edge = edge
        self._reuse_port = reuse_port
        self._listener: EdgeListener | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context

    def replace_ssl_context(self, context: ssl.SSLContext | None) -> int:
        """A reloaded TLS context (SIGHUP: a new CRL) for the connections accepted from now on; the
        connections that a client certificate authenticates are closed (``close_certificate_connections``)."""
        self._ssl_context = context
        return self.close_certificate_connections()

    def close_certificate_connections(self) -> int:
        """The rule "a reloaded CRL applies to open connections too": every connection of this site
        that presented a client certificate (or is still in its handshake, under the old CRL) is closed
        -- an idle one now, a busy one once its response is sent -- and its client reconnects through a
        handshake that meets the new files. All of them, not only the revoked: the new CRL may revoke
        an intermediate, and only a handshake checks the chain. Nothing is checked per request. Returns
        how many were closed."""
        closed = 0
        for handler in list(self._edge.gate.open):
            if not handler.reads_client_cert or (handler.client_cert is None and handler.sock is None):
                continue  # another site's connection, or one without a certificate (a token authenticates it)
            if handler.sock is not None:
                handler.evict()  # still in its TLS handshake: the socket is shut down
            else:
                handler.close()
            closed += 1
        return closed

    def make_handler(self, conn: socket.socket | None = None) -> EdgeHandler:
        """The protocol for a connection just accepted on ``conn`` (a subclass may read the socket)."""
        server = self._runner.server
        assert server is not None
        handler = self._edge.handler(server)
        context = self._ssl_context
        if context is not None and context.verify_mode != ssl.CERT_NONE:
            handler.reads_client_cert = True  # client certificates are verified: read once when connected
        return handler

    async def start(self) -> None:
        await super().start()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family, backlog=ACCEPT_BATCH * 8,
                                    reuse_port=self._reuse_port)
        sock.setblocking(False)
        self._listener = EdgeListener(sock, self._edge, self)
        self._listener.start()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await super().stop()
