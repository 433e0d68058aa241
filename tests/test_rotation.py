"""Secret lifecycle (docs/rotation.md): labels, grace, expiry, policies, generators, hooks, scheduler.

Time comes from an injectable clock; hooks are small real executables and a real HTTP server.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import string
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from secretsd.api.app import create_app
from secretsd.cli import main
from secretsd.domain.generators import CLASSES, BytesGenerator, PasswordGenerator
from secretsd.domain.rotation import SYSTEM, RotationPolicy, backoff
from secretsd.domain.rotation_settings import RotationSettings
from secretsd.errors import ConflictError, RotationFailedError
from secretsd.events import Event
from secretsd.problems import PROBLEM_CONTENT_TYPE
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import Daemon, initialize_store
from secretsd.runtime.leadership import Leadership
from secretsd.runtime.scheduler import RotationScheduler
from secretsd.storage import VersionState
from tests.helpers import DaemonProcess, http, init_store, run_cli

DAY = 86400


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Env:
    """A daemon on a fake clock behind a real aiohttp test server; the scheduler is ticked by hand."""

    client: TestClient[web.Request, web.Application]
    daemon: Daemon
    admin: str
    clock: FakeClock
    events: list[Event] = field(default_factory=list)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    async def req(self, method: str, url: str, token: str | None = None, **kw: Any) -> tuple[int, Any]:
        resp = await self.client.request(method, url, headers=self.auth(token), **kw)
        body = await resp.json(content_type=None)
        if resp.status >= 400:
            assert resp.content_type == PROBLEM_CONTENT_TYPE, body
        return resp.status, body

    async def put(self, path: str, value: str, **extra: Any) -> dict[str, Any]:
        status, body = await self.req("PUT", f"/v1/secrets/{path}", json={"value": value, **extra})
        assert status == 200, body
        return dict(body)

    async def read(self, path: str, token: str | None = None, **params: Any) -> tuple[int, Any]:
        return await self.req("GET", f"/v1/secrets/{path}", token, params={k: str(v) for k, v in params.items()})

    async def policy(self, path: str, token: str | None = None, **policy: Any) -> tuple[int, Any]:
        return await self.req("PUT", f"/v1/metadata/{path}", token, json={"rotation": policy})

    async def rotate(self, path: str, token: str | None = None, **body: Any) -> tuple[int, Any]:
        return await self.req("POST", f"/v1/secrets/{path}/rotate", token, json=body)

    async def token(self, client: str, *policies: str) -> str:
        status, body = await self.req("POST", "/v1/auth/tokens", json={"client": client, "policies": list(policies)})
        assert status == 201, body
        return str(body["token"])

    def named(self, action: str) -> list[Event]:
        return [e for e in self.events if e.action == action]

    async def audit_records(self) -> list[dict[str, Any]]:
        if self.daemon._event_tasks:
            await asyncio.wait(set(self.daemon._event_tasks), timeout=5)
        path = self.daemon.settings.audit.log_path(self.daemon.settings.require_data_dir())
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


POLICY_FILE = """
[policies.reader]
rules = [{ path = "app/**", allow = ["read", "list"] }]
[policies.rotator]
rules = [{ path = "app/**", allow = ["read", "rotate", "list"] }]
[policies.operator]
rules = [{ path = "app/**", allow = ["read", "admin"] }]
"""


def rotation_settings(data_dir: Path, hooks: dict[str, Any] | None = None, **rotation: Any) -> Settings:
    policy_file = data_dir.parent / "policies.toml"
    policy_file.write_text(POLICY_FILE)
    scoped = {name: {"paths": ["app/**"], **hook} for name, hook in (hooks or {}).items()}
    return load_settings(None, data_dir=data_dir, policy_file=policy_file,
                         rotation={"scheduler": False, "hooks": scoped, **rotation})


async def start_env(settings: Settings, admin: str, clock: FakeClock) -> tuple[Env, Callable[[], Any]]:
    daemon = Daemon(settings, clock=clock)
    await daemon.start()
    await daemon.leadership.attempt()  # the leadership task would, within a second or two
    client = TestClient(TestServer(create_app(daemon)))
    await client.start_server()
    env = Env(client, daemon, admin, clock)
    daemon.events.subscribe(env.events.append)

    async def stop() -> None:
        await client.close()
        await daemon.stop()

    return env, stop


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hooks() -> dict[str, Any]:
    """Tests that need hooks put them here before ``env`` starts the daemon."""
    return {}


@pytest.fixture
async def env(data_dir: Path, clock: FakeClock, hooks: dict[str, Any]) -> AsyncIterator[Env]:
    settings = rotation_settings(data_dir, hooks)
    admin = (await initialize_store(settings)).admin_token
    e, stop = await start_env(settings, admin, clock)
    try:
        yield e
    finally:
        await stop()


def script(tmp_path: Path, name: str, body: str) -> str:
    """A small real executable hook (Python, so it needs nothing from the daemon's environment)."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


RECORDING_HOOK = """
import json, os, sys
doc = json.load(sys.stdin)
with open(os.environ["HOOK_LOG"], "a") as f:
    f.write(json.dumps({"doc": doc, "argv": sys.argv, "env": sorted(os.environ)}) + "\\n")
sys.exit(int(os.environ.get("HOOK_EXIT", "0")) if doc["step"] == os.environ.get("HOOK_FAIL_STEP", "set") else 0)
"""


# -- generators ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("encoding", "alphabet", "size"), [
    ("hex", set("0123456789abcdef"), lambda n: 2 * n),
    ("base64", set(string.ascii_letters + string.digits + "+/="), lambda n: 4 * ((n + 2) // 3)),
    ("urlsafe", set(string.ascii_letters + string.digits + "-_"), lambda n: (4 * n + 2) // 3),
])
@pytest.mark.parametrize("length", [16, 32, 33])
def test_bytes_generator_length_and_alphabet(encoding: str, alphabet: set[str], size: Callable[[int], int],
                                             length: int) -> None:
    gen = BytesGenerator(length=length, encoding=encoding)  # type: ignore[arg-type]
    values = {gen.generate() for _ in range(50)}
    assert len(values) == 50
    for value in values:
        assert len(value) == size(length) and set(value) <= alphabet


@pytest.mark.parametrize("classes", [("lower", "upper", "digits"), ("lower", "upper", "digits", "symbols"),
                                     ("digits",), ("symbols", "lower")])
def test_password_generator_length_alphabet_and_every_class(classes: tuple[str, ...]) -> None:
    gen = PasswordGenerator(length=12, classes=classes)  # type: ignore[arg-type]
    alphabet = set(gen.alphabet())
    for _ in range(300):
        value = gen.generate()
        assert len(value) == 12 and set(value) <= alphabet
        for cls in classes:
            assert set(value) & set(CLASSES[cls]), (cls, value)


def test_generators_draw_only_from_the_secrets_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_bytes, real_choice, real_below = secrets.token_bytes, secrets.choice, secrets.randbelow

    def spy(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            calls.append(name)
            return fn(*args)
        return wrapper

    monkeypatch.setattr(secrets, "token_bytes", spy("token_bytes", real_bytes))
    monkeypatch.setattr(secrets, "choice", spy("choice", real_choice))
    monkeypatch.setattr(secrets, "randbelow", spy("randbelow", real_below))
    BytesGenerator(length=32).generate()
    assert calls == ["token_bytes"]
    calls.clear()
    PasswordGenerator(length=20, classes=("lower", "digits")).generate()
    # One uniform draw per character (no rejection loop), then a Fisher-Yates shuffle.
    assert calls.count("choice") == 20 and calls.count("randbelow") == 19 and len(calls) == 39


def test_generator_and_policy_validation() -> None:
    with pytest.raises(ValueError, match="length"):
        BytesGenerator(length=8)
    with pytest.raises(ValueError, match="length"):
        PasswordGenerator(length=6)
    with pytest.raises(ValueError, match="repeat"):
        PasswordGenerator(classes=("lower", "lower"))
    with pytest.raises(ValueError, match="classes"):
        PasswordGenerator(classes=("emoji",))  # type: ignore[arg-type]
    default = RotationPolicy.model_validate({"enabled": True})
    assert default.period_seconds == 90 * DAY and default.grace_seconds == 14 * DAY
    assert default.generator.kind == "bytes"
    with pytest.raises(ValueError, match="grace_seconds"):
        RotationPolicy.model_validate({"enabled": True, "period_seconds": DAY, "grace_seconds": 2 * DAY})
    with pytest.raises(ValueError, match="max_age"):
        RotationPolicy.model_validate({"enabled": True, "period_seconds": 10 * DAY, "max_age_seconds": DAY})


def test_backoff_is_exponential_and_capped() -> None:
    s = RotationSettings(retry_base_seconds=60, retry_max_seconds=600)
    assert [backoff(n, s).total_seconds() for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]


# -- rotation, labels, grace ------------------------------------------------------------------------
async def test_rotation_moves_labels_and_the_grace_period_starts_and_ends(env: Env) -> None:
    reader = await env.token("svc", "reader")
    await env.put("app/key", "v1-value")
    status, body = await env.policy("app/key", grace_seconds=2 * DAY)
    assert status == 200, body
    status, rotated = await env.rotate("app/key")
    assert status == 200, rotated
    assert rotated["version"] == 2 and rotated["previous_version"] == 1 and rotated["generated"] is True
    rotated_at = env.clock.now
    assert rotated["grace_until"] == (rotated_at + timedelta(days=2)).isoformat()

    status, cur = await env.read("app/key", reader)
    assert status == 200 and cur["version"] == 2 and cur["labels"] == ["current"]
    new_value = cur["value"]
    assert new_value != "v1-value" and len(new_value) == 43  # 32 random bytes, urlsafe
    # Through the grace period the old value is served by label and by number, to ordinary readers.
    for advance in (0, DAY, 2 * DAY - 1):
        env.clock.now = rotated_at + timedelta(seconds=advance)
        status, prev = await env.read("app/key", reader, label="previous")
        assert status == 200 and prev["value"] == "v1-value" and prev["labels"] == ["previous"], prev
        status, by_number = await env.read("app/key", reader, version=1)
        assert status == 200 and by_number["value"] == "v1-value"
        assert (await env.read("app/key", reader))[1]["value"] == new_value
    # At the end of the grace period: 410 for readers, still served to admin, then destroyable.
    env.clock.now = rotated_at + timedelta(days=2)
    status, problem = await env.read("app/key", reader, label="previous")
    assert status == 410 and problem["type"].endswith(":gone") and "grace" in problem["detail"]
    assert "v1-value" not in json.dumps(problem)
    assert (await env.read("app/key", reader, version=1))[0] == 410
    operator = await env.token("ops", "operator")
    status, prev = await env.read("app/key", operator, label="previous")
    assert status == 200 and prev["value"] == "v1-value"
    assert (await env.read("app/key", reader))[1]["value"] == new_value  # current unaffected
    status, _ = await env.req("POST", "/v1/secrets/app/key/destroy", json={"versions": [1]})
    assert status == 200
    assert (await env.read("app/key", operator, label="previous"))[0] == 404

    status, meta = await env.req("GET", "/v1/metadata/app/key", reader)
    assert meta["labels"] == {"current": 2, "previous": 1, "pending": None}
    assert [(v["version"], v["labels"], v["state"]) for v in meta["versions"]] == [
        (1, ["previous"], "destroyed"), (2, ["current"], "active")]
    assert meta["rotation"]["last_result"] == "succeeded" and meta["rotation"]["policy"]["grace_seconds"] == 2 * DAY
    assert [e.version for e in env.named("rotation.succeeded")] == [2]


async def test_a_write_to_a_secret_with_a_policy_gets_grace_too(env: Env) -> None:
    reader = await env.token("svc", "reader")
    await env.put("app/plain", "a")
    await env.put("app/plain", "b")  # no policy: old versions stay readable by number, as always
    env.clock.advance(days=400)
    assert (await env.read("app/plain", reader, version=1))[1]["value"] == "a"
    assert (await env.read("app/plain", reader, label="previous"))[1]["value"] == "a"

    await env.put("app/pol", "a")
    await env.policy("app/pol", grace_seconds=3600)
    await env.put("app/pol", "b")
    assert (await env.read("app/pol", reader, label="previous"))[1]["value"] == "a"
    env.clock.advance(hours=1)
    assert (await env.read("app/pol", reader, label="previous"))[0] == 410


async def test_label_and_version_requests_are_checked(env: Env) -> None:
    await env.put("app/k", "x")
    assert (await env.read("app/k", label="previous"))[0] == 404
    assert (await env.read("app/k", label="pending"))[0] == 404
    status, problem = await env.read("app/k", label="older")
    assert status == 400 and problem["type"].endswith(":invalid-request")
    assert (await env.read("app/k", label="current", version=1))[0] == 400
    assert (await env.read("app/k", label="current"))[1]["value"] == "x"


async def test_rotate_and_policy_need_the_rotate_capability(env: Env) -> None:
    await env.put("app/k", "x")
    reader = await env.token("svc", "reader")
    operator = await env.token("ops", "operator")  # admin, but not rotate
    rotator = await env.token("rot", "rotator")
    for token in (reader, operator):
        assert (await env.rotate("app/k", token))[0] == 403
        assert (await env.policy("app/k", token, enabled=True))[0] == 403
    assert (await env.policy("app/k", rotator, enabled=True, period_seconds=DAY, grace_seconds=3600))[0] == 200
    assert (await env.rotate("app/k", rotator))[0] == 200
    assert (await env.rotate("app/nope", rotator))[0] == 404


async def test_policy_is_validated_and_shown(env: Env) -> None:
    await env.put("app/k", "x")
    bad: list[dict[str, Any]] = [
        {"enabled": True, "period_seconds": 10},
        {"enabled": True, "period_seconds": DAY, "grace_seconds": 2 * DAY},
        {"generator": {"kind": "password", "length": 4}},
        {"generator": {"kind": "dice"}},
        {"hook": "not-configured"},
        {"surprise": 1},
    ]
    for policy in bad:
        status, problem = await env.policy("app/k", **policy)
        assert status == 400 and problem["type"].endswith(":invalid-request"), (policy, problem)
    status, body = await env.policy("app/k", enabled=True, period_seconds=30 * DAY,
                                    generator={"kind": "password", "length": 20, "classes": ["lower", "digits"]})
    assert status == 200
    secret = await env.daemon.storage.get_secret("app/k")
    assert secret is not None
    assert body["rotation"]["next_due"] == (secret.updated_at + timedelta(days=30)).isoformat()
    status, meta = await env.req("GET", "/v1/metadata/app/k")
    assert meta["rotation"]["policy"]["generator"] == {"kind": "password", "length": 20,
                                                       "classes": ["lower", "digits"]}
    status, _ = await env.req("PUT", "/v1/metadata/app/k", json={"rotation": None})
    status, meta = await env.req("GET", "/v1/metadata/app/k")
    assert meta["rotation"]["policy"] is None and meta["rotation"]["next_due"] is None


async def test_supplied_generator_needs_a_value(env: Env) -> None:
    await env.put("app/s", "old")
    await env.policy("app/s", generator={"kind": "supplied"})
    status, problem = await env.rotate("app/s")
    assert status == 400 and "supplied" in problem["detail"]
    status, body = await env.rotate("app/s", value="operator-chosen")
    assert status == 200 and body["generated"] is False
    assert (await env.read("app/s"))[1]["value"] == "operator-chosen"


async def test_password_generator_through_the_api(env: Env) -> None:
    await env.put("app/pw", "old")
    await env.policy("app/pw", generator={"kind": "password", "length": 24, "classes": ["upper", "digits"]})
    await env.rotate("app/pw")
    value = (await env.read("app/pw"))[1]["value"]
    assert len(value) == 24 and set(value) <= set(string.ascii_uppercase + string.digits)


# -- expiry ------------------------------------------------------------------------------------------
async def test_expired_versions_are_not_served_to_anyone(env: Env) -> None:
    expires = env.clock.now + timedelta(hours=1)
    put = await env.put("app/tmp", "short-lived", expires_at=expires.isoformat())
    assert put["version"] == 1
    status, got = await env.read("app/tmp")
    assert status == 200 and got["expires_at"] == expires.isoformat()
    env.clock.advance(hours=1)
    status, problem = await env.read("app/tmp")  # admin too
    assert status == 410 and "expired" in problem["detail"] and "short-lived" not in json.dumps(problem)
    past = {"value": "x", "expires_at": "2020-01-01T00:00:00Z"}
    assert (await env.req("PUT", "/v1/secrets/app/tmp", json=past))[0] == 400
    status, problem = await env.req("PUT", "/v1/secrets/app/tmp", json={"value": "x", "expires_at": "tomorrow"})
    assert status == 400 and "tomorrow" not in problem["detail"]


async def test_max_age_expires_versions(env: Env) -> None:
    await env.put("app/aged", "v1")
    await env.policy("app/aged", max_age_seconds=2 * 3600)
    env.clock.advance(hours=1)
    assert (await env.read("app/aged"))[0] == 200
    env.clock.advance(hours=1)
    assert (await env.read("app/aged"))[0] == 410
    await env.rotate("app/aged")  # a fresh version is served again
    assert (await env.read("app/aged"))[0] == 200


# -- the scheduler ---------------------------------------------------------------------------------
async def test_scheduled_rotation_when_due_and_not_before(env: Env) -> None:
    await env.put("app/sched", "v1")
    await env.policy("app/sched", enabled=True, period_seconds=DAY, grace_seconds=3600)
    sched = env.daemon.scheduler
    assert await sched.tick() == []
    env.clock.advance(seconds=DAY - 1)
    assert await sched.tick() == []
    assert (await env.read("app/sched"))[1]["version"] == 1
    env.clock.advance(seconds=1)
    outcomes = await sched.tick()
    assert [(o.path, o.result, o.version) for o in outcomes] == [("app/sched", "succeeded", 2)]
    got = (await env.read("app/sched"))[1]
    assert got["version"] == 2 and got["created_by"] == "system"
    assert await sched.tick() == []  # next due one period later
    _, table = await env.req("GET", "/v1/rotation/status", params={"prefix": "app"})
    row = table["secrets"][0]
    assert row["path"] == "app/sched" and row["last_result"] == "succeeded"
    assert row["next_due"] == (env.clock.now + timedelta(days=1)).isoformat()
    records = await env.audit_records()
    sys_records = [r for r in records if r.get("action") == "rotation.succeeded"]
    assert sys_records and sys_records[-1]["client"] == "system" and sys_records[-1]["version"] == 2
    assert sys_records[-1]["path"] == "app/sched" and sys_records[-1]["trigger"] == "schedule"


async def test_a_write_postpones_the_scheduled_rotation(env: Env) -> None:
    await env.put("app/w", "v1")
    await env.policy("app/w", enabled=True, period_seconds=DAY, grace_seconds=3600)
    env.clock.advance(hours=20)
    await env.put("app/w", "v2")  # a manual rotation, in effect
    env.clock.advance(hours=4)
    outcomes = await env.daemon.scheduler.tick()
    assert [o.result for o in outcomes] == ["rescheduled"]
    assert (await env.read("app/w"))[1]["value"] == "v2"
    env.clock.advance(hours=20)
    assert [o.result for o in await env.daemon.scheduler.tick()] == ["succeeded"]


async def test_scheduled_rotation_of_a_supplied_secret_is_blocked_and_reported(env: Env) -> None:
    await env.put("app/sup", "v1")
    await env.policy("app/sup", enabled=True, period_seconds=DAY, grace_seconds=3600,
                     generator={"kind": "supplied"})
    env.clock.advance(days=1)
    outcomes = await env.daemon.scheduler.tick()
    assert [o.result for o in outcomes] == ["blocked"]
    assert (await env.read("app/sup"))[1]["version"] == 1
    failed = env.named("rotation.failed")
    assert failed and failed[-1].client == "system" and "supplied" in failed[-1].detail["reason"]
    _, table = await env.req("GET", "/v1/rotation/status")
    assert table["secrets"][0]["last_result"] == "blocked"
    assert await env.daemon.scheduler.tick() == []  # reported again later, not every tick
    records = await env.audit_records()
    assert any(r.get("action") == "rotation.failed" and r.get("outcome") == "failed" and r.get("client") == "system"
               for r in records)


async def test_only_the_leader_schedules_and_a_standby_takes_over(env: Env, data_dir: Path, clock: FakeClock) -> None:
    await env.put("app/l", "v1")
    await env.policy("app/l", enabled=True, period_seconds=DAY, grace_seconds=3600)
    clock.advance(days=1)
    # A second scheduler (another replica's) on the same store, with its own leadership.
    other_lead = Leadership(env.daemon.storage, retry_seconds=1)
    assert await env.daemon.leadership.attempt()
    other = RotationScheduler(env.daemon.rotation, env.daemon.barrier, other_lead, tick_seconds=1)
    assert not await other_lead.attempt()
    assert await other.tick() == [] and not other.leader
    await env.daemon.leadership.stop()  # the leader goes away: the lock is free
    assert await env.daemon.scheduler.tick() == []  # the old leader does nothing any more
    assert await other_lead.attempt()  # the standby's next attempt
    outcomes = await other.tick()
    assert other.leader and [o.result for o in outcomes] == ["succeeded"]
    await other_lead.stop()


# -- hooks -------------------------------------------------------------------------------------------
@pytest.fixture
def hook_log(tmp_path: Path) -> Path:
    return tmp_path / "hook.log"


def exec_hook(tmp_path: Path, hook_log: Path, *, timeout: float = 10, **env: str) -> dict[str, Any]:
    return {"command": [script(tmp_path, "hook.py", RECORDING_HOOK)], "timeout_seconds": timeout,
            "env": {"HOOK_LOG": str(hook_log), **env}}


@pytest.fixture
def ok_hooks(hooks: dict[str, Any], tmp_path: Path, hook_log: Path) -> dict[str, Any]:
    hooks["ok"] = exec_hook(tmp_path, hook_log)
    hooks["fails"] = exec_hook(tmp_path, hook_log, HOOK_EXIT="3")
    hooks["fails-test"] = exec_hook(tmp_path, hook_log, HOOK_EXIT="4", HOOK_FAIL_STEP="test")
    hooks["slow"] = {"command": [script(tmp_path, "slow.py", "import time, sys\nsys.stdin.read()\ntime.sleep(30)\n")],
                     "timeout_seconds": 0.5}
    return hooks


async def test_executable_hook_gets_the_value_on_stdin_only(ok_hooks: dict[str, Any], env: Env,
                                                            hook_log: Path) -> None:
    await env.put("app/h", "v1")
    await env.policy("app/h", hook="ok")
    status, body = await env.rotate("app/h")
    assert status == 200, body
    value = (await env.read("app/h"))[1]["value"]
    calls = [json.loads(line) for line in hook_log.read_text().splitlines()]
    assert [c["doc"]["step"] for c in calls] == ["set", "test"]
    for c in calls:
        assert c["doc"] == c["doc"] | {"path": "app/h", "version": 2, "current_version": 1, "value": value}
        assert value not in json.dumps(c["argv"])
        # A minimal environment, not the daemon's (which may hold a passphrase or a DSN).
        assert set(c["env"]) <= {"PATH", "LANG", "HOOK_LOG", "LC_CTYPE", "PWD"}, c["env"]


async def test_failing_hook_discards_the_pending_version(ok_hooks: dict[str, Any], env: Env) -> None:
    await env.put("app/h", "v1")
    await env.policy("app/h", hook="fails-test", enabled=True, period_seconds=DAY, grace_seconds=3600)
    status, problem = await env.rotate("app/h")
    assert status == 502 and problem["type"].endswith(":rotation-failed")
    assert "status 4" in problem["detail"] and "test" in problem["detail"]
    got = (await env.read("app/h"))[1]
    assert got["value"] == "v1" and got["version"] == 1
    v2 = await env.daemon.storage.get_version("app/h", 2)
    assert v2 is not None and v2.state is VersionState.DESTROYED and v2.ciphertext == b""
    secret = await env.daemon.storage.get_secret("app/h")
    assert secret is not None and secret.pending_version is None
    assert secret.rotation_status["failures"] == 1 and secret.rotation_status["last_result"] == "failed"
    assert secret.rotation_due == env.clock.now + timedelta(seconds=60)  # retried with backoff
    failed = env.named("rotation.failed")[-1]
    assert failed.path == "app/h" and failed.version == 2 and "status 4" in failed.detail["reason"]
    metrics = env.daemon.metrics.render().decode()
    assert 'secretsd_rotations_total{outcome="failed"} 1.0' in metrics
    # The request's audit record says what happened, never the value.
    records = await env.audit_records()
    rec = [r for r in records if r.get("action") == "secret.rotate"][-1]
    assert rec["rotation"] == "failed" and rec["outcome"] == 502 and "status 4" in rec["reason"]


async def test_scheduled_hook_failures_retry_with_backoff(ok_hooks: dict[str, Any], env: Env) -> None:
    await env.put("app/h", "v1")
    await env.policy("app/h", hook="fails", enabled=True, period_seconds=DAY, grace_seconds=3600)
    env.clock.advance(days=1)
    delays = []
    for _ in range(3):
        outcomes = await env.daemon.scheduler.tick()
        assert [o.result for o in outcomes] == ["failed"]
        secret = await env.daemon.storage.get_secret("app/h")
        assert secret is not None and secret.rotation_due is not None
        delays.append((secret.rotation_due - env.clock.now).total_seconds())
        assert await env.daemon.scheduler.tick() == []  # not before the retry is due
        env.clock.now = secret.rotation_due
    assert delays == [60, 120, 240]
    assert (await env.read("app/h"))[1]["version"] == 1
    versions = await env.daemon.storage.list_versions("app/h")
    assert [(v.version, v.state.value) for v in versions] == [
        (1, "active"), (2, "destroyed"), (3, "destroyed"), (4, "destroyed")]
    failed = env.named("rotation.failed")
    assert len(failed) == 3 and all(e.client == "system" for e in failed)


async def test_hook_timeout_kills_it_and_changes_nothing(ok_hooks: dict[str, Any], env: Env) -> None:
    await env.put("app/h", "v1")
    await env.policy("app/h", hook="slow")
    started = time.monotonic()
    status, problem = await env.rotate("app/h")
    assert status == 502 and "timed out" in problem["detail"]
    assert time.monotonic() - started < 10
    assert (await env.read("app/h"))[1]["value"] == "v1"
    secret = await env.daemon.storage.get_secret("app/h")
    assert secret is not None and secret.pending_version is None


async def hook_server(handler: Callable[[web.Request], Any]) -> TestServer:
    app = web.Application()
    app.router.add_post("/rotate", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_http_hook_success_and_failure(data_dir: Path, clock: FakeClock) -> None:
    seen: list[dict[str, Any]] = []
    answer = {"status": 200}

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.Response(status=answer["status"])

    server = await hook_server(handler)
    url = f"http://127.0.0.1:{server.port}/rotate"
    settings = rotation_settings(data_dir, {"web": {"url": url, "timeout_seconds": 5}})
    admin = (await initialize_store(settings)).admin_token
    env, stop = await start_env(settings, admin, clock)
    try:
        await env.put("app/web", "v1")
        await env.policy("app/web", hook="web")
        assert (await env.rotate("app/web"))[0] == 200
        value = (await env.read("app/web"))[1]["value"]
        assert [(d["step"], d["value"], d["version"]) for d in seen] == [("set", value, 2), ("test", value, 2)]
        answer["status"] = 500
        status, problem = await env.rotate("app/web")
        assert status == 502 and "HTTP 500" in problem["detail"]
        assert (await env.read("app/web"))[1]["value"] == value
    finally:
        await stop()
        await server.close()


def test_hook_settings_are_validated() -> None:
    from secretsd.domain.hooks import HookSettings

    HookSettings(paths=("db/*",), url="https://rotator.example/hook")
    HookSettings(paths=("db/*",), url="http://127.0.0.1:8080/hook")
    HookSettings(paths=("db/*",), command=("/usr/local/bin/rotate-db", "--verbose"))
    for bad in ({"url": "http://rotator.example/hook"}, {"url": "ftp://x/y"},
                {"url": "https://user:pw@rotator.example/"}, {"command": ("rotate-db",)},
                {"command": ("/bin/true",), "url": "https://x/"}, {}):
        with pytest.raises(ValueError):
            HookSettings(**bad)


# -- restarts and races ------------------------------------------------------------------------------
async def test_restart_in_the_middle_of_a_rotation_finishes_it(data_dir: Path, clock: FakeClock,
                                                               tmp_path: Path, hook_log: Path) -> None:
    """The daemon dies while the hook runs: the pending version stays; the next leader finishes it."""
    body = RECORDING_HOOK.replace("sys.exit(", "import time; time.sleep(30); sys.exit(")
    blocking = script(tmp_path, "block.py", body)
    settings = rotation_settings(data_dir, {"h": {"command": [blocking], "timeout_seconds": 60,
                                                  "env": {"HOOK_LOG": str(hook_log)}}})
    admin = (await initialize_store(settings)).admin_token
    env, stop = await start_env(settings, admin, clock)
    await env.put("app/r", "v1")
    await env.policy("app/r", hook="h")
    task = asyncio.create_task(env.daemon.rotation.rotate(SYSTEM, "app/r"))
    for _ in range(200):  # until the hook has the value
        if hook_log.exists() and hook_log.read_text():
            break
        await asyncio.sleep(0.05)
    pending_value = json.loads(hook_log.read_text().splitlines()[0])["doc"]["value"]
    task.cancel()  # the daemon dies here (its hook process is killed with it)
    with pytest.raises(asyncio.CancelledError):
        await task
    await stop()

    # Restarted, with a hook that works now.
    hook_log.unlink()
    settings2 = rotation_settings(data_dir, {"h": exec_hook(tmp_path, hook_log)})
    env, stop = await start_env(settings2, admin, clock)
    try:
        secret = await env.daemon.storage.get_secret("app/r")
        assert secret is not None and secret.pending_version == 2 and secret.current_version == 1
        assert (await env.read("app/r"))[1]["value"] == "v1"  # readers never saw a half-made version
        reader = await env.token("svc", "reader")
        assert (await env.read("app/r", reader, label="pending"))[0] == 404
        assert (await env.read("app/r", reader, version=2))[0] == 404
        status, pending = await env.read("app/r", label="pending")  # admin holds `rotate`
        assert status == 200 and pending["value"] == pending_value and pending["labels"] == ["pending"]
        assert (await env.rotate("app/r"))[0] == 409  # one rotation at a time
        outcomes = await env.daemon.scheduler.tick()
        assert [o.result for o in outcomes] == ["skipped"]  # might still be in progress elsewhere
        clock.advance(seconds=settings2.rotation.pending_timeout_seconds)
        outcomes = await env.daemon.scheduler.tick()
        assert [(o.result, o.version) for o in outcomes] == [("recovered", 2)]
        got = (await env.read("app/r"))[1]
        assert got["version"] == 2 and got["value"] == pending_value
        assert (await env.read("app/r", label="previous"))[1]["value"] == "v1"
        steps = [json.loads(line)["doc"] for line in hook_log.read_text().splitlines()]
        assert [(d["step"], d["value"]) for d in steps] == [("set", pending_value), ("test", pending_value)]
        assert [v.version for v in await env.daemon.storage.list_versions("app/r")] == [1, 2]
    finally:
        await stop()


async def test_restart_in_the_middle_of_a_rotation_discards_when_the_hook_fails(
        ok_hooks: dict[str, Any], env: Env) -> None:
    await env.put("app/r", "v1")
    await env.policy("app/r", hook="fails")
    secret = await env.daemon.storage.get_secret("app/r")
    assert secret is not None
    # What a daemon that died right after step 1 leaves behind: a sealed pending version.
    from secretsd.storage import VersionRecord

    sealed = env.daemon.barrier.seal_value("app/r", 2, b"half-way")
    await env.daemon.storage.create_pending(VersionRecord(
        path="app/r", version=2, created_at=env.clock.now, created_by="system", state=VersionState.ACTIVE,
        term=sealed.term, nonce=sealed.nonce, ciphertext=sealed.ciphertext), expected_current=1)
    env.clock.advance(seconds=env.daemon.settings.rotation.pending_timeout_seconds + 1)
    outcomes = await env.daemon.scheduler.tick()
    assert [(o.result, o.version) for o in outcomes] == [("discarded", 2)]
    got = (await env.read("app/r"))[1]
    assert got["version"] == 1 and got["value"] == "v1"
    v2 = await env.daemon.storage.get_version("app/r", 2)
    assert v2 is not None and v2.state is VersionState.DESTROYED
    assert env.named("rotation.failed")[-1].detail["trigger"] == "recovery"


async def test_concurrent_rotations_and_writes_never_lose_a_version(tmp_path: Path, data_dir: Path,
                                                                    clock: FakeClock) -> None:
    # A hook that takes a moment, so writes land while rotations are half-way.
    slowish = script(tmp_path, "slowish.py", "import sys, time\nsys.stdin.read()\ntime.sleep(0.05)\n")
    settings = rotation_settings(data_dir, {"slowish": {"command": [slowish], "timeout_seconds": 10}})
    admin = (await initialize_store(settings)).admin_token
    env, stop = await start_env(settings, admin, clock)
    try:
        await env.put("app/race", "v0")
        await env.policy("app/race", hook="slowish")
        acknowledged: dict[int, str] = {}
        rotated: list[int] = []

        async def writer(i: int) -> None:
            for j in range(5):
                body = await env.put("app/race", f"w{i}-{j}")
                assert body["version"] not in acknowledged
                acknowledged[body["version"]] = f"w{i}-{j}"
                await asyncio.sleep(0.01)

        async def rotator() -> None:
            for _ in range(6):
                status, body = await env.rotate("app/race")
                assert status in (200, 409), body
                if status == 200:
                    rotated.append(body["version"])
                await asyncio.sleep(0.01)

        await asyncio.gather(*(writer(i) for i in range(4)), rotator(), rotator())
        # Every acknowledged write is stored, as written; every successful rotation too.
        for version, value in acknowledged.items():
            assert (await env.read("app/race", version=version))[1]["value"] == value
        for version in rotated:
            assert (await env.read("app/race", version=version))[0] == 200
        assert not set(rotated) & set(acknowledged)
        secret = await env.daemon.storage.get_secret("app/race")
        assert secret is not None and secret.pending_version is None
        assert secret.current_version == max([*acknowledged, *rotated])
        versions = await env.daemon.storage.list_versions("app/race")
        numbers = [v.version for v in versions]
        assert numbers == sorted(set(numbers))
        # Whatever is not acknowledged or rotated is a discarded pending version: destroyed, never served.
        for v in versions:
            if v.version not in acknowledged and v.version not in rotated and v.version != 1:
                assert v.state is VersionState.DESTROYED
    finally:
        await stop()


async def test_rotation_service_reports_conflict_when_a_write_lands_mid_rotation(
        data_dir: Path, clock: FakeClock, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    waiting = script(tmp_path, "wait.py", f"import os, sys, time\nsys.stdin.read()\n"
                     f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n")
    settings = rotation_settings(data_dir, {"wait": {"command": [waiting], "timeout_seconds": 20}})
    admin = (await initialize_store(settings)).admin_token
    env, stop = await start_env(settings, admin, clock)
    try:
        await env.put("app/c", "v1")
        await env.policy("app/c", hook="wait")
        task = asyncio.create_task(env.daemon.rotation.rotate(SYSTEM, "app/c"))
        for _ in range(100):
            secret = await env.daemon.storage.get_secret("app/c")
            if secret is not None and secret.pending_version:
                break
            await asyncio.sleep(0.02)
        written = await env.put("app/c", "written-meanwhile")
        assert written["version"] == 3  # 2 is the pending version's number
        gate.touch()
        with pytest.raises(ConflictError):
            await task
        got = (await env.read("app/c"))[1]
        assert got["value"] == "written-meanwhile" and got["version"] == 3
        assert env.named("rotation.failed")[-1].detail["result"] == "conflict"
    finally:
        await stop()


async def test_missing_hook_configuration_is_a_failure_not_a_crash(data_dir: Path, clock: FakeClock,
                                                                   tmp_path: Path, hook_log: Path) -> None:
    settings = rotation_settings(data_dir, {"h": exec_hook(tmp_path, hook_log)})
    admin = (await initialize_store(settings)).admin_token
    env, stop = await start_env(settings, admin, clock)
    await env.put("app/m", "v1")
    await env.policy("app/m", hook="h", enabled=True, period_seconds=DAY, grace_seconds=3600)
    await stop()
    env, stop = await start_env(rotation_settings(data_dir), admin, clock)  # the hook was removed
    try:
        clock.advance(days=1)
        outcomes = await env.daemon.scheduler.tick()
        assert [o.result for o in outcomes] == ["failed"] and "not configured" in outcomes[0].reason
        with pytest.raises(RotationFailedError):
            await env.daemon.rotation.rotate(SYSTEM, "app/m")
        assert (await env.read("app/m"))[1]["version"] == 1
    finally:
        await stop()


# -- CLI -----------------------------------------------------------------------------------------------
def test_rotation_commands_have_examples() -> None:
    runner = CliRunner()
    for command in (["rotate"], ["rotation"], ["rotation", "status"], ["rotation", "set"]):
        assert "Example" in runner.invoke(main, [*command, "--help"]).output, command


@pytest.mark.e2e
def test_cli_rotate_and_status_against_a_real_daemon(tmp_path: Path) -> None:
    data = tmp_path / "proc-data"
    token = init_store(data)
    proc = DaemonProcess(data).start()
    try:
        env = {"SECRETSD_ADDR": proc.url, "SECRETSD_TOKEN": token}
        run_cli("set", "app/db", "--stdin", input_text="first", env=env, check=True)
        run_cli("rotation", "set", "app/db", "--period", "30d", "--grace", "1d", "--generator", "password",
                "--length", "20", env=env, check=True)
        out = run_cli("rotate", "app/db", "--json", env=env, check=True)
        assert json.loads(out.stdout)["version"] == 2
        assert len(run_cli("get", "app/db", env=env, check=True).stdout.strip()) == 20
        assert run_cli("get", "app/db", "--label", "previous", env=env, check=True).stdout.strip() == "first"
        run_cli("rotate", "app/db", "--value-stdin", input_text="chosen", env=env, check=True)
        assert run_cli("get", "app/db", env=env, check=True).stdout.strip() == "chosen"
        status = json.loads(run_cli("rotation", "status", "app", "--json", env=env, check=True).stdout)
        row = status["secrets"][0]
        assert row["path"] == "app/db" and row["last_result"] == "succeeded" and row["next_due"]
        table = run_cli("rotation", "status", env=env, check=True).stdout
        assert "app/db" in table and "succeeded" in table
        missing = run_cli("rotate", "app/none", env=env)
        assert missing.returncode == 3 and missing.stderr.startswith("error:")  # not found
        resp = http("GET", proc.url + "/v1/metadata/app/db", token=token)
        assert resp.body["labels"] == {"current": 3, "previous": 2, "pending": None}
    finally:
        proc.stop()
    assert "chosen" not in proc.logs() and "first" not in proc.logs()
    assert os.environ.get("SECRETSD_TOKEN") != token
