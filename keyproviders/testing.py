"""The conformance suite every key provider must pass.

Subclass ``KeyProviderConformance`` in a test module and provide a ``provider`` fixture that yields
a ready provider (and closes it afterwards)::

    class TestMyProvider(KeyProviderConformance):
        @pytest.fixture
        def provider(self) -> Iterator[KeyProvider]:
            p = MyProvider(...)
            yield p
            p.close()

Providers that cannot rotate their own KEK set ``supports_rotation = False``.

The suite also needs an ``impostor`` fixture: a provider configured exactly like ``provider`` (same
name, same options, so the same key id where ids are names) but holding a *different* key, as an
attacker would leave behind by replacing a token, a key file or a passphrase. The store-binding rule
of secretsd (a provider proves custody by unwrapping what the store holds before it may wrap) rests
on what these cases check: an impostor never opens a genuine record, and a genuine provider never
opens an impostor's.
"""

from __future__ import annotations

import dataclasses
import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest

from keyproviders.base import KeyProvider, ProviderHealth, WrappedKey
from keyproviders.errors import KeyProviderError, UnwrapError

AAD = b"secretsd:dek:term=1"


class KeyProviderConformance:
    supports_rotation: bool = True

    def test_wrap_unwrap_round_trip(self, provider: KeyProvider) -> None:
        key = secrets.token_bytes(32)
        wrapped = provider.wrap(key, AAD)
        assert provider.unwrap(wrapped, AAD) == key

    def test_wrapped_key_is_self_describing(self, provider: KeyProvider) -> None:
        wrapped = provider.wrap(secrets.token_bytes(32), AAD)
        assert wrapped.provider == provider.name
        assert wrapped.key_id == provider.key_id()
        assert wrapped.mechanism
        assert wrapped.ciphertext
        assert wrapped.format == 1

    def test_wrapped_key_survives_json(self, provider: KeyProvider) -> None:
        key = secrets.token_bytes(32)
        wrapped = provider.wrap(key, AAD)
        again = WrappedKey.from_json(wrapped.to_json())
        assert again == wrapped
        assert provider.unwrap(again, AAD) == key

    def test_ciphertext_does_not_contain_key(self, provider: KeyProvider) -> None:
        key = secrets.token_bytes(32)
        wrapped = provider.wrap(key, AAD)
        assert key not in wrapped.ciphertext
        assert key.hex() not in wrapped.to_json()

    def test_each_wrap_is_fresh(self, provider: KeyProvider) -> None:
        key = secrets.token_bytes(32)
        assert provider.wrap(key, AAD).ciphertext != provider.wrap(key, AAD).ciphertext

    def test_wrong_aad_fails(self, provider: KeyProvider) -> None:
        wrapped = provider.wrap(secrets.token_bytes(32), AAD)
        with pytest.raises(UnwrapError):
            provider.unwrap(wrapped, b"secretsd:dek:term=2")

    def test_tampered_ciphertext_fails(self, provider: KeyProvider) -> None:
        wrapped = provider.wrap(secrets.token_bytes(32), AAD)
        flipped = bytes([wrapped.ciphertext[0] ^ 1]) + wrapped.ciphertext[1:]
        with pytest.raises(UnwrapError):
            provider.unwrap(dataclasses.replace(wrapped, ciphertext=flipped), AAD)

    def test_unknown_key_id_fails_cleanly(self, provider: KeyProvider) -> None:
        wrapped = provider.wrap(secrets.token_bytes(32), AAD)
        with pytest.raises(KeyProviderError):
            provider.unwrap(dataclasses.replace(wrapped, key_id=wrapped.key_id + "-gone"), AAD)

    def test_foreign_provider_record_is_refused(self, provider: KeyProvider) -> None:
        wrapped = provider.wrap(secrets.token_bytes(32), AAD)
        with pytest.raises(KeyProviderError):
            provider.unwrap(dataclasses.replace(wrapped, provider="someone-else"), AAD)

    def test_impostor_cannot_unwrap_a_genuine_record(
        self, provider: KeyProvider, impostor: KeyProvider
    ) -> None:
        key = secrets.token_bytes(32)
        wrapped = provider.wrap(key, AAD)
        with pytest.raises(KeyProviderError):
            opened = impostor.unwrap(wrapped, AAD)
            assert opened != key, "the impostor opened a genuine record"

    def test_genuine_provider_cannot_unwrap_an_impostor_record(
        self, provider: KeyProvider, impostor: KeyProvider
    ) -> None:
        planted = impostor.wrap(secrets.token_bytes(32), AAD)
        with pytest.raises(KeyProviderError):
            provider.unwrap(planted, AAD)

    def test_impostor_key_id_never_claims_a_genuine_record_silently(
        self, provider: KeyProvider, impostor: KeyProvider
    ) -> None:
        # Ids may collide (pkcs11 names keys by label and version), so the only safe signal of
        # custody is a successful unwrap; this pins that a colliding id still fails to unwrap.
        wrapped = provider.wrap(secrets.token_bytes(32), AAD)
        if impostor.key_id() != wrapped.key_id:
            with pytest.raises(KeyProviderError):
                impostor.unwrap(dataclasses.replace(wrapped, key_id=impostor.key_id()), AAD)

    def test_health_reports_ok(self, provider: KeyProvider) -> None:
        health = provider.health()
        assert isinstance(health, ProviderHealth)
        assert health.ok, health.detail

    def test_key_id_is_stable(self, provider: KeyProvider) -> None:
        assert provider.key_id() == provider.key_id()

    def test_rotation_keeps_old_keys_unwrappable(self, provider: KeyProvider) -> None:
        if not self.supports_rotation:
            pytest.skip("provider does not rotate its own KEK")
        key = secrets.token_bytes(32)
        before = provider.wrap(key, AAD)
        old_id = provider.key_id()
        new_id = provider.rotate()
        assert new_id != old_id
        assert provider.key_id() == new_id
        after = provider.wrap(key, AAD)
        assert after.key_id == new_id
        assert provider.unwrap(before, AAD) == key
        assert provider.unwrap(after, AAD) == key

    def test_refresh_keeps_the_provider_working(self, provider: KeyProvider) -> None:
        key = secrets.token_bytes(32)
        before = provider.wrap(key, AAD)
        provider.refresh()
        assert provider.unwrap(before, AAD) == key
        assert provider.unwrap(provider.wrap(key, AAD), AAD) == key

    def test_concurrent_wraps_never_mix_keys(self, provider: KeyProvider) -> None:
        keys = [secrets.token_bytes(32) for _ in range(64)]

        def round_trip(key: bytes) -> bool:
            return provider.unwrap(provider.wrap(key, AAD), AAD) == key

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(round_trip, keys))
