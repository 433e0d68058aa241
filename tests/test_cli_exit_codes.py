"""The exit-status contract of remote commands (docs/cli.md), through CliRunner against real daemons.

0 success, 1 any other error, 2 usage, 3 not found, 4 unauthenticated or denied, 5 daemon
unreachable or unavailable (503), 6 conflict (409). Every error is one line on stderr.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from secretsd import errors
from secretsd.cli import main
from secretsd.cli.exits import Exit, exit_code
from secretsd.problems import PROBLEMS, error_from_problem
from tests.helpers import DaemonProcess, free_port, http, init_store

POLICY = '[policies.reader]\nrules = [{ path = "app/*", allow = ["read", "list"] }]\n'


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("exits")
    (root / "policy.toml").write_text(POLICY)
    (root / "secretsd.toml").write_text(f'policy_file = "{root / "policy.toml"}"\n')
    admin = init_store(root / "d")
    proc = DaemonProcess(root / "d", extra_args=["--config", str(root / "secretsd.toml")]).start()
    try:
        assert http("PUT", f"{proc.url}/v1/secrets/app/k", token=admin, body={"value": "v1"}).status == 200
        reader = http("POST", f"{proc.url}/v1/auth/tokens", token=admin,
                      body={"client": "reader", "policies": ["reader"]}).body["token"]
        yield {"url": proc.url, "admin": admin, "reader": reader}
    finally:
        proc.stop()


def invoke(*args: str, env: dict[str, Any]) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def as_admin(daemon: dict[str, str]) -> dict[str, Any]:
    return {"SECRETSD_ADDR": daemon["url"], "SECRETSD_TOKEN": daemon["admin"]}


def test_exit_code_follows_the_problem_status_of_each_error() -> None:
    expected = {404: 3, 410: 3, 401: 4, 403: 4, 503: 5, 409: 6}
    for cls, ptype in PROBLEMS.items():
        # What the client raises for that problem document (the class the daemon's type maps back to).
        raised = error_from_problem({"type": ptype.uri, "status": ptype.status, "detail": "x"}, ptype.status)
        assert exit_code(raised) == expected.get(ptype.status, 1), cls
    assert exit_code(errors.UnreachableError("down")) == Exit.UNAVAILABLE
    assert exit_code(errors.ConfigError("SECRETSD_ADDR must be http(s)://HOST:PORT")) == Exit.USAGE
    assert exit_code(errors.SecretsdError("internal")) == Exit.ERROR


def test_success_is_0(daemon: dict[str, str]) -> None:
    result = invoke("get", "app/k", env=as_admin(daemon))
    assert result.exit_code == 0 and result.stdout == "v1"


def test_usage_is_2(daemon: dict[str, str]) -> None:
    assert invoke("get", env=as_admin(daemon)).exit_code == Exit.USAGE  # missing PATH
    assert invoke("set", "app/k", "--cas", "soon", env=as_admin(daemon)).exit_code == Exit.USAGE
    assert "SECRETSD_ADDR" in error_line(invoke("get", "app/k", env=as_admin(daemon) | {"SECRETSD_ADDR": "ftp://x"}),
                                         Exit.USAGE)


def test_an_empty_secretsd_addr_is_a_usage_error_not_the_default_address(daemon: dict[str, str]) -> None:
    for empty in ("", "  "):
        line = error_line(invoke("get", "app/k", env=as_admin(daemon) | {"SECRETSD_ADDR": empty}), Exit.USAGE)
        assert "SECRETSD_ADDR is set but empty" in line
    assert "--addr is empty" in error_line(invoke("--addr", "", "get", "app/k", env=as_admin(daemon)), Exit.USAGE)
    # An empty variable does not stop a command that needs no daemon.
    assert invoke("--version", env={"SECRETSD_ADDR": ""}).exit_code == 0


def test_not_found_is_3(daemon: dict[str, str]) -> None:
    env = as_admin(daemon)
    assert "no secret at app/missing" in error_line(invoke("get", "app/missing", env=env), Exit.NOT_FOUND)
    error_line(invoke("get", "app/k", "--version", "9", env=env), Exit.NOT_FOUND)
    error_line(invoke("versions", "app/missing", env=env), Exit.NOT_FOUND)
    error_line(invoke("token", "revoke", "0123456789abcdef", env=env), Exit.NOT_FOUND)


def test_unauthenticated_or_denied_is_4(daemon: dict[str, str]) -> None:
    env = as_admin(daemon)
    assert "valid token" in error_line(invoke("get", "app/k", env=env | {"SECRETSD_TOKEN": None}), Exit.DENIED)
    error_line(invoke("get", "app/k", env=env | {"SECRETSD_TOKEN": "sdt_bogus"}), Exit.DENIED)
    reader = env | {"SECRETSD_TOKEN": daemon["reader"]}
    assert invoke("get", "app/k", env=reader).exit_code == 0
    error_line(invoke("get", "other/k", env=reader), Exit.DENIED)  # no rule: denied, not "not found"
    error_line(invoke("set", "app/k", "v2", env=reader), Exit.DENIED)
    assert invoke("get", "app/k", env=env).stdout == "v1"  # the refused write changed nothing


def test_unreachable_is_5() -> None:
    env = {"SECRETSD_ADDR": f"http://127.0.0.1:{free_port()}", "SECRETSD_TOKEN": "x"}
    assert "cannot reach secretsd" in error_line(invoke("get", "app/k", env=env), Exit.UNAVAILABLE)


def test_sealed_daemon_is_5(tmp_path: Path) -> None:
    admin = init_store(tmp_path / "d")
    (tmp_path / "d" / "master.key").rename(tmp_path / "master.key.away")
    sealed = DaemonProcess(tmp_path / "d", env={"SECRETSD_UNSEAL_RETRY_MAX_SECONDS": "0.5"}).start(wait_ready=False)
    try:
        env = {"SECRETSD_ADDR": sealed.url, "SECRETSD_TOKEN": admin}
        assert "sealed" in error_line(invoke("get", "app/k", env=env), Exit.UNAVAILABLE).lower()
    finally:
        sealed.stop()


def test_conflict_is_6(daemon: dict[str, str]) -> None:
    env = as_admin(daemon)
    assert "check-and-set" in error_line(invoke("set", "app/k", "v2", "--cas", "0", env=env), Exit.CONFLICT)
    assert invoke("get", "app/k", env=env).stdout == "v1"


def test_a_malformed_request_the_daemon_refuses_is_1(daemon: dict[str, str]) -> None:
    assert "empty segment" in error_line(invoke("get", "app//x", env=as_admin(daemon)), Exit.ERROR)


def test_addr_and_token_are_accepted_after_the_subcommand(daemon: dict[str, str]) -> None:
    dead = {"SECRETSD_ADDR": f"http://127.0.0.1:{free_port()}", "SECRETSD_TOKEN": "sdt_bogus"}
    result = invoke("get", "app/k", "--addr", daemon["url"], "--token", daemon["admin"], env=dead)
    assert result.exit_code == 0 and result.stdout == "v1"
    # After the subcommand wins over before it, and over the environment.
    result = invoke("--addr", dead["SECRETSD_ADDR"], "token", "list", "--addr", daemon["url"], "--json",
                    "--token", daemon["admin"], env={})
    assert result.exit_code == 0 and '"tokens"' in result.stdout
    result = invoke("run", "--addr", daemon["url"], "--token", daemon["admin"], "--prefix", "app", "--",
                    "sh", "-c", 'test "$k" = v1', env=dead)
    assert result.exit_code == 0, result.stderr


def test_every_remote_command_takes_the_connection_options() -> None:
    remote = [["get"], ["set"], ["list"], ["versions"], ["delete"], ["undelete"], ["destroy"], ["rotate"],
              ["rotation", "status"], ["rotation", "set"], ["status"], ["health"], ["keyring", "rotate"],
              ["policy", "check"], ["token", "create"], ["token", "list"], ["token", "revoke"],
              ["import-env"], ["export-env"], ["run"]]
    for command in remote:
        out = invoke(*command, "--help", env={}).stdout
        for option in ("--addr", "--token", "--ca-file"):
            assert option in out, (command, option)
