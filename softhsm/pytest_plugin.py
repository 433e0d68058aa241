"""pytest fixtures for a throwaway SoftHSM2 token and a real secretsd daemon whose master key is in it.

Installed with jarvis-secretsd and loaded by pytest through the ``pytest11`` entry point
``secretsd-softhsm``: a service's own test suite gets these fixtures with no ``conftest.py`` line.

* ``softhsm_token`` (session): a fresh token in a private temporary directory, provisioned with
  ``provision-token.sh``; attributes ``module``, ``label``, ``pin``, ``so_pin``, ``conf``. Its user PIN
  is also in the environment variable ``PIN_ENV``.
* ``hsm_key`` (function): a new AES-256 KEK generated inside that token (sensitive, never extractable).
* ``make_softhsm_kek`` (function): a factory for KEKs with a chosen mechanism; ``softhsm_kek`` is one.
* ``secretsd_server`` (function): a real ``secretsd serve`` process on a free loopback port, its key
  provider pkcs11 on ``softhsm_token``; attributes ``url``, ``admin_token``, ``data_dir``,
  ``config_file``, and ``seed({path: value})``.
* ``postgres_server`` (session): a throwaway PostgreSQL server (``softhsm.postgres``), started only in a
  session that asks for it; ``fresh_database(server)`` gives each test an empty database.
* ``secretsd_client`` (function): a ``secretsd.client.SecretsClient`` bound to it with the admin token;
  ``secretsd_async_client`` an ``AsyncSecretsClient``, opened by the test with ``async with``.

Options: ``--softhsm-module PATH`` (the PKCS#11 module; else ``SOFTHSM2_MODULE``, else the usual
install paths) and ``--softhsm-keep`` (after a failed run, keep the token directory and the daemon's
data directory, and print where they are).

Tests must never see the machine's own tokens, and SoftHSM reads ``SOFTHSM2_CONF`` only when the
library is initialised, so ``pytest_configure`` points it at a private temporary directory before
any test module can load the library. The config file there is only written when the token is
provisioned: a library loaded earlier fails to initialise instead of finding the system tokens.

Without SoftHSM2 the fixtures skip, except under CI (``CI`` set), where a missing SoftHSM2 is a
broken build and fails loudly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from softhsm import PROVISION_SCRIPT
from softhsm.postgres import postgres_server  # noqa: F401 (registers the opt-in fixture: a server starts only if asked for)

if TYPE_CHECKING:
    from secretsd.client import AsyncSecretsClient, SecretsClient

PIN_ENV = "SECRETSD_TEST_PKCS11_PIN"
TOKEN_LABEL = "secretsd-test"  # noqa: S105 (a token's name, not a secret)
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

_HOME = pytest.StashKey[Path]()
_PREVIOUS_CONF = pytest.StashKey["str | None"]()
_KEPT = pytest.StashKey["list[Path]"]()
_REPORTS = pytest.StashKey["dict[str, pytest.TestReport]"]()
_SESSION = pytest.StashKey[pytest.Session]()


@dataclass(frozen=True)
class SoftHSMToken:
    """A provisioned token. The PINs are test values, created fresh for each session."""

    module: str
    conf: Path
    token_dir: Path
    label: str
    user_pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    pin_env: str = PIN_ENV

    @property
    def pin(self) -> str:
        """The user PIN (the contract's name for ``user_pin``)."""
        return self.user_pin

    def provider_options(self, key_label: str, mechanism: str = "aes-gcm") -> dict[str, Any]:
        """Options for ``Pkcs11KeyProvider.from_config`` (the ``[key_provider]`` table minus kind)."""
        return {
            "module": self.module,
            "token_label": self.label,
            "key_label": key_label,
            "pin_env": self.pin_env,
            "mechanism": mechanism,
        }


@dataclass(frozen=True)
class SoftHSMKek:
    token: SoftHSMToken
    key_label: str
    mechanism: str
    key_id: str

    @property
    def options(self) -> dict[str, Any]:
        return self.token.provider_options(self.key_label, self.mechanism)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    if _ci():
        pytest.fail(f"SoftHSM2 is required under CI but {reason}", pytrace=False)
    pytest.skip(f"SoftHSM2 not available: {reason}")


def find_module(option: str | None = None) -> str | None:
    """The SoftHSM2 PKCS#11 module: ``--softhsm-module``, else ``SOFTHSM2_MODULE``, else the usual paths."""
    override = option or os.environ.get("SOFTHSM2_MODULE")
    if override:
        return override if os.path.isfile(override) else None
    return next((path for path in MODULE_CANDIDATES if os.path.isfile(path)), None)


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--softhsm-module`` and ``--softhsm-keep``."""
    group = parser.getgroup("secretsd-softhsm", "SoftHSM2 token and secretsd daemon fixtures")
    group.addoption("--softhsm-module", metavar="PATH", default=None,
                    help="the SoftHSM2 PKCS#11 module (default: $SOFTHSM2_MODULE, else the usual install paths)")
    group.addoption("--softhsm-keep", action="store_true", default=False,
                    help="after a failed run, keep the SoftHSM2 token directory and the daemons' data, and say where")


def pytest_configure(config: pytest.Config) -> None:
    """Point ``SOFTHSM2_CONF`` at a private directory before any test can load the library."""
    home = Path(tempfile.mkdtemp(prefix="secretsd-softhsm-"))  # mode 0700
    config.stash[_HOME] = home
    config.stash[_PREVIOUS_CONF] = os.environ.get("SOFTHSM2_CONF")
    config.stash[_KEPT] = []
    os.environ["SOFTHSM2_CONF"] = str(home / "softhsm2.conf")


def _keep(config: pytest.Config) -> bool:
    """Keep what the fixtures made: asked to, and the run failed."""
    session = config.stash.get(_SESSION, None)
    return bool(config.getoption("--softhsm-keep")) and session is not None and session.testsfailed > 0


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remember the session, so that ``pytest_unconfigure`` knows whether the run failed."""
    session.config.stash[_SESSION] = session


def pytest_unconfigure(config: pytest.Config) -> None:
    """Restore ``SOFTHSM2_CONF``; remove the token and daemon directories, or keep them (``--softhsm-keep``)."""
    if _HOME not in config.stash:
        return
    previous = config.stash[_PREVIOUS_CONF]
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous
    home = config.stash[_HOME]
    if _keep(config):
        for path in [home, *config.stash[_KEPT]]:
            sys.stderr.write(f"secretsd-softhsm: kept {path} (--softhsm-keep)\n")
        sys.stderr.write(f"secretsd-softhsm: use it with SOFTHSM2_CONF={home / 'softhsm2.conf'}\n")
    else:
        shutil.rmtree(home, ignore_errors=True)
        for path in config.stash[_KEPT]:
            shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so that a fixture's teardown can tell whether its test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    return any(r.failed for r in node.stash.get(_REPORTS, {}).values())


@pytest.fixture(scope="session")
def softhsm_token(pytestconfig: pytest.Config) -> Iterator[SoftHSMToken]:
    """A fresh SoftHSM2 token for the session, its user PIN also in ``PIN_ENV``.

    Skips without SoftHSM2 (fails under CI)."""
    option = pytestconfig.getoption("--softhsm-module")
    module = find_module(option)
    if module is None:
        where = f"--softhsm-module {option} is not a file" if option else (
            "libsofthsm2.so was not found (apt-get install softhsm2, or set SOFTHSM2_MODULE or --softhsm-module)")
        _unavailable(where)
    if shutil.which("softhsm2-util") is None:
        _unavailable("softhsm2-util is not on PATH (apt-get install softhsm2)")
    try:
        import keyproviders.pkcs11  # noqa: F401  (python-pkcs11 is the provider's dependency)
    except ImportError as exc:
        _unavailable(f"python-pkcs11 cannot be imported ({exc})")
    assert module is not None

    home = pytestconfig.stash[_HOME]
    user_pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    done = subprocess.run(  # noqa: S603 (our own script, arguments we generated)
        ["/bin/sh", str(PROVISION_SCRIPT), str(home), TOKEN_LABEL, so_pin, user_pin],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"provision-token.sh failed: {done.stderr.strip()}", pytrace=False)
    conf = home / "softhsm2.conf"
    if done.stdout.strip() != f"export SOFTHSM2_CONF={conf}":
        pytest.fail(f"provision-token.sh printed {done.stdout!r}", pytrace=False)
    if os.environ.get("SOFTHSM2_CONF") != str(conf):
        pytest.fail("SOFTHSM2_CONF was changed during the test session", pytrace=False)

    previous_pin = os.environ.get(PIN_ENV)
    os.environ[PIN_ENV] = user_pin
    try:
        yield SoftHSMToken(
            module=module,
            conf=conf,
            token_dir=home / "tokens",
            label=TOKEN_LABEL,
            user_pin=user_pin,
            so_pin=so_pin,
        )
    finally:
        if previous_pin is None:
            os.environ.pop(PIN_ENV, None)
        else:
            os.environ[PIN_ENV] = previous_pin


@pytest.fixture
def make_softhsm_kek(softhsm_token: SoftHSMToken) -> Callable[..., SoftHSMKek]:
    """Create a KEK with a unique label (``mechanism`` decides its capabilities)."""
    from keyproviders.pkcs11 import create_key

    def make(mechanism: str = "aes-gcm") -> SoftHSMKek:
        label = f"test-kek-{secrets.token_hex(6)}"
        options = softhsm_token.provider_options(label, mechanism)
        key_id = create_key(options, base_dir=softhsm_token.conf.parent)
        return SoftHSMKek(token=softhsm_token, key_label=label, mechanism=mechanism, key_id=key_id)

    return make


@pytest.fixture
def softhsm_kek(make_softhsm_kek: Callable[..., SoftHSMKek]) -> SoftHSMKek:
    """One AES-GCM KEK with a unique label in ``softhsm_token``."""
    return make_softhsm_kek()


@pytest.fixture
def softhsm_removable_token(softhsm_token: SoftHSMToken) -> Iterator[tuple[SoftHSMToken, Path]]:
    """A token of its own (same PINs), so that removing its directory cannot disturb other tests.

    Yields the token and its directory: move the directory away and back to simulate an HSM that
    disappears and returns.
    """
    before = set(softhsm_token.token_dir.iterdir())
    label = f"removable-{secrets.token_hex(3)}"
    subprocess.run(  # noqa: S603 (softhsm2-util with arguments we generated)
        [
            *("softhsm2-util", "--init-token", "--free", "--label", label),
            *("--so-pin", softhsm_token.so_pin, "--pin", softhsm_token.user_pin),
        ],
        check=True,
        capture_output=True,
    )
    (token_dir,) = set(softhsm_token.token_dir.iterdir()) - before
    yield dataclasses.replace(softhsm_token, label=label), token_dir
    shutil.rmtree(token_dir, ignore_errors=True)


@pytest.fixture
def hsm_key(make_softhsm_kek: Callable[..., SoftHSMKek]) -> SoftHSMKek:
    """A KEK generated inside ``softhsm_token`` with a unique label: AES-256, sensitive, never extractable."""
    return make_softhsm_kek()


# -- a real daemon ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower()


@dataclass
class SecretsdServer:
    """A ``secretsd serve`` process on loopback whose key provider is pkcs11 on the SoftHSM2 token."""

    url: str
    admin_token: str = field(repr=False)
    data_dir: Path
    config_file: Path
    log_file: Path
    kek: SoftHSMKek
    process: subprocess.Popen[bytes] = field(repr=False)

    def seed(self, values: Mapping[str, str]) -> None:
        """Write each ``path: value`` as a new version, over HTTP with the admin token."""
        for path, value in values.items():
            request = urllib.request.Request(  # noqa: S310 (our loopback daemon)
                f"{self.url}/v1/secrets/{urllib.parse.quote(path)}",
                data=json.dumps({"value": value}).encode(),
                method="PUT",
                headers={"Authorization": f"Bearer {self.admin_token}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (our loopback daemon)
                response.read()

    def logs(self) -> str:
        """Everything the daemon has written to its log so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within 15 s. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return int(self.process.returncode)


def _secretsd(*args: str) -> subprocess.CompletedProcess[str]:
    # Run as a separate process, like an operator would: the kit never imports the daemon.
    return subprocess.run(  # noqa: S603 (this interpreter, arguments we built)
        [sys.executable, "-m", "secretsd", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _wait_ready(server: SecretsdServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"secretsd exited with {server.process.returncode}:\n{server.logs()}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    server.stop()
    pytest.fail(f"secretsd was not ready after {timeout}s:\n{server.logs()}", pytrace=False)


@pytest.fixture
def secretsd_server(
    request: pytest.FixtureRequest, hsm_key: SoftHSMKek, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecretsdServer]:
    """A real daemon on a free loopback port, its keyring wrapped by ``hsm_key``; stopped after the test."""
    home = tmp_path_factory.mktemp("secretsd")
    data_dir, config_file = home / "data", home / "secretsd.toml"
    provider = {"kind": "pkcs11", **hsm_key.options}
    config_file.write_text("\n".join([
        f"data_dir = {_toml(str(data_dir))}",
        "[key_provider]",
        *(f"{key} = {_toml(value)}" for key, value in provider.items()),
    ]) + "\n")
    init = _secretsd("init", "--config", str(config_file), "--json")
    if init.returncode != 0:
        pytest.fail(f"secretsd init failed: {init.stderr.strip()}", pytrace=False)
    admin_token = str(json.loads(init.stdout)["admin_token"])
    port = _free_port()
    log_file = home / "daemon.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 (this interpreter, arguments we built)
            [sys.executable, "-m", "secretsd", "serve", "--config", str(config_file), "--listen", f"127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = SecretsdServer(
        url=f"http://127.0.0.1:{port}", admin_token=admin_token, data_dir=data_dir, config_file=config_file,
        log_file=log_file, kek=hsm_key, process=process,
    )
    try:
        _wait_ready(server)
        yield server
    finally:
        server.stop()
        if _failed(request.node):
            request.node.add_report_section("teardown", "secretsd daemon log", server.logs())
        request.config.stash[_KEPT].append(home)


@pytest.fixture
def secretsd_client(secretsd_server: SecretsdServer) -> Iterator[SecretsClient]:
    """A ``SecretsClient`` bound to ``secretsd_server`` with its admin token."""
    from secretsd.client import SecretsClient

    client = SecretsClient(secretsd_server.url, secretsd_server.admin_token)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def secretsd_async_client(secretsd_server: SecretsdServer) -> AsyncSecretsClient:
    """An ``AsyncSecretsClient`` bound to ``secretsd_server``, not yet connected.

    Open it in the test's own event loop (``async with secretsd_async_client as client:``), which
    also closes it: a fixture cannot know which loop, or which async plugin, the test runs under.
    """
    from secretsd.client import AsyncSecretsClient

    return AsyncSecretsClient(secretsd_server.url, secretsd_server.admin_token)
