"""``secretsd storage migrate``: an SQLite store copied to PostgreSQL, verified, then served from there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretsd.errors import StorageError
from secretsd.storage.rows import copy_columns
from tests.helpers import DaemonProcess, http, run_cli
from tests.postgres_fixture import PostgresServer, fresh_database, start_or_skip

DSN_ENV = "SECRETSD_TEST_MIGRATE_DSN"


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = start_or_skip()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def database(pg: PostgresServer) -> Iterator[str]:
    manager = fresh_database(pg)
    loop = asyncio.new_event_loop()
    try:
        yield loop.run_until_complete(manager.__aenter__())
        loop.run_until_complete(manager.__aexit__(None, None, None))
    finally:
        loop.close()


def write_configs(root: Path) -> tuple[Path, Path]:
    """Same data directory (the audit log) and key file; only the storage differs."""
    common = (f'data_dir = "{root / "d"}"\n[key_provider]\nkind = "file"\npath = "{root / "master.key"}"\n')
    sqlite = root / "sqlite.toml"
    sqlite.write_text(common)
    postgres = root / "postgres.toml"
    postgres.write_text(common + f'[storage]\nbackend = "postgres"\ndsn_env = "{DSN_ENV}"\n')
    return sqlite, postgres


@pytest.mark.e2e
def test_sqlite_store_copied_to_postgres_and_served_from_there(
    pg: PostgresServer, database: str, tmp_path: Path
) -> None:
    env = {DSN_ENV: pg.dsn(database)}
    sqlite, postgres = write_configs(tmp_path)
    token = json.loads(run_cli("init", "--config", str(sqlite), "--json", check=True).stdout)["admin_token"]
    old = DaemonProcess(tmp_path / "d", extra_args=["--config", str(sqlite)]).start()
    try:
        for n in (1, 2, 3):
            assert http("PUT", f"{old.url}/v1/secrets/app/a", token=token, body={"value": f"a{n}"}).status == 200
        assert http("POST", f"{old.url}/v1/secrets/app/a/delete", token=token, body={"versions": [2]}).status == 200
        assert http("POST", f"{old.url}/v1/secrets/app/a/destroy", token=token, body={"versions": [1]}).status == 200
        svc = http("POST", f"{old.url}/v1/auth/tokens", token=token, body={"client": "svc", "policies": ["root"]})
        gone = http("POST", f"{old.url}/v1/auth/tokens", token=token, body={"client": "old", "policies": ["root"]})
        assert http("DELETE", f"{old.url}/v1/auth/tokens/{gone.body['token_id']}", token=token).status in (200, 204)
        assert http("POST", f"{old.url}/v1/sys/keyring/rotate", token=token).body == {"active_term": 2}
        assert http("PUT", f"{old.url}/v1/secrets/app/b", token=token,
                    body={"value": "b-under-term-2", "metadata": {"owner": "team"}}).status == 200
        # While a daemon serves the source, the copy refuses (it would miss later writes).
        busy = run_cli("storage", "migrate", "--from", str(sqlite), "--to", str(postgres), env=env)
        assert busy.returncode == 1 and "a daemon is serving" in busy.stderr, busy.stderr
    finally:
        old.stop()

    done = run_cli("storage", "migrate", "--from", str(sqlite), "--to", str(postgres), "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    rows = {t["table"]: t for t in report["tables"]}
    assert [t["table"] for t in report["tables"]] == ["meta", "keyring_terms", "secrets", "secret_versions", "tokens"]
    assert rows["keyring_terms"]["target_rows"] == 2 and rows["secrets"]["target_rows"] == 2
    assert rows["secret_versions"]["target_rows"] == 4 and rows["tokens"]["target_rows"] == 3
    assert all(t["source_sha256"] == t["target_sha256"] and len(t["source_sha256"]) == 64 for t in report["tables"])

    again = run_cli("storage", "migrate", "--from", str(sqlite), "--to", str(postgres), env=env)
    assert again.returncode == 1 and "not empty" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    new = DaemonProcess(tmp_path / "d", extra_args=["--config", str(postgres)], env=env).start()
    try:
        status = http("GET", f"{new.url}/v1/sys/status", token=token).body
        assert status["storage"] == "postgres" and status["active_term"] == 2
        assert http("GET", f"{new.url}/v1/secrets/app/a", token=token).body["value"] == "a3"
        versions = {v["version"]: v["state"] for v in http("GET", f"{new.url}/v1/metadata/app/a", token=token)
                    .body["versions"]}
        assert versions == {1: "destroyed", 2: "deleted", 3: "active"}
        assert http("GET", f"{new.url}/v1/secrets/app/b", token=token).body["value"] == "b-under-term-2"
        assert http("GET", f"{new.url}/v1/auth/whoami", token=svc.body["token"]).status == 200
        assert http("GET", f"{new.url}/v1/auth/whoami", token=gone.body["token"]).status == 401
        assert http("PUT", f"{new.url}/v1/secrets/app/a", token=token, body={"value": "a4"}).body["version"] == 4
    finally:
        new.stop()
    # The audit chain continues across the move: same log, head copied with the store.
    verified = run_cli("audit", "verify", "--config", str(postgres), env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_migrate_refuses_an_uninitialised_source(pg: PostgresServer, database: str, tmp_path: Path) -> None:
    sqlite, postgres = write_configs(tmp_path)
    result = run_cli("storage", "migrate", "--from", str(sqlite), "--to", str(postgres),
                     env={DSN_ENV: pg.dsn(database)})
    assert result.returncode == 1 and "not initialised" in result.stderr


def test_a_column_this_version_does_not_know_is_refused_not_dropped() -> None:
    with pytest.raises(StorageError, match="cannot copy"):
        copy_columns("secrets", ["path", "current_version", "created_at", "updated_at", "metadata", "shiny"], "x")
    assert copy_columns("meta", ["value", "key"], "x") == ["key", "value"]


def test_help_has_an_example() -> None:
    result = run_cli("storage", "migrate", "--help")
    assert result.returncode == 0 and "Example" in result.stdout
