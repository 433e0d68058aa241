"""Token lifecycle rules: who may mint which token, expiry, revocation."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from secretsd import tokens
from secretsd.auth import Principal, TokenAuthenticator
from secretsd.clock import Clock, utcnow
from secretsd.errors import NotFoundError, PermissionDeniedError, RequestError
from secretsd.events import Event, EventBus
from secretsd.policy import ROOT_POLICY, PolicyStore
from secretsd.storage import Storage, TokenRecord

_CLIENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


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
        authenticator: TokenAuthenticator,
        *,
        events: EventBus | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._storage = storage
        self._policies = policies
        self._authenticator = authenticator
        self._events = events or EventBus()
        self._clock = clock

    async def create(
        self, creator: Principal, client: str, policies: list[str], ttl_seconds: int | None = None
    ) -> tuple[str, TokenRecord]:
        """Mint a token; returns the token string (shown once) and its stored record."""
        if not _CLIENT.fullmatch(client):
            raise RequestError("client names are 1-128 letters, digits, '.', '_', '@' or '-'")
        if not policies:
            raise RequestError("a token needs at least one policy")
        unknown = self._policies.current.unknown(policies)
        if unknown:
            raise RequestError(f"unknown polic{'y' if len(unknown) == 1 else 'ies'}: {', '.join(unknown)}")
        wanted = tuple(sorted(set(policies)))
        check_delegation(creator, wanted)
        if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
            raise RequestError(f"ttl must be between 1 and {MAX_TTL_SECONDS} seconds")
        now = self._clock()
        expires_at = now + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        check_lifetime(creator, expires_at)
        new = tokens.generate_token()
        record = TokenRecord(
            token_id=new.token_id, secret_hash=new.secret_hash, client=client, policies=wanted,
            created_at=now, created_by=creator.client, expires_at=expires_at,
        )
        await self._storage.create_token(record)
        self._events.emit(Event("token.create", now, creator.client,
                                detail={"token": tokens.display_id(new.token_id), "for": client}))
        return new.token, record

    async def list_tokens(self) -> list[TokenRecord]:
        return await self._storage.list_tokens()

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
        if not await self._storage.revoke_token(token_id, self._clock()):
            raise NotFoundError(f"no active token {tokens.display_id(token_id)}")
        self._authenticator.invalidate(token_id)
        self._events.emit(Event("token.revoke", self._clock(), who.client,
                                detail={"token": tokens.display_id(token_id)}))
        return token_id
