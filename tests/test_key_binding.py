"""The key-provider binding rule (DESIGN invariant 6): a provider proves it holds the very key the store
was sealed with before it wraps anything; a different key under the same name is refused.

The attack: replace the HSM token (same label, same PIN, a key of the attacker's under the same key
label), the key file, or the passphrase. Unseal may still succeed through a recovery provider, and
before this rule a rekey or rewrap then wrapped new terms under the attacker's key.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keyproviders.file import FileKeyProvider
from keyproviders.pkcs11 import Pkcs11KeyProvider, create_key
from secretsd import errors
from secretsd.custody.keyring import prove_custody
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import initialize_store
from secretsd.runtime.masterkey import migrate, rewrap
from softhsm.pytest_plugin import SoftHSMToken
from tests.conftest import Api, running
from tests.helpers import DaemonProcess, http, run_cli
from tests.test_hsm import _terms, eventually, pkcs11_spec, write_config
from tests.test_keyprovider_pkcs11 import plant_impostor_token

FAST_KDF = {"memory_kib": 19 * 1024, "iterations": 2, "lanes": 1}


def replace_key_file(path: Path) -> None:
    """What an attacker with write access to the key's directory does: a key file of their own."""
    planted = path.with_name("planted.key")
    FileKeyProvider.create(planted)
    os.replace(planted, path)


async def status(api: Api) -> dict[str, Any]:
    resp = await api.client.get("/v1/sys/status", headers=api.auth())
    assert resp.status == 200
    return dict(await resp.json())


async def refused_rotation(api: Api) -> dict[str, Any]:
    before = await _terms(api.daemon.settings)
    resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
    body = dict(await resp.json())
    assert resp.status == 503, body
    assert body["type"].endswith(":provider-key-mismatch"), body
    assert await _terms(api.daemon.settings) == before  # nothing wrapped, nothing stored
    return body


# -- file and env-sealed: a replaced key file, a changed passphrase ------------------------------------
async def test_rule_a_replaced_key_file_never_wraps_a_new_term(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"kind": "file", "path": str(tmp_path / "master.key")},
                          recovery=[{"kind": "file", "path": str(tmp_path / "recovery.key")}])
    settings = load_settings(config, data_dir=tmp_path / "d")
    admin = (await initialize_store(settings)).admin_token

    # While the daemon serves: the file is replaced, and the refresh before a rekey would read it.
    async with running(settings, admin) as api:
        await api.put("app/k", "v1")
        assert (await status(api))["degraded"] is False
        replace_key_file(tmp_path / "master.key")
        body = await refused_rotation(api)
        assert body["detail"].startswith("refusing to wrap new keys: key provider file")
        assert "holds no key this store was sealed with" in body["detail"]
        await api.put("app/k", "v2")  # serving goes on from the DEKs in memory
        assert (await api.get("app/k"))["value"] == "v2"

    # After a restart: the recovery key unseals, the replaced file is reported and never wraps.
    async with running(settings, admin) as api:
        assert not api.daemon.barrier.sealed
        state = await status(api)
        assert state["degraded"] is True
        primary = state["providers"][0]
        assert primary["ok"] is False and "this store was sealed with" in primary["detail"], primary
        await refused_rotation(api)
        assert (await api.get("app/k"))["value"] == "v2"


