"""Every way the HSM setup can be wrong ends in one line that says what to do, never a traceback (issue 15).

Each case runs ``secretsd hsm create-key`` and ``secretsd hsm doctor`` in process (click's
CliRunner) against a real SoftHSM2 token: a missing module path, a file that is not a PKCS#11
module, a token label that does not exist, a wrong PIN, a locked PIN, a key of the wrong type under
the configured label, and a missing python-pkcs11. Only the locked PIN is simulated: SoftHSM 2.6.1
never answers CKR_PIN_LOCKED (measured: 15 wrong PINs, and a token whose stored flags carry
CKF_USER_PIN_LOCKED, still log in with the right PIN), so its ``C_Login`` is made to answer it.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pkcs11 import KeyType
from pkcs11 import exceptions as p11

from keyproviders.errors import ProviderConfigError
from keyproviders.pkcs11 import Pkcs11KeyProvider, Pkcs11Options
from keyproviders.pkcs11.library import _Library, _library
from secretsd.cli import main
from softhsm.pytest_plugin import SoftHSMToken


def write_config(path: Path, options: dict[str, Any]) -> Path:
    lines = ["[key_provider]", 'kind = "pkcs11"', *(f"{k} = {json.dumps(v)}" for k, v in options.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def create_key_error(config: Path) -> str:
    """``hsm create-key``'s whole stderr, checked to be one ``error:`` line with exit status 1."""
    result = CliRunner().invoke(main, ["hsm", "create-key", "--config", str(config)])
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def doctor_failure(config: Path) -> tuple[str, str]:
    """``hsm doctor --json``: the failing check's name and its one-line detail; exit status 1."""
    result = CliRunner().invoke(main, ["hsm", "doctor", "--config", str(config), "--json"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    checks = json.loads(result.stdout)
    assert [c["status"] for c in checks[:-1]] == ["ok"] * (len(checks) - 1) and checks[-1]["status"] == "fail"
    assert "\n" not in checks[-1]["detail"] and "Traceback" not in checks[-1]["detail"]
    return checks[-1]["check"], checks[-1]["detail"]


@pytest.fixture
def options(softhsm_token: SoftHSMToken) -> dict[str, Any]:
    return softhsm_token.provider_options(f"kek-{secrets.token_hex(4)}")


@pytest.fixture
def plant(softhsm_token: SoftHSMToken) -> Callable[[str, Callable[[Any], None]], None]:
    """Create objects under a label through this process's own login (a second C_Login would fail)."""

    def plant(label: str, make: Callable[[Any], None]) -> None:
        opts = Pkcs11Options.parse(softhsm_token.provider_options(label), base_dir=softhsm_token.conf.parent)
        library = _library(opts.module)
        with library.lock:
            library.acquire(opts.token_label)
            try:
                make(library.session(opts, rescan=True))
            finally:
                library.release(opts.token_label)

    return plant


def test_a_missing_module_path_is_one_line(options: dict[str, Any], tmp_path: Path) -> None:
    config = write_config(tmp_path / "hsm.toml", options | {"module": str(tmp_path / "no-such-pkcs11.so")})
    line = create_key_error(config)
    assert "no-such-pkcs11.so does not exist" in line
    assert doctor_failure(config) == ("configuration", line.removeprefix("error: "))


def test_a_file_that_is_not_a_pkcs11_module_is_one_line(options: dict[str, Any], tmp_path: Path) -> None:
    fake = tmp_path / "fake-pkcs11.so"
    fake.write_bytes(b"not an ELF file")
    config = write_config(tmp_path / "hsm.toml", options | {"module": str(fake)})
    line = create_key_error(config)
    assert f"cannot load or initialise PKCS#11 module {fake}" in line and "SOFTHSM2_CONF" in line
    check, detail = doctor_failure(config)
    assert check == "module loads" and f"cannot load or initialise PKCS#11 module {fake}" in detail


def test_an_unknown_token_label_is_one_line(options: dict[str, Any], tmp_path: Path) -> None:
    config = write_config(tmp_path / "hsm.toml", options | {"token_label": "no-such-token"})
    line = create_key_error(config)
    assert "token 'no-such-token' not found" in line and "provision the token" in line
    check, detail = doctor_failure(config)
    assert check == "token, login and key" and "token 'no-such-token' not found" in detail


def test_a_wrong_pin_is_one_line(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, _ = softhsm_removable_token  # a token of its own: a refused PIN is remembered per token
    monkeypatch.setenv("SECRETSD_TEST_WRONG_PIN", "000000")
    config = write_config(tmp_path / "hsm.toml", token.provider_options("kek") | {"pin_env": "SECRETSD_TEST_WRONG_PIN"})
    line = create_key_error(config)
    assert "PIN incorrect" in line and "check environment variable SECRETSD_TEST_WRONG_PIN" in line
    assert "000000" not in line
    check, detail = doctor_failure(config)
    assert check == "token, login and key" and "PIN incorrect" in detail


@pytest.fixture
def pin_locked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every user login answers CKR_PIN_LOCKED (SoftHSM cannot be brought to; see the module docstring)."""
    real_lib = _Library.lib

    class LockedToken:
        def __init__(self, token: Any) -> None:
            self._token = token

        def open(self, **kwargs: Any) -> Any:
            if kwargs.get("user_pin") is not None:
                raise p11.PinLocked()
            return self._token.open(**kwargs)

    class LockedLib:
        def __init__(self, lib: Any) -> None:
            self._lib = lib

        def get_token(self, **kwargs: Any) -> LockedToken:
            return LockedToken(self._lib.get_token(**kwargs))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._lib, name)

    monkeypatch.setattr(_Library, "lib", lambda self: LockedLib(real_lib(self)))
    yield


def test_a_locked_pin_is_one_line(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path, pin_locked: None
) -> None:
    token, _ = softhsm_removable_token  # never logged in by this process, so login really is attempted
    config = write_config(tmp_path / "hsm.toml", token.provider_options("kek"))
    line = create_key_error(config)
    assert "is locked (too many wrong PINs)" in line and "--init-pin" in line and token.pin_env in line
    check, detail = doctor_failure(config)
    assert check == "token, login and key" and "is locked" in detail


def test_a_des3_key_under_the_label_is_one_line(
    options: dict[str, Any], plant: Callable[[str, Callable[[Any], None]], None], softhsm_token: SoftHSMToken,
    tmp_path: Path,
) -> None:
    label = options["key_label"]
    plant(label, lambda s: s.generate_key(KeyType.DES3, id=b"1", label=label, store=True))
    config = write_config(tmp_path / "hsm.toml", options)
    line = create_key_error(config)
    assert "is taken (DES3 secret key), not by a secretsd KEK" in line and "set key_label" in line
    check, detail = doctor_failure(config)
    assert check == "token, login and key" and "not an AES-256 key (it is DES3)" in detail
    with pytest.raises(ProviderConfigError, match=r"unfit to be a KEK: it is not an AES-256 key \(it is DES3\)"):
        Pkcs11KeyProvider.from_config(options, base_dir=softhsm_token.conf.parent)


def test_an_aes128_key_under_the_label_is_refused_by_name(
    options: dict[str, Any], plant: Callable[[str, Callable[[Any], None]], None], tmp_path: Path
) -> None:
    label = options["key_label"]
    plant(label, lambda s: s.generate_key(KeyType.AES, 128, id=b"1", label=label, store=True))
    config = write_config(tmp_path / "hsm.toml", options)
    assert "is taken (AES-128 secret key)" in create_key_error(config)
    assert "not an AES-256 key (it is AES-128)" in doctor_failure(config)[1]


def test_an_rsa_key_pair_under_the_label_is_one_line(
    options: dict[str, Any], plant: Callable[[str, Callable[[Any], None]], None], softhsm_token: SoftHSMToken,
    tmp_path: Path,
) -> None:
    label = options["key_label"]
    plant(label, lambda s: s.generate_keypair(KeyType.RSA, 1024, id=b"1", label=label, store=True))
    config = write_config(tmp_path / "hsm.toml", options)
    line = create_key_error(config)
    assert "is taken (RSA private key, RSA public key), not by a secretsd KEK" in line
    check, detail = doctor_failure(config)
    # Not "not found, create it": create-key would refuse the label, sending the operator in a circle.
    assert check == "token, login and key" and "not an AES-256 secret key (RSA private key, RSA public key)" in detail
    assert "not found" not in detail
    with pytest.raises(ProviderConfigError, match="not an AES-256 secret key"):
        Pkcs11KeyProvider.from_config(options, base_dir=softhsm_token.conf.parent)


def test_a_missing_pkcs11_binding_is_one_line(
    options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # python-pkcs11 is a base dependency; a damaged environment must still get one line. A None in
    # sys.modules makes the next import of that name fail, as if the package were not installed.
    for name in [m for m in sys.modules if m == "pkcs11" or m.startswith(("pkcs11.", "keyproviders.pkcs11"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pkcs11", None)
    config = write_config(tmp_path / "hsm.toml", options)
    for command in ("create-key", "doctor"):
        result = CliRunner().invoke(main, ["hsm", command, "--config", str(config)])
        assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
        assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
        assert "python-pkcs11 cannot be imported" in result.stderr and "pip install" in result.stderr
