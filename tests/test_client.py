"""The Python client against a real daemon: both faces, error mapping, retries, the settings source."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from secretsd import errors
from secretsd.client import AsyncSecretsClient, RetryPolicy, SecretsClient, calls
from secretsd.client.settings_source import SecretPath, SecretsdSettingsSource
from tests.helpers import DaemonProcess, free_port, init_store

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
POLICIES = """
[policies.reader]
rules = [{ path = "app/**", allow = ["read", "list"] }]

[policies.billing]
rules = [
  { path = "billing/**", allow = ["read"] },
  { path = "shared/stripe-key", allow = ["read"] },
]
"""


class Daemon:
    def __init__(self, proc: DaemonProcess, admin: str, reader: str, billing: str) -> None:
        self.proc, self.admin, self.reader, self.billing = proc, admin, reader, billing
        self.url = proc.url


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("client")
    (root / "policies.toml").write_text(POLICIES)
    token = init_store(root / "data")
    proc = DaemonProcess(root / "data", env={"SECRETSD_POLICY_FILE": str(root / "policies.toml")}).start()
    try:
        with SecretsClient(proc.url, token) as admin:
            reader = admin.create_token("reader-svc", ["reader"])["token"]
            billing = admin.create_token("billing", ["billing"])["token"]
        yield Daemon(proc, token, reader, billing)
    finally:
        proc.stop()


# -- both faces, same answers ------------------------------------------------------------------
def exercise_sync(url: str, token: str, base: str) -> list[Any]:
    with SecretsClient(url, token) as c:
        return [
            c.put(f"{base}/a", "one")["version"],
            c.put(f"{base}/a", "two", cas=1, metadata={"owner": "me"})["version"],
            c.get(f"{base}/a")["value"],
            c.get(f"{base}/a", version=1)["value"],
            [s["path"] for s in c.list_all(base)],
            c.metadata(f"{base}/a")["metadata"],
            c.delete(f"{base}/a")["deleted"],
            c.undelete(f"{base}/a", [2])["undeleted"],
            c.whoami()["client"],
            c.health()["ready"],
        ]


async def exercise_async(url: str, token: str, base: str) -> list[Any]:
    async with AsyncSecretsClient(url, token) as c:
        return [
            (await c.put(f"{base}/a", "one"))["version"],
            (await c.put(f"{base}/a", "two", cas=1, metadata={"owner": "me"}))["version"],
            (await c.get(f"{base}/a"))["value"],
            (await c.get(f"{base}/a", version=1))["value"],
            [s["path"] for s in await c.list_all(base)],
            (await c.metadata(f"{base}/a"))["metadata"],
            (await c.delete(f"{base}/a"))["deleted"],
            (await c.undelete(f"{base}/a", [2]))["undeleted"],
            (await c.whoami())["client"],
            (await c.health())["ready"],
        ]


async def test_sync_and_async_faces_give_the_same_answers(daemon: Daemon) -> None:
    expected = [1, 2, "two", "one", ["{b}/a"], {"owner": "me"}, [2], [2], "admin", True]

    def fill(base: str) -> list[Any]:
        return [[p.format(b=base) for p in v] if isinstance(v, list) and v and isinstance(v[0], str) else v
                for v in expected]

    assert (await asyncio.to_thread(exercise_sync, daemon.url, daemon.admin, "app/sync")) == fill("app/sync")
    got = await exercise_async(daemon.url, daemon.admin, "app/async")
    assert got[2:] == fill("app/async")[2:] and got[:2] == [1, 2]


async def test_async_client_is_safe_to_share_between_tasks(daemon: Daemon) -> None:
    async with AsyncSecretsClient(daemon.url, daemon.admin) as c:
        await asyncio.gather(*(c.put(f"app/many/k{i}", str(i)) for i in range(40)))
        values = await asyncio.gather(*(c.get(f"app/many/k{i}") for i in range(40)))
    assert [v["value"] for v in values] == [str(i) for i in range(40)]


# -- error mapping: 400 401 403 404 409 ---------------------------------------------------------
def error_cases(d: Daemon) -> list[tuple[str, str, type[errors.SecretsdError], Any]]:
    return [
        ("400 invalid path", d.admin, errors.InvalidPathError, lambda c: c.get("app/bad name")),
        ("400 bad request", d.admin, errors.RequestError, lambda c: c.policy_check("x", "fly", "app/x")),
        ("401", "sdt_not-a-real-token", errors.UnauthenticatedError, lambda c: c.get("app/x")),
        ("403", d.reader, errors.PermissionDeniedError, lambda c: c.put("app/x", "v")),
        ("404", d.admin, errors.NotFoundError, lambda c: c.get("app/does-not-exist")),
        ("409", d.admin, errors.ConflictError, lambda c: c.put("app/conflict", "v", cas=0)),
    ]


def test_errors_map_to_typed_exceptions_sync(daemon: Daemon) -> None:
    with SecretsClient(daemon.url, daemon.admin) as admin:
        admin.put("app/conflict", "exists")
    for label, token, cls, op in error_cases(daemon):
        with SecretsClient(daemon.url, token) as c, pytest.raises(cls) as info:
            op(c)
        assert type(info.value) is cls, label
        assert "sdt_" not in info.value.message, label


async def test_errors_map_to_typed_exceptions_async(daemon: Daemon) -> None:
    async with AsyncSecretsClient(daemon.url, daemon.admin) as admin:
        await admin.put("app/conflict", "exists")
    for label, token, cls, op in error_cases(daemon):
        async with AsyncSecretsClient(daemon.url, token) as c:
            with pytest.raises(cls) as info:
                await op(c)
        assert type(info.value) is cls, label


# -- retries ---------------------------------------------------------------------------------------
class CountingSync(SecretsClient):
    attempts = 0

    def _once(self, call: calls.Call) -> dict[str, Any]:
        self.attempts += 1
        return super()._once(call)


class CountingAsync(AsyncSecretsClient):
    attempts = 0

    async def _once(self, call: calls.Call) -> dict[str, Any]:
        self.attempts += 1
        return await super()._once(call)


FAST = RetryPolicy(max_attempts=4, max_time=5, base_delay=0.01, max_delay=0.02)


def test_retry_policy_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(max_attempts=10, max_time=100, base_delay=0.1, max_delay=1.0)
    for attempt in range(1, 10):
        cap = min(1.0, 0.1 * 2 ** (attempt - 1))
        for _ in range(20):
            assert cap / 2 <= policy.delay(attempt) <= cap
    get = calls.get_secret("a/b")
    sealed = errors.SealedError()
    assert policy.next_delay(get, sealed, 1, 0) is not None
    assert policy.next_delay(calls.put_secret("a/b", "v"), sealed, 1, 0) is None  # not idempotent
    assert policy.next_delay(calls.put_secret("a/b", "v", cas=3), sealed, 1, 0) is not None
    assert policy.next_delay(get, errors.NotFoundError(), 1, 0) is None  # not retryable
    assert policy.next_delay(get, sealed, 10, 0) is None  # out of attempts
    assert policy.next_delay(get, sealed, 1, 99.99) is None  # out of time
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_connection_errors_retry_idempotent_calls_only_sync() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    c = CountingSync(url, "t", retry=FAST)
    with pytest.raises(errors.UnreachableError, match="cannot reach secretsd"):
        c.get("app/x")
    assert c.attempts == 4
    c.attempts = 0
    with pytest.raises(errors.UnreachableError):
        c.put("app/x", "v")
    assert c.attempts == 1
    never = CountingSync(url, "t", retry=RetryPolicy.never())
    with pytest.raises(errors.UnreachableError):
        never.get("app/x")
    assert never.attempts == 1


async def test_connection_errors_retry_idempotent_calls_only_async() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with CountingAsync(url, "t", retry=FAST) as c:
        with pytest.raises(errors.UnreachableError, match="cannot reach secretsd"):
            await c.get("app/x")
        assert c.attempts == 4
        c.attempts = 0
        with pytest.raises(errors.UnreachableError):
            await c.create_token("svc", ["root"])
        assert c.attempts == 1


def test_timeout_is_an_unreachable_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as server:  # accepts, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(errors.UnreachableError):
            SecretsClient(url, "t", timeout=0.3, retry=RetryPolicy.never()).get("a/b")

        async def go() -> None:
            async with AsyncSecretsClient(url, "t", timeout=0.3, retry=RetryPolicy.never()) as c:
                await c.get("a/b")

        with pytest.raises(errors.UnreachableError):
            asyncio.run(go())
        assert time.monotonic() - start < 5


@pytest.fixture
def sealed(tmp_path: Path) -> Iterator[tuple[DaemonProcess, str, Path, Path]]:
    """A daemon holding app/k, restarted without its key file: sealed, answering 503."""
    data = tmp_path / "data"
    token = init_store(data)
    first = DaemonProcess(data).start()
    with SecretsClient(first.url, token) as c:
        c.put("app/k", "kept")
    first.stop()
    key, hidden = data / "master.key", tmp_path / "master.key.away"
    key.rename(hidden)
    proc = DaemonProcess(data, env={"SECRETSD_UNSEAL_RETRY_MAX_SECONDS": "0.3"}).start(wait_ready=False)
    try:
        yield proc, token, key, hidden
    finally:
        proc.stop()


PATIENT = RetryPolicy(max_attempts=100, max_time=30, base_delay=0.05, max_delay=0.3)


def restore_later(hidden: Path, key: Path, delay: float = 1.0) -> threading.Timer:
    timer = threading.Timer(delay, hidden.rename, args=(key,))
    timer.start()
    return timer


def test_sealed_daemon_503_then_retry_succeeds_after_unseal_sync(sealed: Any) -> None:
    proc, token, key, hidden = sealed
    with CountingSync(proc.url, token, retry=RetryPolicy.never()) as c:
        with pytest.raises(errors.SealedError) as info:
            c.get("app/k")
        assert info.value.retryable
    with CountingSync(proc.url, token, retry=PATIENT) as c:
        with pytest.raises(errors.SealedError):
            c.put("app/k", "no cas: never retried")
        assert c.attempts == 1
        c.attempts = 0
        timer = restore_later(hidden, key)
        start = time.monotonic()
        assert c.get("app/k")["value"] == "kept"
        timer.join()
        assert c.attempts > 2 and time.monotonic() - start >= 0.9


async def test_sealed_daemon_503_then_retry_succeeds_after_unseal_async(sealed: Any) -> None:
    proc, token, key, hidden = sealed
    async with CountingAsync(proc.url, token, retry=RetryPolicy.never()) as c:
        with pytest.raises(errors.SealedError):
            await c.list_secrets("app")
    async with CountingAsync(proc.url, token, retry=PATIENT) as c:
        with pytest.raises(errors.SealedError):
            await c.put("app/k", "no cas: never retried")
        assert c.attempts == 1
        c.attempts = 0
        timer = restore_later(hidden, key)
        assert (await c.get("app/k"))["value"] == "kept"
        timer.join()
        assert c.attempts > 2


# -- configuration -----------------------------------------------------------------------------------
def test_configuration_from_environment_and_tls_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SECRETSD_ADDR", "https://secrets.example:8443/")
    monkeypatch.setenv("SECRETSD_TOKEN", "sdt_env")
    c = SecretsClient()
    assert (c.addr, c.token, c.endpoint.port) == ("https://secrets.example:8443", "sdt_env", 8443)
    assert c.endpoint.ssl_context is not None
    a = AsyncSecretsClient(token="sdt_arg")
    assert a.token == "sdt_arg" and a.addr == "https://secrets.example:8443"
    with pytest.raises(errors.ConfigError):
        SecretsClient("ftp://x")
    with pytest.raises(FileNotFoundError):
        SecretsClient("https://x", ca_file=tmp_path / "missing-ca.pem")
    cert, key = make_cert(tmp_path)
    tls = AsyncSecretsClient("https://x", ca_file=cert, client_cert=(cert, key))
    assert tls.endpoint.ssl_context is not None and tls.endpoint.ssl_context.verify_mode.name == "CERT_REQUIRED"


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# -- the pydantic-settings source ---------------------------------------------------------------------
def seed_billing(d: Daemon) -> None:
    with SecretsClient(d.url, d.admin) as c:
        for path, value in {
            "billing/DATABASE_URL": "postgres://billing:pw@db.internal:5432/billing",
            "billing/PORT": "8001",
            "billing/ALLOWED_HOSTS": '["billing.example", "localhost"]',
            "shared/stripe-key": "sk_live_0123456789",
        }.items():
            c.put(path, value)


def test_example_app_runs_against_a_real_daemon(daemon: Daemon) -> None:
    seed_billing(daemon)
    env = os.environ | {"SECRETSD_ADDR": daemon.url, "SECRETSD_TOKEN": daemon.billing,
                        "PYTHONPATH": str(ROOT)}
    env.pop("BILLING_PORT", None)
    app = ROOT / "docs" / "examples" / "settings_app.py"
    out = subprocess.run([sys.executable, str(app)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "port": 8001, "debug": False, "allowed_hosts": ["billing.example", "localhost"],
        "database_host": "db.internal", "stripe_key_length": 18, "settings_repr_hides_secrets": True,
    }
    assert "sk_live" not in out.stdout and "pw@" not in out.stdout
    # Precedence: the environment beats secretsd.
    out = subprocess.run([sys.executable, str(app)], capture_output=True, text=True,
                         env=env | {"BILLING_PORT": "9000"}, timeout=60)
    assert json.loads(out.stdout)["port"] == 9000


class Svc(BaseSettings):
    database_url: SecretStr
    stripe: Annotated[SecretStr, SecretPath("shared/stripe-key")]
    port: int = 1
    timeout: float = 2.5
    mode: str = "default"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, SecretsdSettingsSource(
            settings_cls, prefix="billing", paths={"mode": "billing/PORT"})


def test_settings_source_precedence_defaults_and_errors(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_billing(daemon)
    monkeypatch.setenv("SECRETSD_ADDR", daemon.url)
    monkeypatch.setenv("SECRETSD_TOKEN", daemon.billing)
    monkeypatch.delenv("PORT", raising=False)
    s = Svc()  # type: ignore[call-arg]
    assert s.database_url.get_secret_value().startswith("postgres://")
    assert s.stripe.get_secret_value() == "sk_live_0123456789"
    assert (s.port, s.timeout, s.mode) == (8001, 2.5, "8001")  # secret, default (404), explicit path
    monkeypatch.setenv("PORT", "7000")
    assert Svc().port == 7000  # type: ignore[call-arg]  # env beats secretsd
    assert Svc(port=6000).port == 6000  # type: ignore[call-arg]  # init kwargs beat both
    # Not allowed to read: the service must not start on defaults.
    monkeypatch.setenv("SECRETSD_TOKEN", daemon.reader)
    with pytest.raises(errors.PermissionDeniedError):
        Svc()  # type: ignore[call-arg]
    monkeypatch.setenv("SECRETSD_ADDR", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(errors.UnreachableError):
        Svc()  # type: ignore[call-arg]


def test_settings_source_path_rules() -> None:
    class S(BaseSettings):
        db_password: str = ""
        other: Annotated[str, SecretPath("x/y")] = ""

    src = SecretsdSettingsSource(S, prefix="/svc/")
    assert src.path_for("db_password", S.model_fields["db_password"]) == "svc/DB_PASSWORD"
    assert src.path_for("other", S.model_fields["other"]) == "x/y"
    exact = SecretsdSettingsSource(S, prefix="svc", name_case="exact")
    assert exact.path_for("db_password", S.model_fields["db_password"]) == "svc/db_password"
    assert SecretsdSettingsSource(S).path_for("db_password", S.model_fields["db_password"]) is None
    with pytest.raises(ValueError, match="does not have"):
        SecretsdSettingsSource(S, paths={"nope": "a/b"})
    with pytest.raises(errors.InvalidPathError):
        SecretPath("sys/status")


def test_settings_validation_errors_need_not_quote_secret_values(daemon: Daemon) -> None:
    """A stored value that fails the service's own validation must not appear in the error, with
    ``hide_input_in_errors=True`` as the docs and the example app set it."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsConfigDict

    with SecretsClient(daemon.url, daemon.admin) as c:
        c.put("hide/port", "SECRETVAL-not-a-number")

    class Strict(BaseSettings):
        model_config = SettingsConfigDict(hide_input_in_errors=True)
        port: int = 1

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings,  # type: ignore[no-untyped-def]
                                       dotenv_settings, file_secret_settings):
            return (init_settings, SecretsdSettingsSource(settings_cls, prefix="hide", name_case="lower",
                                                          client=SecretsClient(daemon.url, daemon.admin)))

    with pytest.raises(ValidationError) as info:
        Strict()
    assert "SECRETVAL" not in str(info.value)
