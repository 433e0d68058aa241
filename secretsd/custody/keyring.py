"""The keyring: DEK terms unwrapped by a key provider and held in memory after unseal.

This module is also the boundary where key-provider exceptions become secretsd errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import keyproviders
from keyproviders import KeyProvider, WrappedKey
from secretsd import errors
from secretsd.custody.crypto import DataKey, dek_aad, new_dek
from secretsd.records import KeyringTerm

log = logging.getLogger("secretsd.custody.keyring")


def convert_provider_error(exc: keyproviders.KeyProviderError) -> errors.SecretsdError:
    """Map a key-provider failure to the secretsd hierarchy, keeping its actionable message."""
    message = str(exc) or exc.__class__.__name__
    if isinstance(exc, keyproviders.ProviderUnavailableError):
        return errors.ProviderUnavailable(message)
    if isinstance(exc, keyproviders.ProviderKeyNotFoundError):
        return errors.ProviderKeyNotFound(message)
    if isinstance(exc, keyproviders.ProviderAuthError):
        return errors.ProviderAuthFailed(message)
    if isinstance(exc, keyproviders.KeyMismatchError):
        return errors.ProviderKeyMismatch(message)
    if isinstance(exc, keyproviders.ProviderConfigError):
        return errors.ConfigError(message)
    if isinstance(exc, keyproviders.UnwrapError):
        return errors.CryptoError(f"a wrapped data key failed authentication ({message})")
    return errors.KeyProviderFailure(message)


@contextmanager
def provider_errors() -> Iterator[None]:
    try:
        yield
    except keyproviders.KeyProviderError as exc:
        raise convert_provider_error(exc) from exc


@dataclass
class Keyring:
    keys: dict[int, DataKey]
    active_term: int
    encryptions: dict[int, int]

    def key(self, term: int) -> DataKey | None:
        return self.keys.get(term)


async def wrap_for_all(
    providers: Sequence[KeyProvider], dek: bytes, term: int
) -> tuple[WrappedKey, ...]:
    """Wrap a DEK once per unseal provider; each wrapping alone can unseal the term."""
    wrapped = []
    with provider_errors():
        for provider in providers:
            wrapped.append(await asyncio.to_thread(provider.wrap, dek, dek_aad(term)))
    return tuple(wrapped)


async def unwrap_term(providers: Sequence[KeyProvider], term: KeyringTerm) -> bytes:
    """Unwrap a term with the first provider that holds one of its wrappings."""
    failure: errors.SecretsdError | None = None
    for wrapped in term.wrappings:
        for provider in providers:
            if provider.name != wrapped.provider:
                continue
            try:
                return await asyncio.to_thread(provider.unwrap, wrapped, dek_aad(term.term))
            except keyproviders.KeyProviderError as exc:
                failure = (_not_the_store_key(provider, wrapped) if isinstance(exc, keyproviders.UnwrapError)
                           else convert_provider_error(exc))
                failure.__cause__ = exc
                log.warning("provider %s could not unwrap term %d: %s", provider.name, term.term, failure)
    if failure is not None:
        raise failure
    kinds = ", ".join(sorted({w.provider for w in term.wrappings}))
    raise errors.ProviderKeyNotFound(
        f"keyring term {term.term} is wrapped only by provider(s) {kinds}, none of which is configured"
    )


def _not_the_store_key(provider: KeyProvider, wrapped: WrappedKey) -> errors.ProviderKeyMismatch:
    return errors.ProviderKeyMismatch(
        f"key provider {provider.name} holds a key named {wrapped.key_id} that does not open the store's "
        "wrapping made with that name: it is not the key this store was sealed with (a replaced token or "
        "key file, a changed passphrase), or the stored wrapping was altered. It will not be used"
    )


def prove_custody(
    provider: KeyProvider,
    terms: Sequence[KeyringTerm],
    known: Mapping[int, DataKey] | None = None,
    *,
    same_key_id_only: bool = False,
) -> None:
    """The rule: a provider wraps for a store only once it has opened one of the store's wrappings.

    Blocking (one unwrap per key version tried). Each of the provider's key versions found in the
    store is tried once, its current version first; the unwrapped DEK must also equal the one in
    memory when ``known`` is given. Ids are names, not keys (pkcs11 names keys by label and version,
    which a planted token can copy), so only an unwrap proves anything. Raises
    ``ProviderKeyMismatch`` if nothing opens; ``same_key_id_only`` (for a provider an operator is
    adding) asks only that a wrapping under its current id, if the store holds one, opens.
    """
    current = provider.key_id()
    if not getattr(provider, "can_unwrap", True):
        _prove_by_public_key_id(provider, current, terms, same_key_id_only=same_key_id_only)
        return
    newest_per_id: dict[str, tuple[KeyringTerm, WrappedKey]] = {}
    for term in sorted(terms, key=lambda t: t.term):
        for wrapped in term.wrappings:
            if wrapped.provider == provider.name and (wrapped.key_id == current or not same_key_id_only):
                newest_per_id[wrapped.key_id] = (term, wrapped)
    unknown = errors.ProviderKeyMismatch(
        f"key provider {provider.name} (key {current}) holds no key this store was sealed with: it opens none "
        "of the store's wrappings. If it is a new provider, add it with 'secretsd keyring migrate --to CONFIG'; "
        "if it should be the store's key, its token or key file was replaced or its passphrase changed"
    )
    if not newest_per_id:
        if same_key_id_only:
            return
        raise unknown
    candidates = sorted(newest_per_id.values(), key=lambda tw: tw[1].key_id != current)
    mismatch: errors.ProviderKeyMismatch | None = None
    for term, wrapped in candidates:
        try:
            dek = provider.unwrap(wrapped, dek_aad(term.term))
        except keyproviders.ProviderKeyNotFoundError:
            continue  # a version this provider does not hold (another provider of the same kind)
        except (keyproviders.UnwrapError, keyproviders.KeyMismatchError):
            mismatch = _not_the_store_key(provider, wrapped)
            continue
        except keyproviders.KeyProviderError as exc:
            raise convert_provider_error(exc) from exc
        expected = None if known is None else known.get(term.term)
        if expected is not None and not expected.matches(dek):
            mismatch = _not_the_store_key(provider, wrapped)
            continue
        return
    raise mismatch or unknown


def _prove_by_public_key_id(
    provider: KeyProvider, current: str, terms: Sequence[KeyringTerm], *, same_key_id_only: bool
) -> None:
    """``prove_custody`` for a wrap-only provider (recovery-shares: the daemon holds a public key).

    It cannot unwrap, but its key id is a hash of its public key, so an id found among the store's
    wrappings proves it is the very key the store wraps for; a replaced public key file has another id.
    """
    stored = {w.key_id for t in terms for w in t.wrappings if w.provider == provider.name}
    if current in stored or same_key_id_only:  # same_key_id_only: a target an operator names in 'keyring migrate'
        return
    raise errors.ProviderKeyMismatch(
        f"key provider {provider.name} has public key {current}, but this store wraps for "
        f"{', '.join(sorted(stored)) or 'no such key'}: its public key file was replaced, or it belongs to "
        "another store. It will not be used"
    )


async def unseal(providers: Sequence[KeyProvider], terms: Sequence[KeyringTerm]) -> Keyring:
    if not terms:
        raise errors.NotInitializedError("the store has no keyring; run 'secretsd init'")
    keys = {}
    for term in terms:
        keys[term.term] = DataKey(await unwrap_term(providers, term))
    return Keyring(
        keys=keys,
        active_term=max(keys),
        encryptions={t.term: t.encryptions for t in terms},
    )


async def make_term(
    providers: Sequence[KeyProvider], term: int, created_at: datetime
) -> tuple[KeyringTerm, bytes]:
    """A new term with a fresh DEK, wrapped for every provider. Returns the record and the DEK."""
    dek = new_dek()
    return KeyringTerm(term, await wrap_for_all(providers, dek, term), created_at), dek
