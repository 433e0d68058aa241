"""The billing service's settings against a real secretsd whose master key is in a SoftHSM2 token.

No conftest.py: ``secretsd_server`` and ``softhsm_token`` come from the pytest plugin installed with
jarvis-secretsd (the test extra); the service itself needs only jarvis-secretsd-client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from billing.settings import load
from pydantic import ValidationError

DATABASE_URL = "postgresql://billing:pw@db.internal/billing"


@pytest.fixture
def daemon(secretsd_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The daemon, seeded with the service's secrets, and the service pointed at it."""
    secretsd_server.seed({"billing/DATABASE_URL": DATABASE_URL, "billing/PORT": "9000",
                          "shared/stripe-key": "sk_test_4eC39HqLyjWDarjtT1zdp7dc"})
    monkeypatch.setenv("SECRETSD_ADDR", secretsd_server.url)
    monkeypatch.setenv("SECRETSD_TOKEN", secretsd_server.admin_token)
    for name in ("BILLING_PORT", "BILLING_DATABASE_URL", "BILLING_STRIPE_KEY"):
        monkeypatch.delenv(name, raising=False)
    return secretsd_server


def test_settings_come_from_secretsd(daemon: Any) -> None:
    settings = load()
    assert settings.database_url.get_secret_value() == DATABASE_URL
    assert settings.stripe_key.get_secret_value().startswith("sk_test_")
    assert settings.port == 9000
    assert "sk_test_" not in repr(settings) and "pw@" not in repr(settings)


def test_an_environment_variable_overrides_secretsd(daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_PORT", "9100")
    assert load().port == 9100


def test_a_bad_stored_value_is_a_validation_error_that_quotes_no_value(daemon: Any) -> None:
    daemon.seed({"billing/PORT": "not-a-port"})
    with pytest.raises(ValidationError) as caught:
        load()
    assert "port" in str(caught.value) and "not-a-port" not in str(caught.value)


def test_the_master_key_is_in_the_token(daemon: Any, softhsm_token: Any) -> None:
    assert 'kind = "pkcs11"' in daemon.config_file.read_text()
    assert softhsm_token.label in daemon.config_file.read_text()
    assert not (daemon.data_dir / "master.key").exists()


def test_hsm_doctor_passes_on_the_daemons_token(daemon: Any) -> None:
    # What an operator runs: the HSM commands work from a plain `pip install jarvis-secretsd`.
    result = subprocess.run([sys.executable, "-m", "secretsd", "hsm", "doctor", "--config", str(daemon.config_file),  # noqa: S603
                             "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(check["status"] != "fail" for check in json.loads(result.stdout))
