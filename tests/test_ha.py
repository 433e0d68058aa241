"""Several daemon replicas on one PostgreSQL database (issue 7, docs/ha.md).

End to end: real ``secretsd serve`` processes, each with its own data directory (audit log) and
audit chain name, one key file, one throwaway PostgreSQL server (tests/postgres_fixture.py), and
only 127.0.0.1. Plus in-process tests of the keyring poll fallback and the feed's reconnection.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import Daemon, initialize_store
from tests.helpers import DaemonProcess, http, run_cli
from tests.postgres_fixture import PostgresServer, fresh_database, start_or_skip

DSN_ENV = "SECRETSD_TEST_HA_DSN"


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = start_or_skip()
    try:
        yield server
    finally:
        server.stop()


def toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower()


class Cluster:
    """One database, one key file, and replicas that each get a config, a data dir and a chain."""

    def __init__(self, server: PostgresServer, database: str, root: Path) -> None:
        self.server = server
        self.database = database
        self.root = root
        self.env = {DSN_ENV: server.dsn(database)}
        self.replicas: list[DaemonProcess] = []
        self.token = ""

    def config(self, name: str, **top: Any) -> Path:
        settings = {"data_dir": str(self.root / name), "token_cache_seconds": 5, "change_poll_seconds": 60,
                    "leader_retry_seconds": 0.5} | top
        lines = [f"{k} = {toml(v)}" for k, v in settings.items()]
        lines += ["[key_provider]", 'kind = "file"', f"path = {toml(str(self.root / 'master.key'))}",
                  "[storage]", 'backend = "postgres"', f'dsn_env = "{DSN_ENV}"', "pool_max = 4",
                  "[audit]", f'chain = "{name}"']
        path = self.root / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def init(self) -> str:
        result = run_cli("init", "--config", str(self.config("init")), "--json", env=self.env, check=True)
        self.token = str(json.loads(result.stdout)["admin_token"])
        return self.token

    def replica(self, name: str, **top: Any) -> DaemonProcess:
        config = self.config(name, **top)
        proc = DaemonProcess(self.root / name, extra_args=["--config", str(config)], env=self.env)
        self.replicas.append(proc)
        return proc.start()

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.server.dsn(self.database))
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    def stop(self) -> None:
        for proc in self.replicas:
            proc.stop()


@pytest.fixture
def cluster(pg: PostgresServer, tmp_path: Path) -> Iterator[Cluster]:
    manager = fresh_database(pg)
    loop = asyncio.new_event_loop()
    try:
        name = loop.run_until_complete(manager.__aenter__())
        c = Cluster(pg, name, tmp_path)
        try:
            c.init()
            yield c
        finally:
            c.stop()
            loop.run_until_complete(manager.__aexit__(None, None, None))
    finally:
        loop.close()


def eventually(check: Any, timeout: float, what: str) -> float:
    """Poll ``check`` until true; return how long it took."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - began


def status(proc: DaemonProcess, token: str) -> dict[str, Any]:
    resp = http("GET", f"{proc.url}/v1/sys/status", token=token)
    assert resp.status == 200, resp.body
    return dict(resp.body)


# -- keyring -------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_rekey_on_a_is_used_by_b_for_reading_and_for_encrypting(cluster: Cluster) -> None:
    token = cluster.token
    a, b = cluster.replica("a"), cluster.replica("b")  # change_poll_seconds = 60: only NOTIFY is fast
    assert http("PUT", f"{a.url}/v1/secrets/app/one", token=token, body={"value": "v1"}).status == 200
    assert http("GET", f"{b.url}/v1/secrets/app/one", token=token).body["value"] == "v1"
    assert status(b, token)["change_feed"] == "listening"

    assert http("POST", f"{a.url}/v1/sys/keyring/rotate", token=token).body == {"active_term": 2}
    # B encrypts under the new term promptly: it heard the NOTIFY and reloaded.
    took = eventually(lambda: status(b, token)["active_term"] == 2, 5, "B switching to term 2")
    assert took < 5
    assert http("PUT", f"{b.url}/v1/secrets/app/two", token=token, body={"value": "from-b"}).status == 200
    rows = asyncio.run(cluster.query("SELECT path, term FROM secret_versions ORDER BY path"))
    assert {r["path"]: r["term"] for r in rows} == {"app/one": 1, "app/two": 2}
    # And each reads what the other wrote under either term.
    assert http("GET", f"{a.url}/v1/secrets/app/two", token=token).body["value"] == "from-b"
    assert http("GET", f"{b.url}/v1/secrets/app/one", token=token).body["value"] == "v1"


