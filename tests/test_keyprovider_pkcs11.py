"""The pkcs11 key provider against a real SoftHSM2 token (fixtures from softhsm.pytest_plugin)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyproviders.errors import (
    KeyMismatchError,
    KeyProviderError,
    ProviderAuthError,
    ProviderConfigError,
    ProviderKeyNotFoundError,
    ProviderUnavailableError,
    UnwrapError,
)
from keyproviders.pkcs11 import (
    MECHANISM_GCM,
    MECHANISM_KWP,
    Attribute,
    KeyType,
    Pkcs11KeyProvider,
    check_kek_attributes,
    create_key,
    doctor,
)
from keyproviders.testing import AAD, KeyProviderConformance
from softhsm.pytest_plugin import SoftHSMKek, SoftHSMToken

MakeKek = Callable[..., SoftHSMKek]


@contextlib.contextmanager
def opened(options: dict[str, Any], *, base_dir: Path) -> Iterator[Pkcs11KeyProvider]:
    p = Pkcs11KeyProvider.from_config(options, base_dir=base_dir)
    try:
        yield p
    finally:
        p.close()


def opened_kek(kek: SoftHSMKek, **overrides: Any) -> contextlib.AbstractContextManager[Pkcs11KeyProvider]:
    return opened({**kek.options, **overrides}, base_dir=kek.token.conf.parent)


@pytest.fixture(params=[MECHANISM_GCM, MECHANISM_KWP])
def mechanism(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def kek(make_softhsm_kek: MakeKek, mechanism: str) -> SoftHSMKek:
    return make_softhsm_kek(mechanism)


@pytest.fixture
def provider(kek: SoftHSMKek) -> Iterator[Pkcs11KeyProvider]:
    with opened_kek(kek) as p:
        yield p


@pytest.fixture
def impostor(kek: SoftHSMKek, softhsm_removable_token: tuple[SoftHSMToken, Path]) -> Iterator[Pkcs11KeyProvider]:
    """Another token holding a key under the very same label and version: the same key id."""
    other, _ = softhsm_removable_token
    options = {**kek.options, "token_label": other.label}
    create_key(options, base_dir=kek.token.conf.parent)
    with opened(options, base_dir=kek.token.conf.parent) as p:
        assert p.key_id() == kek.key_id
        yield p


class TestPkcs11Conformance(KeyProviderConformance):
    """The shared suite, once per mechanism: it uses the parametrised ``provider`` fixture above."""


# -- the KEK -----------------------------------------------------------------------------------
def test_kek_attributes_read_back_from_token(provider: Pkcs11KeyProvider, mechanism: str) -> None:
    provider.rotate()
    for version, attrs in provider.kek_attributes().items():
        assert attrs[Attribute.SENSITIVE] is True, version
        assert attrs[Attribute.EXTRACTABLE] is False, version
        assert attrs[Attribute.ALWAYS_SENSITIVE] is True, version
        assert attrs[Attribute.NEVER_EXTRACTABLE] is True, version
        assert attrs[Attribute.TOKEN] is True, version
        assert attrs[Attribute.KEY_TYPE] == KeyType.AES and attrs[Attribute.VALUE_LEN] == 32
        # Least privilege: exactly the capabilities the mechanism needs.
        gcm = mechanism == MECHANISM_GCM
        assert (attrs[Attribute.ENCRYPT], attrs[Attribute.DECRYPT]) == (gcm, gcm)
        assert (attrs[Attribute.WRAP], attrs[Attribute.UNWRAP]) == (not gcm, not gcm)


def test_rule_kek_must_be_sensitive_and_never_extractable() -> None:
    good = {
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE_LEN: 32,
        Attribute.TOKEN: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
    }
    check_kek_attributes(good, what="kek")
    for attr, value in [
        (Attribute.SENSITIVE, False),
        (Attribute.EXTRACTABLE, True),
        (Attribute.TOKEN, False),
        (Attribute.VALUE_LEN, 16),
    ]:
        with pytest.raises(ProviderConfigError, match="unfit to be a KEK"):
            check_kek_attributes({**good, attr: value}, what="kek")


def test_create_key_refuses_existing_label(softhsm_kek: SoftHSMKek) -> None:
    with pytest.raises(ProviderConfigError, match="already exists"):
        create_key(softhsm_kek.options, base_dir=softhsm_kek.token.conf.parent)


def test_key_made_for_one_mechanism_is_refused_for_the_other(make_softhsm_kek: MakeKek) -> None:
    kek = make_softhsm_kek(MECHANISM_GCM)
    with (
        opened_kek(kek, mechanism=MECHANISM_KWP) as p,
        pytest.raises(ProviderConfigError, match="does not allow"),
    ):
        p.wrap(secrets.token_bytes(32), AAD)


def test_unwrap_uses_the_recorded_mechanism(make_softhsm_kek: MakeKek) -> None:
    """A record carries its mechanism, so changing the configured one does not orphan old records."""
    kek = make_softhsm_kek(MECHANISM_GCM)
    key = secrets.token_bytes(32)
    with opened_kek(kek) as p:
        wrapped = p.wrap(key, AAD)
    with opened_kek(kek, mechanism=MECHANISM_KWP) as p:
        assert p.unwrap(wrapped, AAD) == key


def test_kwp_binds_aad_even_though_the_mechanism_cannot(make_softhsm_kek: MakeKek) -> None:
    with opened_kek(make_softhsm_kek(MECHANISM_KWP)) as p:
        wrapped = p.wrap(secrets.token_bytes(32), b"term=1")
        with pytest.raises(UnwrapError):
            p.unwrap(wrapped, b"term=2")
        with pytest.raises(UnwrapError):
            p.unwrap(dataclasses.replace(wrapped, nonce=secrets.token_bytes(16)), b"term=1")


def test_rotation_is_seen_by_another_provider(softhsm_kek: SoftHSMKek) -> None:
    with opened_kek(softhsm_kek) as early, opened_kek(softhsm_kek) as rotator:
        new_id = rotator.rotate()
        wrapped = rotator.wrap(b"k" * 32, AAD)
        assert wrapped.key_id == new_id
        assert early.unwrap(wrapped, AAD) == b"k" * 32  # re-finds the new version on demand


# -- configuration and credentials ---------------------------------------------------------------
def test_pin_in_config_is_refused(softhsm_kek: SoftHSMKek) -> None:
    options = {**softhsm_kek.options, "pin": softhsm_kek.token.user_pin}
    with pytest.raises(ProviderConfigError, match="never be written in the configuration") as info:
        Pkcs11KeyProvider.from_config(options, base_dir=softhsm_kek.token.conf.parent)
    assert softhsm_kek.token.user_pin not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, "unknown option"),
        ({"slot": 0}, "not a slot number"),
        ({"pin_file": "/run/pin"}, "exactly one of pin_env and pin_file"),
        ({"pin_env": None}, "exactly one of pin_env and pin_file"),
        ({"module": "libsofthsm2.so"}, "absolute path"),
        ({"module": "/nonexistent/libpkcs11.so"}, "does not exist"),
        ({"token_label": None}, "'token_label' is required"),
        ({"mechanism": "aes-cbc"}, "not supported"),
    ],
)
def test_bad_options_are_refused(softhsm_kek: SoftHSMKek, change: dict[str, Any], message: str) -> None:
    options = {k: v for k, v in {**softhsm_kek.options, **change}.items() if v is not None}
    with pytest.raises(ProviderConfigError, match=message):
        Pkcs11KeyProvider.from_config(options, base_dir=softhsm_kek.token.conf.parent)


def test_wrong_pin_is_an_auth_error_and_is_not_retried(
    softhsm_kek: SoftHSMKek, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WRONG_PIN", "not-the-pin")
    wrong = {**softhsm_kek.options, "pin_env": "WRONG_PIN"}
    base = softhsm_kek.token.conf.parent
    with pytest.raises(ProviderAuthError) as info:
        Pkcs11KeyProvider.from_config(wrong, base_dir=base)
    message = str(info.value)
    assert "PIN incorrect for token 'secretsd-test'" in message
    assert "WRONG_PIN" in message  # says where the PIN came from
    assert "not-the-pin" not in message
    # A real HSM locks the PIN after a few failures: the same wrong PIN is not presented again.
    with pytest.raises(ProviderAuthError, match="not tried again"):
        Pkcs11KeyProvider.from_config(wrong, base_dir=base)
    with opened_kek(softhsm_kek) as p:  # the right PIN still works
        assert p.health().ok


def test_missing_token_is_a_config_error(softhsm_kek: SoftHSMKek) -> None:
    """A token never seen is a configuration problem (a typo, an unprovisioned token): retrying a
    typo forever would hide it, and it is not ProviderKeyNotFoundError, whose meaning is "the token
    answers but lacks the key" (create-key's cue to create one). A token lost *after* it was seen
    is ProviderUnavailableError instead (see the removal test)."""
    with pytest.raises(ProviderConfigError) as info:
        Pkcs11KeyProvider.from_config(
            {**softhsm_kek.options, "token_label": "no-such-token"}, base_dir=softhsm_kek.token.conf.parent
        )
    assert f"token 'no-such-token' not found in module {softhsm_kek.token.module}" in str(info.value)


def test_missing_key_is_key_not_found(softhsm_token: SoftHSMToken) -> None:
    options = softhsm_token.provider_options("never-created")
    with pytest.raises(ProviderKeyNotFoundError, match="key 'never-created' not found in token 'secretsd-test'"):
        Pkcs11KeyProvider.from_config(options, base_dir=softhsm_token.conf.parent)


def test_pin_from_owner_only_file(softhsm_kek: SoftHSMKek, tmp_path: Path) -> None:
    pin_file = tmp_path / "hsm-pin"
    pin_file.write_text(softhsm_kek.token.user_pin + "\n")  # as `echo PIN > file` writes it
    pin_file.chmod(0o600)
    options = {k: v for k, v in softhsm_kek.options.items() if k != "pin_env"}
    with opened(options | {"pin_file": "hsm-pin"}, base_dir=tmp_path) as p:
        assert p.unwrap(p.wrap(b"x" * 32, AAD), AAD) == b"x" * 32

    pin_file.chmod(0o644)
    with pytest.raises(ProviderConfigError, match="chmod 600"):
        Pkcs11KeyProvider.from_config(options | {"pin_file": str(pin_file)}, base_dir=tmp_path)
    with pytest.raises(ProviderConfigError, match="does not exist"):
        Pkcs11KeyProvider.from_config(options | {"pin_file": "missing"}, base_dir=tmp_path)


# -- concurrency ---------------------------------------------------------------------------------
def test_many_threads_never_crash_or_mix_keys(make_softhsm_kek: MakeKek) -> None:
    """SoftHSM runs without locks under python-pkcs11; this fails (or crashes) without ours."""
    stack = contextlib.ExitStack()
    gcm = stack.enter_context(opened_kek(make_softhsm_kek(MECHANISM_GCM)))
    kwp = stack.enter_context(opened_kek(make_softhsm_kek(MECHANISM_KWP)))
    failures: list[str] = []
    start = threading.Barrier(16)

    def worker(n: int) -> None:
        p = gcm if n % 2 else kwp
        start.wait()
        for i in range(40):
            key, aad = secrets.token_bytes(32), f"term={n}:{i}".encode()
            try:
                if p.unwrap(p.wrap(key, aad), aad) != key:
                    failures.append(f"thread {n}: wrong key")
                if i == 20 and n in (0, 1):
                    p.rotate()
                if i % 10 == 0 and not p.health().ok:
                    failures.append(f"thread {n}: unhealthy")
            except Exception as exc:
                failures.append(f"thread {n}: {exc!r}")

    with stack:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


def test_closing_one_provider_does_not_log_out_another(softhsm_kek: SoftHSMKek) -> None:
    """Closing a logged-in session logs out every session of the process: the login is shared."""
    with opened_kek(softhsm_kek) as survivor:
        with opened_kek(softhsm_kek):
            pass
        assert survivor.unwrap(survivor.wrap(b"s" * 32, AAD), AAD) == b"s" * 32


# -- the token goes away and comes back ------------------------------------------------------------
def test_token_removed_and_restored_while_live(
    softhsm_removable_token: tuple[SoftHSMToken, Path], softhsm_kek: SoftHSMKek, tmp_path: Path
) -> None:
    """SoftHSM 2.6.1: moving a token's directory away kills its handles (OBJECT_HANDLE_INVALID);
    moving it back does not revive them until the library is re-initialised. The provider must
    report the outage as retryable, keep the process up, and recover by itself."""
    token, token_dir = softhsm_removable_token
    options = token.provider_options("kek")
    create_key(options, base_dir=tmp_path)  # a new token: create_key re-scans the slots for it
    key = secrets.token_bytes(32)
    with opened(options, base_dir=tmp_path) as p, opened_kek(softhsm_kek) as bystander:
        wrapped = p.wrap(key, AAD)
        parked = tmp_path / "parked"
        shutil.move(token_dir, parked)
        try:
            with pytest.raises(ProviderUnavailableError) as info:
                p.unwrap(wrapped, AAD)
            assert info.value.retryable
            assert not p.health().ok
            # The re-initialisation killed every session of the library; the provider on the
            # other token notices and reconnects without an error.
            assert bystander.unwrap(bystander.wrap(b"b" * 32, AAD), AAD) == b"b" * 32
        finally:
            shutil.move(parked, token_dir)
        assert _eventually(lambda: p.unwrap(wrapped, AAD)) == key
        assert p.health().ok
        assert p.unwrap(p.wrap(key, AAD), AAD) == key


def test_unwrapped_keys_never_reach_the_token_directory(make_softhsm_kek: MakeKek, softhsm_token: SoftHSMToken) -> None:
    """The KEK stays in the token; DEKs pass through it only as session (in-memory) objects."""
    deks = [secrets.token_bytes(32) for _ in range(8)]
    for mechanism in (MECHANISM_GCM, MECHANISM_KWP):
        with opened_kek(make_softhsm_kek(mechanism)) as p:
            for dek in deks:
                assert p.unwrap(p.wrap(dek, AAD), AAD) == dek
            p.rotate()
            for dek in deks:
                assert p.unwrap(p.wrap(dek, AAD), AAD) == dek
    stored = b"".join(f.read_bytes() for f in softhsm_token.token_dir.rglob("*") if f.is_file())
    assert stored, "the token directory should hold the token's files"
    for dek in deks:
        assert dek not in stored
        assert dek.hex().encode() not in stored


# -- doctor --------------------------------------------------------------------------------------
def test_doctor_passes_on_a_good_token(kek: SoftHSMKek) -> None:
    results = doctor(kek.options, base_dir=kek.token.conf.parent, rounds=3)
    assert [r.status for r in results] == ["ok"] * 6, results
    assert "median" in results[-1].detail


def test_doctor_stops_at_login_with_the_wrong_pin(softhsm_kek: SoftHSMKek, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCTOR_PIN", "0000-wrong")
    results = doctor({**softhsm_kek.options, "pin_env": "DOCTOR_PIN"}, base_dir=Path("."))
    assert [r.status for r in results] == ["ok", "ok", "fail"]
    assert "PIN incorrect" in results[-1].detail


# -- helpers -------------------------------------------------------------------------------------
def _eventually(call: Callable[[], bytes], timeout: float = 15.0) -> bytes:
    """Retry a call that fails with a retryable error until it succeeds (the provider backs off)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KeyProviderError as exc:
            if not exc.retryable or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the key is pinned: a replaced token or an imported key is refused --------------------------------