async def test_rule_a_changed_passphrase_never_wraps_a_new_term(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BINDING_PASSPHRASE", "correct horse battery staple, the genuine one")
    config = write_config(tmp_path / "c.toml", {"kind": "env-sealed", "passphrase_env": "BINDING_PASSPHRASE",
                                                  **FAST_KDF},
                          recovery=[{"kind": "file", "path": str(tmp_path / "recovery.key")}])
    settings = load_settings(config, data_dir=tmp_path / "d")
    admin = (await initialize_store(settings)).admin_token
    monkeypatch.setenv("BINDING_PASSPHRASE", "a different passphrase that someone else chose")
    async with running(settings, admin) as api:
        assert not api.daemon.barrier.sealed  # the recovery key opened it
        state = await status(api)
        assert state["degraded"] is True and state["providers"][0]["ok"] is False
        await refused_rotation(api)


async def test_a_lone_replaced_key_stays_sealed_and_says_why(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "d")
    admin = (await initialize_store(settings)).admin_token
    replace_key_file(tmp_path / "d" / "master.key")
    async with running(settings, admin) as api:
        assert api.daemon.barrier.sealed
        assert "master.key" in (api.daemon.barrier.last_error or "")


async def test_rewrap_refuses_a_provider_that_does_not_hold_the_store_key(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "d")
    await initialize_store(settings)
    before = await _terms(settings)
    replace_key_file(tmp_path / "d" / "master.key")
    planted_ids = FileKeyProvider.load(tmp_path / "d" / "master.key").key_id()
    with pytest.raises(errors.SecretsdError):
        await rewrap(settings)
    assert await _terms(settings) == before
    # rotate() never ran: the planted file still holds only the attacker's one key.
    assert FileKeyProvider.load(tmp_path / "d" / "master.key").key_id() == planted_ids


async def test_rewrap_adds_no_new_custody_migrate_does(tmp_path: Path) -> None:
    """A provider the store has never seen is new custody: only `migrate`, which names it, adds it."""
    settings = load_settings(None, data_dir=tmp_path / "d")
    await initialize_store(settings)
    FileKeyProvider.create(tmp_path / "recovery.key")
    with_recovery = write_config(tmp_path / "r.toml", {"kind": "file", "path": "master.key"},
                                 recovery=[{"kind": "file", "path": str(tmp_path / "recovery.key")}])
    new = load_settings(with_recovery, data_dir=tmp_path / "d")
    with pytest.raises(errors.ProviderKeyMismatch, match="keyring migrate"):
        await rewrap(new, rotate=False)
    report = await migrate(settings, new)
    assert report.providers == ["file", "file"]
    await rewrap(new, rotate=False)  # now both are the store's custody


# -- pkcs11: the token itself swapped -----------------------------------------------------------------
def test_prove_custody_refuses_a_planted_token_under_the_same_names(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path
) -> None:
    token, token_dir = softhsm_removable_token
    spec = pkcs11_spec(token, "kek")
    create_key(token.provider_options("kek"), base_dir=tmp_path)
    settings = load_settings(write_config(tmp_path / "hsm.toml", spec), data_dir=tmp_path / "d")
    asyncio.run(initialize_store(settings))
    terms = asyncio.run(_terms(settings))
    plant_impostor_token(token, token_dir, tmp_path / "parked", "kek")
    impostor = Pkcs11KeyProvider.from_config(token.provider_options("kek"), base_dir=tmp_path)
    try:
        assert impostor.key_id() == terms[0].wrappings[0].key_id  # same names ...
        with pytest.raises(errors.ProviderKeyMismatch, match="not the key this store was sealed with"):
            prove_custody(impostor, terms)  # ... another key
        with pytest.raises(errors.ProviderKeyMismatch):
            prove_custody(impostor, terms, same_key_id_only=True)
    finally:
        impostor.close()


def _hsm_store(token: SoftHSMToken, tmp_path: Path, **top: Any) -> tuple[Path, str]:
    create_key(token.provider_options("kek"), base_dir=tmp_path)
    config = write_config(tmp_path / "hsm.toml", pkcs11_spec(token, "kek"),
                          recovery=[{"kind": "file", "path": str(tmp_path / "recovery.key")}], **top)
    out = run_cli("init", "--config", str(config), "--data-dir", str(tmp_path / "d"), "--json", check=True)
    return config, json.loads(out.stdout)["admin_token"]


def _planted_key_versions(token: SoftHSMToken) -> list[bytes]:
    """CKA_IDs of the objects labelled "kek" in whatever token now answers to the label (another process)."""
    code = (
        "import json, sys, pkcs11\n"
        "from pkcs11 import Attribute\n"
        "t = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])\n"
        "with t.open(user_pin=sys.argv[3]) as s:\n"
        "    print(json.dumps(sorted(o[Attribute.ID].decode() for o in s.get_objects({Attribute.LABEL: 'kek'}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, token.module, token.label, token.user_pin],
                         check=True, capture_output=True, text=True)
    return [v.encode() for v in json.loads(out.stdout)]


@pytest.mark.e2e
def test_rule_a_token_swapped_while_serving_never_wraps_and_the_genuine_one_is_taken_back(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path
) -> None:
    token, token_dir = softhsm_removable_token
    config, admin = _hsm_store(token, tmp_path, provider_check_seconds=0.3)
    daemon = DaemonProcess(tmp_path / "d", extra_args=["--config", str(config)]).start()
    url = daemon.url

    def state() -> dict[str, Any]:
        status: dict[str, Any] = http("GET", f"{url}/v1/sys/status", token=admin).body
        return status

    try:
        assert http("PUT", f"{url}/v1/secrets/app/k", token=admin, body={"value": "before"}).status == 200
        terms_before = asyncio.run(_terms(load_settings(config, data_dir=tmp_path / "d")))
        planted = plant_impostor_token(token, token_dir, tmp_path / "parked", "kek")
        try:
            # First the outage (the planted key appears a moment later), then the planted key is found.
            eventually(lambda: "not the key" in state()["providers"][0]["detail"])
            pkcs11_state = state()["providers"][0]
            assert pkcs11_state["ok"] is False
            assert "not the key" in pkcs11_state["detail"], pkcs11_state
            # Serving goes on from memory; what would wrap under the planted key is refused.
            assert http("GET", f"{url}/v1/secrets/app/k", token=admin).body["value"] == "before"
            rotate = http("POST", f"{url}/v1/sys/keyring/rotate", token=admin)
            assert rotate.status == 503 and rotate.body["type"].endswith(":provider-key-mismatch"), rotate.body
            assert asyncio.run(_terms(load_settings(config, data_dir=tmp_path / "d"))) == terms_before
            # An operator's rewrap must not create a new key version in the planted token either.
            out = run_cli("keyring", "rewrap", "--config", str(config), "--data-dir", str(tmp_path / "d"))
            assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
            assert "not the key this store was sealed with" in out.stderr
            assert _planted_key_versions(token) == [b"1"]
        finally:
            shutil.rmtree(planted)
            shutil.move(tmp_path / "parked", token_dir)
        try:
            eventually(lambda: state()["degraded"] is False)
        except AssertionError as exc:
            raise AssertionError(f"the genuine token was not taken back: {state()}\n{daemon.logs()[-4000:]}") from exc
        assert http("POST", f"{url}/v1/sys/keyring/rotate", token=admin).status == 200
        assert http("GET", f"{url}/v1/secrets/app/k", token=admin).body["value"] == "before"
    finally:
        daemon.stop()


def test_a_planted_token_at_start_is_reported_and_never_wraps(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path
) -> None:
    token, token_dir = softhsm_removable_token
    config, admin = _hsm_store(token, tmp_path)
    planted = plant_impostor_token(token, token_dir, tmp_path / "parked", "kek")
    del planted
    settings = load_settings(config, data_dir=tmp_path / "d")

    async def check() -> None:
        async with running(settings, admin) as api:
            assert not api.daemon.barrier.sealed  # the recovery key file opened it
            provider = (await status(api))["providers"][0]
            assert provider["ok"] is False and "not the key this store was sealed with" in provider["detail"]
            await refused_rotation(api)

    asyncio.run(check())


