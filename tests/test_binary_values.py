"""Binary values (issue 16 item 4): ``value_base64`` in, ``value_base64`` out, exact bytes through the CLI.

A value whose bytes are UTF-8 text reads back as ``value``; any other bytes read back as
``value_base64``; either way the stored bytes are exactly the ones written.
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from secretsd.cli import main
from secretsd.client.calls import value_field, value_of
from tests.conftest import Api
from tests.test_audit import records

BLOB = bytes(range(256)) + b"\xff\xfe\x00\x80"  # not UTF-8


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def test_a_binary_value_round_trips_exactly(api: Api) -> None:
    resp = await api.client.put("/v1/secrets/app/blob", json={"value_base64": b64(BLOB)}, headers=api.auth())
    assert resp.status == 200, await resp.text()
    got = await api.get("app/blob")
    assert "value" not in got and base64.b64decode(got["value_base64"]) == BLOB


async def test_text_sent_as_base64_reads_back_as_text(api: Api) -> None:
    resp = await api.client.put("/v1/secrets/app/t", json={"value_base64": b64("grüße\n".encode())},
                                headers=api.auth())
    assert resp.status == 200
    got = await api.get("app/t")
    assert got["value"] == "grüße\n" and "value_base64" not in got


@pytest.mark.parametrize("body", [
    {"value": "x", "value_base64": b64(b"x")},   # both
    {},                                          # neither
    {"value_base64": "not base64!"},
    {"value_base64": "YQ"},                      # unpadded
    {"value_base64": 5},
])
async def test_a_bad_value_field_is_a_400_and_writes_nothing(api: Api, body: dict[str, object]) -> None:
    resp = await api.client.put("/v1/secrets/app/bad", json=body, headers=api.auth())
    assert resp.status == 400, await resp.text()
    assert (await api.client.get("/v1/secrets/app/bad", headers=api.auth())).status == 404


async def test_the_value_limit_counts_the_decoded_bytes(api: Api) -> None:
    limit = api.daemon.settings.max_value_bytes
    resp = await api.client.put("/v1/secrets/app/big", json={"value_base64": b64(b"\xff" * (limit + 1))},
                                headers=api.auth())
    assert resp.status == 413
    resp = await api.client.put("/v1/secrets/app/big", json={"value_base64": b64(b"\xff" * limit)},
                                headers=api.auth())
    assert resp.status == 200


async def test_batch_write_and_read_carry_binary_values(api: Api) -> None:
    resp = await api.client.post("/v1/secrets:batch", headers=api.auth(), json={"items": [
        {"path": "bin/a", "value_base64": b64(BLOB)}, {"path": "bin/b", "value": "text"}]})
    assert [r["status"] for r in (await resp.json())["results"]] == [200, 200]
    page = await (await api.client.get("/v1/secrets:read", params={"prefix": "bin"}, headers=api.auth())).json()
    assert [value_of(s) for s in page["secrets"]] == [BLOB, "text"]


async def test_the_audit_hmac_of_a_value_is_the_same_whichever_way_it_was_sent(api: Api) -> None:
    await api.put("app/h1", "same")
    resp = await api.client.put("/v1/secrets/app/h2", json={"value_base64": b64(b"same")}, headers=api.auth())
    assert resp.status == 200
    hmacs = {r["path"]: r["value_hmac"] for r in records(api.daemon.settings) if r["action"] == "secret.write"}
    assert hmacs["app/h1"] == hmacs["app/h2"]


def test_value_field_and_value_of_are_inverse() -> None:
    for value in ("text", "", BLOB, "grüße".encode()):
        field = value_field(value)
        assert value_of(field) == value
    assert value_field("x") == {"value": "x"} and "value_base64" in value_field(b"\xff")


# -- the CLI: exact bytes in, exact bytes out ----------------------------------------------------------
async def test_cli_set_file_and_get_keep_a_binary_file_byte_for_byte(api: Api, tmp_path: Path) -> None:
    src = tmp_path / "key.der"
    src.write_bytes(BLOB + os.urandom(64))
    env = {"SECRETSD_ADDR": str(api.client.make_url("")).rstrip("/"), "SECRETSD_TOKEN": api.admin}
    runner = CliRunner()

    async def run(*args: str) -> bytes:
        # In a thread: the in-process daemon answers on this test's event loop.
        result = await asyncio.to_thread(runner.invoke, main, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout_bytes

    await run("set", "app/der", "--file", str(src))
    assert await run("get", "app/der") == src.read_bytes()
    out = tmp_path / "out.der"
    await run("get", "app/der", "-o", str(out))
    assert out.read_bytes() == src.read_bytes() and (out.stat().st_mode & 0o777) == 0o600
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"line one\r\nline two\r\n")  # text, but its CRs are part of the value too
    await run("set", "app/crlf", "--file", str(crlf))
    assert await run("get", "app/crlf") == b"line one\r\nline two\r\n"
    assert (await api.get("app/crlf"))["value"] == "line one\r\nline two\r\n"
    runner_in = await asyncio.to_thread(runner.invoke, main, ["set", "app/piped", "--stdin"], input=BLOB, env=env)
    assert runner_in.exit_code == 0, runner_in.output
    assert await run("get", "app/piped") == BLOB


async def test_env_commands_meet_a_binary_value_with_a_clear_answer(api: Api, tmp_path: Path) -> None:
    # import-env sees it as changed (no .env line is those bytes); run refuses it as a variable.
    resp = await api.client.put("/v1/secrets/svc/KEY", json={"value_base64": b64(BLOB)}, headers=api.auth())
    assert resp.status == 200
    env = {"SECRETSD_ADDR": str(api.client.make_url("")).rstrip("/"), "SECRETSD_TOKEN": api.admin}
    dotenv = tmp_path / "x.env"
    dotenv.write_text("KEY=text\n")
    runner = CliRunner()
    imported = await asyncio.to_thread(runner.invoke, main, ["import-env", str(dotenv), "--prefix", "svc", "--json"],
                                       env=env)
    assert imported.exit_code == 0, imported.output
    assert '"changed": 1' in imported.stdout and '"written": 0' in imported.stdout
    ran = await asyncio.to_thread(runner.invoke, main, ["run", "--prefix", "svc", "--", "true"], env=env)
    assert ran.exit_code != 0 and "binary value" in ran.output and "Traceback" not in ran.output
