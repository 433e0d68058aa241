"""The line per request (secretsd/api/access_log.py): written without the logging machinery by
`serve`, in exactly the daemon's log formats."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest

from secretsd.api.access_log import LoggingAccessLog, StreamAccessLog
from secretsd.runtime.logs import ConsoleFormatter, JsonFormatter, access_log, console_line, json_line
from tests.helpers import DaemonProcess, http, init_store

STOCK = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _record(**extra: str) -> logging.LogRecord:
    record = logging.LogRecord("secretsd.http", logging.INFO, "", 0, "GET %s %d %.1fms",
                               ("/v1/secrets/{path}", 200, 1.25), None)
    record.__dict__.update(extra)
    return record


def test_console_lines_keep_the_stock_format_with_extras_in_brackets() -> None:
    record = _record(request_id="r-1", client="svc")
    assert ConsoleFormatter().format(record) == STOCK.format(record) + " [request_id=r-1 client=svc]"
    bare = _record()
    assert ConsoleFormatter().format(bare) == STOCK.format(bare)


def test_console_time_cache_follows_the_clock_across_seconds() -> None:
    for created in (1_700_000_000.999, 1_700_000_001.0, 1_700_000_001.5, 1_699_999_999.25):
        record = _record()
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert console_line(created, "INFO", "secretsd.http", record.getMessage(), {}) == STOCK.format(record)


def test_stream_access_line_equals_the_logging_line_but_its_time() -> None:
    out = io.StringIO()
    StreamAccessLog(out, console_line)("GET", "/v1/secrets/{path}", 200, 0.00125, "r-1", "svc")
    logged = ConsoleFormatter().format(_record(request_id="r-1", client="svc"))
    stamp = re.compile(r"^\S+ \S+ ")
    assert stamp.sub("", out.getvalue()) == stamp.sub("", logged) + "\n"


def test_json_access_line_is_the_json_formatters_line() -> None:
    out = io.StringIO()
    access_log("INFO", "json", out)("PUT", "/v1/secrets/{path}", 409, 0.002, "r-2", None)
    line = json.loads(out.getvalue())
    formatted = json.loads(JsonFormatter().format(_record(request_id="r-2")))
    assert set(line) == set(formatted) == {"time", "level", "logger", "message", "request_id"}
    assert line["message"] == "PUT /v1/secrets/{path} 409 2.0ms" and line["level"] == "info"
    assert json_line(0.0, "INFO", "x", "m", {})  # the builder the formatter uses


def test_no_request_lines_above_info() -> None:
    out = io.StringIO()
    access_log("WARNING", "console", out)("GET", "/healthz", 200, 0.001, "r-3", None)
    assert out.getvalue() == ""


def test_a_broken_stream_never_fails_the_request() -> None:
    out = io.StringIO()
    out.close()
    StreamAccessLog(out, console_line)("GET", "/healthz", 200, 0.001, "r-4", None)  # no exception


def test_logging_access_log_reaches_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="secretsd.http")
    LoggingAccessLog()("GET", "/healthz", 200, 0.001, "r-5", "svc")
    assert [(r.getMessage(), r.request_id, r.client) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("GET /healthz 200 1.0ms", "r-5", "svc")]


@pytest.mark.e2e
def test_the_daemon_writes_one_request_line_with_the_request_id(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = init_store(data)
    daemon = DaemonProcess(data).start()
    try:
        http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": "v"})
        resp = http("GET", f"{daemon.url}/v1/secrets/app/k", token=token, headers={"X-Request-Id": "trace-abc"})
        assert resp.status == 200
    finally:
        daemon.stop()
    lines = [line for line in daemon.logs().splitlines() if "request_id=trace-abc" in line]
    assert len(lines) == 1, daemon.logs()
    assert re.fullmatch(r"\S+ \S+ INFO    secretsd\.http: GET /v1/secrets/\{path\} 200 [\d.]+ms "
                        r"\[request_id=trace-abc client=admin\]", lines[0]), lines[0]


def test_fresh_request_ids_are_unique_and_a_forked_child_draws_its_own_prefix() -> None:
    import os

    from secretsd.api.app import _new_request_id

    ids = [_new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(re.fullmatch(r"[0-9a-f]{28}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write, _new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child[:16] != ids[0][:16], "a forked worker must not repeat its parent's ids"
