"""The keyring: DEK terms unwrapped by a key provider and held in memory after unseal.

This module is also the boundary where key-provider exceptions become secretsd errors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import keyproviders
from keyproviders import KeyProvider, WrappedKey
from secretsd import errors
from secretsd.custody.crypto import DataKey, binding_message, dek_aad, new_dek
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
    """Wrap a DEK once per unseal provider; each wrapping alone can unseal the term.

    A wrap-only provider's wrapping also carries its binding tag (``bind_wrapping``).
    """
    wrapped = []
    key = DataKey(dek)
    with provider_errors():
        for provider in providers:
            one = await asyncio.to_thread(provider.wrap, dek, dek_aad(term))
            wrapped.append(bind_wrapping(provider, one, key, term) if _wrap_only(provider) else one)
    return tuple(wrapped)


# -- binding a wrap-only provider's public key to the keyring ---------------------------------------
#: The ``params`` entry of a wrap-only provider's wrapping that holds its binding tag (base64).
BINDING_PARAM = "binding"


def _wrap_only(provider: KeyProvider) -> bool:
    return not getattr(provider, "can_unwrap", True)


def _binding_tag(provider: KeyProvider, key_id: str, key: DataKey, term: int) -> bytes:
    public_key = getattr(provider, "public_key", b"")
    return key.binding_tag(binding_message(term, provider.name, key_id, public_key))


def bind_wrapping(provider: KeyProvider, wrapped: WrappedKey, key: DataKey, term: int) -> WrappedKey:
    """``wrapped`` with a tag over the provider's public key keyed from the term's DEK.

    The store holds only wrappings, so whoever can write it could name any public key; only a
    holder of the unsealed DEK can make this tag (``binding_holds`` checks it).
    """
    tag = base64.b64encode(_binding_tag(provider, wrapped.key_id, key, term)).decode("ascii")
    return dataclasses.replace(wrapped, params={**wrapped.params, BINDING_PARAM: tag})


def binding_holds(provider: KeyProvider, wrapped: WrappedKey, key: DataKey, term: int) -> bool:
    """Whether ``wrapped`` carries a valid tag for ``provider``'s current public key (constant time)."""
    stored = wrapped.params.get(BINDING_PARAM)
    if not isinstance(stored, str) or wrapped.key_id != provider.key_id():
        return False
    try:
        raw = base64.b64decode(stored.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return False
    return hmac.compare_digest(raw, _binding_tag(provider, wrapped.key_id, key, term))


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
    if _wrap_only(provider):
        _prove_by_public_key_id(provider, current, terms, known, same_key_id_only=same_key_id_only)
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
    provider: KeyProvider, current: str, terms: Sequence[KeyringTerm], known: Mapping[int, DataKey] | None,
    *, same_key_id_only: bool,
) -> None:
    """The rule for a wrap-only provider (recovery-shares: the daemon holds a public key only).

    It cannot unwrap, and its key id is only a name: whoever can write the store can add a wrapping
    under any id. So once the store is *bound* (a wrapping of this provider kind carries a binding
    tag, ``bind_wrapping``), a wrapping under the current id whose tag verifies with the term's DEK
    in memory (``known``) is required: a planted public key has none, as its planter lacks the DEKs.
    A store written before bindings existed (no tag anywhere) is trusted on first use: the current
    id must be the only recovery key id it names; ``legacy_bindings`` then adds the tags.
    """
    ours = [(t, w) for t in terms for w in t.wrappings if w.provider == provider.name]
    if same_key_id_only and all(w.key_id != current for _, w in ours):
        return  # a target an operator names in 'keyring migrate': new custody, nothing to prove
    bound = [(t, w) for t, w in ours if BINDING_PARAM in w.params]
    if bound:
        for term, wrapped in bound:
            key = None if known is None else known.get(term.term)
            if key is not None and binding_holds(provider, wrapped, key, term.term):
                return
        source = getattr(provider, "source", "its public key")
        raise errors.ProviderKeyMismatch(
            f"{source} does not match the key the keyring was bound to: key provider {provider.name} has "
            f"public key {current}, for which the store holds no binding made with the keyring's keys"
            + (" (they are not unsealed here)" if known is None else "")
            + ". The file was replaced, or it belongs to another store. Nothing will be wrapped for it")
    stored = {w.key_id for _, w in ours}
    if stored == {current}:
        return
    raise errors.ProviderKeyMismatch(
        f"key provider {provider.name} has public key {current}, but this store wraps for "
        f"{', '.join(sorted(stored)) or 'no such key'}: its public key file was replaced, or it belongs to "
        "another store. It will not be used"
    )


def legacy_bindings(
    providers: Sequence[KeyProvider], terms: Sequence[KeyringTerm], known: Mapping[int, DataKey]
) -> list[tuple[KeyringTerm, tuple[WrappedKey, ...]]]:
    """The migration of a store written before bindings: each term's new wrappings, tags added.

    Only for a wrap-only provider that passed the trust-on-first-use rule of ``prove_custody`` (the
    caller's to check) and only while no wrapping of its kind is bound yet; the ciphertexts stay.
    """
    changes: dict[int, tuple[KeyringTerm, list[WrappedKey]]] = {}
    for provider in providers:
        if not _wrap_only(provider):
            continue
        current = provider.key_id()
        ours = [w for t in terms for w in t.wrappings if w.provider == provider.name]
        if any(BINDING_PARAM in w.params for w in ours) or {w.key_id for w in ours} != {current}:
            continue
        for term in terms:
            key = known.get(term.term)
            if key is None:
                continue
            _, wrappings = changes.setdefault(term.term, (term, list(term.wrappings)))
            for i, wrapped in enumerate(wrappings):
                if wrapped.provider == provider.name and wrapped.key_id == current:
                    wrappings[i] = bind_wrapping(provider, wrapped, key, term.term)
    return [(term, tuple(w)) for term, w in changes.values() if tuple(w) != term.wrappings]


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
