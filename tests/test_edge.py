"""The HTTP edge against a real daemon process over raw sockets (issue 12, items 2 and 3).

Item 2: whatever the HTTP parser makes of a malformed request, no part of a bearer token reaches a
response, a log line or an audit record. Item 3: what an unauthenticated peer can hold (connections,
time per request phase, log lines) is bounded, and a legitimate client is still served.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, http, init_store


def _read_all(sock: socket.socket, timeout: float = 3.0) -> bytes:
    """Everything the daemon sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, raw: bytes, timeout: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        return _read_all(sock, timeout)


def token_parts(token: str, width: int = 8) -> set[str]:
    """Every ``width``-character piece of the token: none may be found anywhere."""
    return {token[i:i + width] for i in range(len(token) - width + 1)}


def leaks(text: bytes, token: str, *, secret_only: bool = False) -> list[str]:
    """The pieces of ``token`` found in ``text``; ``secret_only``: of its secret part only.

    The audit log names the token that made a request by its id (``sdt_<id>``, not a secret,
    docs/audit.md); the secret part after it must never appear.
    """
    decoded = text.decode("latin-1")
    searched = token[len("sdt_") + 17:] if secret_only else token
    return sorted(part for part in token_parts(searched) if part in decoded)


def malformed_requests(token: str) -> dict[str, bytes]:
    """One request per way of breaking HTTP/1.1, each carrying the token."""
    tok = token.encode()
    half = len(tok) // 2
    get = b"GET /v1/auth/whoami HTTP/1.1\r\nHost: localhost\r\n"
    return {
        "nul in value": get + b"Authorization: Bearer " + tok + b"\x00\r\n\r\n",
        "soh in value": get + b"Authorization: Bearer \x01" + tok + b"\r\n\r\n",
        "del in value": get + b"Authorization: Bearer " + tok[:half] + b"\x7f" + tok[half:] + b"\r\n\r\n",
        "bare cr": get + b"Authorization: Bearer " + tok[:half] + b"\r" + tok[half:] + b"\r\n\r\n",
        "lf in value": get + b"Authorization: Bearer " + tok[:half] + b"\n" + tok[half:] + b"\r\n\r\n",
        "overlong line": get + b"Authorization: Bearer " + tok + b"A" * 20000 + b"\r\n\r\n",
        "overlong token value": get + b"Authorization: Bearer " + tok * 400 + b"\r\n\r\n",
        "non-ascii": get + b"Authorization: Bearer " + tok + b"\xff\xfe\xc3\x28\r\n\r\n",
        "obs-fold": get + b"Authorization: Bearer\r\n " + tok + b"\r\n\r\n",
        "no colon": get + b"Authorization Bearer " + tok + b"\r\n\r\n",
        "space before colon": get + b"Authorization : Bearer " + tok + b"\r\n\r\n",
        "token as header name": get + tok + b"\x01: x\r\n\r\n",
        "bad chunk size": (b"PUT /v1/secrets/app/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + tok
                           + b"\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                           + b"zz" + tok + b"\r\n{}\r\n0\r\n\r\n"),
        "chunked and length": (b"PUT /v1/secrets/app/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                               + tok + b"\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        "token in path with nul": b"GET /v1/secrets/" + tok + b"\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "token in query, bad version": b"GET /v1/secrets?prefix=" + tok + b" HTTP/9.9\r\nHost: l\r\n\r\n",
        "token in path, control char": b"GET /\x01" + tok + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "token as method": tok + b" / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "token in request line, no version": b"GET /v1/" + tok + b"\r\n\r\n",
        "two spaces in request line": b"GET  /v1/" + tok + b"  HTTP/1.1\r\nHost: l\r\n\r\n",
    }


def start_edge_daemon(where: Path) -> tuple[DaemonProcess, str]:
    """A daemon logging at DEBUG (aiohttp's parser errors are debug lines there) with short timeouts."""
    data = where / "data"
    token = init_store(data)
    proc = DaemonProcess(data, env={
        "SECRETSD_LOG_LEVEL": "DEBUG",
        "SECRETSD_HTTP__HEADER_TIMEOUT_SECONDS": "1",
        "SECRETSD_HTTP__BODY_TIMEOUT_SECONDS": "1",
        "SECRETSD_HTTP__IDLE_TIMEOUT_SECONDS": "1.5",
    })
    return proc.start(), token


@pytest.fixture
def edge_daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, str]]:
    daemon, token = start_edge_daemon(tmp_path)
    try:
        yield daemon, token
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def shared_edge_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, str]]:
    """One daemon for the deadline tests, which leave nothing behind."""
    daemon, token = start_edge_daemon(tmp_path_factory.mktemp("edge"))
    try:
        yield daemon, token
    finally:
        daemon.stop()


