"""Structured logging: one line per event, JSON or console, never a secret.

Request lines carry the request id that the response header (and, later, the audit record) carries.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_EXTRA_FIELDS = ("request_id", "client")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        return json.dumps(doc)


class ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{n}={getattr(record, n)}" for n in _EXTRA_FIELDS if getattr(record, n, None)]
        return f"{line} [{' '.join(extras)}]" if extras else line


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