@pytest.mark.e2e
def test_b_decrypts_a_newer_term_lazily_without_any_notification(cluster: Cluster) -> None:
    """The read path alone: B reloads once on an unknown term, even before the feed reports it."""
    token = cluster.token
    b = cluster.replica("b", change_poll_seconds=3600)
    a = cluster.replica("a")
    # Cut B's notification connection, and let A rekey and write under term 2 meanwhile.
    asyncio.run(cluster.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'secretsd-listen' "
        "AND datname = $1", cluster.database))
    assert http("POST", f"{a.url}/v1/sys/keyring/rotate", token=token).body == {"active_term": 2}
    assert http("PUT", f"{a.url}/v1/secrets/app/new", token=token, body={"value": "term-2"}).status == 200
    assert http("GET", f"{b.url}/v1/secrets/app/new", token=token).body["value"] == "term-2"
    assert status(b, token)["active_term"] == 2


async def test_without_a_change_feed_replicas_poll_the_keyring(tmp_path: Path) -> None:
    """SQLite has no change feed: a second process on the same store follows within the poll bound."""
    settings = load_settings(None, data_dir=tmp_path / "d")
    await initialize_store(settings)
    a = Daemon(settings)
    b = Daemon(load_settings(None, data_dir=tmp_path / "d", change_poll_seconds=0.2,
                             audit={"chain": "b", "path": str(tmp_path / "b.jsonl")}))
    await a.start()
    await b.start()
    try:
        assert b.replication.mode == "polling only"
        assert await a.barrier.rekey() == 2
        began = time.monotonic()
        while b.barrier.active_term != 2:
            assert time.monotonic() - began < 3, "B did not pick up term 2 within the poll bound"
            await asyncio.sleep(0.05)
        assert b.replication.reloads == 1
    finally:
        await b.stop()
        await a.stop()


