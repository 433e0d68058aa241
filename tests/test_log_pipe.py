"""A log stream nobody reads must not stop the daemon (runtime/logs.py: LogPipe).

Found by a test harness that piped the daemon's stderr and never read it: after ~570 request
lines the 64 KiB pipe was full, the next log write blocked, and with it the event loop and every
request. Log lines now leave through a thread of their own, dropped and counted past a bound.
"""

from __future__ import annotations

import http.client as httplib
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

from secretsd.runtime.logs import LogPipe
from tests.helpers import free_port, http, init_store


class _Gated(io.StringIO):
    """A stream whose writes block until the gate opens (a pipe nobody drains)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def write(self, text: str) -> int:
        self.gate.wait()
        return super().write(text)


def test_writes_never_wait_for_a_stuck_stream_and_drops_are_counted_then_reported() -> None:
    stream = _Gated()
    pipe = LogPipe(stream, capacity=10)
    began = time.monotonic()
    for n in range(50):
        pipe.write(f"line {n}\n")
    assert time.monotonic() - began < 1.0  # the stream is stuck; the writer is not
    assert pipe.dropped >= 30  # at most 10 buffered and one batch of 10 held by the stuck writer
    dropped = pipe.dropped
    stream.gate.set()
    assert pipe.drain(timeout=5)  # the backlog drains
    pipe.write("after\n")
    pipe.close()
    text = stream.getvalue()
    assert text.startswith("line 0\n")
    assert text.endswith(f"\nsecretsd: {dropped} log line(s) dropped: the log stream was not being read\nafter\n")
    assert text.count("line ") + dropped == 50  # every line either written or counted


def test_drops_not_yet_reported_are_reported_on_close() -> None:
    stream = _Gated()
    pipe = LogPipe(stream, capacity=2)
    for n in range(6):
        pipe.write(f"line {n}\n")
    dropped = pipe.dropped
    stream.gate.set()
    pipe.close()
    assert stream.getvalue().endswith(f"secretsd: {dropped} log line(s) dropped: the log stream was not being read\n")


def test_close_gives_up_on_a_stream_that_never_takes_a_line() -> None:
    stream = _Gated()
    pipe = LogPipe(stream, capacity=2)
    for _ in range(5):
        pipe.write("x\n")
    began = time.monotonic()
    pipe.close(timeout=0.2)
    assert time.monotonic() - began < 2.0


def test_a_daemon_whose_stderr_nobody_reads_keeps_answering(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = init_store(data)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "secretsd", "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,  # never read
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if http("GET", f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the daemon did not start"
            time.sleep(0.05)
        conn = httplib.HTTPConnection("127.0.0.1", port, timeout=5)
        # ~100 bytes of log per request: 1,500 requests fill a 64 KiB pipe several times over.
        for _ in range(1500):
            conn.request("GET", "/v1/secrets/app/missing", headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            assert response.status == 404
        conn.close()
        assert http("GET", f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert b"log line(s) dropped" in err or err.count(b"GET /v1/secrets") >= 1500
