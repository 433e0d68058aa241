"""HSM custody end to end on a real SoftHSM2 token: provisioning, serving, outages, master-key lifecycle."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyproviders.base import KeyProvider
from keyproviders.file import FileKeyProvider
from keyproviders.pkcs11 import Pkcs11KeyProvider, create_key
from secretsd.custody.keyring import unwrap_term
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import Daemon, initialize_store
from secretsd.runtime.masterkey import migrate, rewrap
from softhsm.pytest_plugin import SoftHSMToken
from tests.conftest import Api, running
from tests.helpers import DaemonProcess, http, run_cli


def toml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower()


def write_config(path: Path, provider: dict[str, Any], *, recovery: list[dict[str, Any]] | None = None,
                 **top: Any) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    lines.append("[key_provider]")
    lines += [f"{k} = {toml_value(v)}" for k, v in provider.items()]
    for extra in recovery or []:
        lines.append("[[recovery_providers]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def pkcs11_spec(token: SoftHSMToken, label: str) -> dict[str, Any]:
    return {"kind": "pkcs11", **token.provider_options(label)}


@pytest.fixture
def hsm_key(softhsm_token: SoftHSMToken) -> dict[str, Any]:
    label = f"kek-{secrets.token_hex(4)}"
    create_key(softhsm_token.provider_options(label), base_dir=softhsm_token.conf.parent)
    return pkcs11_spec(softhsm_token, label)


def eventually(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


# -- provisioning and serving through the CLI ------------------------------------------------------
@pytest.mark.e2e
def test_create_key_doctor_init_and_serve_with_pkcs11(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    label = f"kek-{secrets.token_hex(4)}"
    config = write_config(tmp_path / "hsm.toml", pkcs11_spec(softhsm_token, label), data_dir=str(tmp_path / "d"))
    created = run_cli("hsm", "create-key", "--config", str(config), "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout) == {"key_id": f"{label}/v1"}
    again = run_cli("hsm", "create-key", "--config", str(config))
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.splitlines()) == 1
    doctor = run_cli("hsm", "doctor", "--config", str(config), "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = json.loads(doctor.stdout)
    assert all(c["status"] != "fail" for c in checks) and any("sensitive" in c["detail"] for c in checks)

    init = run_cli("init", "--config", str(config), "--json")
    assert init.returncode == 0, init.stderr
    doc = json.loads(init.stdout)
    assert doc["provider"] == "pkcs11" and doc["key_id"] == f"{label}/v1"
    assert not (tmp_path / "d" / "master.key").exists()
    token = doc["admin_token"]
    daemon = DaemonProcess(tmp_path / "d", extra_args=["--config", str(config)]).start()
    try:
        assert http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": "in-hsm"}).status == 200
        assert http("GET", f"{daemon.url}/v1/secrets/app/k", token=token).body["value"] == "in-hsm"
        status = http("GET", f"{daemon.url}/v1/sys/status", token=token).body
        assert status["provider"] == "pkcs11" and status["key_id"] == f"{label}/v1" and not status["degraded"]
        assert http("POST", f"{daemon.url}/v1/sys/keyring/rotate", token=token).body == {"active_term": 2}
    finally:
        daemon.stop()


def test_doctor_fails_loudly_on_a_missing_key(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    config = write_config(tmp_path / "hsm.toml", pkcs11_spec(softhsm_token, "no-such-key"))
    result = run_cli("hsm", "doctor", "--config", str(config))
    assert result.returncode == 1 and "fail" in result.stdout


def test_hsm_commands_need_a_pkcs11_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "file.toml", {"kind": "file"})
    result = run_cli("hsm", "doctor", "--config", str(config))
    assert result.returncode == 1 and "kind = \"pkcs11\"" in result.stderr


@pytest.mark.e2e
def test_wrong_pin_starts_sealed_with_an_actionable_error(
    softhsm_token: SoftHSMToken, hsm_key: dict[str, Any], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "hsm.toml", hsm_key)
    token = json.loads(run_cli("init", "--config", str(config), "--data-dir", str(tmp_path / "d"),
                               "--json", check=True).stdout)["admin_token"]
    # A PIN that cannot turn up in a log by chance ("000000" does, inside a counter-based request id).
    wrong_pin = f"wrong-pin-{secrets.token_hex(6)}"
    wrong = {"SECRETSD_TEST_BAD_PIN": wrong_pin}
    bad = write_config(tmp_path / "bad.toml", hsm_key | {"pin_env": "SECRETSD_TEST_BAD_PIN"})
    daemon = DaemonProcess(tmp_path / "d", extra_args=["--config", str(bad)], env=wrong).start(wait_ready=False)
    try:
        assert http("GET", f"{daemon.url}/readyz").status == 503
        status = http("GET", f"{daemon.url}/v1/sys/status", token=token).body
        assert status["sealed"] is True and "PIN" in status["seal_error"]
        assert softhsm_token.user_pin not in daemon.logs() and wrong_pin not in daemon.logs()
    finally:
        daemon.stop()


# -- an HSM that goes away while the daemon runs ----------------------------------------------------
@pytest.mark.e2e
def test_token_removed_and_restored_while_the_daemon_serves(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path
) -> None:
    token_info, token_dir = softhsm_removable_token
    create_key(token_info.provider_options("kek"), base_dir=tmp_path)
    config = write_config(tmp_path / "hsm.toml", pkcs11_spec(token_info, "kek"), provider_check_seconds=0.3)
    token = json.loads(run_cli("init", "--config", str(config), "--data-dir", str(tmp_path / "d"),
                               "--json", check=True).stdout)["admin_token"]
    daemon = DaemonProcess(tmp_path / "d", extra_args=["--config", str(config)]).start()
    url = daemon.url
    try:
        http("PUT", f"{url}/v1/secrets/app/k", token=token, body={"value": "before"})
        parked = tmp_path / "parked-token"
        shutil.move(token_dir, parked)
        try:
            eventually(lambda: http("GET", f"{url}/v1/sys/status", token=token).body["degraded"] is True)
            ready = http("GET", f"{url}/readyz")
            assert ready.status == 200 and ready.body["checks"]["providers"] == "degraded"
            # Reads and writes go on from the keys in memory; what needs the KEK says so.
            assert http("GET", f"{url}/v1/secrets/app/k", token=token).body["value"] == "before"
            assert http("PUT", f"{url}/v1/secrets/app/k", token=token, body={"value": "during"}).status == 200
            rotate = http("POST", f"{url}/v1/sys/keyring/rotate", token=token)
            assert rotate.status == 503 and rotate.body["type"].endswith(":provider-unavailable")
        finally:
            shutil.move(parked, token_dir)
        eventually(lambda: http("GET", f"{url}/v1/sys/status", token=token).body["degraded"] is False)
        assert http("POST", f"{url}/v1/sys/keyring/rotate", token=token).status == 200
        assert http("GET", f"{url}/v1/secrets/app/k", token=token).body["value"] == "during"
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        daemon.stop()


# -- in-process: concurrency, several providers, and no key on disk --------------------------------
@pytest.fixture
async def hsm_api(hsm_key: dict[str, Any], tmp_path: Path) -> AsyncIterator[Api]:
    config = write_config(tmp_path / "hsm.toml", hsm_key)
    settings = load_settings(config, data_dir=tmp_path / "d")
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        yield api


async def test_concurrent_requests_during_unseal_and_rekey(hsm_api: Api) -> None:
    for i in range(20):
        await hsm_api.put(f"app/{i}", f"value-{i}")

    async def reader(i: int) -> None:
        for _ in range(10):
            assert (await hsm_api.get(f"app/{i % 20}"))["value"].startswith(f"value-{i % 20}")

    async def writer(i: int) -> None:
        for n in range(5):
            await hsm_api.put(f"app/{i % 20}", f"value-{i % 20}-{n}")

    async def rekeyer() -> None:
        for _ in range(4):
            resp = await hsm_api.client.post("/v1/sys/keyring/rotate", headers=hsm_api.auth())
            assert resp.status == 200

    async def unsealer() -> None:
        for _ in range(4):
            await hsm_api.daemon.barrier.reload()

    await asyncio.gather(*[reader(i) for i in range(16)], *[writer(i) for i in range(8)], rekeyer(), unsealer())
    assert hsm_api.daemon.barrier.active_term == 5
    for i in range(20):
        value = (await hsm_api.get(f"app/{i}"))["value"]
        assert value == f"value-{i}" or value.startswith(f"value-{i}-")


async def test_no_unwrapped_key_reaches_disk(hsm_api: Api, softhsm_token: SoftHSMToken) -> None:
    for i in range(5):
        await hsm_api.put(f"app/{i}", f"v{i}")
    await hsm_api.client.post("/v1/sys/keyring/rotate", headers=hsm_api.auth())
    providers = hsm_api.daemon.providers.available()
    deks = [await unwrap_term(providers, t) for t in await hsm_api.daemon.storage.keyring_terms()]
    assert len(deks) == 2
    data_dir = hsm_api.daemon.settings.require_data_dir()
    files = [f for f in [*data_dir.rglob("*"), *softhsm_token.token_dir.rglob("*")] if f.is_file()]
    blob = b"".join(f.read_bytes() for f in files)
    for dek in deks:
        assert dek not in blob and dek.hex().encode() not in blob
    attrs = next(iter(providers[0].kek_attributes().values()))  # type: ignore[attr-defined]
    from pkcs11 import Attribute

    assert attrs[Attribute.SENSITIVE] is True and attrs[Attribute.EXTRACTABLE] is False
    assert attrs[Attribute.NEVER_EXTRACTABLE] is True


async def test_any_configured_provider_unseals(hsm_key: dict[str, Any], tmp_path: Path) -> None:
    both = write_config(tmp_path / "both.toml", hsm_key,
                        recovery=[{"kind": "file", "path": str(tmp_path / "recovery.key")}])
    settings = load_settings(both, data_dir=tmp_path / "d")
    admin = (await initialize_store(settings)).admin_token
    terms = await _terms(settings)
    assert [w.provider for w in terms[0].wrappings] == ["pkcs11", "file"]

    # The HSM refuses (a wrong PIN): the recovery key file alone unseals, reads work, and the
    # daemon says it is degraded; a new term cannot be made without every provider.
    broken = write_config(tmp_path / "broken.toml", hsm_key | {"pin_env": "SECRETSD_TEST_NO_SUCH_PIN"},
                          recovery=[{"kind": "file", "path": str(tmp_path / "recovery.key")}])
    async with running(load_settings(broken, data_dir=tmp_path / "d"), admin) as api:
        client, daemon = api.client, api.daemon
        assert not daemon.barrier.sealed
        await api.put("app/k", "v")
        assert (await api.get("app/k"))["value"] == "v"
        status = await (await client.get("/v1/sys/status", headers=api.auth())).json()
        assert status["degraded"] is True and [p["ok"] for p in status["providers"]] == [False, True]
        resp = await client.post("/v1/sys/keyring/rotate", headers=api.auth())
        assert resp.status == 503 and "every configured key provider" in (await resp.json())["detail"]
    # And the HSM alone opens it too.
    await _assert_opens(load_settings(write_config(tmp_path / "hsm.toml", hsm_key), data_dir=tmp_path / "d"))


# -- master-key lifecycle -----------------------------------------------------------------------------
async def _terms(settings: Settings) -> list[Any]:
    from secretsd.runtime.daemon import build_storage

    storage = build_storage(settings)
    await storage.open()
    try:
        return await storage.keyring_terms()
    finally:
        await storage.close()


async def _assert_opens(settings: Settings, values: dict[str, str] | None = None) -> None:
    daemon = Daemon(settings)
    await daemon.start()
    try:
        assert not daemon.barrier.sealed, daemon.barrier.last_error
        from secretsd.domain.identity import Principal

        who = Principal("test", ("root",), "token")
        for path, value in (values or {}).items():
            assert (await daemon.secrets.get(who, path)).value == value
    finally:
        await daemon.stop()


async def _assert_does_not_open(settings: Settings) -> None:
    daemon = Daemon(settings)
    await daemon.start()
    try:
        assert daemon.barrier.sealed
    finally:
        await daemon.stop()


async def _store_with_terms(settings: Settings, n_terms: int) -> dict[str, str]:
    await initialize_store(settings)
    daemon = Daemon(settings)
    await daemon.start()
    from secretsd.domain.identity import Principal

    who = Principal("test", ("root",), "token")
    values = {}
    try:
        for t in range(n_terms):
            for i in range(3):
                values[f"app/t{t}/{i}"] = f"value-{t}-{i}"
                await daemon.secrets.put(who, f"app/t{t}/{i}", values[f"app/t{t}/{i}"])
            if t < n_terms - 1:
                await daemon.barrier.rekey()
    finally:
        await daemon.stop()
    return values


@pytest.fixture
def fail_wrap_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[type[KeyProvider], int], None]]:
    """Fault injection: the provider class's wrap fails after N successful calls (an interrupted run)."""

    def arm(cls: type[KeyProvider], n: int) -> None:
        real = cls.wrap
        calls = {"n": 0}

        def wrap(self: Any, key: bytes, aad: bytes) -> Any:
            calls["n"] += 1
            if calls["n"] > n:
                raise OSError("simulated crash mid-run")
            return real(self, key, aad)

        monkeypatch.setattr(cls, "wrap", wrap)

    yield arm


