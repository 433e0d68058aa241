"""Structured logging: one line per event, JSON or console, never a secret.

Request lines carry the request id that the response header (and, later, the audit record) carries.
"""

from __future__ import annotations

import json
import logging
import sys
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


def access_log(level: str = "INFO", fmt: str = "console", stream: TextIO | None = None) -> AccessLog:
    """The request-line writer for ``serve``: the same lines as the formatters above, without
    the logging machinery (``secretsd.api.access_log``); none at all when INFO is not logged."""
    if logging.getLevelName(level.upper()) > logging.INFO:
        return no_access_log
    stream = stream or sys.stderr
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print raw request lines; ours prints route templates instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
