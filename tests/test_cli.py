"""The CLI against a real daemon process: every command, --json for scripts, one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, free_port, init_store, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def cli(daemon_process: tuple[DaemonProcess, str]):  # type: ignore[no-untyped-def]
    daemon, token = daemon_process
    env = {"SECRETSD_ADDR": daemon.url, "SECRETSD_TOKEN": token}

    def run(*args: str, input_text: str | None = None, token_override: str | None = None):  # type: ignore[no-untyped-def]
        e = env | ({"SECRETSD_TOKEN": token_override} if token_override is not None else {})
        return run_cli(*args, env=e, input_text=input_text)

    return run


def one_line_error(result, code: int = 1) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return str(lines[0])


def test_init_json_and_refusal_to_reinitialise(tmp_path: Path) -> None:
    data = tmp_path / "d"
    result = run_cli("init", "--data-dir", str(data), "--json")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert doc["admin_token"].startswith("sdt_") and doc["provider"] == "file"
    assert (data / "master.key").stat().st_mode & 0o777 == 0o600
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
    again = run_cli("init", "--data-dir", str(data), "--json")
    assert "already initialised" in one_line_error(again)
    assert again.stdout == ""
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()} == digest


def test_init_plain_output_shows_token_once(tmp_path: Path) -> None:
    result = run_cli("init", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 0 and result.stdout.count("sdt_") == 1


def test_set_and_get_every_way(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("set", "app/a", "from-arg").stdout.strip() == "app/a: version 1"
    assert cli("set", "app/a", "--stdin", input_text="from-stdin").returncode == 0
    f = tmp_path / "v.txt"
    f.write_text("from-file\nline2")
    assert cli("set", "app/a", "--file", str(f)).returncode == 0
    assert cli("get", "app/a").stdout == "from-file\nline2"  # the stored bytes, nothing added
    assert cli("get", "app/a", "--version", "2").stdout == "from-stdin"
    doc = json.loads(cli("get", "app/a", "--json").stdout)
    assert doc["value"] == "from-file\nline2" and doc["version"] == 3
    doc = json.loads(cli("set", "app/b", "x", "--meta", "owner=me", "--cas", "0", "--json").stdout)
    assert doc["version"] == 1
    assert "check-and-set" in one_line_error(cli("set", "app/b", "y", "--cas", "0"), 6)
    usage = cli("set", "app/c")
    assert usage.returncode == 2 and "exactly one way" in usage.stderr


def test_list_versions_delete_undelete_destroy(cli) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        cli("set", "svc/db", f"v{i}")
    cli("set", "svc/api", "k")
    listing = json.loads(cli("list", "svc", "--json").stdout)
    assert [(s["path"], s["current_version"]) for s in listing["secrets"]] == [("svc/api", 1), ("svc/db", 3)]
    table = cli("list", "svc").stdout
    assert "svc/db" in table and "v2" not in table
    versions = json.loads(cli("versions", "svc/db", "--json").stdout)
    assert [v["version"] for v in versions["versions"]] == [1, 2, 3]
    assert "svc/db" in cli("versions", "svc/db").stdout
    assert cli("delete", "svc/db").stdout.strip() == "svc/db: deleted version(s) 3"
    assert "deleted" in one_line_error(cli("get", "svc/db"), 3)
    assert cli("undelete", "svc/db", "--versions", "3").returncode == 0
    assert cli("get", "svc/db").stdout == "v2"
    assert json.loads(cli("destroy", "svc/db", "--versions", "1,2", "--json").stdout)["destroyed"] == [1, 2]
    assert "destroyed" in one_line_error(cli("get", "svc/db", "--version", "1"), 3)
    assert cli("undelete", "svc/db").returncode == 2  # --versions is required


def test_tokens_status_health_keyring_policy(cli) -> None:  # type: ignore[no-untyped-def]
    new = cli("token", "create", "--client", "billing", "--policy", "root", "--ttl", "1h").stdout.strip()
    assert new.startswith("sdt_")
    listing = json.loads(cli("token", "list", "--json").stdout)
    entry = next(t for t in listing["tokens"] if t["client"] == "billing")
    assert entry["expires_at"] and new not in json.dumps(listing)
    assert cli("get", "nope/x", token_override=new).returncode == 3  # not found
    assert "revoked" in cli("token", "revoke", entry["token_id"]).stdout
    assert "valid token" in one_line_error(cli("status", token_override=new), 4)
    status = json.loads(cli("status", "--json").stdout)
    assert status["sealed"] is False and status["provider"] == "file"
    assert "provider" in cli("status").stdout
    assert cli("health").stdout.startswith("ready")
    assert json.loads(cli("keyring", "rotate", "--json").stdout)["active_term"] == 2
    cli("token", "create", "--client", "ops", "--policy", "root")
    allowed = cli("policy", "check", "ops", "read", "app/x")
    assert allowed.returncode == 0 and allowed.stdout.startswith("ALLOW: allowed by policy 'root'")
    assert "no active token" in one_line_error(cli("policy", "check", "billing", "read", "app/x"), 3)


def test_errors_are_one_line_with_non_zero_exit(cli) -> None:  # type: ignore[no-untyped-def]
    assert "no secret at app/missing" in one_line_error(cli("get", "app/missing"), 3)
    assert "empty segment" in one_line_error(cli("get", "app//x"))
    assert "valid token" in one_line_error(cli("get", "app/x", token_override=""), 4)
    assert "valid token" in one_line_error(cli("get", "app/x", token_override="sdt_bogus"), 4)
    assert cli("token", "create", "--client", "x", "--policy", "root", "--ttl", "soon").returncode == 2


def test_unreachable_daemon_is_one_line(tmp_path: Path) -> None:
    result = run_cli("status", env={"SECRETSD_ADDR": f"http://127.0.0.1:{free_port()}", "SECRETSD_TOKEN": "x"})
    assert "cannot reach secretsd" in one_line_error(result, 5)
    result = run_cli("status", env={"SECRETSD_ADDR": "ftp://nowhere"})
    assert "SECRETSD_ADDR" in one_line_error(result, 2)


def test_help_has_examples_on_every_command() -> None:
    for command in [["init"], ["serve"], ["get"], ["set"], ["list"], ["versions"], ["delete"], ["undelete"],
                    ["destroy"], ["status"], ["health"], ["keyring", "rotate"], ["policy", "check"],
                    ["token", "create"], ["token", "list"], ["token", "revoke"]]:
        out = run_cli(*command, "--help").stdout
        assert "Example" in out, command


def test_init_with_config_file_and_env(tmp_path: Path) -> None:
    config = tmp_path / "secretsd.toml"
    config.write_text('data_dir = "store"\nmax_versions = 3\n[key_provider]\nkind = "file"\npath = "kek.json"\n')
    result = run_cli("init", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "store" / "kek.json").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text("max_versions = 0\n")
    assert "max_versions" in one_line_error(run_cli("init", "--config", str(bad), "--data-dir", str(tmp_path / "x")))
    bad.write_text("unknown_setting = 1\n")
    assert "unknown setting" in one_line_error(run_cli("init", "--config", str(bad)))
    assert "no data directory" in one_line_error(run_cli("init"))
    token = init_store(tmp_path / "env-store")
    assert token.startswith("sdt_")


def test_init_makes_a_loose_data_directory_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    assert run_cli("init", "--data-dir", str(data), "--json").returncode == 0
    assert data.stat().st_mode & 0o777 == 0o700


def test_piped_tables_are_tab_separated_lines_that_never_wrap(cli) -> None:  # type: ignore[no-untyped-def]
    # Issue 16 item 4: a table read by another program (stdout not a terminal) is one line per row,
    # tab-separated, with a header; nothing wraps at 80 columns, so an id is never split.
    client = "billing-reconciliation-nightly-batch-worker-eu-west"
    cli("token", "create", "--client", client, "--policy", "root")
    ids = {t["client"]: t["token_id"] for t in json.loads(cli("token", "list", "--json").stdout)["tokens"]}
    lines = cli("token", "list").stdout.splitlines()
    assert lines[0].split("\t") == ["id", "client", "policies", "created", "expires", "revoked"]
    row = next(line.split("\t") for line in lines[1:] if client in line)
    assert len(row) == 6 and row[0] == ids[client] and row[1] == client
    assert not any(c in "".join(lines) for c in "│┃━─╭╰")
    cli("set", "svc/db", "v")
    assert cli("list", "svc").stdout.splitlines()[:2][0] == "path\tversion\tupdated"
    status = cli("status").stdout.splitlines()
    assert "\t" in status[0] and any(line.startswith("provider\t") for line in status)


def test_plain_table_cells_keep_one_row_per_line() -> None:
    from secretsd.cli.common import _cell

    assert _cell("a\tb\nc\\d") == "a\\tb\\nc\\\\d"
    assert _cell(None) == "" and _cell(3) == "3"


def test_json_covers_errors_too(cli) -> None:  # type: ignore[no-untyped-def]
    # Issue 16 item 4: with --json a failed command still prints one JSON document on stdout (and
    # its one line on stderr), and exits with the contract's code.
    missing = cli("get", "nope/x", "--json")
    assert missing.returncode == 3 and missing.stderr.startswith("error: ")
    assert json.loads(missing.stdout)["error"] | {"detail": ""} == {
        "type": "not-found", "status": 404, "detail": "", "exit_code": 3}
    cli("set", "app/cas", "v1")
    conflict = cli("set", "app/cas", "v2", "--cas", "0", "--json")
    assert conflict.returncode == 6 and json.loads(conflict.stdout)["error"]["status"] == 409
    assert cli("get", "nope/x").stdout == ""  # without --json, stdout stays empty


def test_json_error_when_the_daemon_is_unreachable() -> None:
    result = run_cli("status", "--json", env={"SECRETSD_ADDR": f"http://127.0.0.1:{free_port()}",
                                               "SECRETSD_TOKEN": "x"})
    assert result.returncode == 5
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "unreachable" and error["status"] is None and error["exit_code"] == 5
