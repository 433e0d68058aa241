"""Attacks on issue 17's performance changes, with real parts (docs/threat-model.md, "Performance
changes (issue 17)"): group commit on a full disk and inside a batch, sealing in the writer thread
while the keyring rotates, concurrent creators on PostgreSQL, and what a caller can put into the
line per request."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from secretsd.api.access_log import LineBuilder, StreamAccessLog
from secretsd.api.app import create_app
from secretsd.errors import ConflictError, StorageError
from secretsd.records import SecretRecord, VersionRecord, VersionState
from secretsd.runtime.daemon import Daemon, initialize_store
from secretsd.runtime.logs import access_log, console_line, json_line
from secretsd.runtime.workers import auto_workers, cpu_quota
from secretsd.storage.base import Seal
from secretsd.storage.sqlite import SQLiteStorage
from secretsd.storage.testing import T0, initialized, version
from tests.conftest import Api, make_settings, running
from tests.helpers import free_port, http, init_store
from tests.postgres_fixture import PostgresServer, fresh_database, start_or_skip
from tests.test_storage_group_commit import _hold_the_writer

# -- group commit ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of its own (root and mount needed; skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, check=False)


def _fill(path: Path) -> None:
    with path.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


async def test_a_batch_whose_commit_fails_on_a_full_disk_fails_every_write_and_stores_none(small_disk: Path) -> None:
    s = SQLiteStorage(small_disk / "db.sqlite")
    await s.open()
    try:
        await initialized(s)
        _fill(small_disk / "filler")
        held, release = await _hold_the_writer(s)
        writes = [asyncio.create_task(s.write_version(version(f"full/k{i}", 1, ct=b"x" * 400), expected_current=0,
                                                      metadata=None, max_versions=5)) for i in range(40)]
        await asyncio.sleep(0.05)  # all 40 queue behind the held write: one batch
        release.set()
        await held
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert all(isinstance(r, StorageError) for r in results), results
        assert await s.list_secrets("full") == [], "a write of a failed batch was stored"
        # Space returns: the same writer commits again, no restart.
        (small_disk / "filler").unlink()
        await s.write_version(version("after/k", 1), expected_current=0, metadata=None, max_versions=5)
    finally:
        await s.close()
    again = SQLiteStorage(small_disk / "db.sqlite")
    await again.open()
    try:
        assert [x.path for x in await again.list_secrets("")] == ["after/k"]
    finally:
        await again.close()


def _sealer(n: int) -> Seal:
    def seal(secret: SecretRecord | None) -> tuple[VersionRecord, datetime | None]:
        number = (secret.latest_version if secret else 0) + 1
        return VersionRecord(path="app/hot", version=number, created_at=T0, created_by=f"w{n}",
                             state=VersionState.ACTIVE, term=1, nonce=b"n" * 12, ciphertext=b"c" * 20), None
    return seal


async def test_check_and_set_queued_after_an_unconditional_write_in_its_batch_sees_it(
        sqlite_store: SQLiteStorage) -> None:
    await sqlite_store.write_version(version("app/hot", 1), expected_current=0, metadata=None, max_versions=5)
    held, release = await _hold_the_writer(sqlite_store)
    blind = asyncio.create_task(sqlite_store.write_unconditional("app/hot", _sealer(0), metadata=None,
                                                          max_versions=5))
    stale = asyncio.create_task(sqlite_store.write_version(version("app/hot", 2), expected_current=1, metadata=None,
                                                    max_versions=5))
    await asyncio.sleep(0.05)
    release.set()
    await held
    done, lost = await asyncio.gather(blind, stale, return_exceptions=True)
    assert not isinstance(done, BaseException) and done.secret.current_version == 2
    assert isinstance(lost, ConflictError), "a check-and-set against version 1 must lose to the write before it"
    hot = await sqlite_store.get_secret("app/hot")
    assert hot is not None and hot.current_version == 2
    written = await sqlite_store.get_version("app/hot", 2)
    assert written is not None and written.created_by == "w0"


async def test_unconditional_writes_batched_on_one_path_keep_max_versions(sqlite_store: SQLiteStorage) -> None:
    held, release = await _hold_the_writer(sqlite_store)
    writes = [asyncio.create_task(sqlite_store.write_unconditional("app/hot", _sealer(i), metadata=None,
                                                            max_versions=3)) for i in range(10)]
    await asyncio.sleep(0.05)
    release.set()
    await held
    results = await asyncio.gather(*writes)
    assert sorted(r.secret.current_version for r in results) == list(range(1, 11))
    kept = [v.version for v in await sqlite_store.list_versions("app/hot")]
    assert sorted(kept) == [8, 9, 10], kept


# -- sealing in the writer thread while the keyring rotates ------------------------------------------


async def _storm_with_rotations(api: Api) -> None:
    """12 writers, 480 unconditional PUTs to 3 paths, 5 keyring rotations in the middle; then every
    acknowledged version reads back, and each term's stored count equals the versions sealed under it."""
    paths = [f"storm/p{i}" for i in range(3)]
    acknowledged: dict[tuple[str, int], str] = {}

    async def writer(n: int) -> None:
        for i in range(40):
            path, value = paths[i % 3], f"v-{n}-{i}"
            resp = await api.client.put(f"/v1/secrets/{path}", json={"value": value}, headers=api.auth())
            assert resp.status == 200, await resp.text()
            acknowledged[(path, (await resp.json())["version"])] = value

    async def rotator() -> None:
        for _ in range(5):
            await asyncio.sleep(0.05)
            resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
            assert resp.status == 200, await resp.text()

    await asyncio.gather(rotator(), *[writer(n) for n in range(12)])
    assert len(acknowledged) == 480
    used: Counter[int] = Counter()
    for (path, number), value in acknowledged.items():
        assert (await api.get(path, version=number))["value"] == value
        stored = await api.daemon.storage.get_version(path, number)
        assert stored is not None
        used[stored.term] += 1
    terms = {t.term: t.encryptions for t in await api.daemon.storage.keyring_terms()}
    assert len(used) > 1, "no rotation landed during the writes"
    # Every sealed value counted once against the term it was sealed under.
    assert all(terms[term] == count for term, count in used.items()), (terms, used)


