"""The ``token`` authenticator: bearer tokens (``secretsd.tokens``), verified against their stored hash.

Registered under the entry point ``secretsd.authenticators: token``, as any third-party method would be.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from secretsd import tokens
from secretsd.auth import AuthenticatorContext
from secretsd.clock import Clock, utcnow
from secretsd.domain.identity import Credentials, Principal
from secretsd.errors import ConfigError, UnauthenticatedError
from secretsd.records import TokenRecord
from secretsd.storage import Storage

_NO_HASH = bytes(32)
#: Cached lookups at most: a flood of unknown ids must not grow memory.
_CACHE_LIMIT = 10_000


class TokenAuthenticator:
    """Bearer tokens, verified against their stored hash, with a short-lived cache of the lookups."""

    method = "token"

    def __init__(self, storage: Storage, *, cache_seconds: float, clock: Clock = utcnow) -> None:
        self._storage = storage
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, TokenRecord | None]] = {}

    @classmethod
    def from_config(cls, options: Mapping[str, Any], context: AuthenticatorContext) -> TokenAuthenticator:
        # Its one knob stays the top-level ``token_cache_seconds`` (context.cache_seconds), as before.
        if options:
            raise ConfigError(f"authenticator 'token' takes no options (given: {', '.join(sorted(options))})")
        return cls(context.storage, cache_seconds=context.cache_seconds, clock=context.clock)

    def __repr__(self) -> str:
        return f"TokenAuthenticator(cache_seconds={self._cache_seconds})"

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
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
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
        if record is None or not matches or not record.is_active(self._clock()):
            raise UnauthenticatedError()
        return Principal(record.client, record.policies, self.method, token_id, record.expires_at)
