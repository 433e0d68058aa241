"""pytest fixtures for a throwaway SoftHSM2 token. Enable with ``pytest_plugins = ["softhsm.pytest_plugin"]``.

* ``softhsm_token`` (session): a fresh token in a temporary directory, provisioned with
  ``provision-token.sh``; its user PIN is in the environment variable ``PIN_ENV``.
* ``softhsm_kek`` (function): a new AES-256 KEK with a unique label in that token.
* ``make_softhsm_kek`` (function): a factory for KEKs with a chosen mechanism.

Tests must never see the machine's own tokens, and SoftHSM reads ``SOFTHSM2_CONF`` only when the
library is initialised, so ``pytest_configure`` points it at a private temporary directory before
any test module can load the library. The config file there is only written when the token is
provisioned: a library loaded earlier fails to initialise instead of finding the system tokens.

Without SoftHSM2 the fixtures skip, except under CI (``CI`` set), where a missing SoftHSM2 is a
broken build and fails loudly.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from softhsm import PROVISION_SCRIPT

PIN_ENV = "SECRETSD_TEST_PKCS11_PIN"
TOKEN_LABEL = "secretsd-test"  # noqa: S105 (a token's name, not a secret)
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

_state: dict[str, Any] = {}


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


def find_module() -> str | None:
    override = os.environ.get("SOFTHSM2_MODULE")
    if override:
        return override if os.path.isfile(override) else None
    return next((path for path in MODULE_CANDIDATES if os.path.isfile(path)), None)


def pytest_configure(config: pytest.Config) -> None:
    home = Path(tempfile.mkdtemp(prefix="secretsd-softhsm-"))  # mode 0700
    _state.update(home=home, previous=os.environ.get("SOFTHSM2_CONF"))
    os.environ["SOFTHSM2_CONF"] = str(home / "softhsm2.conf")


def pytest_unconfigure(config: pytest.Config) -> None:
    if "home" not in _state:
        return
    previous = _state.pop("previous")
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous
    shutil.rmtree(_state.pop("home"), ignore_errors=True)


@pytest.fixture(scope="session")
def softhsm_token() -> Iterator[SoftHSMToken]:
    module = find_module()
    if module is None:
        _unavailable("libsofthsm2.so was not found (apt-get install softhsm2, or set SOFTHSM2_MODULE)")
    if shutil.which("softhsm2-util") is None:
        _unavailable("softhsm2-util is not on PATH (apt-get install softhsm2)")
    try:
        import keyproviders.pkcs11  # noqa: F401  (python-pkcs11 is the provider's dependency)
    except ImportError as exc:
        _unavailable(f"python-pkcs11 cannot be imported ({exc})")
    assert module is not None

    home: Path = _state["home"]
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
