"""The env-sealed key provider: conformance, the passphrase rule, KDF parameters and caching.

Tests run at the production floor of the KDF (Argon2id m=19 MiB, t=2, p=1, ~40 ms a derivation)
rather than through a test-only bypass: the floor is cheap enough, and no code path exists that
an operator could use to configure a weaker KDF.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyproviders import (
    KeyProvider,
    KeyProviderError,
    ProviderConfigError,
    UnwrapError,
    WrappedKey,
    create_provider,
    env_sealed,
)
from keyproviders.env_sealed import ARGON2_COST, EnvSealedKeyProvider, KdfParams, passphrase_weakness
from keyproviders.registry import available_providers
from keyproviders.testing import AAD, KeyProviderConformance

ENV = "SECRETSD_TEST_PASSPHRASE"
PASSPHRASE = "vT7#qL2m!Rx9@wZk4$Hn"
OTHER_PASSPHRASE = "Jd8%fP3s^Yc6&Bt1*Gu"
FAST = {"memory_kib": 19 * 1024, "iterations": 2, "lanes": 1}  # the enforced minimum


def options(**extra: Any) -> dict[str, Any]:
    return {"passphrase_env": ENV, **FAST, **extra}


def make(tmp_path: Path, **extra: Any) -> EnvSealedKeyProvider:
    return EnvSealedKeyProvider.from_config(options(**extra), base_dir=tmp_path)


@pytest.fixture(autouse=True)
def passphrase(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ENV, PASSPHRASE)
    return PASSPHRASE


class TestEnvSealedConformance(KeyProviderConformance):
    @pytest.fixture
    def provider(self, tmp_path: Path) -> Iterator[KeyProvider]:
        p = make(tmp_path)
        yield p
        p.close()

    @pytest.fixture
    def impostor(self, provider: KeyProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyProvider]:
        # The same variable, holding a passphrase someone else chose.
        monkeypatch.setenv(ENV, "an entirely different passphrase, chosen by someone else")
        p = make(tmp_path)
        yield p
        p.close()


# -- registry and configuration ------------------------------------------------------------------
def test_registry_finds_env_sealed(tmp_path: Path) -> None:
    assert "env-sealed" in available_providers()
    p = create_provider({"kind": "env-sealed", **options()}, base_dir=tmp_path, create=True)
    assert isinstance(p, EnvSealedKeyProvider)
    assert list(tmp_path.iterdir()) == []  # nothing written: the passphrase is the only state


def test_passphrase_in_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match=r"environment variable.*passphrase_env") as info:
        make(tmp_path, passphrase=PASSPHRASE)
    assert PASSPHRASE not in str(info.value)


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match=r"unknown option.*memory_mib"):
        make(tmp_path, memory_mib=64)


def test_passphrase_env_is_required(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match="passphrase_env is required"):
        EnvSealedKeyProvider.from_config(FAST, base_dir=tmp_path)


def test_passphrase_pasted_into_passphrase_env_is_not_echoed(tmp_path: Path) -> None:
    for value in (PASSPHRASE, "CorrectlyShapedButLowercaseName_x1"):
        with pytest.raises(ProviderConfigError) as info:
            EnvSealedKeyProvider.from_config({"passphrase_env": value}, base_dir=tmp_path)
        assert value not in str(info.value)


def test_missing_env_var_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not retryable: a running process never sees a variable set later. The operator sets it and
    # restarts; until then the daemon stays up, sealed, showing this message.
    monkeypatch.delenv(ENV)
    with pytest.raises(ProviderConfigError, match=f"{ENV} \\(passphrase_env\\) is not set") as info:
        make(tmp_path)
    assert not info.value.retryable


def test_empty_env_var_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "")
    with pytest.raises(ProviderConfigError, match="not set or empty"):
        make(tmp_path)


@pytest.mark.parametrize(("name", "value"), [
    ("memory_kib", 19 * 1024 - 1), ("memory_kib", 8), ("iterations", 1), ("lanes", 0),
])
def test_kdf_cost_minimums_are_enforced(tmp_path: Path, name: str, value: int) -> None:
    with pytest.raises(ProviderConfigError, match=f"{name} = {value} is below the minimum"):
        make(tmp_path, **{name: value})


@pytest.mark.parametrize(("name", "value"), [
    ("memory_kib", 8 * 1024 * 1024), ("iterations", 1000), ("lanes", 64), ("lanes", True), ("iterations", "3"),
])
def test_kdf_cost_must_be_a_sane_integer(tmp_path: Path, name: str, value: object) -> None:
    with pytest.raises(ProviderConfigError, match=name):
        make(tmp_path, **{name: value})


def test_default_cost_is_rfc9106_second_option() -> None:
    assert {k: v[0] for k, v in ARGON2_COST.items()} == {"memory_kib": 65536, "iterations": 3, "lanes": 4}


# -- the passphrase rule ---------------------------------------------------------------------------
WEAK = {
    "short": ("Xk9#mQ2!", "shorter than 16"),
    "few distinct": ("aAaAaAbBbBbB1!1!1!", "fewer than 8 distinct"),
    "repeated unit": ("Xk9#mQ2!Xk9#mQ2!", "repeated"),
    "sequence": ("abcdefghijklmnopqrstuvwxyz", "consecutive"),
    "digit runs": ("1234-5678-9012-3456-7890", "consecutive"),
    "one class": ("qmzvhtrwkpxbnfjd", "one kind of character"),
    "digits only": ("8472910365018274", "one kind of character"),
    "common words": ("P@ssw0rd-Changeme-2024!", "common passwords"),
    "xkcd": ("correct horse battery staple", "common passwords"),
    "trailing newline": (PASSPHRASE + "\n", "whitespace"),
}


@pytest.mark.parametrize("case", sorted(WEAK))
def test_weak_passphrase_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    weak, reason = WEAK[case]
    monkeypatch.setenv(ENV, weak)
    with pytest.raises(ProviderConfigError, match=f"too weak: .*{reason}") as info:
        make(tmp_path)
    assert weak.strip() not in str(info.value)


@pytest.mark.parametrize("good", [
    PASSPHRASE,
    "tidal-orbit-velvet-cactus-ripple",          # diceware with separators
    "tidalorbitvelvetcactusripple",              # one class, but long
    "3f9a0c7be1d24456a8b2c3d4e5f60718",          # openssl rand -hex 16
    "Zm9vYmFyYmF6cXV4cXV1eA+/x2Q=",              # openssl rand -base64
    "pässwörd-ünïcode-ßtrong-42",                # non-ASCII is fine
])
def test_strong_passphrases_are_accepted(good: str) -> None:
    assert passphrase_weakness(good) is None


# -- wrapped keys ------------------------------------------------------------------------------------
def test_params_and_salt_are_in_the_wrapped_key_and_survive_json(tmp_path: Path) -> None:
    p = make(tmp_path)
    wrapped = p.wrap(secrets.token_bytes(32), AAD)
    params = dict(wrapped.params)
    assert params == {"scheme": 1, "kdf": "argon2id", "salt": params["salt"], **FAST}
    assert len(KdfParams.from_record(params).salt) >= 16
    again = WrappedKey.from_json(wrapped.to_json())
    assert again.params == wrapped.params
    assert json.loads(wrapped.to_json())["params"] == params


def test_another_provider_with_the_same_passphrase_unwraps(tmp_path: Path) -> None:
    # What a restart looks like: a new process, a new current salt, old records still open.
    key = secrets.token_bytes(32)
    wrapped = make(tmp_path).wrap(key, AAD)
    other = make(tmp_path, memory_kib=32 * 1024)  # the configured cost applies to new versions only
    assert other.key_id() != wrapped.key_id
    assert other.unwrap(WrappedKey.from_json(wrapped.to_json()), AAD) == key


def test_different_passphrase_fails_with_unwrap_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = make(tmp_path).wrap(secrets.token_bytes(32), AAD)
    monkeypatch.setenv(ENV, OTHER_PASSPHRASE)
    other = make(tmp_path)
    with pytest.raises(UnwrapError, match="different passphrase") as info:
        other.unwrap(wrapped, AAD)
    assert OTHER_PASSPHRASE not in str(info.value) and PASSPHRASE not in str(info.value)


def test_same_salt_different_passphrase_gives_a_different_key_id(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    params = KdfParams(kdf="argon2id", salt=b"s" * 16, **FAST)
    ids = set()
    for phrase in (PASSPHRASE, OTHER_PASSPHRASE):
        ids.add(env_sealed._subkeys(env_sealed.derive_root_key(phrase.encode(), params))[1])
    assert len(ids) == 2


def test_key_id_does_not_reveal_the_kek(tmp_path: Path) -> None:
    p = make(tmp_path)
    kek, kid = p._derive(p._current)
    assert kid == p.key_id() and kid.startswith("env-sealed-")
    assert kek.hex()[:16] not in kid


@pytest.mark.parametrize(("field", "value"), [
    ("memory_kib", 8), ("iterations", 1), ("memory_kib", 2**40), ("lanes", 1000),
    ("salt", "c2hvcnQ="), ("salt", "not base64!"), ("kdf", "pbkdf2"), ("scheme", 2), ("iterations", "3"),
])
def test_tampered_kdf_params_are_refused_before_deriving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         field: str, value: object) -> None:
    # A record whose author chose a cheap KDF must not make us publish a cheap-to-guess key id, and
    # one asking for terabytes must not make us allocate them.
    p = make(tmp_path)
    wrapped = p.wrap(secrets.token_bytes(32), AAD)
    tampered = dataclasses.replace(wrapped, params={**wrapped.params, field: value})

    def no_derivation(passphrase: bytes, params: KdfParams) -> bytes:
        raise AssertionError("derived with tampered parameters")

    monkeypatch.setattr(env_sealed, "derive_root_key", no_derivation)
    with pytest.raises(UnwrapError, match="unusable env-sealed KDF parameters"):
        p.unwrap(tampered, AAD)


def test_changed_salt_fails_cleanly(tmp_path: Path) -> None:
    p = make(tmp_path)
    wrapped = p.wrap(secrets.token_bytes(32), AAD)
    salt = "AAAAAAAAAAAAAAAAAAAAAA=="
    with pytest.raises(UnwrapError):
        p.unwrap(dataclasses.replace(wrapped, params={**wrapped.params, "salt": salt}), AAD)


# -- caching, rotation, lifecycle ------------------------------------------------------------------
def test_derived_key_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[KdfParams] = []
    real = env_sealed.derive_root_key

    def counting(passphrase: bytes, params: KdfParams) -> bytes:
        calls.append(params)
        return real(passphrase, params)

    monkeypatch.setattr(env_sealed, "derive_root_key", counting)
    writer = make(tmp_path)
    assert len(calls) == 1  # the current version, derived once at construction
    keys = [secrets.token_bytes(32) for _ in range(20)]
    wrapped = [writer.wrap(k, AAD) for k in keys]
    assert len(calls) == 1  # wrapping never derives

    reader = make(tmp_path)  # a restarted daemon: its own current version ...
    calls.clear()
    assert [reader.unwrap(w, AAD) for w in wrapped] == keys
    assert len(calls) == 1  # ... plus exactly one derivation to unseal all 20


def test_rotate_makes_a_new_salt_current_and_old_versions_unwrap(tmp_path: Path) -> None:
    p = make(tmp_path)
    key = secrets.token_bytes(32)
    before = p.wrap(key, AAD)
    new_id = p.rotate()
    after = p.wrap(key, AAD)
    assert after.key_id == new_id != before.key_id
    assert after.params["salt"] != before.params["salt"]
    assert p.unwrap(before, AAD) == key == p.unwrap(after, AAD)
    assert p.health().ok


def test_close_drops_cached_keys(tmp_path: Path) -> None:
    p = make(tmp_path)
    wrapped = p.wrap(secrets.token_bytes(32), AAD)
    p.close()
    assert p._keks == {} and p._passphrase is None
    assert not p.health().ok
    with pytest.raises(ValueError, match="closed"):
        p.unwrap(wrapped, AAD)


def test_health_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make(tmp_path)

    class Exploding:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(PASSPHRASE)

    monkeypatch.setattr(p, "_lock", Exploding())
    health = p.health()
    assert not health.ok and PASSPHRASE not in health.detail


def test_scrypt_fallback_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = secrets.token_bytes(32)
    argon_wrapped = make(tmp_path).wrap(key, AAD)
    monkeypatch.setattr(env_sealed, "argon2id_available", lambda: False)
    p = make(tmp_path)
    wrapped = p.wrap(key, AAD)
    assert wrapped.params["kdf"] == "scrypt" and wrapped.params["n"] == 2**17
    assert p.unwrap(WrappedKey.from_json(wrapped.to_json()), AAD) == key
    assert p.unwrap(argon_wrapped, AAD) == key  # Argon2id records still open where it exists


# -- the passphrase never leaks ----------------------------------------------------------------------
def test_passphrase_never_appears_in_records_reprs_or_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make(tmp_path)
    wrapped = p.wrap(secrets.token_bytes(32), AAD)
    p.rotate()
    texts = [wrapped.to_json(), repr(wrapped), repr(p), str(p.health()), p.key_id()]
    for bad in (
        lambda: make(tmp_path, passphrase=PASSPHRASE),
        lambda: make(tmp_path, iterations=1),
        lambda: make(tmp_path, bogus=1),
        lambda: p.unwrap(dataclasses.replace(wrapped, key_id="env-sealed-0000"), AAD),
        lambda: p.unwrap(wrapped, b"wrong aad"),
    ):
        with pytest.raises(KeyProviderError) as info:
            bad()
        texts += [str(info.value), repr(info.value)]
    monkeypatch.setenv(ENV, PASSPHRASE[:10])
    with pytest.raises(KeyProviderError) as info:
        make(tmp_path)
    texts += [str(info.value), repr(info.value)]
    for text in texts:
        assert PASSPHRASE not in text and PASSPHRASE[:10] not in text
        assert PASSPHRASE.encode().hex() not in text


def test_direct_construction_enforces_the_same_rules() -> None:
    with pytest.raises(ProviderConfigError, match="too weak"):
        EnvSealedKeyProvider(b"short", passphrase_env=ENV, **FAST)
    with pytest.raises(ProviderConfigError, match="below the minimum"):
        EnvSealedKeyProvider(PASSPHRASE.encode(), passphrase_env=ENV, **{**FAST, "memory_kib": 64})
