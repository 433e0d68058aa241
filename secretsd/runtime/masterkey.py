"""Master-key lifecycle, offline: re-wrap the keyring under a new KEK version, or move it to others.

Both touch only the keyring's wrappings (cost grows with terms, never with secrets) and may run
while the daemon serves: it holds its DEKs in memory and never re-reads wrappings unless it
unseals again. Each step swaps one term's wrappings atomically and only ever *adds* a way to open
a term before it removes one, so a run interrupted at any point leaves a store that the old or the
new configuration (or both) can open, never neither.

Neither ever wraps with, or creates a key version in, a provider that has not first proved it holds
the store's key (``keyring.prove_custody``): a replaced token or key file is refused before it can
capture a new term. New custody enters only through ``migrate``, whose targets the operator names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from keyproviders import KeyProvider, WrappedKey
from keyproviders.shares import RecoverySharesKeyProvider
from secretsd.custody.crypto import DataKey
from secretsd.custody.keyring import prove_custody, provider_errors, unwrap_term, wrap_for_all
from secretsd.records import KeyringTerm
from secretsd.runtime.config import Settings
from secretsd.runtime.daemon import build_storage, provider_set
from secretsd.storage import Storage

Progress = Callable[[int, int], None]


@dataclass
class Report:
    terms: int = 0
    providers: list[str] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    retired_key_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"terms": self.terms, "providers": self.providers, "key_ids": self.key_ids,
                "retired_key_ids": self.retired_key_ids}


def _ids(wrappings: tuple[WrappedKey, ...]) -> set[tuple[str, str]]:
    return {(w.provider, w.key_id) for w in wrappings}


def _unwrappers(providers: list[KeyProvider]) -> list[KeyProvider]:
    return [p for p in providers if getattr(p, "can_unwrap", True)]


async def _known_keys(
    targets: list[KeyProvider], openers: list[KeyProvider], terms: list[KeyringTerm]
) -> dict[int, DataKey] | None:
    """The DEKs a wrap-only target's binding tag is checked with (``prove_custody``), opened by
    ``openers`` that can unwrap; None when no target needs them."""
    if all(getattr(p, "can_unwrap", True) for p in targets) or not _unwrappers(openers):
        return None
    return {t.term: DataKey(await unwrap_term(_unwrappers(openers), t)) for t in terms}


async def _cover(
    storage: Storage,
    openers: list[KeyProvider],
    targets: list[KeyProvider],
    needs: Callable[[KeyringTerm], bool],
    merge: Callable[[KeyringTerm, tuple[WrappedKey, ...]], tuple[WrappedKey, ...]],
    progress: Progress | None,
) -> list[KeyringTerm]:
    """Re-wrap every term that ``needs`` it, including terms a running daemon adds meanwhile.

    Returns the terms as they were before their change.
    """
    done: list[KeyringTerm] = []
    while True:
        pending = [t for t in await storage.keyring_terms() if needs(t)]
        if not pending:
            return done
        total = len(done) + len(pending)
        for term in pending:
            dek = await unwrap_term(openers, term)
            fresh = await wrap_for_all(targets, dek, term.term)
            await storage.replace_keyring_wrappings(term.term, term.wrappings, merge(term, fresh))
            done.append(term)
            if progress:
                progress(len(done), total)


async def rewrap(settings: Settings, *, rotate: bool = True, progress: Progress | None = None) -> Report:
    """Rotate every configured provider's KEK (unless ``rotate`` is false) and re-wrap each term for them.

    With ``rotate=False`` this also wraps every term for providers added to the configuration
    since (a new recovery key), and drops wrappings for providers no longer configured.
    """
    storage = build_storage(settings)
    # create: a newly configured recovery key file is made here (an HSM key never is).
    group = provider_set(settings, create=True)
    await storage.open()
    try:
        providers = await group.ready_all()
        terms = await storage.keyring_terms()
        for provider in _unwrappers(providers):
            # Before rotate(): never create a key version in a planted token.
            await asyncio.to_thread(prove_custody, provider, terms)
        known = await _known_keys(providers, providers, terms)
        for provider in providers:
            if provider not in _unwrappers(providers):  # a public key: proven by its binding tag
                await asyncio.to_thread(prove_custody, provider, terms, known)
        if rotate:
            with provider_errors():
                for provider in providers:
                    await asyncio.to_thread(provider.rotate)
        current = {(p.name, p.key_id()) for p in providers}
        old_terms = await _cover(storage, providers, providers, lambda t: _ids(t.wrappings) != current,
                                 lambda _t, fresh: fresh, progress)
        before = set().union(*(_ids(t.wrappings) for t in old_terms)) if old_terms else set()
        return Report(
            terms=len(old_terms), providers=[p.name for p in providers],
            key_ids=sorted(k for _, k in current),
            retired_key_ids=sorted(k for kind, k in before - current),
        )
    finally:
        group.close()
        await storage.close()


async def migrate(
    old: Settings, new: Settings, *, progress: Progress | None = None,
    recovery: RecoverySharesKeyProvider | None = None,
) -> Report:
    """Move the keyring from ``old``'s providers to ``new``'s, without re-encrypting secrets.

    Phase one adds wrappings for the new providers next to the old ones; only once every term has
    them does phase two remove the old ones. ``recovery`` (a recovery-shares provider built from K
    shares) opens the terms when ``old``'s providers cannot: the way off a lost HSM.
    """
    decorate = None
    configured = new
    if recovery is not None:
        from secretsd.runtime.recovery import shares_settings, with_shares

        old = shares_settings(old, recovery)
        decorate = with_shares(old, recovery)
        # The recovery key stays a target even if the new configuration's directory lost its file.
        new = shares_settings(new, recovery)
    storage = build_storage(old)
    old_group = provider_set(old, decorate=decorate)
    new_group = provider_set(new, create=True)
    await storage.open()
    try:
        openers = await old_group.ready_any()
        targets = await new_group.ready_all()
        terms = await storage.keyring_terms()
        old_specs = old.provider_specs()
        known = await _known_keys(targets, openers, terms)
        for target, spec in zip(targets, new.provider_specs(), strict=True):
            # A target configured as before (the HSM kept while a recovery key is added) is the
            # store's custody and must prove it in full. A new one may be new custody, but one that
            # reuses a stored key id must hold that key, or its wrappings would replace the genuine ones.
            await asyncio.to_thread(prove_custody, target, terms, known, same_key_id_only=spec not in old_specs)
        target_ids = {(p.name, p.key_id()) for p in targets}

        def add(term: KeyringTerm, fresh: tuple[WrappedKey, ...]) -> tuple[WrappedKey, ...]:
            kept = tuple(w for w in term.wrappings if (w.provider, w.key_id) not in _ids(fresh))
            return kept + fresh

        def lacks_targets(term: KeyringTerm) -> bool:
            return not target_ids <= _ids(term.wrappings)

        old_terms = await _cover(storage, openers, targets, lacks_targets, add, progress)
        retired: set[tuple[str, str]] = set()
        for term in await storage.keyring_terms():
            if lacks_targets(term):
                continue  # added by a daemon since phase one: the final pass below covers it
            keep = tuple(w for w in term.wrappings if (w.provider, w.key_id) in target_ids)
            retired |= _ids(term.wrappings) - target_ids
            if keep != term.wrappings:
                await storage.replace_keyring_wrappings(term.term, term.wrappings, keep)
        # A term a daemon made meanwhile keeps its old wrapping and gains the new ones.
        old_terms += await _cover(storage, openers, targets, lacks_targets, add, progress)
        if recovery is not None:  # the shares opened every term: they are this store's
            from secretsd.runtime.recovery import restore_public_file

            restore_public_file(configured, recovery)
        return Report(
            terms=len(old_terms), providers=[p.name for p in targets],
            key_ids=sorted(k for _, k in target_ids), retired_key_ids=sorted(k for _, k in retired),
        )
    finally:
        old_group.close()
        new_group.close()
        await storage.close()
