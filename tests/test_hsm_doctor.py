"""``secretsd hsm doctor`` on a real SoftHSM2 token: the checks' order, and that it reports, never raises.

Doctor runs one function per check (keyproviders/pkcs11/tools.py: ``_CHECKS``); these tests pin
what an operator sees from that list: the check names in order, the first ``fail`` ending the run,
and a failure of any kind, expected or not, becoming that check's line instead of an exception.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keyproviders.pkcs11 import CheckResult, Pkcs11KeyProvider, doctor
from keyproviders.pkcs11.library import _library
from softhsm.pytest_plugin import SoftHSMKek
from tests.helpers import run_cli
from tests.test_hsm import write_config

CHECKS = [
    "configuration",
    "module loads",
    "token, login and key",
    "key attributes",
    "mechanism by trial",
    "wrap/unwrap latency",
]


def run_doctor(options: dict[str, Any], base_dir: Path) -> list[CheckResult]:
    """doctor, with the contract that it returns rather than raises made explicit in the failure."""
    try:
        return doctor(options, base_dir=base_dir, rounds=2)
    except Exception as exc:  # the contract under test: nothing may escape
        pytest.fail(f"doctor raised {exc!r}; it must report every failure as a check line")


def logins(kek: SoftHSMKek) -> int:
    """How many providers of this process share the token's login (each doctor run must give its back)."""
    login = _library(kek.token.module)._logins.get(kek.token.label)
    return login.users if login is not None else 0


def test_doctor_runs_every_check_in_order_on_a_good_token(softhsm_kek: SoftHSMKek) -> None:
    before = logins(softhsm_kek)
    results = run_doctor(softhsm_kek.options, softhsm_kek.token.conf.parent)
    assert [(r.name, r.status) for r in results] == [(name, "ok") for name in CHECKS], results
    assert results[2].detail == f"logged in; versions [1], current {softhsm_kek.key_id}"
    assert results[4].detail == "CKM_AES_GCM wraps, unwraps and rejects the wrong AAD"
    assert logins(softhsm_kek) == before, "doctor must close the provider it opened"


def _missing_module(options: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return {**options, "module": str(tmp_path / "no-such-pkcs11.so")}


def _not_a_module(options: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "not-pkcs11.so").write_bytes(b"this is not a shared object\n")
    return {**options, "module": str(tmp_path / "not-pkcs11.so")}


def _wrong_pin(options: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "pin").write_text("0000-wrong\n")
    (tmp_path / "pin").chmod(0o600)
    return {**{k: v for k, v in options.items() if k != "pin_env"}, "pin_file": "pin"}


def _missing_key(options: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return {**options, "key_label": "no-such-key"}


@pytest.mark.parametrize(
    ("fault", "failing_check", "message"),
    [
        (_missing_module, "configuration", "does not exist"),
        (_not_a_module, "module loads", "cannot load or initialise PKCS#11 module"),
        (_wrong_pin, "token, login and key", "PIN incorrect"),
        (_missing_key, "token, login and key", "key 'no-such-key' not found"),
    ],
    ids=["missing-module", "not-a-module", "wrong-pin", "missing-key"],
)
def test_doctor_stops_at_the_first_failing_check_and_never_raises(
    softhsm_kek: SoftHSMKek,
    tmp_path: Path,
    fault: Callable[[dict[str, Any], Path], dict[str, Any]],
    failing_check: str,
    message: str,
) -> None:
    before = logins(softhsm_kek)
    results = run_doctor(fault(softhsm_kek.options, tmp_path), tmp_path)
    upto = CHECKS.index(failing_check) + 1
    assert [r.name for r in results] == CHECKS[:upto], results
    assert [r.status for r in results] == ["ok"] * (upto - 1) + ["fail"], results
    assert message in results[-1].detail, results[-1]
    assert logins(softhsm_kek) == before


def test_doctor_reports_an_unexpected_exception_as_a_fail_line_and_still_closes(
    softhsm_kek: SoftHSMKek, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault we cannot provoke in SoftHSM (a library bug in wrap): the one place a mock stands in."""

    def broken_wrap(self: Pkcs11KeyProvider, key: bytes, aad: bytes) -> Any:
        raise RuntimeError  # no message: the line names the exception type instead

    monkeypatch.setattr(Pkcs11KeyProvider, "wrap", broken_wrap)
    before = logins(softhsm_kek)
    results = run_doctor(softhsm_kek.options, softhsm_kek.token.conf.parent)
    assert [r.name for r in results] == CHECKS[:5], results
    assert results[-1] == CheckResult("mechanism by trial", "fail", "RuntimeError")
    assert logins(softhsm_kek) == before, "a failing later check must still close the provider"


def test_cli_doctor_json_lists_the_checks_up_to_the_failure(softhsm_kek: SoftHSMKek, tmp_path: Path) -> None:
    config = write_config(tmp_path / "hsm.toml", {"kind": "pkcs11", **_missing_key(softhsm_kek.options, tmp_path)})
    result = run_cli("hsm", "doctor", "--config", str(config), "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    checks = json.loads(result.stdout)
    assert [(c["check"], c["status"]) for c in checks] == [
        ("configuration", "ok"),
        ("module loads", "ok"),
        ("token, login and key", "fail"),
    ]
    assert set(checks[0]) == {"check", "status", "detail"}
