"""Scheduled backups (issue 14 item 4, ``[backup]``, secretsd.runtime.backup_schedule).

End to end: a real daemon with a 1 s interval writes backups that ``backup verify`` passes, keeps the
newest N and never removes a file it did not name; an unusable destination is an audit record, a
metric and a log line while the daemon keeps serving. In process: the schedule's forms, the leader
rule with the real lease code, a crash mid-write, a full disk, a symlinked or group-writable
destination.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyproviders import KeyProvider
from secretsd.errors import ConfigError
from secretsd.runtime.backup_schedule import NAME_PATTERN, BackupScheduler, file_name, open_destination, prune
from secretsd.runtime.backup_settings import parse_schedule
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import build_storage
from secretsd.runtime.leadership import Leadership
from secretsd.storage import Storage
from tests.conftest import make_settings, running
from tests.helpers import DaemonProcess, http, init_store, run_cli

NAME = "secretsd-backup-"


def backups(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if NAME_PATTERN.match(p.name))


def audit_records(data: Path, action: str) -> list[dict[str, Any]]:
    records = []
    for log in sorted((data / "audit").glob("*.jsonl")):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("action") == action:
                records.append(record)
    return records


def metric(url: str, token: str, name: str) -> float:
    page = http("GET", f"{url}/metrics", token=token).body
    assert isinstance(page, str)
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def schedule_env(directory: Path, retention: int = 2) -> dict[str, str]:
    return {"SECRETSD_BACKUP__ENABLED": "true", "SECRETSD_BACKUP__SCHEDULE": "1s",
            "SECRETSD_BACKUP__DIRECTORY": str(directory), "SECRETSD_BACKUP__RETENTION": str(retention)}


# -- end to end ------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_daemon_writes_scheduled_backups_keeps_the_newest_n_and_each_verifies(tmp_path: Path) -> None:
    data, dest = tmp_path / "data", tmp_path / "backups"
    token = init_store(data)
    dest.mkdir(mode=0o700)
    # Files the daemon did not write: retention never removes them, even one named almost like ours.
    foreign = [dest / "notes.txt", dest / "secretsd-backup-manual.sdbk", dest / "secretsd-backup-20200101T000000Z.sdbk"]
    for path in foreign:
        path.write_text("mine")
    daemon = DaemonProcess(data, env=schedule_env(dest, retention=2)).start()
    try:
        assert http("PUT", f"{daemon.url}/v1/secrets/app/db", token=token, body={"value": "s3cret"}).status == 200
        wait_until(lambda: len(audit_records(data, "backup.scheduled")) >= 4, 30, "four scheduled backups")
        status = http("GET", f"{daemon.url}/v1/sys/status", token=token).body["backup"]
        assert status["enabled"] is True and status["last_result"] == "ok" and status["failures"] == 0
        assert status["last_file"].startswith(NAME) and status["last_size_bytes"] > 0
        assert metric(daemon.url, token, "secretsd_backup_last_success_timestamp_seconds") > 0
        assert metric(daemon.url, token, "secretsd_backup_last_size_bytes") > 0
        assert metric(daemon.url, token, "secretsd_backup_failures_total") == 0
        shown = run_cli("status", "--json", env={"SECRETSD_ADDR": daemon.url, "SECRETSD_TOKEN": token})
        assert json.loads(shown.stdout)["backup"]["last_result"] == "ok", shown.stderr
    finally:
        daemon.stop()
    kept = backups(dest)
    assert len(kept) == 2, [p.name for p in dest.iterdir()]
    for path in foreign:
        assert path.read_text() == "mine"
    assert not [p for p in dest.iterdir() if p.name.endswith(".partial")]
    records = audit_records(data, "backup.scheduled")
    assert all(r["outcome"] == "ok" and r["size"] > 0 and len(r["manifest_sha256"]) == 64 for r in records)
    assert {p.name for p in kept} <= {r["file"] for r in records}
    for path in kept:
        assert path.stat().st_mode & 0o777 == 0o600
        checked = run_cli("backup", "verify", str(path), "--data-dir", str(data))
        assert checked.returncode == 0, checked.stderr


@pytest.mark.e2e
def test_an_unusable_backup_directory_is_audited_and_counted_and_the_daemon_keeps_serving(tmp_path: Path) -> None:
    data, dest = tmp_path / "data", tmp_path / "backups"
    token = init_store(data)
    dest.mkdir()
    dest.chmod(0o777)  # anyone may replace or delete what lands here: refused (root ignores 0500)
    daemon = DaemonProcess(data, env=schedule_env(dest)).start()
    try:
        wait_until(lambda: bool(audit_records(data, "backup.scheduled")), 20, "a failure record")
        record = audit_records(data, "backup.scheduled")[0]
        assert record["outcome"] == "error" and "group or others may write" in record["reason"]
        assert metric(daemon.url, token, "secretsd_backup_failures_total") >= 1
        assert metric(daemon.url, token, "secretsd_backup_last_failure_timestamp_seconds") > 0
        assert metric(daemon.url, token, "secretsd_backup_last_success_timestamp_seconds") == 0
        status = http("GET", f"{daemon.url}/v1/sys/status", token=token).body["backup"]
        assert status["last_result"] == "failed" and "group or others" in status["last_error"]
        assert http("PUT", f"{daemon.url}/v1/secrets/app/db", token=token, body={"value": "v"}).status == 200
        assert http("GET", f"{daemon.url}/v1/secrets/app/db", token=token).body["value"] == "v"
        assert http("GET", f"{daemon.url}/readyz").status == 200
    finally:
        daemon.stop()
    assert "scheduled backup into" in daemon.logs() and "failed" in daemon.logs()
    assert list(dest.iterdir()) == []


# -- the schedule ----------------------------------------------------------------------------------

def test_schedule_forms() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    every = parse_schedule("6h")
    assert every.interval == timedelta(hours=6)
    assert every.next_due(None, now) == now
    assert every.next_due(now - timedelta(hours=1), now) == now + timedelta(hours=5)
    daily = parse_schedule("daily 03:30")
    assert daily.next_due(None, now) == now  # nothing taken yet: now
    assert daily.next_due(now.replace(hour=4), now) == datetime(2026, 11, 30, 3, 30, tzinfo=UTC)
    assert daily.next_due(now - timedelta(days=1), now) == now  # missed today's slot: now
    assert parse_schedule("90s").interval == timedelta(seconds=90)
    assert parse_schedule("1d").retry_after() == timedelta(minutes=5)


@pytest.mark.parametrize("bad", ["", "6", "0h", "-1h", "6 h", "daily 24:00", "daily 3:00", "weekly", "*/5 * * * *"])
def test_a_bad_schedule_is_a_one_line_config_error(tmp_path: Path, bad: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[backup]\nschedule = "{bad}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "backup.schedule" in str(caught.value) and "\n" not in str(caught.value)


def test_enabled_backups_need_a_directory_and_a_relative_one_is_beside_the_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[backup]\nenabled = true\n")
    with pytest.raises(ConfigError, match="needs a directory"):
        load_settings(config)
    config.write_text('[backup]\nenabled = true\ndirectory = "b"\nschedule = "daily 02:15"\nretention = 3\n')
    settings = load_settings(config)
    assert settings.backup.directory == tmp_path / "b" and settings.backup.retention == 3


# -- the destination -------------------------------------------------------------------------------

def test_a_missing_destination_is_created_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        os.close(open_destination(tmp_path / "a" / "b"))
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700


def test_a_symlinked_destination_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "backups").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symlink"):
        open_destination(tmp_path / "backups")


def test_a_group_writable_destination_is_refused(tmp_path: Path) -> None:
    (tmp_path / "backups").mkdir()
    (tmp_path / "backups").chmod(0o770)
    with pytest.raises(ConfigError, match="group or others"):
        open_destination(tmp_path / "backups")


def test_retention_never_deletes_a_file_it_did_not_write(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    dest.mkdir(mode=0o700)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ours = [file_name(start + timedelta(seconds=n)) for n in range(5)]
    for name in ours:
        (dest / name).write_text("x")
    others = ["notes.txt", "secretsd-backup-manual.sdbk", ours[0] + ".bak", "x" + ours[1]]
    for name in others:
        (dest / name).write_text("keep")
    (dest / "elsewhere").write_text("target")
    (dest / f".{ours[4]}.partial").write_text("a crashed run's")  # ours, left by a crash: removed
    linked = file_name(start - timedelta(days=1))  # named like ours, but a symlink: not a file we wrote
    (dest / linked).symlink_to(dest / "elsewhere")
    fd = open_destination(dest)
    try:
        removed = prune(fd, 2)
    finally:
        os.close(fd)
    assert removed == ours[:3]
    assert sorted(p.name for p in dest.iterdir()) == sorted([*ours[3:], *others, "elsewhere", linked])


# -- runs in process -------------------------------------------------------------------------------

class _Leads:
    is_leader = True


async def _scheduler(api_daemon: Any, dest: Path, write: Any = None, leader: Any = None) -> BackupScheduler:
    settings = make_settings(api_daemon.settings.data_dir,
                             backup={"enabled": True, "directory": str(dest), "schedule": "1s", "retention": 3})
    d = api_daemon
    records: list[dict[str, Any]] = []

    async def record(fields: dict[str, Any]) -> None:
        records.append(fields)
        await d.record(fields)

    sched = BackupScheduler(settings.backup, d.storage, d.providers.available, d.barrier, leader or _Leads(),
                            write or d._write_backup, record)
    sched.records = records  # type: ignore[attr-defined]
    return sched


async def test_only_the_leader_takes_scheduled_backups(tmp_path: Path) -> None:
    """The leader rule with the real lease: the daemon holds the ``scheduler`` lock; a second
    Leadership on the same store cannot take it, and its scheduler writes nothing."""
    settings = make_settings(tmp_path / "data", leader_retry_seconds=0.1)
    async with running(settings) as api:
        d = api.daemon
        deadline = time.monotonic() + 5
        while not d.leadership.is_leader and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert d.leadership.is_leader
        other_storage = build_storage(settings)
        await other_storage.open()
        other = Leadership(other_storage)
        try:
            assert await other.attempt() is False
            follower = await _scheduler(d, tmp_path / "f", leader=other)
            assert await follower.tick() is None
            assert not (tmp_path / "f").exists()
            leader = await _scheduler(d, tmp_path / "l", leader=d.leadership)
            result = await leader.tick()
            assert result is not None and result.ok
            assert [p.name for p in backups(tmp_path / "l")] == [result.file]
        finally:
            await other.stop()
            await other_storage.close()


async def test_a_crash_mid_write_leaves_no_file_under_a_final_name(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path / "data")) as api:
        async def half(storage: Storage, providers: Sequence[KeyProvider],
                       send: Callable[[bytes], Awaitable[None]]) -> Any:
            await send(b"half a backup")
            raise RuntimeError("the process died here")

        sched = await _scheduler(api.daemon, tmp_path / "b", write=half)
        result = await sched.run_once()
        assert not result.ok and result.reason == "RuntimeError: the process died here"
        assert list((tmp_path / "b").iterdir()) == []
        assert sched.failures == 1 and sched.status()["last_result"] == "failed"
        assert sched.records[-1]["outcome"] == "error"  # type: ignore[attr-defined]
        # A retry waits (no hot loop against a broken destination), then succeeds.
        assert sched.due(datetime.now(UTC)) > datetime.now(UTC)


async def test_a_full_disk_is_a_reported_failure_and_leaves_no_partial_file(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path / "data")) as api:
        real = api.daemon._write_backup

        async def full(storage: Storage, providers: Sequence[KeyProvider],
                       send: Callable[[bytes], Awaitable[None]]) -> Any:
            async def failing_send(data: bytes) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            return await real(storage, providers, failing_send)

        sched = await _scheduler(api.daemon, tmp_path / "b", write=full)
        result = await sched.run_once()
        assert not result.ok and "No space left" in (result.reason or "")
        assert list((tmp_path / "b").iterdir()) == []
        record = sched.records[-1]  # type: ignore[attr-defined]
        assert record["action"] == "backup.scheduled" and record["outcome"] == "error"
        # Nothing changed in the store: the daemon still serves.
        await api.put("app/x", "1")
        assert (await api.get("app/x"))["value"] == "1"


async def test_a_scheduled_backup_is_never_written_while_sealed_or_a_follower(tmp_path: Path) -> None:
    class Follower:
        is_leader = False

    async with running(make_settings(tmp_path / "data")) as api:
        sched = await _scheduler(api.daemon, tmp_path / "b", leader=Follower())
        assert await sched.tick() is None
        assert not (tmp_path / "b").exists()
