"""Audit chain names by default (issue 16 item 7, secretsd/audit/chains.py, docs/audit.md).

Without ``[audit] chain`` each daemon derives a free chain (main, main-<host>, main-<host>-2...),
so two daemons on one store start without extra config and never write each other's file or head
key; a configured chain stays exclusive; an upgraded or restarted single daemon keeps ``main``.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from secretsd.audit.chains import candidates, claim_chain, host_label, release
from secretsd.errors import AuditError
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import Daemon, initialize_store
from secretsd.storage.sqlite import SQLiteStorage
from tests.helpers import DaemonProcess, http, init_store, run_cli
from tests.postgres_fixture import PostgresServer, fresh_database

PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HOST = host_label(platform.node())


def meta(data: Path, key: str) -> str | None:
    conn = sqlite3.connect(data / "secretsd.db")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["db-1", "web 1.example.com", "höst/../../etc", "", "-", "x" * 300,
                                  "a\nb\tc", "..", "UPPER_case.9"])
@pytest.mark.parametrize("base", ["main", "m" * 64, "main-w63"])
def test_derived_chain_names_stay_within_the_chain_pattern(node: str, base: str) -> None:
    names = candidates(base, node)
    assert all(PATTERN.fullmatch(name) for name in names), names
    assert len(set(names)) == len(names) and names[0] == base
    assert "/" not in host_label(node) and host_label(node) not in ("", ".", "..")


def test_a_chain_is_configured_only_when_set(tmp_path: Path) -> None:
    assert not load_settings(None, data_dir=tmp_path).audit.chain_configured
    toml = tmp_path / "c.toml"
    toml.write_text('[audit]\nsign = "record"\n')
    assert not load_settings(toml, data_dir=tmp_path).audit.chain_configured
    toml.write_text('[audit]\nchain = "main"\n')
    assert load_settings(toml, data_dir=tmp_path).audit.chain_configured
    os.environ["SECRETSD_AUDIT__CHAIN"] = "node-a"
    try:
        assert load_settings(None, data_dir=tmp_path).audit.chain_configured
    finally:
        del os.environ["SECRETSD_AUDIT__CHAIN"]


# -- the claim, on a real SQLite store --------------------------------------------------------------
async def test_each_data_directory_claims_its_own_chain_on_one_store(tmp_path: Path) -> None:
    """The shared-store rule: a chain claimed by one data directory is never taken by another, even
    on a host of the same name; the same directory gets its chain back."""
    store = SQLiteStorage(tmp_path / "db.sqlite")
    await store.open()
    try:
        names = candidates("main", "same-host")

        def path_in(folder: str) -> Callable[[str], Path]:
            return lambda name: tmp_path / folder / f"{name}.jsonl"

        a = await claim_chain(store, names, path_in("a"), node="same-host")
        release(a)  # a stopped: its lock is free, its claim in the store stays
        b = await claim_chain(store, names, path_in("b"), node="same-host")
        again = await claim_chain(store, names, path_in("a"), node="same-host")
        assert (a.name, b.name, again.name) == ("main", "main-same-host", "main")
        # A claim id is written only for the chain a directory takes, never for one it skipped.
        assert sorted(p.name for p in (tmp_path / "b").glob("*.claim")) == ["main-same-host.claim"]
        held = await claim_chain(store, names, path_in("a"), node="same-host")
        assert held.name == "main-same-host-2"  # "main" is locked by `again` on this directory
        for claim in (b, again, held):
            release(claim)
    finally:
        await store.close()


async def test_a_chain_with_a_stored_head_and_no_owner_belongs_to_the_directory_with_its_files(
        tmp_path: Path) -> None:
    """A store from before chain owners: the daemon that has main's files keeps main; any other
    directory leaves it alone."""
    store = SQLiteStorage(tmp_path / "db.sqlite")
    await store.open()
    try:
        await store.put_meta("audit_head:main", json.dumps({"seq": 3, "hash": "ab" * 32}))
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "main.jsonl").write_text("{}\n")
        names = candidates("main", "h")
        other = await claim_chain(store, names, lambda n: tmp_path / "new" / f"{n}.jsonl", node="h")
        old = await claim_chain(store, names, lambda n: tmp_path / "old" / f"{n}.jsonl", node="h")
        assert (other.name, old.name) == ("main-h", "main")
        release(other)
        release(old)
    finally:
        await store.close()


# -- in-process daemons -----------------------------------------------------------------------------
async def _settings(tmp_path: Path) -> Settings:
    settings = load_settings(None, data_dir=tmp_path / "data")
    await initialize_store(settings)
    return settings


def _configured(settings: Settings, chain: str) -> Settings:
    return settings.model_copy(update={"audit": settings.audit.model_copy(update={"chain": chain})})


async def test_a_configured_chain_stays_exclusive(tmp_path: Path) -> None:
    settings = _configured(await _settings(tmp_path), "node-a")
    first = Daemon(settings)
    await first.start()
    try:
        second = Daemon(settings)
        with pytest.raises(AuditError, match=r"another process is writing the audit log .*its own \[audit\] chain"):
            await second.start()
        assert first.audit_chain == "node-a"
        # A daemon without a configured chain never takes a configured one that is held.
        third = Daemon(load_settings(None, data_dir=settings.require_data_dir()))
        await third.start()
        try:
            assert third.audit_chain == "main"
        finally:
            await third.stop()
    finally:
        await first.stop()
    assert sorted(p.name for p in (settings.require_data_dir() / "audit").glob("*.jsonl")) == [
        "main.jsonl", "node-a.jsonl"]


async def test_a_restarted_or_upgraded_single_daemon_continues_main(tmp_path: Path) -> None:
    settings = await _settings(tmp_path)
    data = settings.require_data_dir()
    for round_ in range(3):
        if round_ == 2:
            # As a store and data directory from before chain owners look: no owner, no claim file.
            conn = sqlite3.connect(data / "secretsd.db")
            conn.execute("DELETE FROM meta WHERE key = 'audit_owner:main'")
            conn.commit()
            conn.close()
            (data / "audit" / "main.claim").unlink()
        daemon = Daemon(settings)
        await daemon.start()
        try:
            assert daemon.audit_chain == "main"
            assert (await daemon.status())["audit_chain"] == "main"
        finally:
            await daemon.stop()
    assert [p.name for p in (data / "audit").glob("*.jsonl")] == ["main.jsonl"]
    seqs = [r["seq"] for r in records(data / "audit" / "main.jsonl")]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3
    head = json.loads(meta(data, "audit_head:main") or "{}")
    assert head["seq"] == seqs[-1]
    assert [k for k in _meta_keys(data) if k.startswith("audit_head:")] == ["audit_head:main"]
    assert run_cli("audit", "verify", "--data-dir", str(data)).returncode == 0


def _meta_keys(data: Path) -> list[str]:
    conn = sqlite3.connect(data / "secretsd.db")
    try:
        return [str(k) for (k,) in conn.execute("SELECT key FROM meta ORDER BY key")]
    finally:
        conn.close()


# -- real processes: two daemons on one store -------------------------------------------------------
def test_two_daemons_on_one_sqlite_data_dir_write_separate_chains_that_verify(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = init_store(data)
    first = DaemonProcess(data).start()
    second = None
    try:
        second = DaemonProcess(data).start()  # refused before: the chain "main" was taken
        for i, daemon in enumerate((first, second)):
            assert http("PUT", f"{daemon.url}/v1/secrets/app/k{i}", token=token,
                        body={"value": f"v{i}"}).status == 200
        assert http("GET", f"{second.url}/v1/secrets/app/k0", token=token).body["value"] == "v0"
        chains = [http("GET", f"{d.url}/v1/sys/status", token=token).body["audit_chain"] for d in (first, second)]
        assert chains == ["main", f"main-{HOST}"]
        assert "audit chain 'main'" in first.logs() and f"audit chain 'main-{HOST}'" in second.logs()
        status = run_cli("status", env={"SECRETSD_ADDR": second.url, "SECRETSD_TOKEN": token})
        assert f"main-{HOST}" in status.stdout, status.stdout + status.stderr
    finally:
        for proc in (second, first):
            if proc is not None:
                assert proc.stop() == 0, proc.logs()
    assert sorted(p.name for p in (data / "audit").glob("*.jsonl")) == ["main-" + HOST + ".jsonl", "main.jsonl"]
    for chain, path in (("main", "app/k0"), (f"main-{HOST}", "app/k1")):
        writes = [r for r in records(data / "audit" / f"{chain}.jsonl") if r.get("action") == "secret.write"]
        assert [r["path"] for r in writes] == [path]  # each daemon wrote its own chain only
        verified = run_cli("audit", "verify", "--data-dir", str(data), "--chain", chain)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        head = json.loads(meta(data, f"audit_head:{chain}") or "{}")
        assert head["seq"] == records(data / "audit" / f"{chain}.jsonl")[-1]["seq"]


def test_audit_verify_chain_refuses_a_name_that_is_not_a_chain(tmp_path: Path) -> None:
    result = run_cli("audit", "verify", "--data-dir", str(tmp_path), "--chain", "../secretsd")
    assert result.returncode == 2 and "chain name" in result.stderr


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    manager = fresh_database(postgres_server)
    loop = asyncio.new_event_loop()
    try:
        name = loop.run_until_complete(manager.__aenter__())
        yield postgres_server.dsn(name)
        loop.run_until_complete(manager.__aexit__(None, None, None))
    finally:
        loop.close()


def test_two_daemons_on_one_postgres_store_write_distinct_head_keys(pg_dsn: str, tmp_path: Path) -> None:
    """Two replicas, each with its own data directory (on one host here, so even their host names
    agree), no [audit] chain: distinct chains, distinct head keys, each verifies."""
    env = {"SECRETSD_TEST_PG_DSN": pg_dsn}

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join([
            f'data_dir = "{tmp_path / name}"', "[key_provider]", 'kind = "file"',
            f'path = "{tmp_path / "master.key"}"', "[storage]", 'backend = "postgres"',
            'dsn_env = "SECRETSD_TEST_PG_DSN"', "pool_max = 4", "[audit]", "head_interval_seconds = 0"]) + "\n")
        return path

    token = json.loads(run_cli("init", "--config", str(config("a")), "--json", env=env, check=True).stdout)[
        "admin_token"]
    replicas = [DaemonProcess(tmp_path / name, extra_args=["--config", str(config(name))], env=env)
                for name in ("a", "b")]
    try:
        for replica in replicas:
            replica.start()
        for i, replica in enumerate(replicas):
            assert http("PUT", f"{replica.url}/v1/secrets/app/k{i}", token=token,
                        body={"value": "v"}).status == 200
        chains = [http("GET", f"{r.url}/v1/sys/status", token=token).body["audit_chain"] for r in replicas]
    finally:
        for replica in replicas:
            assert replica.stop() == 0, replica.logs()
    assert chains == ["main", f"main-{HOST}"]

    async def heads() -> dict[str, dict[str, object]]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch("SELECT key, value FROM meta WHERE key LIKE 'audit_head:%'")
        finally:
            await conn.close()
        return {r["key"]: json.loads(r["value"]) for r in rows}

    stored = asyncio.run(heads())
    assert sorted(stored) == ["audit_head:main", f"audit_head:main-{HOST}"]
    for name, chain in zip(("a", "b"), chains, strict=True):
        log = records(tmp_path / name / "audit" / f"{chain}.jsonl")
        assert stored[f"audit_head:{chain}"]["seq"] == log[-1]["seq"]  # each head is its own log's
        verified = run_cli("audit", "verify", "--config", str(config(name)), "--chain", chain, env=env)
        assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_a_worker_without_a_configured_chain_derives_one_from_main_wn(tmp_path: Path) -> None:
    """serve --workers: worker N keeps main-wN (what workers wrote before), and a second worker N on
    the same data directory (a second `serve --workers`) takes main-wN-<host> instead of failing."""
    from secretsd.runtime.workers import worker_env

    assert "SECRETSD_AUDIT__CHAIN" not in worker_env(None, 1)  # the worker derives its own
    assert worker_env("node-a", 1)["SECRETSD_AUDIT__CHAIN"] == "node-a-w1"  # configured: as before
    settings = await _settings(tmp_path)
    first, second = Daemon(settings, worker=1), Daemon(settings, worker=1)
    await first.start()
    try:
        await second.start()
        try:
            assert (first.audit_chain, second.audit_chain) == ("main-w1", f"main-w1-{HOST}")
        finally:
            await second.stop()
    finally:
        await first.stop()


async def test_create_root_never_writes_a_chain_another_replica_owns(tmp_path: Path) -> None:
    """Offline recovery without a configured chain claims like a daemon: when "main" belongs to
    another replica's data directory (a shared store), the record goes to main-offline, and main's
    head in the store is left alone."""
    from secretsd.runtime.recovery import create_root_token

    settings = await _settings(tmp_path)
    data = settings.require_data_dir()
    daemon = Daemon(settings)
    await daemon.start()
    await daemon.stop()
    conn = sqlite3.connect(data / "secretsd.db")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_owner:main'",
                 (json.dumps({"claim": "f" * 32, "host": "replica-b"}),))
    conn.commit()
    conn.close()
    head, log = meta(data, "audit_head:main"), (data / "audit" / "main.jsonl").read_bytes()
    result = await create_root_token(settings)
    assert result.audit_chain == "main-offline"
    assert meta(data, "audit_head:main") == head and (data / "audit" / "main.jsonl").read_bytes() == log
    assert [r["action"] for r in records(data / "audit" / "main-offline.jsonl")] == ["token.create-root"]
