"""Backup drills with real daemon processes (issue 14): a lost data directory restored from a backup with the
same key; SQLite -> backup -> PostgreSQL -> backup -> SQLite, each restored store served by a real daemon."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, http, run_cli
from tests.postgres_fixture import PostgresServer, fresh_database, start_or_skip

DSN_ENV = "SECRETSD_TEST_BACKUP_DSN"
VALUES = {f"app/svc{n}/password": f"pw-{n}-ü" for n in range(20)}


def populate(url: str, token: str) -> str:
    """Values under two keyring terms, deleted and destroyed versions, a service token; its token."""
    for path, value in VALUES.items():
        assert http("PUT", f"{url}/v1/secrets/{path}", token=token, body={"value": "first-" + value}).status == 200
    assert http("POST", f"{url}/v1/sys/keyring/rotate", token=token).body == {"active_term": 2}
    for path, value in VALUES.items():
        assert http("PUT", f"{url}/v1/secrets/{path}", token=token, body={"value": value}).status == 200
    assert http("PUT", f"{url}/v1/secrets/app/gone", token=token, body={"value": "x"}).status == 200
    assert http("POST", f"{url}/v1/secrets/app/gone/destroy", token=token, body={"versions": [1]}).status == 200
    svc = http("POST", f"{url}/v1/auth/tokens", token=token, body={"client": "svc", "policies": ["root"]})
    return str(svc.body["token"])


def serves_everything(url: str, token: str, svc: str) -> None:
    for path, value in VALUES.items():
        assert http("GET", f"{url}/v1/secrets/{path}", token=token).body["value"] == value
        assert http("GET", f"{url}/v1/secrets/{path}?version=1", token=token).body["value"] == "first-" + value
    assert http("GET", f"{url}/v1/secrets/app/gone?version=1", token=token).status in (404, 410)
    assert http("GET", f"{url}/v1/auth/whoami", token=svc).status == 200
    assert http("GET", f"{url}/v1/sys/status", token=token).body["active_term"] == 2


def first_record(data_dir: Path) -> dict[str, object]:
    line = (data_dir / "audit" / "main.jsonl").read_text().splitlines()[0]
    return dict(json.loads(line))


@pytest.mark.e2e
def test_lost_data_directory_restored_from_a_backup_serves_every_value(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = json.loads(run_cli("init", "--data-dir", str(data), "--json", check=True).stdout)["admin_token"]
    daemon = DaemonProcess(data).start()
    try:
        svc = populate(daemon.url, token)
        # Taken while the daemon serves: one read transaction, so one moment of the store.
        made = run_cli("backup", "create", "--out", str(tmp_path / "b.sdbk"), "--data-dir", str(data), "--json")
        assert made.returncode == 0, made.stderr
        manifest = json.loads(made.stdout)
    finally:
        daemon.stop()
    # The disk is lost; the key (here a key file, kept apart as the operator should) is not.
    shutil.copy2(data / "master.key", tmp_path / "master.key")
    shutil.rmtree(data)
    data.mkdir(mode=0o700)
    shutil.copy2(tmp_path / "master.key", data / "master.key")

    checked = run_cli("backup", "verify", str(tmp_path / "b.sdbk"), "--data-dir", str(data))
    assert checked.returncode == 0, checked.stderr
    restored = run_cli("backup", "restore", str(tmp_path / "b.sdbk"), "--data-dir", str(data))
    assert restored.returncode == 0, restored.stderr
    record = first_record(data)
    assert record["action"] == "backup.restore" and record["seq"] == 1
    assert record["manifest_sha256"] == manifest["manifest_sha256"]

    daemon = DaemonProcess(data).start()
    try:
        serves_everything(daemon.url, token, svc)
    finally:
        daemon.stop()
    verified = run_cli("audit", "verify", "--data-dir", str(data))
    assert verified.returncode == 0, verified.stdout + verified.stderr


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


def config(path: Path, data_dir: Path, key: Path, postgres: bool = False) -> Path:
    text = f'data_dir = "{data_dir}"\n[key_provider]\nkind = "file"\npath = "{key}"\n'
    if postgres:
        text += f'[storage]\nbackend = "postgres"\ndsn_env = "{DSN_ENV}"\n'
    path.write_text(text)
    return path


@pytest.mark.e2e
def test_sqlite_backup_restored_into_postgres_and_back(pg: PostgresServer, database: str, tmp_path: Path) -> None:
    env = {DSN_ENV: pg.dsn(database)}
    key = tmp_path / "master.key"
    sqlite = config(tmp_path / "sqlite.toml", tmp_path / "sqlite-data", key)
    postgres = config(tmp_path / "postgres.toml", tmp_path / "pg-data", key, postgres=True)
    back = config(tmp_path / "back.toml", tmp_path / "back-data", key)
    token = json.loads(run_cli("init", "--config", str(sqlite), "--json", check=True).stdout)["admin_token"]
    daemon = DaemonProcess(tmp_path / "sqlite-data", extra_args=["--config", str(sqlite)]).start()
    try:
        svc = populate(daemon.url, token)
    finally:
        daemon.stop()
    made = run_cli("backup", "create", "--out", str(tmp_path / "from-sqlite.sdbk"), "--config", str(sqlite))
    assert made.returncode == 0, made.stderr

    restored = run_cli("backup", "restore", str(tmp_path / "from-sqlite.sdbk"), "--config", str(postgres), "--json",
                       env=env)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["source"] == "sqlite"
    again = run_cli("backup", "restore", str(tmp_path / "from-sqlite.sdbk"), "--config", str(postgres), env=env)
    assert again.returncode == 6 and "not empty" in again.stderr, again.stderr

    daemon = DaemonProcess(tmp_path / "pg-data", extra_args=["--config", str(postgres)], env=env).start()
    try:
        assert http("GET", f"{daemon.url}/v1/sys/status", token=token).body["storage"] == "postgres"
        serves_everything(daemon.url, token, svc)
        # Taken from PostgreSQL while its daemon serves (REPEATABLE READ snapshot).
        made = run_cli("backup", "create", "--out", str(tmp_path / "from-pg.sdbk"), "--config", str(postgres),
                       "--json", env=env)
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["source"] == "postgres"
    finally:
        daemon.stop()

    assert run_cli("backup", "restore", str(tmp_path / "from-pg.sdbk"), "--config", str(back)).returncode == 0
    daemon = DaemonProcess(tmp_path / "back-data", extra_args=["--config", str(back)]).start()
    try:
        serves_everything(daemon.url, token, svc)
    finally:
        daemon.stop()
    for conf, extra in ((postgres, env), (back, {})):
        verified = run_cli("audit", "verify", "--config", str(conf), env=extra)
        assert verified.returncode == 0, verified.stdout + verified.stderr
