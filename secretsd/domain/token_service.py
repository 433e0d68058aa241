"""Token lifecycle rules: who may mint which token, expiry, revocation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from secretsd import tokens
from secretsd.clock import Clock, utcnow

# The client-name rule lives in client_names (the unix rules obey it too); importable from here as before.
from secretsd.domain.client_names import RESERVED_CLIENTS as RESERVED_CLIENTS
from secretsd.domain.client_names import check_client_name as check_client_name
from secretsd.domain.client_names import is_reserved_client as is_reserved_client
from secretsd.domain.identity import CredentialCache, Principal
from secretsd.domain.policy import ROOT_POLICY, PolicyStore
from secretsd.errors import ConflictError, NotFoundError, PermissionDeniedError, RequestError, UnauthenticatedError
from secretsd.events import Event, EventBus
from secretsd.records import TokenRecord
from secretsd.storage import Storage

log = logging.getLogger("secretsd.tokens")

MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
#: The most tokens one page of ``GET /v1/auth/tokens`` holds (and its default).
MAX_TOKEN_PAGE = 1000
#: Who the daemon names as the creator of a token made offline by ``token create-root``.
RECOVERY_CREATOR = "recovery"
#: Tokens the daemon itself gives a reserved name: (client, created_by).
_OWN_TOKENS = {("admin", "init"), ("admin", RECOVERY_CREATOR)}


def is_active_root(token: TokenRecord, now: datetime) -> bool:
    return ROOT_POLICY in token.policies and token.is_active(now)


def refuse_revoking_the_last_root_token(target: TokenRecord, others: Sequence[TokenRecord], now: datetime) -> None:
    """The rule: a revocation may not leave the store without an active (unexpired) root token.

    Only a root token can mint another (see ``check_delegation``), and ``init`` refuses an
    initialised store, so the last one gone would lock administration out for good. Storage
    calls this inside the revoking transaction, so that two concurrent revocations of the last
    two root tokens cannot both pass it.
    """
    if not is_active_root(target, now) or any(is_active_root(t, now) for t in others):
        return
    raise ConflictError(
        f"{tokens.display_id(target.token_id)} is the last active token with the root policy; revoking "
        "it would lock administration out: create another root token first ('secretsd token create "
        "--client NAME --policy root'), then revoke this one ('secretsd token create-root' recovers "
        "a store offline if every root token is lost)"
    )


def check_delegation(creator: Principal, policies: tuple[str, ...], *, verb: str = "grant") -> None:
    """A token may only grant (or revoke) policies its holder has, unless the holder has root.

    Without this rule any holder of ``admin`` on ``sys/tokens`` could mint a root token, or revoke
    the administrators' tokens.
    """
    if ROOT_POLICY in creator.policies:
        return
    extra = sorted(set(policies) - set(creator.policies))
    if extra:
        raise PermissionDeniedError(
            f"you cannot {verb} tokens with policies you do not hold: {', '.join(extra)}"
        )


def renewed_expiry(record: TokenRecord, now: datetime) -> datetime | None:
    """The rule "a renewal extends a token by its TTL up to its max TTL", never shortening it.

    None: the token has no expiry (nothing to renew). A token made without ``max_ttl_seconds``
    (or before renewal existed) has no further end than its first expiry, so it stays put.
    """
    if record.expires_at is None:
        return None
    if record.ttl_seconds is None or record.max_expires_at is None:
        return record.expires_at
    wanted = min(now + timedelta(seconds=record.ttl_seconds), record.max_expires_at)
    return max(wanted, record.expires_at)


def check_lifetime(creator: Principal, expires_at: datetime | None) -> None:
    """A token may not outlive the token that created it."""
    if creator.expires_at is None:
        return
    if expires_at is None or expires_at > creator.expires_at:
        raise PermissionDeniedError(
            f"a token cannot outlive its creator: give a ttl ending by {creator.expires_at.isoformat()}"
        )


class TokenService:
    def __init__(
        self,
        storage: Storage,
        policies: PolicyStore,
        credential_cache: CredentialCache,
        *,
        events: EventBus | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._storage = storage
        self._policies = policies
        self._credential_cache = credential_cache  # told of each revocation, so it takes effect at once
        self._events = events or EventBus()
        self._clock = clock

    async def create(
        self, creator: Principal, client: str, policies: list[str], ttl_seconds: int | None = None,
        max_ttl_seconds: int | None = None,
    ) -> tuple[str, TokenRecord]:
        """Mint a token; returns the token string (shown once) and its stored record.

        ``max_ttl_seconds`` makes it renewable (``renew_self``) up to that long after creation."""
        check_client_name(client)
        if not policies:
            raise RequestError("a token needs at least one policy")
        unknown = self._policies.current.unknown(policies)
        if unknown:
            raise RequestError(f"unknown polic{'y' if len(unknown) == 1 else 'ies'}: {', '.join(unknown)}")
        wanted = tuple(sorted(set(policies)))
        check_delegation(creator, wanted)
        if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
            raise RequestError(f"ttl must be between 1 and {MAX_TTL_SECONDS} seconds")
        if max_ttl_seconds is not None:
            if ttl_seconds is None:
                raise RequestError("max_ttl_seconds needs ttl_seconds: a token without expiry has nothing to renew")
            if not ttl_seconds <= max_ttl_seconds <= MAX_TTL_SECONDS:
                raise RequestError(f"max_ttl_seconds must be between ttl_seconds and {MAX_TTL_SECONDS}")
        now = self._clock()
        expires_at = now + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        max_expires_at = now + timedelta(seconds=max_ttl_seconds) if max_ttl_seconds else None
        check_lifetime(creator, expires_at)
        # Renewals must not carry it past its creator's end either.
        check_lifetime(creator, max_expires_at or expires_at)
        new = tokens.generate_token()
        record = TokenRecord(
            token_id=new.token_id, secret_hash=new.secret_hash, client=client, policies=wanted,
            created_at=now, created_by=creator.client, expires_at=expires_at,
            ttl_seconds=ttl_seconds if max_ttl_seconds else None, max_expires_at=max_expires_at,
        )
        await self._storage.create_token(record)
        self._events.emit(Event("token.create", now, creator.client,
                                detail={"token": tokens.display_id(new.token_id), "for": client}))
        return new.token, record

    async def renew_self(self, who: Principal) -> TokenRecord:
        """Extend the caller's own token (``renewed_expiry``); answer its record as it now stands.

        A revoked or expired token cannot renew (UnauthenticatedError, the 401 of authentication:
        it may have been revoked between authentication and here); a caller not using a token
        (a Unix peer) has none to renew (RequestError)."""
        if who.token_id is None:
            raise RequestError(f"only a token renews; this request authenticated by {who.method}")
        now = self._clock()
        record = await self._storage.get_token(who.token_id)
        if record is None or not record.is_active(now):
            raise UnauthenticatedError()
        new = renewed_expiry(record, now)
        if new is None or new == record.expires_at:
            return record
        if not await self._storage.renew_token(record.token_id, new, now):
            raise UnauthenticatedError()
        # The cached verification holds the old expiry: drop it (other processes hear the notice).
        self._credential_cache.invalidate(record.token_id)
        self._events.emit(Event("token.renew", now, who.client,
                                detail={"token": tokens.display_id(record.token_id)}))
        return dataclasses.replace(record, expires_at=new)

    async def list_tokens(self) -> list[TokenRecord]:
        return await self._storage.list_tokens()

    async def list_page(self, *, after: str = "", limit: int = MAX_TOKEN_PAGE,
                        include_expired: bool = False) -> tuple[list[TokenRecord], str | None]:
        """The rule of a token listing page: at most ``limit`` (1..MAX_TOKEN_PAGE) tokens by id after
        the cursor (an id, bare or ``sdt_``), expired ones only if asked; and the next cursor (a
        display id) or None at the end. Revoked tokens are listed until the purge deletes them."""
        if not 1 <= limit <= MAX_TOKEN_PAGE:
            raise RequestError(f"limit must be between 1 and {MAX_TOKEN_PAGE}")
        cursor = after.removeprefix(tokens.TOKEN_PREFIX)
        if cursor and not tokens.is_token_id(cursor):
            raise RequestError("after must be a token id from a previous page (sdt_0123456789abcdef)")
        found = await self._storage.list_tokens_page(self._clock(), after=cursor, limit=limit + 1,
                                                     include_expired=include_expired)
        page = found[:limit]
        return page, tokens.display_id(page[-1].token_id) if len(found) > limit else None

    async def policies_of(self, client: str) -> list[str]:
        """The policies ``client`` holds now: the union over its active tokens (NotFoundError: none)."""
        now = self._clock()
        held = sorted({p for t in await self._storage.list_tokens() if t.client == client and t.is_active(now)
                       for p in t.policies})
        if not held:
            raise NotFoundError(f"client {client!r} has no active token")
        return held

    async def revoke(self, who: Principal, token_id: str) -> str:
        """Revoke a token given by id (or, pasted whole, by the token itself); return its id."""
        parsed = tokens.parse_token(token_id)
        # A whole token pasted in: use its id, and never echo its secret part back.
        token_id = parsed[0] if parsed else token_id.removeprefix(tokens.TOKEN_PREFIX)
        if not tokens.is_token_id(token_id):
            raise NotFoundError("no active token with that id (ids look like sdt_0123456789abcdef)")
        target = await self._storage.get_token(token_id)
        if target is None or target.revoked_at is not None:
            raise NotFoundError(f"no active token {tokens.display_id(token_id)}")
        check_delegation(who, target.policies, verb="revoke")
        if not await self._storage.revoke_token(token_id, self._clock(),
                                                guard=refuse_revoking_the_last_root_token):
            raise NotFoundError(f"no active token {tokens.display_id(token_id)}")
        self._credential_cache.invalidate(token_id)
        self._events.emit(Event("token.revoke", self._clock(), who.client,
                                detail={"token": tokens.display_id(token_id)}))
        return token_id

    async def warn_about_reserved_names(self) -> list[TokenRecord]:
        """Log tokens stored (before names were reserved) under a reserved client name.

        They keep working (stored data is never broken by an upgrade), but whatever they do reads
        as the daemon's own identity, so the operator is told which to replace.
        """
        now = self._clock()  # an expired or revoked one no longer works: nothing to warn about
        found = [t for t in await self._storage.list_tokens()
                 if t.is_active(now) and is_reserved_client(t.client)
                 and (t.client, t.created_by) not in _OWN_TOKENS]
        for t in found:
            log.warning("token %s has the reserved client name %r (created by %r before such names were "
                        "reserved); it still works, but its actions read as the daemon's own: create a "
                        "token under another name and revoke this one",
                        tokens.display_id(t.token_id), t.client, t.created_by)
        return found
