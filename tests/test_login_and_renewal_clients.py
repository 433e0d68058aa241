"""``secretsd login`` / ``whoami`` and the clients' background renewal (issue 13 item 4), against a
real daemon process; the renewal plan's timing rules in isolation."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from secretsd_client import SecretsClient
from secretsd_client.aio import AsyncSecretsClient
from secretsd_client.errors import SealedError, UnauthenticatedError, UnreachableError
from secretsd_client.renewal import MAX_BACKOFF_SECONDS, RenewalPlan

from secretsd.cli import main
from tests.helpers import DaemonProcess, http, init_store


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    data = tmp_path_factory.mktemp("login") / "data"
    admin = init_store(data)
    proc = DaemonProcess(data).start()
    try:
        yield proc.url, admin
    finally:
        proc.stop()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("SECRETSD_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "secretsd" / "token"


def _token(url: str, admin: str, **body: object) -> dict[str, str]:
    resp = http("POST", f"{url}/v1/auth/tokens", token=admin, body={"client": "svc", "policies": ["root"]} | body)
    assert resp.status == 201, resp.body
    return dict(resp.body)


def _cli(url: str, *args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--addr", url, *args], input=stdin)
    return result.exit_code, result.output


# -- login / whoami -------------------------------------------------------------------------------
def test_login_stores_the_token_0600_and_the_cli_uses_it(daemon: tuple[str, str], home: Path) -> None:
    url, admin = daemon
    code, out = _cli(url, "whoami")
    assert code == 4  # no token anywhere: refused
    code, out = _cli(url, "login", "--method", "token", stdin=admin + "\n")
    assert code == 0, out
    assert admin not in out  # never echoed
    assert home.read_text().strip() == admin
    assert stat.S_IMODE(home.stat().st_mode) == 0o600 and stat.S_IMODE(home.parent.stat().st_mode) == 0o700
    code, out = _cli(url, "whoami")
    assert code == 0 and "client:   admin" in out and "method:   token" in out and "expires:  never" in out


def test_whoami_names_the_expiry(daemon: tuple[str, str], home: Path) -> None:
    url, admin = daemon
    made = _token(url, admin, ttl_seconds=3600)
    code, out = _cli(url, "whoami", "--token", made["token"])
    assert code == 0 and f"expires:  {made['expires_at']}" in out and "client:   svc" in out


def test_login_refuses_a_bad_token_and_stores_nothing(daemon: tuple[str, str], home: Path) -> None:
    url, _ = daemon
    code, out = _cli(url, "login", stdin="sdt_0123456789abcdef_" + "A" * 43 + "\n")
    assert code == 4 and not home.exists()
    code, out = _cli(url, "login", stdin="\n")
    assert code == 2 and "no token given" in out and not home.exists()


def test_login_print_prints_and_stores_nothing(daemon: tuple[str, str], home: Path) -> None:
    url, admin = daemon
    code, out = _cli(url, "login", "--print", stdin=admin + "\n")
    assert code == 0 and out.strip().splitlines()[-1] == admin and not home.exists()


def test_a_stored_token_others_can_read_is_refused(daemon: tuple[str, str], home: Path) -> None:
    url, admin = daemon
    assert _cli(url, "login", stdin=admin + "\n")[0] == 0
    home.chmod(0o644)
    code, out = _cli(url, "whoami")
    assert code == 2 and "chmod 600" in out and admin not in out
    home.unlink()
    home.symlink_to(home.parent / "elsewhere")
    (home.parent / "elsewhere").write_text(admin)
    (home.parent / "elsewhere").chmod(0o600)
    code, out = _cli(url, "whoami")
    assert code == 2 and "symlink" in out


def test_an_explicit_token_wins_over_the_stored_one(daemon: tuple[str, str], home: Path) -> None:
    url, admin = daemon
    assert _cli(url, "login", stdin=admin + "\n")[0] == 0
    svc = _token(url, admin)["token"]
    code, out = _cli(url, "whoami", "--token", svc)
    assert code == 0 and "client:   svc" in out


def test_token_create_max_ttl_makes_a_renewable_token(daemon: tuple[str, str], home: Path) -> None:
    url, admin = daemon
    code, out = _cli(url, "token", "create", "--client", "svc", "--policy", "root", "--ttl", "60",
                     "--max-ttl", "1h", "--json", "--token", admin)
    assert code == 0, out
    assert '"max_expires_at": null' not in out and '"max_expires_at"' in out


# -- background renewal ---------------------------------------------------------------------------
def _expires(url: str, admin: str, token_id: str) -> datetime:
    listed = http("GET", f"{url}/v1/auth/tokens", token=admin).body["tokens"]
    return datetime.fromisoformat(next(t for t in listed if t["token_id"] == token_id)["expires_at"])


def test_the_sync_client_renews_in_the_background(daemon: tuple[str, str]) -> None:
    url, admin = daemon
    made = _token(url, admin, ttl_seconds=2, max_ttl_seconds=60)
    first = datetime.fromisoformat(made["expires_at"])
    with SecretsClient(url, made["token"], auto_renew=True) as client:
        assert client.renewer is not None
        deadline = time.monotonic() + 2.6
        while time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.renewer.plan.renewals >= 2  # at once, then at ~2/3 of the TTL
        assert _expires(url, admin, made["token_id"]) > first
        assert client.whoami()["client"] == "svc"  # past its first expiry, still good
        renewer = client.renewer
    renewer.join(timeout=5)
    assert not renewer.is_alive()  # close() stopped it


async def test_the_async_client_renews_in_the_background(daemon: tuple[str, str]) -> None:
    url, admin = daemon
    made = await asyncio.to_thread(_token, url, admin, ttl_seconds=30, max_ttl_seconds=60)
    async with AsyncSecretsClient(url, made["token"], auto_renew=True) as client:
        for _ in range(50):
            if client.renewal_plan.renewals:
                break
            await asyncio.sleep(0.05)
        assert client.renewal_plan.renewals == 1  # at once; the next one ~20 s later
        assert await asyncio.to_thread(_expires, url, admin, made["token_id"]) > datetime.fromisoformat(
            made["expires_at"])


def test_a_client_stops_renewing_a_token_that_does_not_renew(daemon: tuple[str, str]) -> None:
    url, admin = daemon
    fixed = _token(url, admin, ttl_seconds=60)  # no max TTL
    with SecretsClient(url, fixed["token"], auto_renew=True) as client:
        assert client.renewer is not None
        client.renewer.join(timeout=5)
        assert not client.renewer.is_alive() and client.renewer.plan.renewals == 1


# -- the plan --------------------------------------------------------------------------------------
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _answer(expires_in: float | None, cap_in: float | None) -> dict[str, str | None]:
    def at(seconds: float | None) -> str | None:
        return None if seconds is None else (T0 + timedelta(seconds=seconds)).isoformat()
    return {"expires_at": at(expires_in), "max_expires_at": at(cap_in)}


def test_renewal_waits_two_thirds_of_the_time_left_and_stops_at_the_max() -> None:
    plan = RenewalPlan()
    assert plan.after_answer(_answer(900, 86400), T0) == pytest.approx(600)
    assert plan.after_answer(_answer(86400, 86400), T0) is None  # at its max: final
    assert plan.after_answer(_answer(None, None), T0) is None  # no expiry
    assert plan.after_answer(_answer(900, None), T0) is None  # no max TTL
    assert plan.after_answer(_answer(0.3, 86400), T0) == 1.0  # at most once a second


def test_renewal_never_hammers_a_failing_daemon() -> None:
    plan = RenewalPlan()
    plan.after_answer(_answer(100_000, 1_000_000), T0)
    waits = [plan.after_error(UnreachableError("x"), T0) for _ in range(12)]
    assert waits[:4] == [2.0, 4.0, 8.0, 16.0] and max(w or 0 for w in waits) == MAX_BACKOFF_SECONDS
    assert plan.after_answer(_answer(900, 86400), T0) is not None and plan.failures == 0
    # Never waits past the token's own expiry; once expired, stops.
    near = T0 + timedelta(seconds=890)
    assert [plan.after_error(SealedError("sealed"), near) for _ in range(4)] == [2.0, 4.0, 5.0, 5.0]
    assert plan.after_error(SealedError("sealed"), T0 + timedelta(seconds=901)) is None
    # Refused (revoked, expired): asking again changes nothing.
    assert RenewalPlan().after_error(UnauthenticatedError("no"), T0) is None
