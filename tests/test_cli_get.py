"""`secretsd get` writes the stored bytes and nothing else; `-o FILE` writes them to a 0600 file."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from secretsd.cli import main
from tests.helpers import DaemonProcess, http, init_store

VALUES = {
    "app/pem": "-----BEGIN KEY-----\nabc\n-----END KEY-----\n",  # ends in a newline: kept, not doubled
    "app/plain": "no newline",
    "app/unicode": "pässwörd ✓ \t $HOME \"q\"",
    "app/crlf": "a\r\nb\r\n\n",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("get") / "d"
    admin = init_store(data)
    proc = DaemonProcess(data).start()
    try:
        for path, value in VALUES.items():
            assert http("PUT", f"{proc.url}/v1/secrets/{path}", token=admin, body={"value": value}).status == 200
        yield {"SECRETSD_ADDR": proc.url, "SECRETSD_TOKEN": admin}
    finally:
        proc.stop()


def get(env: dict[str, Any], *args: str) -> Result:
    return CliRunner().invoke(main, ["get", *args], env=env, catch_exceptions=False)


def test_get_writes_the_stored_bytes_and_nothing_else(env: dict[str, Any]) -> None:
    for path, value in VALUES.items():
        result = get(env, path)
        assert result.exit_code == 0, result.stderr
        assert result.stdout_bytes == value.encode("utf-8"), path


def test_get_newline_adds_exactly_one(env: dict[str, Any]) -> None:
    assert get(env, "app/plain", "--newline").stdout_bytes == b"no newline\n"
    assert get(env, "app/pem", "--newline").stdout_bytes == VALUES["app/pem"].encode() + b"\n"


def test_get_output_file_is_0600_and_holds_the_stored_bytes(env: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_text("old, readable by all")
    target.chmod(0o644)
    result = get(env, "app/pem", "-o", str(target))
    assert result.exit_code == 0 and result.stdout_bytes == b""
    assert target.read_bytes() == VALUES["app/pem"].encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temporary file left behind


def test_get_output_with_json_reports_the_file_not_the_value(env: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "v"
    result = get(env, "app/unicode", "-o", str(target), "--json")
    assert result.exit_code == 0 and VALUES["app/unicode"] not in result.stdout
    assert '"file"' in result.stdout and target.read_bytes() == VALUES["app/unicode"].encode()


def test_get_output_failure_leaves_no_file(env: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "v"
    result = get(env, "app/plain", "-o", str(missing))
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not missing.parent.exists()
    result = get(env, "app/none", "-o", str(tmp_path / "w"))  # not found: nothing written
    assert result.exit_code == 3 and not (tmp_path / "w").exists()
    assert os.listdir(tmp_path) == []