def swap_in_blank_token(genuine: SoftHSMToken, token_dir: Path, parked: Path) -> Path:
    """Park the genuine token's directory and put an empty token with the same label and PINs in its place."""
    shutil.move(token_dir, parked)
    before = set(genuine.token_dir.iterdir())
    subprocess.run(
        [*("softhsm2-util", "--init-token", "--free", "--label", genuine.label),
         *("--so-pin", genuine.so_pin, "--pin", genuine.user_pin)],
        check=True, capture_output=True,
    )
    (planted,) = set(genuine.token_dir.iterdir()) - before
    return planted


def plant_impostor_token(genuine: SoftHSMToken, token_dir: Path, parked: Path, key_label: str) -> Path:
    """Swap the genuine token for one with the same label and PIN holding another key of that label."""
    planted = swap_in_blank_token(genuine, token_dir, parked)
    # The attacker's key is made by another process, as it would be (this one holds a session).
    code = ("import sys, json; from keyproviders.pkcs11 import create_key; "
            "create_key(json.loads(sys.argv[1]), base_dir=sys.argv[2])")
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(genuine.provider_options(key_label)), str(parked.parent)],
        check=True, capture_output=True,
    )
    return planted


@pytest.mark.parametrize("mechanism_name", [MECHANISM_GCM, MECHANISM_KWP])
def test_rule_a_replaced_token_is_refused_until_the_genuine_one_returns(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path, mechanism_name: str
) -> None:
    token, token_dir = softhsm_removable_token
    options = token.provider_options("kek", mechanism_name)
    create_key(options, base_dir=tmp_path)
    key = secrets.token_bytes(32)
    with opened(options, base_dir=tmp_path) as p:
        genuine = p.wrap(key, AAD)
        planted = plant_impostor_token(token, token_dir, tmp_path / "parked", "kek")
        try:
            # Same token label, same PIN, same key label and version: only the key differs.
            deadline = time.monotonic() + 15
            while True:  # first the outage (retryable, backing off), then the planted key is found
                with pytest.raises(KeyProviderError) as info:
                    p.wrap(key, AAD)  # never succeeds: that would be a wrap under the planted key
                if isinstance(info.value, KeyMismatchError) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            error = info.value
            assert isinstance(error, KeyMismatchError), error
            assert "not the key this provider found" in str(error)
            assert not p.health().ok
            with pytest.raises(KeyProviderError):
                p.unwrap(genuine, AAD)
            with pytest.raises(KeyProviderError):
                p.rotate()
            with pytest.raises(KeyProviderError):
                p.refresh()
        finally:
            shutil.rmtree(planted)
            shutil.move(tmp_path / "parked", token_dir)
        # The mismatch is reported until the next attempt (0.5 s, never growing), then the genuine
        # token is taken back.
        deadline = time.monotonic() + 15
        while True:
            try:
                assert p.unwrap(genuine, AAD) == key
                break
            except KeyMismatchError:
                assert time.monotonic() < deadline, "the genuine token was not taken back"
                time.sleep(0.1)
        assert p.health().ok
        assert p.unwrap(p.wrap(key, AAD), AAD) == key