async def test_values_sealed_in_the_writer_during_keyring_rotations_open_under_their_stored_term(
        tmp_path: Path) -> None:
    async with running(make_settings(tmp_path / "data", max_versions=1000)) as api:
        await _storm_with_rotations(api)


# -- PostgreSQL: concurrent creators of one new secret -----------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = start_or_skip()
    try:
        yield server
    finally:
        server.stop()


async def test_concurrent_unconditional_creators_on_postgresql_all_succeed(
        pg: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with fresh_database(pg) as database:
        monkeypatch.setenv("SECRETSD_TEST_PG_DSN", pg.dsn(database))
        settings = make_settings(tmp_path / "data", storage={"backend": "postgres", "dsn_env": "SECRETSD_TEST_PG_DSN",
                                                             "pool_max": 8})
        async with running(settings) as api:
            for round_ in range(3):
                path = f"fresh/k{round_}"
                responses = await asyncio.gather(*[
                    api.client.put(f"/v1/secrets/{path}", json={"value": f"w{i}"}, headers=api.auth())
                    for i in range(16)])
                assert [r.status for r in responses] == [200] * 16, [await r.text() for r in responses]
                versions = sorted([(await r.json())["version"] for r in responses])
                assert versions == list(range(1, 17))


async def test_values_sealed_in_a_postgresql_transaction_during_keyring_rotations_open_under_their_term(
        pg: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with fresh_database(pg) as database:
        monkeypatch.setenv("SECRETSD_TEST_PG_DSN", pg.dsn(database))
        settings = make_settings(tmp_path / "data", max_versions=1000,
                                 storage={"backend": "postgres", "dsn_env": "SECRETSD_TEST_PG_DSN", "pool_max": 8})
        async with running(settings) as api:
            await _storm_with_rotations(api)


# -- the line per request ------------------------------------------------------------------------------

_LINE = re.compile(r"[\x20-\x7e]+")
_ID = re.compile(r"request_id=([A-Za-z0-9._-]{1,64})[ \]]")


@pytest.mark.parametrize("build", [console_line, json_line])
async def test_no_caller_can_put_a_token_or_control_characters_into_the_request_line(
        tmp_path: Path, build: LineBuilder) -> None:
    settings = make_settings(tmp_path / "data")
    admin = (await initialize_store(settings)).admin_token
    daemon = Daemon(settings)
    await daemon.start()
    out = io.StringIO()
    server = TestServer(create_app(daemon, access_log=StreamAccessLog(out, build)))
    await server.start_server()
    try:
        requests = [
            f"GET /v1/secrets/{admin} HTTP/1.1\r\nAuthorization: Bearer {admin}\r\n",
            f"GET /v1/secrets/a%0d%0aINFO%20forged%1b[31m HTTP/1.1\r\nX-Request-Id: {admin}\r\n",
            "GET /v1/secrets/a HTTP/1.1\r\nX-Request-Id: ab\x1b[31mcd\r\n",
            "GET /v1/secrets/a HTTP/1.1\r\nX-Request-Id: ab\tcd\r\n",
            "GET /v1/secrets/a HTTP/1.1\r\nX-Request-Id: " + "a" * 65 + "\r\n",
            "GET /%e2%80%ae%1b[2J HTTP/1.1\r\n",
            "FOO\x1b /v1/secrets/a HTTP/1.1\r\n",
            f"PUT /v1/secrets/x HTTP/1.1\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\n"
            "Content-Length: 27\r\n\r\n{\"value\": \"s3cret-v4lue\"}\r\n",
        ]
        for raw in requests:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            head, _, body = raw.partition("\r\n\r\n")
            writer.write((head.rstrip("\r\n") + "\r\nHost: x\r\nConnection: close\r\n\r\n" + body).encode("latin-1"))
            await writer.drain()
            await reader.read()
            writer.close()
    finally:
        await server.close()
        await daemon.stop()
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) > 5, out.getvalue()
    for line in lines[:-1]:
        assert _LINE.fullmatch(line), repr(line)
        assert admin not in line and "s3cret" not in line and "forged" not in line, line
        assert _ID.search(line) or '"request_id": "' in line, line


def test_the_request_line_without_a_stderr_is_dropped_not_a_500(tmp_path: Path) -> None:
    """``serve 2>&-``: Python starts with ``sys.stderr = None``. Through ``logging`` that lost the
    lines; writing them straight to stderr must not turn every answer (a stored PUT's too) into a 500."""
    data = tmp_path / "data"
    token = init_store(data)
    port = free_port()
    with (tmp_path / "stdout.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "secretsd", "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(2))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                if (ready := http("GET", url + "/readyz", timeout=1)).status != 0:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, "the daemon did not start"
            time.sleep(0.05)
        assert ready.status == 200, ready.body
        assert http("PUT", url + "/v1/secrets/app/k", token=token, body={"value": "v"}).status == 200
        assert http("GET", url + "/v1/secrets/app/k", token=token).body["value"] == "v"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_no_stderr_means_no_request_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", None)
    write = access_log("INFO", "console")
    write("GET", "/healthz", 200, 0.001, "r-1", None)  # must not raise


# -- request ids -------------------------------------------------------------------------------------


async def test_a_caller_cannot_claim_the_shape_of_a_fresh_request_id(api: Api) -> None:
    """Fresh ids are a prefix every answer shows and a counter: a caller who could send the next one
    would share its records with the next caller's (audit correlation poisoned, even unauthenticated)."""
    seen = (await api.client.get("/v1/auth/whoami", headers=api.auth())).headers["X-Request-Id"]
    prefix, counter = seen[:16], int(seen[16:], 16)
    claimed = [f"{prefix}{counter + k:012x}" for k in (1, 2)]
    attacker = [(await api.client.get("/v1/auth/whoami", headers={"X-Request-Id": c})).headers["X-Request-Id"]
                for c in claimed]
    victim = (await api.client.get("/v1/auth/whoami", headers=api.auth())).headers["X-Request-Id"]
    ids = [seen, *attacker, victim]
    assert len(set(ids)) == len(ids), f"two requests share an id: {ids}"
    # Ids of any other shape are still the caller's to choose (tracing through a proxy).
    other = (await api.client.get("/v1/auth/whoami", headers={**api.auth(), "X-Request-Id": "trace-abc"}))
    assert other.headers["X-Request-Id"] == "trace-abc"


# -- serve --workers auto ------------------------------------------------------------------------------


def _cgroup(root: Path, relative: str, files: dict[str, str]) -> None:
    folder = root / relative
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")


@pytest.mark.parametrize(("layout", "expected"), [
    ("v2 one and a half CPUs", 2), ("v2 unlimited", None), ("v1 one CPU", 1), ("v1 unlimited", None),
    ("v2 parent limits", 1), ("no cgroup files", None)])
def test_workers_auto_counts_a_cgroup_cpu_quota(tmp_path: Path, layout: str, expected: int | None) -> None:
    """A container with ``--cpus 1`` on a 64-CPU host still sees 64 CPUs in its affinity mask: one
    worker per CPU there would be 64 processes of ~50 MB in a container sized for one."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    if layout.startswith("v2"):
        proc.write_text("0::/kubepods/pod1/c1\n")
        quota = {"v2 one and a half CPUs": "150000 100000", "v2 unlimited": "max 100000",
                 "v2 parent limits": "max 100000"}[layout]
        _cgroup(root, "kubepods/pod1/c1", {"cpu.max": quota})
        _cgroup(root, "kubepods/pod1", {"cpu.max": "100000 100000" if layout == "v2 parent limits" else "max 100000"})
    elif layout.startswith("v1"):
        proc.write_text("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n")
        _cgroup(root, "cpu,cpuacct/docker/abc", {"cpu.cfs_quota_us": "100000" if layout == "v1 one CPU" else "-1",
                                                 "cpu.cfs_period_us": "100000"})
    else:
        proc.write_text("0::/\n")
    assert cpu_quota(cgroup_root=root, proc_cgroup=proc) == expected
    cpus = min(len(os.sched_getaffinity(0)), 64)
    assert auto_workers(cgroup_root=root, proc_cgroup=proc) == min(cpus, expected or cpus)