async def test_the_feed_reconnects_and_catches_up_after_losing_its_connection(
    pg: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fresh_database(pg) as database:
        monkeypatch.setenv(DSN_ENV, pg.dsn(database))
        common = {"storage": {"backend": "postgres", "dsn_env": DSN_ENV},
                  "key_provider": {"kind": "file", "path": str(tmp_path / "master.key")}}
        first = load_settings(None, data_dir=tmp_path / "a", **common)
        await initialize_store(first)
        a = Daemon(first)
        b = Daemon(load_settings(None, data_dir=tmp_path / "b", change_poll_seconds=1, audit={"chain": "b"},
                                 **common))
        await a.start()
        await b.start()
        try:
            for _ in range(100):
                if b.replication.mode == "listening":
                    break
                await asyncio.sleep(0.05)
            assert b.replication.mode == "listening"
            admin = await asyncpg.connect(pg.socket_dsn(database))
            try:
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'secretsd-listen' AND datname = $1", database)
            finally:
                await admin.close()
            assert killed == 2
            assert await a.barrier.rekey() == 2  # its NOTIFY reaches nobody
            began = time.monotonic()
            while b.barrier.active_term != 2 or b.replication.mode != "listening":
                assert time.monotonic() - began < 5, (b.barrier.active_term, b.replication.mode)
                await asyncio.sleep(0.05)
        finally:
            await b.stop()
            await a.stop()


# -- token revocation ----------------------------------------------------------------------------
@pytest.mark.e2e
def test_revocation_on_a_is_refused_on_b_at_once(cluster: Cluster) -> None:
    """With a 60 s token cache, B still refuses a token revoked on A within a second: NOTIFY."""
    token = cluster.token
    a = cluster.replica("a", token_cache_seconds=60)
    b = cluster.replica("b", token_cache_seconds=60)
    created = http("POST", f"{a.url}/v1/auth/tokens", token=token, body={"client": "svc", "policies": ["root"]})
    assert created.status == 201
    svc = created.body["token"]
    assert http("GET", f"{b.url}/v1/auth/whoami", token=svc).status == 200  # now cached on B
    assert http("DELETE", f"{a.url}/v1/auth/tokens/{created.body['token_id']}", token=token).status in (200, 204)
    took = eventually(lambda: http("GET", f"{b.url}/v1/auth/whoami", token=svc).status == 401, 2,
                      "B refusing the revoked token")
    assert took < 2
    assert http("GET", f"{a.url}/v1/auth/whoami", token=svc).status == 401


# -- check-and-set under contention --------------------------------------------------------------
@pytest.mark.e2e
def test_cas_writes_across_two_replicas_lose_nothing(cluster: Cluster) -> None:
    token = cluster.token
    a, b = cluster.replica("a", max_versions=1000), cluster.replica("b", max_versions=1000)
    path, per_worker, workers = "race/counter", 10, 6
    acknowledged: dict[int, str] = {}
    problems: list[str] = []
    lock = threading.Lock()

    def worker(wid: int) -> None:
        proc = a if wid % 2 else b
        landed = 0
        while landed < per_worker and not problems:
            meta = http("GET", f"{proc.url}/v1/metadata/{path}", token=token)
            current = meta.body["current_version"] if meta.status == 200 else 0
            value = f"w{wid}-{landed}"
            resp = http("PUT", f"{proc.url}/v1/secrets/{path}", token=token, body={"value": value, "cas": current})
            if resp.status == 409:
                continue
            if resp.status != 200:
                problems.append(f"{resp.status} {resp.body}")
                return
            with lock:
                if resp.body["version"] in acknowledged:
                    problems.append(f"version {resp.body['version']} acknowledged twice")
                acknowledged[resp.body["version"]] = value
            landed += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not problems
    total = per_worker * workers
    assert sorted(acknowledged) == list(range(1, total + 1))  # unique, increasing, no gap: no lost update
    for n, value in acknowledged.items():
        proc = b if n % 2 else a
        assert http("GET", f"{proc.url}/v1/secrets/{path}?version={n}", token=token).body["value"] == value
    assert http("GET", f"{a.url}/v1/metadata/{path}", token=token).body["current_version"] == total


@pytest.mark.e2e
def test_kill_9_a_while_writing_every_acknowledged_write_is_on_b(cluster: Cluster) -> None:
    token = cluster.token
    a, b = cluster.replica("a"), cluster.replica("b")
    acknowledged: dict[str, str] = {}
    stop = threading.Event()

    def writer(wid: int) -> None:
        i = 0
        while not stop.is_set():
            path, value = f"load/w{wid}/k{i}", f"value-{wid}-{i}"
            try:
                resp = http("PUT", f"{a.url}/v1/secrets/{path}", token=token, body={"value": value}, timeout=5)
            except OSError:
                return  # A died mid-request: never acknowledged
            if resp.status == 200:
                acknowledged[path] = value
            i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    eventually(lambda: len(acknowledged) >= 100, 30, "100 acknowledged writes")
    a.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    for path, value in dict(acknowledged).items():
        assert http("GET", f"{b.url}/v1/secrets/{path}", token=token).body["value"] == value


# -- leadership ----------------------------------------------------------------------------------
@pytest.mark.e2e
def test_leader_failover_after_kill_9(cluster: Cluster) -> None:
    token = cluster.token
    a = cluster.replica("a")
    eventually(lambda: status(a, token)["leader"] is True, 5, "A leading")
    b = cluster.replica("b")
    time.sleep(1.2)  # several of B's attempts
    # One leader: A, B waiting. (On a loaded machine A's liveness query can time out, and then
    # leadership legitimately moves; two sequential status calls may straddle such a move, so the
    # state is read until it is stable rather than once.)
    eventually(lambda: (status(a, token)["leader"], status(b, token)["leader"]) == (True, False), 10,
               "A leading while B waits")
    a.kill9()
    took = eventually(lambda: status(b, token)["leader"] is True, 10, "B taking over")
    assert took < 5  # leader_retry_seconds = 0.5: the database frees a killed session's lock at once
    # A clean stop hands over too: C waits while B leads, then leads once B is stopped.
    c = cluster.replica("c")
    time.sleep(1)
    assert status(c, token)["leader"] is False
    b.stop()
    eventually(lambda: status(c, token)["leader"] is True, 10, "C taking over from a stopped B")


# -- the database restarted under load -----------------------------------------------------------
@pytest.mark.e2e
def test_database_restart_under_load_is_503_then_recovers_with_nothing_lost(tmp_path: Path) -> None:
    server = start_or_skip()  # its own server: restarting it must not disturb other tests
    manager = fresh_database(server)
    loop = asyncio.new_event_loop()
    cluster: Cluster | None = None
    try:
        database = loop.run_until_complete(manager.__aenter__())
        cluster = Cluster(server, database, tmp_path)
        token = cluster.init()
        a = cluster.replica("a", leader_retry_seconds=0.5, change_poll_seconds=1)
        acknowledged: dict[str, str] = {}
        statuses: dict[int, int] = {}
        kinds: set[str] = set()
        stop = threading.Event()

        def writer(wid: int) -> None:
            i = 0
            while not stop.is_set():
                path, value = f"load/w{wid}/k{i}", f"v-{wid}-{i}"
                resp = http("PUT", f"{a.url}/v1/secrets/{path}", token=token, body={"value": value}, timeout=30)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    acknowledged[path] = value
                else:
                    # The audit chain head lives in the database too: while it is down, a request
                    # may also be refused (fail-closed) because its audit record cannot be made durable.
                    kinds.add(resp.body["type"].rsplit(":", 1)[-1])
                    time.sleep(0.02)
                i += 1

        threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(4)]
        for t in threads:
            t.start()
        eventually(lambda: len(acknowledged) >= 50, 30, "writes before the restart")
        before = len(acknowledged)
        # -l: the new postmaster must not inherit our pipes (communicate() would wait for it).
        server._run("pg_ctl", "-D", str(server.data), "-l", str(server.log), "-m", "fast", "-w", "-t", "60",
                    "restart")
        eventually(lambda: len(acknowledged) >= before + 50, 30, "writes after the restart")
        stop.set()
        for t in threads:
            t.join(timeout=40)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.get(503, 0) >= 1, statuses  # the outage was seen, as 503
        assert kinds and kinds <= {"storage-unavailable", "audit-failed"}, kinds
        for path, value in dict(acknowledged).items():
            assert http("GET", f"{a.url}/v1/secrets/{path}", token=token).body["value"] == value
        assert http("GET", f"{a.url}/readyz").status == 200
        # The notification connection and the leader lock came back by themselves.
        eventually(lambda: status(a, token)["change_feed"] == "listening", 10, "the change feed reconnecting")
        eventually(lambda: status(a, token)["leader"] is True, 10, "leadership re-taken")
    finally:
        if cluster is not None:
            cluster.stop()
        try:
            loop.run_until_complete(manager.__aexit__(None, None, None))
        finally:
            loop.close()
            server.stop()
