"""Structured logging: one line per event, JSON or console, never a secret.

Request lines carry the request id that the response header (and, later, the audit record) carries.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TextIO

from secretsd.api.access_log import AccessLog, StreamAccessLog, no_access_log

_EXTRA_FIELDS = ("request_id", "client")


def json_line(created: float, level: str, logger: str, message: str, extras: dict[str, str]) -> str:
    doc = {"time": datetime.fromtimestamp(created, UTC).isoformat(), "level": level.lower(), "logger": logger,
           "message": message}
    doc.update(extras)
    return json.dumps(doc)


class _ConsoleTime:
    """``logging``'s default asctime (local time, ``,mmm``), with the seconds part kept per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._text},{int((created - second) * 1000):03d}"


_console_time = _ConsoleTime()


def console_line(created: float, level: str, logger: str, message: str, extras: dict[str, str]) -> str:
    line = f"{_console_time(created)} {level:<7} {logger}: {message}"
    tail = " ".join(f"{k}={v}" for k, v in extras.items() if v)
    return f"{line} [{tail}]" if tail else line


def _extras(record: logging.LogRecord) -> dict[str, str]:
    return {n: getattr(record, n) for n in _EXTRA_FIELDS if getattr(record, n, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json_line(record.created, record.levelname, record.name, record.getMessage(), _extras(record))


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = console_line(record.created, record.levelname, record.name, record.getMessage(), _extras(record))
        # Tracebacks as logging.Formatter appends them.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class LogPipe:
    """The daemon's log stream, written by a thread of its own.

    A write only appends the text to a buffer, so a stderr that nobody reads (a full pipe, a stuck
    log shipper) stalls that thread, never the event loop and the requests on it. The thread wakes
    once for whatever gathered (not once a line: a wake-up per request line cost ~13% of a GET's
    CPU) and writes it in one call. Beyond ``capacity`` waiting lines, new ones are dropped and
    counted; the first line buffered after a gap says how many. Behaves as a text stream
    (``write``, ``flush``) for ``logging.StreamHandler``.
    """

    #: How long the thread lets lines gather after the first one arrives.
    GATHER_SECONDS = 0.005

    def __init__(self, stream: TextIO, *, capacity: int = 10_000) -> None:
        self.stream = stream
        self.dropped = 0
        self._capacity = capacity
        self._reported = 0
        self._lines: list[str] = []
        self._unwritten = 0  # buffered or being written
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, text: str) -> int:
        with self._lock:
            if len(self._lines) >= self._capacity:
                self.dropped += 1
                return len(text)
            # The first line that gets through after a gap says how many went missing, where they went.
            missed = self.dropped - self._reported
            if missed:
                text = f"{_dropped_line(missed)}{text}"
                self._reported += missed
            self._lines.append(text)
            self._unwritten += 1
            first = len(self._lines) == 1
        if first:
            self._wake.set()
        return len(text)

    def flush(self) -> None:
        """Nothing to do here: the writer thread flushes what it writes (``logging`` calls this
        after every record, so it must not wait)."""

    def drain(self, timeout: float = 1.0) -> bool:
        """Wait until every buffered line is written, for at most ``timeout`` seconds; whether it was."""
        deadline = time.monotonic() + timeout
        while self._unwritten:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.001)
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Write what is buffered, for at most ``timeout`` seconds (a stuck stream must not hold up
        exit); drops not reported yet are reported last."""
        with self._lock:
            missed = self.dropped - self._reported
            if missed:
                self._lines.append(_dropped_line(missed))
                self._unwritten += 1
                self._reported += missed
            self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._closing:
                time.sleep(self.GATHER_SECONDS)
            with self._lock:
                batch, self._lines = self._lines, []
                self._wake.clear()
                closing = self._closing
            if batch:
                try:
                    self.stream.write("".join(batch))
                    self.stream.flush()
                except (OSError, ValueError):  # a closed or broken stream: the lines have nowhere to go
                    pass
                with self._lock:
                    self._unwritten -= len(batch)
            if closing:
                with self._lock:
                    if not self._lines:
                        return


def _dropped_line(missed: int) -> str:
    return f"secretsd: {missed} log line(s) dropped: the log stream was not being read\n"


_pipe: LogPipe | None = None


def drain_logs(timeout: float = 1.0) -> bool:
    """Wait until the lines logged so far are written (nothing to wait for before ``configure_logging``)."""
    return _pipe.drain(timeout) if _pipe is not None else True


def log_stream() -> TextIO | LogPipe | None:
    """Where the daemon's lines go: the log pipe once ``configure_logging`` made it, else stderr."""
    return _pipe or sys.stderr


def access_log(level: str = "INFO", fmt: str = "console", stream: TextIO | LogPipe | None = None) -> AccessLog:
    """The request-line writer for ``serve``: the same lines as the formatters above, without
    the logging machinery (``secretsd.api.access_log``); none at all when INFO is not logged."""
    if logging.getLevelName(level.upper()) > logging.INFO:
        return no_access_log
    stream = stream or log_stream()
    if stream is None:
        # Started with stderr closed (``serve 2>&-``): Python has no sys.stderr, and logging drops
        # its lines then; so do we, rather than fail every request after its answer was decided.
        return no_access_log
    return StreamAccessLog(stream, json_line if fmt == "json" else console_line)


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    # One line per request is on the hot path: skip what our formats never print (the logging
    # docs' "Optimization" section: no caller lookup, no thread/process/task names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _pipe
    if _pipe is not None and _pipe.stream is not sys.stderr:  # configured again, onto another stderr
        _pipe.close()
        _pipe = None
    if _pipe is None and sys.stderr is not None:
        _pipe = LogPipe(sys.stderr)
        atexit.register(_pipe.close)
    handler = logging.StreamHandler(log_stream())
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print raw request lines; ours prints route templates instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