def test_no_token_part_in_parser_error_bodies_logs_or_audit(edge_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, token = edge_daemon
    answers = {name: exchange(daemon.port, raw) for name, raw in malformed_requests(token).items()}
    for name, answer in answers.items():
        assert not leaks(answer, token), f"{name}: the response quotes the token: {answer[:300]!r}"
        if answer:
            head, _, body = answer.partition(b"\r\n\r\n")
            status = int(head.split(b" ")[1])
            assert 400 <= status < 500, f"{name}: {head!r}"
            assert b"application/problem+json" in head.lower(), f"{name}: {head!r}"
            assert json.loads(body)["status"] == status
    # The daemon still serves, then stops so every log line and audit record is on disk.
    assert http("GET", daemon.url + "/v1/auth/whoami", token=token).status == 200
    daemon.stop()
    log_bytes = daemon.log_path.read_bytes() if daemon.log_path else b""
    assert not leaks(log_bytes, token), "the daemon log quotes the token"
    audit_files = list((daemon.data_dir / "audit").rglob("*"))
    assert audit_files
    for path in audit_files:
        if path.is_file():
            assert not leaks(path.read_bytes(), token, secret_only=True), f"{path.name} quotes the token"


# -- item 3: deadlines per request phase -------------------------------------------------------------


def closed_after(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the daemon closes ``sock`` (reading and discarding), or None if not by ``limit``."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    return None


def test_header_timeout_cuts_a_trickled_head(shared_edge_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, _ = shared_edge_daemon
    head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        started = time.monotonic()
        sock.settimeout(0.1)
        closed = False
        for byte in head:  # one byte every 50 ms: slowloris
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 4:
                break
        elapsed = time.monotonic() - started
    # header_timeout_seconds = 1 (the idle timeout, 1.5 s, would be later).
    assert closed and elapsed < 1.45, f"a trickled head was kept {elapsed:.1f}s"


def test_body_timeout_cuts_a_body_that_never_arrives(shared_edge_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, token = shared_edge_daemon
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(b"PUT /v1/secrets/app/slow HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                     + token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     + b'{"value": "x')
        started = time.monotonic()
        answer = _read_all(sock, timeout=4)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"application/problem+json" in answer
    assert elapsed < 3, f"a missing body was waited for {elapsed:.1f}s"
    # Nothing was stored.
    assert http("GET", daemon.url + "/v1/secrets/app/slow", token=token).status == 404


def test_idle_timeout_cuts_a_keepalive_connection(shared_edge_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, _ = shared_edge_daemon
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.settimeout(2)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        elapsed = closed_after(sock, 5)
    assert elapsed is not None and elapsed < 2.5, f"an idle keep-alive connection was kept {elapsed}s"


def test_silent_connection_is_cut_after_the_header_timeout(shared_edge_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, _ = shared_edge_daemon
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        elapsed = closed_after(sock, 5)
    assert elapsed is not None and elapsed < 1.45, f"a connection that sent nothing was kept {elapsed}s"


# -- item 3: the connection cap and the file-descriptor limit -----------------------------------------


def limited_daemon(tmp_path: Path, nofile: int, env: dict[str, str] | None = None) -> tuple[DaemonProcess, str]:
    """A daemon whose RLIMIT_NOFILE is ``nofile`` (set in the child before exec)."""
    data = tmp_path / "data"
    token = init_store(data)

    class Limited(DaemonProcess):
        def start(self, *, wait_ready: bool = True) -> DaemonProcess:
            self.log_path = self.data_dir.parent / f"daemon-{self.port}.log"
            with self.log_path.open("wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "secretsd", "serve", "--data-dir", str(self.data_dir),
                     "--listen", f"127.0.0.1:{self.port}"],
                    stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy() | self.env,
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
                )
            self.wait_for("/readyz")
            return self

    return Limited(data, env=env or {}).start(), token


def hold_connections(port: int, count: int, connect_timeout: float = 1.0) -> list[socket.socket]:
    """Up to ``count`` attacker connections, half silent, half with a partial request head; stops
    at the first that cannot connect (the daemon's backlog is full)."""
    held = []
    for i in range(count):
        sock = socket.socket()
        sock.settimeout(connect_timeout)
        try:
            sock.connect(("127.0.0.1", port))
            if i % 2:
                sock.sendall(b"GET /v1/secrets/app/x HTTP/1.1\r\nHost: ")
        except OSError:
            sock.close()
            break
        held.append(sock)
    return held


def test_connection_cap_keeps_a_legitimate_client_served(tmp_path: Path) -> None:
    # 192 descriptors: the default cap is 128 connections. 300 attackers hold connections open
    # (timeouts are long), more than the descriptors the daemon has.
    daemon, token = limited_daemon(tmp_path, 192, {"SECRETSD_HTTP__HEADER_TIMEOUT_SECONDS": "60",
                                                   "SECRETSD_HTTP__IDLE_TIMEOUT_SECONDS": "60"})
    held = hold_connections(daemon.port, 300)
    try:
        time.sleep(0.5)
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            answer = http("GET", daemon.url + "/v1/auth/whoami", token=token, timeout=5)
            latencies.append(time.monotonic() - started)
            assert answer.status == 200, answer
        assert max(latencies) < 2, latencies
        metrics = http("GET", daemon.url + "/metrics", token=token).body
        assert 'secretsd_http_connections_closed_total{reason="evicted"}' in metrics
        open_now = float(next(line.split()[-1] for line in metrics.splitlines()
                              if line.startswith("secretsd_http_connections ")))
        assert open_now <= 128
    finally:
        for sock in held:
            sock.close()
        daemon.stop()
    assert "Too many open files" not in daemon.logs()


def test_accept_errors_are_logged_at_a_bounded_rate(tmp_path: Path) -> None:
    # A cap set above what the descriptors allow: accept() fails with EMFILE under the flood,
    # and the log says so a bounded number of times (not megabytes a second).
    daemon, token = limited_daemon(tmp_path, 128, {"SECRETSD_HTTP__MAX_CONNECTIONS": "1000",
                                                   "SECRETSD_HTTP__HEADER_TIMEOUT_SECONDS": "60",
                                                   "SECRETSD_HTTP__IDLE_TIMEOUT_SECONDS": "60"})
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(held) < 600:
            held += hold_connections(daemon.port, 50, connect_timeout=0.2)
    finally:
        for sock in held:
            sock.close()
    time.sleep(1.5)  # the daemon retries accept once a second
    assert http("GET", daemon.url + "/v1/auth/whoami", token=token, timeout=5).status == 200
    daemon.stop()
    lines = daemon.logs().splitlines()
    assert len(lines) < 40, f"{len(lines)} log lines:\n" + "\n".join(lines[:60])
    assert any("cannot accept connections" in line for line in lines)


# -- the rules, one function each ---------------------------------------------------------------------

FAKE_TOKEN = "sdt_0123456789abcdef_" + "S3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS"


def test_edge_relies_on_aiohttp_internals() -> None:
    """secretsd/runtime/edge.py subclasses aiohttp's RequestHandler and reads these; an upgrade that
    renames them must fail here, not silently disable a deadline."""
    import inspect

    from aiohttp.web_protocol import RequestHandler

    slots = set().union(*(getattr(cls, "__slots__", ()) for cls in RequestHandler.__mro__))
    for name in ("_waiter", "_messages", "_request_count", "_request_in_progress", "_force_close",
                 "_close", "_keepalive_handle"):
        assert name in slots, name
    for method in ("_process_keepalive", "handle_error", "log_exception", "data_received",
                   "connection_made", "connection_lost", "force_close", "close"):
        assert callable(getattr(RequestHandler, method)), method
    assert list(inspect.signature(RequestHandler.handle_error).parameters) == [
        "self", "request", "status", "exc", "message"]
    source = inspect.getsource(RequestHandler.data_received)
    assert "self._request_count += 1" in source and "self._messages.append" in source
    assert "self.log_exception(" in inspect.getsource(RequestHandler.start)


@pytest.fixture
def daemon_logging() -> Iterator[None]:
    """The daemon's log configuration in this process, undone afterwards for the other tests."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("daemon_logging")
def test_scrub_request_data_keeps_no_request_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from secretsd.runtime.edge_log import install_log_scrubbing
    from secretsd.runtime.logs import configure_logging, drain_logs

    configure_logging("DEBUG")
    install_log_scrubbing()
    try:
        raise BadHttpMessage(f"Invalid header value char:\n\n  b'Authorization: Bearer {FAKE_TOKEN}\\x00'")
    except BadHttpMessage as exc:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", FAKE_TOKEN, exc_info=exc)
        logging.getLogger("aiohttp.server").debug(f"got {FAKE_TOKEN!r}")
    drain_logs()  # the daemon's log lines leave through their own thread
    out = capsys.readouterr().err
    assert "Error handling request from (BadHttpMessage)" in out
    assert not leaks(out.encode(), FAKE_TOKEN)


@pytest.mark.usefixtures("daemon_logging")
def test_loop_exception_handler_prints_no_callback_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from secretsd.runtime.edge_log import loop_exception_handler
    from secretsd.runtime.logs import configure_logging, drain_logs

    configure_logging("INFO")
    loop = asyncio.new_event_loop()
    try:
        loop_exception_handler(loop, {"message": f"Exception in callback feed(b'Bearer {FAKE_TOKEN}')",
                                      "exception": ValueError(FAKE_TOKEN), "protocol": FAKE_TOKEN})
    finally:
        loop.close()
    drain_logs()  # the daemon's log lines leave through their own thread
    out = capsys.readouterr().err
    assert "Exception in callback feed (ValueError)" in out
    assert not leaks(out.encode(), FAKE_TOKEN)


def test_bounded_log_writes_one_line_per_interval_and_counts_the_rest() -> None:
    import logging

    from secretsd.runtime.edge_log import BoundedLog

    now = [0.0]
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test.bounded")
    logger.addHandler(Collect())
    logger.propagate = False
    bounded = BoundedLog(10, logger=logger, clock=lambda: now[0])
    for _ in range(10_000):
        bounded.note("accept", "cannot accept: %s", "EMFILE")
        now[0] += 0.001  # 10 s of failures, one a millisecond
    now[0] += 1
    bounded.note("accept", "cannot accept: %s", "EMFILE")
    bounded.note("malformed", "malformed request")
    assert lines[0] == "cannot accept: EMFILE"
    assert lines[1].startswith("cannot accept: EMFILE (") and "more like it" in lines[1]
    assert lines[2] == "malformed request"
    assert len(lines) == 3
    assert bounded.counts == {"accept": 10_001, "malformed": 1}


class FakeConnection:
    def __init__(self, waiting: bool) -> None:
        self.waiting = waiting
        self.evicted = False

    def is_waiting_on_peer(self) -> bool:
        return self.waiting

    def evict(self) -> None:
        self.evicted = True


def test_make_room_closes_the_stalest_waiting_connection() -> None:
    from secretsd.runtime.edge import ConnectionGate, EdgeStats

    gate = ConnectionGate(3, EdgeStats())
    busy, idle_old, idle_new = FakeConnection(False), FakeConnection(True), FakeConnection(True)
    for conn in (busy, idle_old, idle_new):
        assert gate.make_room()
        gate.add(conn)  # type: ignore[arg-type]
    gate.touch(idle_old)  # type: ignore[arg-type]  # it just delivered a request head: the freshest
    assert gate.make_room()
    assert idle_new.evicted and not idle_old.evicted and not busy.evicted
    assert gate.stats.closed["evicted"] == 1


def test_make_room_never_closes_a_connection_being_answered() -> None:
    from secretsd.runtime.edge import ConnectionGate, EdgeStats

    gate = ConnectionGate(2, EdgeStats())
    conns = [FakeConnection(False), FakeConnection(False)]
    for conn in conns:
        gate.add(conn)  # type: ignore[arg-type]
    resumed: list[bool] = []
    assert not gate.make_room()
    gate.when_room(lambda: resumed.append(True))
    assert not any(c.evicted for c in conns) and gate.stats.deferred == 1
    gate.release(conns[0])  # type: ignore[arg-type]
    assert resumed == [True] and gate.make_room()


def test_default_max_connections_leaves_descriptors_free() -> None:
    from secretsd.runtime.edge import default_max_connections

    assert default_max_connections(1024) == 896
    assert default_max_connections(192) == 128
    assert default_max_connections(65536) == 57344
    assert default_max_connections(resource.RLIM_INFINITY) == 10_000
    assert default_max_connections(8) == 1


def test_tls_handshake_has_the_header_deadline_and_counts_against_the_cap(tmp_path: Path) -> None:
    import ssl
    import urllib.request

    from tests.test_tls import TlsDaemon, make_pki

    ca_file, cert_file, key_file = make_pki(tmp_path)
    config = tmp_path / "tls.toml"
    config.write_text(f'tls_cert_file = "{cert_file}"\ntls_key_file = "{key_file}"\n'
                      "[http]\nmax_connections = 8\nheader_timeout_seconds = 1\n")
    data = tmp_path / "d"
    token = init_store(data)
    daemon = TlsDaemon(data, extra_args=["--config", str(config)]).start()
    try:
        # A peer that never starts its handshake is cut at the header deadline.
        with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
            elapsed = closed_after(sock, 5)
        assert elapsed is not None and elapsed < 1.6, f"a silent TLS peer was kept {elapsed}s"
        # Twenty silent peers hold more than the cap; a real TLS client is still served.
        held = hold_connections(daemon.port, 20)
        try:
            context = ssl.create_default_context(cafile=str(ca_file))
            request = urllib.request.Request(daemon.url + "/v1/auth/whoami",
                                             headers={"Authorization": f"Bearer {token}"})
            started = time.monotonic()
            with urllib.request.urlopen(request, context=context, timeout=5) as answer:
                assert answer.status == 200
            assert time.monotonic() - started < 1
        finally:
            for sock in held:
                sock.close()
    finally:
        daemon.stop()
