"""The one line per request: method, route template, status, time, request id and client.

It is the hottest log call there is, so the running daemon writes it without the logging
module's machinery (a record, a formatter, a handler lock: about 25 µs a line, a seventh of a
GET's CPU), in the same format as every other line (``secretsd.runtime.logs`` passes its line
builder in). Anything else (tests, embedding) gets ``LoggingAccessLog``, which goes through
``logging`` as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

LOGGER = "secretsd.http"

#: Builds a complete log line from (created, level name, logger name, message, extra fields).
LineBuilder = Callable[[float, str, str, str, dict[str, str]], str]


class Writable(Protocol):
    """Where request lines go: a text stream, or the daemon's log pipe (``runtime.logs.LogPipe``)."""

    def write(self, text: str, /) -> int: ...


class AccessLog(Protocol):
    def __call__(self, method: str, route: str, status: int, seconds: float, request_id: str,
                 client: str | None) -> None: ...


def _message(method: str, route: str, status: int, seconds: float) -> str:
    return f"{method} {route} {status} {seconds * 1000:.1f}ms"


class LoggingAccessLog:
    """Through ``logging`` (what caplog and any handler see): the default outside ``serve``."""

    def __init__(self) -> None:
        self._log = logging.getLogger(LOGGER)

    def __call__(self, method: str, route: str, status: int, seconds: float, request_id: str,
                 client: str | None) -> None:
        self._log.info(_message(method, route, status, seconds), extra={"request_id": request_id, "client": client})


class StreamAccessLog:
    """Straight to a stream, one write per line, formatted by the daemon's own line builder."""

    def __init__(self, stream: Writable, build: LineBuilder) -> None:
        self._stream = stream
        self._build = build

    def __call__(self, method: str, route: str, status: int, seconds: float, request_id: str,
                 client: str | None) -> None:
        extras = {"request_id": request_id, "client": client} if client else {"request_id": request_id}
        line = self._build(time.time(), "INFO", LOGGER, _message(method, route, status, seconds), extras)
        try:  # noqa: SIM105 - a try costs nothing on this path; contextlib.suppress does
            self._stream.write(line + "\n")
        except (OSError, ValueError):  # a closed or broken stderr must not fail the request
            pass


def no_access_log(method: str, route: str, status: int, seconds: float, request_id: str,
                  client: str | None) -> None:
    """``log_level`` above INFO: no request lines."""