async def test_rewrap_rotates_the_kek_and_survives_interruption(
    tmp_path: Path, fail_wrap_after: Callable[[type[KeyProvider], int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(None, data_dir=tmp_path / "d")
    values = await _store_with_terms(settings, 3)
    old_ids = {w.key_id for t in await _terms(settings) for w in t.wrappings}

    fail_wrap_after(FileKeyProvider, 1)
    with pytest.raises(OSError, match="simulated"):
        await rewrap(settings)
    monkeypatch.undo()
    mixed = {w.key_id for t in await _terms(settings) for w in t.wrappings}
    assert len(mixed) == 2  # one term moved to the new KEK version, the others not yet
    await _assert_opens(settings, values)

    report = await rewrap(settings, rotate=False)
    assert report.terms == 2  # only the terms still under the old version were redone
    assert set(report.retired_key_ids) == old_ids
    after = {w.key_id for t in await _terms(settings) for w in t.wrappings}
    assert len(after) == 1 and after.isdisjoint(old_ids)
    await _assert_opens(settings, values)


async def test_rewrap_with_pkcs11_creates_a_new_kek_version(hsm_key: dict[str, Any], tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path / "hsm.toml", hsm_key), data_dir=tmp_path / "d")
    values = await _store_with_terms(settings, 2)
    report = await rewrap(settings)
    assert report.key_ids == [f"{hsm_key['key_label']}/v2"]
    assert report.retired_key_ids == [f"{hsm_key['key_label']}/v1"]
    await _assert_opens(settings, values)


async def test_migrate_file_to_pkcs11_interrupted_then_completed(
    hsm_key: dict[str, Any], tmp_path: Path, fail_wrap_after: Callable[[type[KeyProvider], int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = load_settings(None, data_dir=tmp_path / "d")
    values = await _store_with_terms(old, 3)
    new = load_settings(write_config(tmp_path / "hsm.toml", hsm_key), data_dir=tmp_path / "d")

    fail_wrap_after(Pkcs11KeyProvider, 1)
    with pytest.raises(OSError, match="simulated"):
        await migrate(old, new)
    monkeypatch.undo()
    await _assert_opens(old, values)  # phase one interrupted: the old key still opens everything

    report = await migrate(old, new)
    assert report.providers == ["pkcs11"] and report.retired_key_ids
    assert all([w.provider for w in t.wrappings] == ["pkcs11"] for t in await _terms(new))
    await _assert_opens(new, values)
    await _assert_does_not_open(load_settings(None, data_dir=tmp_path / "d", unseal_retry_max_seconds=0.1))


async def test_migrate_interrupted_while_removing_old_wrappings(
    hsm_key: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = load_settings(None, data_dir=tmp_path / "d")
    values = await _store_with_terms(old, 3)
    new = load_settings(write_config(tmp_path / "hsm.toml", hsm_key), data_dir=tmp_path / "d")
    from secretsd.storage.sqlite import SQLiteStorage

    real = SQLiteStorage.replace_keyring_wrappings
    calls = {"n": 0}

    async def flaky(self: SQLiteStorage, term: int, expected: Any, wrappings: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # three adds succeeded, one removal succeeded, the next "crashes"
            raise OSError("simulated crash while pruning")
        await real(self, term, expected, wrappings)

    monkeypatch.setattr(SQLiteStorage, "replace_keyring_wrappings", flaky)
    with pytest.raises(OSError, match="pruning"):
        await migrate(old, new)
    monkeypatch.undo()
    await _assert_opens(new, values)  # every term already has its new wrapping
    await migrate(old, new)
    await _assert_opens(new, values)


@pytest.mark.e2e
def test_migrate_while_the_daemon_serves(hsm_key: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = json.loads(run_cli("init", "--data-dir", str(data), "--json", check=True).stdout)["admin_token"]
    daemon = DaemonProcess(data).start()
    try:
        http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": "kept"})
        new = write_config(tmp_path / "hsm.toml", hsm_key)
        result = run_cli("keyring", "migrate", "--data-dir", str(data), "--to", str(new), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["providers"] == ["pkcs11"]
        assert http("GET", f"{daemon.url}/v1/secrets/app/k", token=token).body["value"] == "kept"
    finally:
        daemon.stop()
    moved = DaemonProcess(data, extra_args=["--config", str(new)]).start()
    try:
        assert http("GET", f"{moved.url}/v1/secrets/app/k", token=token).body["value"] == "kept"
    finally:
        moved.stop()


# -- daemons running while the master key changes under them -------------------------------------
async def test_a_running_daemon_wraps_new_terms_under_the_newest_kek_after_rewrap(
    hsm_api: Api,
) -> None:
    settings = hsm_api.daemon.settings
    report = await rewrap(settings)  # another process makes v2 and re-wraps every term
    (new_id,) = report.key_ids
    resp = await hsm_api.client.post("/v1/sys/keyring/rotate", headers=hsm_api.auth())
    assert resp.status == 200
    newest = (await _terms(settings))[-1]
    assert [w.key_id for w in newest.wrappings] == [new_id]


async def test_a_daemon_with_the_pre_migration_config_refuses_to_add_terms(
    hsm_key: dict[str, Any], tmp_path: Path
) -> None:
    old = load_settings(None, data_dir=tmp_path / "d")
    admin = (await initialize_store(old)).admin_token
    async with running(old, admin) as api:
        client = api.client
        await api.put("app/k", "v")
        await migrate(old, load_settings(write_config(tmp_path / "hsm.toml", hsm_key), data_dir=tmp_path / "d"))
        assert (await api.get("app/k"))["value"] == "v"  # it keeps serving from memory
        resp = await client.post("/v1/sys/keyring/rotate", headers=api.auth())
        doc = await resp.json()
        assert resp.status == 503 and "was the keyring migrated" in doc["detail"]
        assert len(await _terms(old)) == 1
