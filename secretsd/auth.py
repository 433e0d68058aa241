"""Authentication: who is calling. One pluggable step in front of every request.

An ``Authenticator`` turns the credentials a transport saw (a bearer token today; a verified TLS
client certificate or Unix-socket peer credentials later) into a ``Principal``, or says the
credentials are not its kind. Authorisation is separate: see ``secretsd.policy``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from secretsd import tokens
from secretsd.clock import Clock, utcnow
from secretsd.errors import UnauthenticatedError
from secretsd.storage import Storage, TokenRecord

_NO_HASH = bytes(32)


@dataclass(frozen=True)
class Principal:
    client: str
    policies: tuple[str, ...]
    method: str  # "token", later "mtls", "peer"
    token_id: str | None = None
    expires_at: datetime | None = None

    @property
    def display(self) -> str:
        return f"{self.client} ({tokens.display_id(self.token_id)})" if self.token_id else self.client


@dataclass(frozen=True)
class Credentials:
    """What the transport saw. Fields stay None when that kind of credential was not presented."""

    bearer: str | None = None
    peer_cert_subject: str | None = None
    peer_uid: int | None = None


class Authenticator(Protocol):
    method: str

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        """A principal; None if these credentials are not this authenticator's kind.

        Raises ``UnauthenticatedError`` when the credentials are of its kind but invalid.
        """
        ...


class TokenAuthenticator:
    """Bearer tokens, verified against their stored hash, with a short-lived cache."""

    method = "token"

    def __init__(self, storage: Storage, *, cache_seconds: float, clock: Clock = utcnow) -> None:
        self._storage = storage
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, TokenRecord | None]] = {}

    def invalidate(self, token_id: str) -> None:
        self._cache.pop(token_id, None)

    def invalidate_all(self) -> None:
        """Forget every cached token (after revocations may have been missed, e.g. a lost feed)."""
        self._cache.clear()

    async def _record(self, token_id: str) -> TokenRecord | None:
        now = time.monotonic()
        hit = self._cache.get(token_id)
        if hit is not None and now - hit[0] < self._cache_seconds:
            return hit[1]
        record = await self._storage.get_token(token_id)
        if len(self._cache) > 10_000:
            self._cache.clear()  # bounded: a flood of unknown ids must not grow memory
        self._cache[token_id] = (now, record)
        return record

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        if credentials.bearer is None:
            return None
        parsed = tokens.parse_token(credentials.bearer)
        if parsed is None:
            raise UnauthenticatedError()
        token_id, secret = parsed
        record = await self._record(token_id)
        # Compare even when the id is unknown, and give one message for every failure: a caller
        # must not learn whether an id exists.
        matches = tokens.secret_matches(secret, record.secret_hash if record else _NO_HASH)
        if record is None or not matches:
            raise UnauthenticatedError()
        if record.revoked_at is not None:
            raise UnauthenticatedError()
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise UnauthenticatedError()
        return Principal(record.client, record.policies, self.method, token_id, record.expires_at)


async def authenticate(authenticators: Sequence[Authenticator], credentials: Credentials) -> Principal:
    """The first authenticator that recognises the credentials decides; none means 401."""
    for authenticator in authenticators:
        principal = await authenticator.authenticate(credentials)
        if principal is not None:
            return principal
    raise UnauthenticatedError()
