"""Logging at the HTTP edge: nothing a peer sent is written, and nothing a peer repeats floods the log.

Two rules, each in one place:
- ``scrub_request_data``: aiohttp's parser errors quote the raw request line or header (a bearer
  token, say) and asyncio's callback reports print their arguments; such records keep their
  constant template and the exception's type, never its message, arguments or traceback text.
- ``BoundedLog``: an error a peer can provoke over and over (accept failing with EMFILE, malformed
  requests) is logged at most once per interval and kind; the others are counted into the next line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("secretsd.http")

# The loggers aiohttp's server side writes to (aiohttp/log.py).
AIOHTTP_LOGGERS = ("aiohttp.access", "aiohttp.internal", "aiohttp.server", "aiohttp.web", "aiohttp.websocket")
# The leading words of a message, before anything it may have interpolated (a repr, bytes, a path).
_CONSTANT_PREFIX = re.compile(r"[A-Za-z][A-Za-z ,'_-]*")


def _exception_type(exc_info: Any) -> str | None:
    if isinstance(exc_info, BaseException):
        return type(exc_info).__name__
    if isinstance(exc_info, tuple) and exc_info and exc_info[0] is not None:
        return str(exc_info[0].__name__)
    return None


def scrub_request_data(record: logging.LogRecord) -> bool:
    """Keep the record, without anything the request could have put into it (the rule of item 2)."""
    kind = _exception_type(record.exc_info)
    match = _CONSTANT_PREFIX.match(str(record.msg))
    record.msg = (match.group(0).strip() if match else "aiohttp error") + (f" ({kind})" if kind else "")
    record.args = ()
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None
    return True


def install_log_scrubbing() -> None:
    """Scrub every record aiohttp's server loggers write (filters sit on the logger that logs)."""
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if scrub_request_data not in logger.filters:
            logger.addFilter(scrub_request_data)


@dataclass
class _Kind:
    last: float
    unlogged: int = 0


class BoundedLog:
    """At most one line per ``interval`` seconds for each kind of event; the rest are counted."""

    def __init__(self, interval: float, *, logger: logging.Logger = log,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._logger = logger
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        #: Every event noted, logged or not (for metrics).
        self.counts: dict[str, int] = {}

    def note(self, kind: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self._clock()
        state = self._kinds.get(kind)
        if state is not None and now - state.last < self.interval:
            state.unlogged += 1
            return
        unlogged = state.unlogged if state else 0
        suffix = f" ({unlogged} more like it since the last such line)" if unlogged else ""
        self._logger.log(level, message + suffix, *args)
        self._kinds[kind] = _Kind(now)


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's error reports without reprs: asyncio names callbacks with their arguments,
    which can be request bytes. (Accept failures never come here: secretsd/runtime/edge_listener.py.)"""
    exc = context.get("exception")
    match = _CONSTANT_PREFIX.match(str(context.get("message", "")))
    frames = "".join(traceback.format_tb(exc.__traceback__)) if isinstance(exc, BaseException) else ""
    log.error("event loop: %s%s\n%s", match.group(0).strip() if match else "error",
              f" ({type(exc).__name__})" if isinstance(exc, BaseException) else "", frames)
