"""Hole H6: tokens were never purged (``[tokens] purge_after_days``, secretsd.runtime.token_purge).

End to end: a real daemon deletes tokens dead past the retention, audits the sweep once with the
count and counts it in /metrics, and keeps recently dead and live tokens. In process: only the
leader sweeps, nothing while sealed, 0 turns it off, a backlog goes in bounded batches.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from secretsd import tokens
from secretsd.errors import ConfigError
from secretsd.events import Event, EventBus
from secretsd.records import TokenRecord
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import build_storage
from secretsd.runtime.token_purge import TokenPurger
from secretsd.storage import Storage
from tests.conftest import make_settings
from tests.helpers import DaemonProcess, http, init_store

NOW = datetime.now(UTC)


def dead_token(n: int, *, expired_days_ago: float = 30, root: bool = False) -> TokenRecord:
    new = tokens.generate_token()
    return TokenRecord(token_id=new.token_id, secret_hash=new.secret_hash, client=f"job-{n}",
                       policies=("root",) if root else ("reader",), created_at=NOW - timedelta(days=60),
                       created_by="jwt", expires_at=NOW - timedelta(days=expired_days_ago))


async def seed(data: Path, records: list[TokenRecord]) -> None:
    storage = build_storage(make_settings(data))
    await storage.open()
    try:
        for r in records:
            await storage.create_token(r)
    finally:
        await storage.close()


async def stored_ids(data: Path) -> set[str]:
    storage = build_storage(make_settings(data))
    await storage.open()
    try:
        return {t.token_id for t in await storage.list_tokens()}
    finally:
        await storage.close()


def audit_records(data: Path, action: str) -> list[dict[str, Any]]:
    found = []
    for log in sorted((data / "audit").glob("*.jsonl")):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("action") == action:
                found.append(record)
    return found


def metric(url: str, token: str, name: str) -> float:
    page = http("GET", f"{url}/metrics", token=token).body
    assert isinstance(page, str)
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_daemon_purges_tokens_dead_past_the_retention(tmp_path: Path) -> None:
    data = tmp_path / "data"
    admin = init_store(data)
    old = [dead_token(n) for n in range(300)] + [dead_token(300, root=True)]  # an expired root is no root
    recent = [dead_token(400, expired_days_ago=1)]
    asyncio.run(seed(data, old + recent))
    daemon = DaemonProcess(data, env={"SECRETSD_TOKENS__PURGE_INTERVAL_SECONDS": "0.2"}).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not audit_records(data, "token.purge"):
            time.sleep(0.1)
        runs = audit_records(data, "token.purge")
        assert runs and runs[0]["count"] == 301 and runs[0]["client"] == "system"
        assert metric(daemon.url, admin, "secretsd_tokens_purged_total") == 301
        # The admin token (live, root) still works; the recently expired one is kept, hidden by default.
        listed = http("GET", f"{daemon.url}/v1/auth/tokens", token=admin)
        assert listed.status == 200
    finally:
        daemon.stop()
    left = asyncio.run(stored_ids(data))
    assert len(left) == 2 and recent[0].token_id in left
    assert not left & {t.token_id for t in old}


class _Leader:
    def __init__(self, leads: bool) -> None:
        self.is_leader = leads


class _Barrier:
    def __init__(self, sealed: bool) -> None:
        self.sealed = sealed


async def _store(tmp_path: Path, records: list[TokenRecord]) -> Storage:
    data = tmp_path / "data"
    init_store(data)
    await seed(data, records)
    storage = build_storage(make_settings(data))
    await storage.open()
    return storage


async def test_only_the_unsealed_leader_sweeps_and_0_days_never_does(tmp_path: Path) -> None:
    storage = await _store(tmp_path, [dead_token(n) for n in range(3)])
    seen: list[Event] = []
    bus = EventBus()
    bus.subscribe(seen.append)
    try:
        follower = TokenPurger(storage, _Barrier(False), _Leader(False), bus, purge_after_days=7, interval_seconds=1)
        sealed = TokenPurger(storage, _Barrier(True), _Leader(True), bus, purge_after_days=7, interval_seconds=1)
        never = TokenPurger(storage, _Barrier(False), _Leader(True), bus, purge_after_days=0, interval_seconds=1)
        assert await follower.tick() is None and await sealed.tick() is None and await never.tick() is None
        assert len(await storage.list_tokens()) == 4 and seen == []
        leader = TokenPurger(storage, _Barrier(False), _Leader(True), bus, purge_after_days=7, interval_seconds=1)
        assert await leader.tick() == 3
        assert await leader.tick() == 0  # every run is audited, an empty one too
        assert [(e.action, e.client, e.detail["count"]) for e in seen] == [
            ("token.purge", "system", 3), ("token.purge", "system", 0)]
    finally:
        await storage.close()


async def test_a_backlog_goes_in_bounded_batches(tmp_path: Path) -> None:
    storage = await _store(tmp_path, [dead_token(n) for n in range(25)])
    calls: list[int] = []
    real = storage.purge_tokens

    async def counting(cutoff: datetime, now: datetime, *, limit: int = 1000) -> int:
        n = await real(cutoff, now, limit=limit)
        calls.append(n)
        return n

    storage.purge_tokens = counting  # type: ignore[method-assign]
    try:
        purger = TokenPurger(storage, _Barrier(False), _Leader(True), EventBus(), purge_after_days=7,
                             interval_seconds=1, batch=10)
        assert await purger.sweep() == 25
        assert calls == [10, 10, 5]
    finally:
        await storage.close()


def test_purge_settings_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[tokens]\npurge_after_days = 3\npurge_interval_seconds = 60\n")
    settings = load_settings(config)
    assert settings.tokens.purge_after_days == 3 and settings.tokens.purge_interval_seconds == 60
    assert load_settings(None).tokens.purge_after_days == 7
    for bad in ("purge_after_days = -1", "purge_interval_seconds = 0", "purge_days = 3"):
        config.write_text(f"[tokens]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_settings(config)


# -- GET /v1/auth/tokens: pages, expired hidden ------------------------------------------------------
def _seed_rows(data: Path, records: list[TokenRecord]) -> None:
    """Many token rows in one transaction (a thousand commits would each fsync)."""
    conn = sqlite3.connect(data / "secretsd.db")
    with conn:
        conn.executemany(
            "INSERT INTO tokens (token_id, secret_hash, client, policies, created_at, created_by, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r.token_id, r.secret_hash, r.client, json.dumps(list(r.policies)), r.created_at.isoformat(),
              r.created_by, r.expires_at.isoformat() if r.expires_at else None) for r in records])
    conn.close()


async def test_token_listing_pages_and_hides_expired_tokens(tmp_path: Path) -> None:
    from tests.conftest import running

    async with running(make_settings(tmp_path / "data")) as api:
        for n in range(4):
            await api.token(f"svc-{n}", "root")
        await api.daemon.storage.create_token(dead_token(9, expired_days_ago=1))
        h = api.auth()

        async def page(**query: str) -> tuple[int, dict[str, Any]]:
            resp = await api.client.get("/v1/auth/tokens", params=query, headers=h)
            return resp.status, await resp.json()

        status, everything = await page()
        assert status == 200 and everything["next_after"] is None
        live = [t["token_id"] for t in everything["tokens"]]
        assert len(live) == 5 and live == sorted(live) and "job-9" not in {t["client"] for t in everything["tokens"]}
        walked: list[str] = []
        after = ""
        while True:
            status, body = await page(limit="2", **({"after": after} if after else {}))
            assert status == 200 and len(body["tokens"]) <= 2
            walked += [t["token_id"] for t in body["tokens"]]
            if body["next_after"] is None:
                break
            after = body["next_after"]
        assert walked == live
        status, body = await page(include_expired="1")
        assert len(body["tokens"]) == 6 and "job-9" in {t["client"] for t in body["tokens"]}
        for bad in ({"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"after": "nope"},
                    {"after": "sdt_0123"}, {"include_expired": "2"}, {"include_expired": "yes"}):
            resp = await api.client.get("/v1/auth/tokens", params=bad, headers=h)
            assert resp.status == 400, bad
            assert resp.content_type == "application/problem+json"


def test_the_cli_follows_every_page_of_the_token_listing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from secretsd.cli import main

    data = tmp_path / "data"
    admin = init_store(data)
    _seed_rows(data, [dead_token(n, expired_days_ago=-30) for n in range(1004)]  # live for 30 more days
               + [dead_token(5000, expired_days_ago=1)])
    daemon = DaemonProcess(data).start()
    try:
        env = {"SECRETSD_ADDR": daemon.url, "SECRETSD_TOKEN": admin}
        out = CliRunner().invoke(main, ["token", "list", "--json"], env=env, catch_exceptions=False)
        assert out.exit_code == 0, out.stderr
        listed = json.loads(out.stdout)["tokens"]
        assert len(listed) == 1005 and len({t["token_id"] for t in listed}) == 1005  # 1004 + admin, 2 pages
        out = CliRunner().invoke(main, ["token", "list", "--json", "--include-expired"], env=env,
                                 catch_exceptions=False)
        assert len(json.loads(out.stdout)["tokens"]) == 1006
        first = http("GET", f"{daemon.url}/v1/auth/tokens", token=admin).body
        assert len(first["tokens"]) == 1000 and first["next_after"] == first["tokens"][-1]["token_id"]
    finally:
        daemon.stop()


async def test_the_last_root_guard_counts_only_live_roots_among_many_expired(tmp_path: Path) -> None:
    """ACTIVE_TOKENS leaves expired tokens out: 50 expired root tokens do not let the last live one go."""
    from secretsd.domain.token_service import refuse_revoking_the_last_root_token
    from secretsd.errors import ConflictError

    storage = await _store(tmp_path, [dead_token(n, root=True) for n in range(50)])
    try:
        admin = next(t for t in await storage.list_tokens() if t.is_active(NOW))
        with pytest.raises(ConflictError, match="last active token with the root policy"):
            await storage.revoke_token(admin.token_id, datetime.now(UTC), guard=refuse_revoking_the_last_root_token)
        still = await storage.get_token(admin.token_id)
        assert still is not None and still.revoked_at is None
    finally:
        await storage.close()
