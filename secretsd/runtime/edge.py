"""The HTTP edge: what a peer can hold before the application sees a request (issue 12, items 2, 3).

aiohttp's ``RequestHandler`` parses HTTP/1.1; ``EdgeHandler`` adds what it lacks:

- a request the parser refuses gets a fixed problem document that quotes nothing it sent
  (``EdgeHandler.handle_error``), and is logged without its bytes;
- a request head must be complete within ``header_timeout_seconds`` of the connection (or of the
  first byte of a later request), its body within ``body_timeout_seconds``; a keep-alive connection
  idles ``idle_timeout_seconds`` at most (aiohttp's keepalive timer);
- ``ConnectionGate`` caps open connections below the descriptor limit; at the cap the connection
  that has gone longest without a complete request head makes room (``ConnectionGate.make_room``);
  secretsd/runtime/edge_listener.py accepts a connection only when the gate has room.

The subclass reads a few ``RequestHandler`` internals (``_waiter``, ``_messages``,
``_request_count``, ``_request_in_progress``, ``_process_keepalive``);
tests/test_edge.py::test_edge_relies_on_aiohttp_internals fails when aiohttp changes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from secretsd.auth.tls import peer_certificate
from secretsd.domain.identity import ClientCertificate, PeerCredentials
from secretsd.errors import RequestError, RequestTimeoutError
from secretsd.problems import INTERNAL, PROBLEM_CONTENT_TYPE, PROBLEMS, ProblemType, problem_document
from secretsd.runtime.config import HttpSettings
from secretsd.runtime.edge_log import BoundedLog

log = logging.getLogger("secretsd.http")

#: Descriptors kept free for everything that is not a client connection: the store, the audit log
#: and its rotation, the key provider, worker threads, a PostgreSQL pool, and the few connections
#: accepted in one batch while the ones closed to make room for them are still closing.
MIN_HEADROOM = 64
#: The default cap when the descriptor limit is unlimited.
UNLIMITED_CAP = 10_000
_BAD_REQUEST = PROBLEMS[RequestError]
_MALFORMED_DETAIL = "The request is not valid HTTP/1.1."


def default_max_connections(soft_limit: int | None = None) -> int:
    """The connection cap from RLIMIT_NOFILE: an eighth of it (at least MIN_HEADROOM) stays free."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY or soft_limit <= 0:
        return UNLIMITED_CAP
    return max(1, soft_limit - max(MIN_HEADROOM, soft_limit // 8))


def _problem_bytes(ptype: ProblemType, detail: str) -> bytes:
    return json.dumps(problem_document(ptype, detail)).encode()


class EdgeStats:
    """Counts for metrics: connections closed by the edge by reason, and accepts deferred at the cap."""

    REASONS = ("evicted", "header_timeout", "body_timeout", "idle_timeout", "malformed")

    def __init__(self) -> None:
        self.closed = dict.fromkeys(self.REASONS, 0)
        #: Times accepting paused because every connection at the cap was busy with a request.
        self.deferred = 0


class ConnectionGate:
    """At most ``cap`` open connections; who makes room at the cap is decided in ``make_room``.

    Connections are kept in the order they last delivered a complete request head (or were
    accepted), oldest first, so the stalest is found without a scan of all of them.
    """

    def __init__(self, cap: int, stats: EdgeStats) -> None:
        self.cap = cap
        self.stats = stats
        self.open: dict[EdgeHandler, None] = {}
        self._on_room: list[Callable[[], None]] = []

    def make_room(self) -> bool:
        """True if one more connection may be accepted, closing the stalest waiting one if at the cap.

        Stalest: the longest since it delivered a complete request head (or was accepted), among
        connections waiting on their peer (idle, a partial head, a body still to come, a TLS
        handshake). A connection whose request is complete and being answered is never closed for
        another; if every one is such, nothing is accepted until one closes.
        """
        if len(self.open) < self.cap:
            return True
        victim = next((h for h in self.open if h.is_waiting_on_peer()), None)
        if victim is None:
            self.stats.deferred += 1
            return False
        self.stats.closed["evicted"] += 1
        del self.open[victim]
        victim.evict()
        return True

    def add(self, handler: EdgeHandler) -> None:
        self.open[handler] = None

    def touch(self, handler: EdgeHandler) -> None:
        """``handler`` delivered a complete request head: it becomes the freshest."""
        if handler in self.open:
            del self.open[handler]
            self.open[handler] = None

    def release(self, handler: EdgeHandler) -> None:
        if self.open.pop(handler, False) is None and self._on_room:
            waiting, self._on_room = self._on_room, []
            for resume in waiting:
                resume()

    def when_room(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once a connection closes (a paused listener)."""
        self._on_room.append(resume)


class Edge:
    """The limits of one daemon's listeners, shared by the API and metrics listeners."""

    def __init__(self, settings: HttpSettings, *, bounded: BoundedLog, list_prefix: bytes | None = None) -> None:
        self.settings = settings
        #: ``/v1/{mount}/metadata`` of the Vault façade, where a LIST request is taken as Vault's
        #: GET ?list=true (``list_as_get``); None: the façade is off and LIST stays a bad request.
        self.list_prefix = list_prefix
        self.safe_cap = default_max_connections()
        self.cap = settings.max_connections or self.safe_cap
        self.stats = EdgeStats()
        self.gate = ConnectionGate(self.cap, self.stats)
        self.bounded = bounded
        if self.cap > self.safe_cap:
            log.warning("[http] max_connections = %d leaves too few of the %d file descriptors "
                        "(RLIMIT_NOFILE) for the store and the audit log; at most %d is safe",
                        self.cap, resource.getrlimit(resource.RLIMIT_NOFILE)[0], self.safe_cap)

    def handler(self, server: Server) -> EdgeHandler:
        options: dict[str, Any] = {
            "loop": asyncio.get_running_loop(),
            "keepalive_timeout": self.settings.idle_timeout_seconds,
            # A body the handler did not read is drained after the response, within the body deadline.
            "lingering_time": min(10.0, self.settings.body_timeout_seconds),
            "access_log": None,  # our middleware logs route templates, never raw request lines
        }
        return EdgeHandler(server, self, **options)


def list_as_get(data: bytes, list_prefix: bytes) -> bytes:
    """A request head with Vault's LIST verb (hvac sends it) as the ``GET ...?list=true`` it means.

    aiohttp's parser (llhttp) refuses methods it does not know, LIST among them, with a 400 before
    any handler runs; Vault's own clients send GET ?list=true, which this makes of it. Only for a
    target under the façade's metadata path, and only when the head starts the bytes received (a
    LIST whose first line arrives split stays a 400): anything else is left for the parser to judge.
    """
    line, sep, rest = data.partition(b"\r\n")
    parts = line.split(b" ")
    if not sep or len(parts) != 3 or not parts[1].startswith(list_prefix):
        return data
    target = parts[1] + (b"&" if b"?" in parts[1] else b"?") + b"list=true"
    return b"GET " + target + b" " + parts[2] + sep + rest


class EdgeHandler(RequestHandler):
    """aiohttp's connection protocol with deadlines per request phase and a silent parse error."""

    def __init__(self, manager: Server, edge: Edge, **options: Any) -> None:
        super().__init__(manager, **options)
        self._edge = edge
        self._edge_loop: asyncio.AbstractEventLoop = options["loop"]
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        #: The accepted socket, until the connection is made (a TLS handshake may be under way).
        self.sock: socket.socket | None = None
        #: The Unix-socket peer, read once when the connection was accepted (runtime/unix_listener.py).
        self.peer: PeerCredentials | None = None
        #: Set by a TLS site that verifies client certificates ([auth.tls]); then ``client_cert`` is
        #: the verified certificate, read once when the handshake completed (None: none was sent).
        self.reads_client_cert = False
        self.client_cert: ClientCertificate | None = None

    def __repr__(self) -> str:
        # asyncio's error reports print protocols; aiohttp's own repr is safe today, this stays so.
        return "<EdgeHandler>"

    # -- the phases of a connection -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sock = None
        if self.reads_client_cert:
            self.client_cert = peer_certificate(transport.get_extra_info("ssl_object"))
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._edge.gate.release(self)
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"LIST ") and self._edge.list_prefix is not None and not self._body_pending():
            data = list_as_get(data, self._edge.list_prefix)
        heads_before = self._request_count
        waiting_for_head = self._waiting_for_head()
        super().data_received(data)
        if self._request_count != heads_before:
            # A complete head arrived (the parser queued it): that deadline is met.
            self._cancel_head_timer()
            self._edge.gate.touch(self)
            if self._messages:
                payload = self._messages[-1][1]
                if isinstance(payload, StreamReader) and not payload.is_eof():
                    self._watch_body(payload)
        elif data and waiting_for_head and self._head_timer is None:
            # The first byte of a later request on a keep-alive connection starts its head deadline.
            self._arm_head_timer()

    def _process_keepalive(self) -> None:
        was_open = not self._force_close
        super()._process_keepalive()
        if was_open and self._force_close:
            self._edge.stats.closed["idle_timeout"] += 1

    # -- state the gate asks about --------------------------------------------------------------

    def _waiting_for_head(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _body_pending(self) -> bool:
        return self._body is not None and not self._body.is_eof()

    def is_waiting_on_peer(self) -> bool:
        """Idle, in its TLS handshake, or waiting for the rest of a head or a body."""
        return self.transport is None or self._waiting_for_head() or self._body_pending()

    def evict(self) -> None:
        if self.sock is not None:
            # Not connected yet (TLS handshake): ending the socket makes the handshake fail now.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            return
        self._fail_body()
        self.force_close()

    # -- deadlines ------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self._edge_loop.call_later(self._edge.settings.header_timeout_seconds,
                                                      self._head_deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self._force_close:
            self._edge.stats.closed["header_timeout"] += 1
            self.force_close()

    def _watch_body(self, payload: StreamReader) -> None:
        # The parser reads one body at a time, so an earlier one is complete by now.
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body = payload
        self._body_timer = self._edge_loop.call_later(self._edge.settings.body_timeout_seconds,
                                                      self._body_deadline)

    def _body_deadline(self) -> None:
        self._body_timer = None
        if self._body_pending() and not self._force_close:
            self._edge.stats.closed["body_timeout"] += 1
            self._fail_body()

    def _fail_body(self) -> None:
        """End a body that is still arriving: its reader gets a 408 error, the connection closes after."""
        body, self._body = self._body, None
        if body is None or body.is_eof():
            return
        # No further bytes are parsed (data_received ignores them once closing), so the reader can
        # be ended here without the parser feeding it again.
        self.close()
        if self._request_in_progress:
            # The handler (or the one about to run) reads this: a problem document, not a 500.
            body.set_exception(RequestTimeoutError("the request body did not arrive in time"))
        body.feed_eof()

    # -- errors -----------------------------------------------------------------------------------

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A fixed problem document: aiohttp's own quotes the offending line (a token, say)."""
        if status >= 500:
            # Frames only: the message may quote request data.
            frames = "".join(traceback.format_tb(exc.__traceback__)) if exc is not None else ""
            log.error("unhandled %s in the HTTP server\n%s", type(exc).__name__, frames)
            ptype, detail = INTERNAL, INTERNAL.title
        else:
            self._edge.stats.closed["malformed"] += 1
            self._edge.bounded.note("malformed", "refused a malformed request from %s (%s)",
                                    request.remote, type(exc).__name__ if exc else "error",
                                    level=logging.INFO)
            ptype = _BAD_REQUEST if status == 400 else ProblemType("invalid-request", status, "Invalid request")
            detail = _MALFORMED_DETAIL
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started; cannot send an error document")
        response = web.Response(body=_problem_bytes(ptype, detail), status=ptype.status,
                                content_type=PROBLEM_CONTENT_TYPE)
        response.headers["Cache-Control"] = "no-store"
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # aiohttp passes the exception; its message may quote request bytes. Type and frames only.
        exc = kw.get("exc_info")
        frames = "".join(traceback.format_tb(exc.__traceback__)) if isinstance(exc, BaseException) else ""
        log.error("HTTP server error (%s)\n%s", type(exc).__name__ if exc else "unknown", frames)


class EdgeCollector(Collector):
    """The edge's counts, read at scrape time."""

    def __init__(self, edge: Edge) -> None:
        self._edge = edge

    def collect(self) -> Iterator[Metric]:
        edge = self._edge
        yield GaugeMetricFamily("secretsd_http_connections", "Open client connections",
                                value=len(edge.gate.open))
        yield GaugeMetricFamily("secretsd_http_connections_max", "The connection cap ([http] max_connections)",
                                value=edge.cap)
        closed = CounterMetricFamily("secretsd_http_connections_closed",
                                     "Connections the server closed or refused, by reason", labels=["reason"])
        for reason, count in edge.stats.closed.items():
            closed.add_metric([reason], count)
        yield closed
        yield CounterMetricFamily("secretsd_http_accepts_deferred",
                                  "Times accepting paused: every connection at the cap was busy",
                                  value=edge.stats.deferred)
        yield CounterMetricFamily("secretsd_http_accept_errors",
                                  "Failed accepts (descriptors exhausted)",
                                  value=edge.bounded.counts.get("accept", 0))