_IMPORT_KEK = """
import secrets, sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
module, label, pin, key_label = sys.argv[1:5]
with pkcs11.lib(module).get_token(token_label=label).open(rw=True, user_pin=pin) as session:
    session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: secrets.token_bytes(32), Attribute.LABEL: key_label, Attribute.ID: b"1",
        Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
    })
"""


def _import_kek(token: SoftHSMToken, key_label: str) -> None:
    """Put an AES key whose value existed outside the token into it (CKA_LOCAL false)."""
    subprocess.run(
        [sys.executable, "-c", _IMPORT_KEK, token.module, token.label, token.user_pin, key_label],
        check=True, capture_output=True,
    )


def test_rule_kek_must_be_generated_in_the_token(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token, _ = softhsm_removable_token
    options = token.provider_options("imported")
    _import_kek(token, "imported")
    with pytest.raises(ProviderConfigError, match="CKA_LOCAL is false"):
        Pkcs11KeyProvider.from_config(options, base_dir=tmp_path)
    with opened({**options, "allow_imported_keys": True}, base_dir=tmp_path) as p:
        assert p.unwrap(p.wrap(b"k" * 32, AAD), AAD) == b"k" * 32
    assert "imported into the token" in caplog.text
    with pytest.raises(ProviderConfigError, match="must be true or false"):
        Pkcs11KeyProvider.from_config({**options, "allow_imported_keys": "yes"}, base_dir=tmp_path)
