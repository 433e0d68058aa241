"""The Authenticator seam: the token method passes the conformance suite; the daemon builds its
authenticators from configuration through the ``secretsd.authenticators`` entry points."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from secretsd import tokens
from secretsd.auth import (
    ENTRY_POINT_GROUP,
    Authenticator,
    AuthenticatorContext,
    Authenticators,
    available_authenticators,
    create_authenticators,
)
from secretsd.auth.testing import AuthenticatorConformance, AuthenticatorHarness, Issued
from secretsd.auth.token import TokenAuthenticator
from secretsd.clock import utcnow
from secretsd.domain.identity import Credentials, Principal
from secretsd.domain.policy import ROOT_POLICY, PolicyStore
from secretsd.domain.token_service import TokenService
from secretsd.errors import ConfigError
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import Daemon
from secretsd.storage import Storage, TokenRecord
from secretsd.storage.sqlite import SQLiteStorage
from secretsd.storage.testing import initialized
from tests.helpers import DaemonProcess, http, init_store, run_cli


class TokenHarness:
    """Bearer tokens in a real SQLite store, revoked through the token service as the daemon does."""

    compares_secrets = True

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._start = utcnow()
        self._offset = timedelta()
        # Built from configuration through the entry point, with a cache long enough that a
        # revocation can only take effect by reaching it.
        self.authenticators = create_authenticators(
            [{"method": "token"}], AuthenticatorContext(storage, clock=self.now, cache_seconds=300))
        self.authenticator: Authenticator = next(iter(self.authenticators))
        self._service = TokenService(storage, PolicyStore(None), self.authenticators, clock=self.now)

    def now(self) -> datetime:
        return self._start + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += timedelta(seconds=seconds)

    async def issue(self, client: str, policies: tuple[str, ...], *, ttl_seconds: float | None = None) -> Issued:
        new = tokens.generate_token()
        expires = None if ttl_seconds is None else self.now() + timedelta(seconds=ttl_seconds)
        await self._storage.create_token(TokenRecord(
            token_id=new.token_id, secret_hash=new.secret_hash, client=client, policies=policies,
            created_at=self.now(), created_by="test", expires_at=expires))
        return Issued(Credentials(bearer=new.token), client, policies, (new.token, new.token.split("_", 2)[2]))

    def unknown(self) -> Credentials:
        return Credentials(bearer=tokens.generate_token().token)

    def malformed(self) -> Sequence[Credentials]:
        token = tokens.generate_token().token
        return [Credentials(bearer=b) for b in (
            "", "sdt_", "not-a-token", token + "A", token[:-1], token.upper(), "sdt_" + "0" * 16 + "_" + "!" * 43,
            token.replace("sdt_", "xyz_"),
        )]

    def tampered(self, issued: Issued) -> Credentials:
        assert issued.credentials.bearer is not None
        token_id = issued.credentials.bearer.split("_")[1]
        other = tokens.generate_token().token.split("_", 2)[2]
        return Credentials(bearer=f"sdt_{token_id}_{other}")

    async def revoke(self, issued: Issued) -> None:
        assert issued.credentials.bearer is not None
        root = Principal("admin", (ROOT_POLICY,), "token")
        await self._service.revoke(root, issued.credentials.bearer.split("_")[1])


class TestTokenAuthenticatorConformance(AuthenticatorConformance):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[AuthenticatorHarness]:
        storage = SQLiteStorage(tmp_path / "db.sqlite")
        await storage.open()
        await initialized(storage)
        yield TokenHarness(storage)
        await storage.close()


# -- the seam's own rules -------------------------------------------------------------------------
def test_the_token_method_is_registered_like_a_third_party_one() -> None:
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "token"]
    assert ep.load() is TokenAuthenticator
    assert "token" in available_authenticators()


def test_credentials_keep_the_bearer_out_of_their_repr() -> None:
    token = tokens.generate_token().token
    assert token not in repr(Credentials(bearer=token)) and token not in str(Credentials(bearer=token))


class _Other:
    """A second method, as a third party would write one (for ordering and fan-out only)."""

    method = "other"

    def __init__(self) -> None:
        self.invalidated: list[str] = []

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        return None

    def invalidate(self, token_id: str) -> None:
        self.invalidated.append(token_id)

    def invalidate_all(self) -> None:
        self.invalidated.append("*")


class _NoCache:
    method = "nocache"

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        return None


def test_revocations_reach_every_authenticator_that_caches() -> None:
    other = _Other()
    authenticators = Authenticators([_NoCache(), other])
    authenticators.invalidate("00000000000000aa")
    authenticators.invalidate_all()
    assert other.invalidated == ["00000000000000aa", "*"]
    assert authenticators.methods == ("nocache", "other")


def _context(tmp_path: Path) -> AuthenticatorContext:
    return AuthenticatorContext(SQLiteStorage(tmp_path / "db.sqlite"))


@pytest.mark.parametrize(("specs", "message"), [
    ([], "no authenticators configured"),
    ([{"method": "no-such-method"}], "unknown authenticator method 'no-such-method'; available: .*token"),
    ([{}], "needs a method"),
    ([{"method": "token"}, {"method": "token"}], "configured twice"),
    ([{"method": "token", "cache_seconds": "s3cr3t-value"}], "takes no options \\(given: cache_seconds\\)"),
])
def test_bad_authenticator_configuration_is_refused(tmp_path: Path, specs: list[dict[str, object]],
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        create_authenticators(specs, _context(tmp_path))
    assert "s3cr3t-value" not in str(caught.value)  # names the option, never echoes its value


def test_without_configuration_the_daemon_authenticates_tokens(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data", token_cache_seconds=7)
    daemon = Daemon(settings)
    assert daemon.authenticators.methods == ("token",)
    (token_auth,) = daemon.authenticators
    assert isinstance(token_auth, TokenAuthenticator) and token_auth._cache_seconds == 7


def test_the_daemon_builds_the_configured_authenticators(tmp_path: Path) -> None:
    config = tmp_path / "secretsd.toml"
    config.write_text('[[authenticators]]\nmethod = "token"\n')
    assert Daemon(load_settings(config, data_dir=tmp_path / "data")).authenticators.methods == ("token",)
    config.write_text('[[authenticators]]\nmethod = "no-such-method"\n')
    with pytest.raises(ConfigError, match="unknown authenticator method"):
        Daemon(load_settings(config, data_dir=tmp_path / "data"))
    config.write_text("authenticators = []\n")
    with pytest.raises(ConfigError, match="authenticators"):
        load_settings(config, data_dir=tmp_path / "data")


@pytest.mark.e2e
def test_a_daemon_configured_with_the_token_method_serves_and_an_unknown_one_does_not_start(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    admin = init_store(data)
    config = tmp_path / "secretsd.toml"
    config.write_text('[[authenticators]]\nmethod = "token"\n')
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    try:
        resp = http("GET", daemon.url + "/v1/auth/whoami", token=admin)
        assert resp.status == 200 and resp.body["method"] == "token"
        assert http("GET", daemon.url + "/v1/auth/whoami", token=tokens.generate_token().token).status == 401
    finally:
        daemon.stop()
    config.write_text('[[authenticators]]\nmethod = "no-such-method"\n')
    result = run_cli("serve", "--config", str(config), "--data-dir", str(data), "--listen", "127.0.0.1:1", timeout=30)
    assert result.returncode != 0
    assert "unknown authenticator method 'no-such-method'" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.dumps(admin) not in result.stderr
