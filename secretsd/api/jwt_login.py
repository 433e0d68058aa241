"""``POST /v1/auth/jwt/login``: a workload JWT for a short-lived daemon token (secretsd.auth.jwt).

The route authenticates itself (``Operation.login``): the middleware does not ask the authenticators,
this handler verifies the JWT and sets the request's principal, so the audit record names the rule's
client with method ``jwt``; a refusal is recorded with the ``sub``/``iss`` the caller presented (never
the JWT) and counted under method ``jwt``. The token is minted by the token service, as any other.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from secretsd.api.bodies import read_body
from secretsd.api.context import PRINCIPAL, audit_note, services
from secretsd.auth.jwt import MAX_JWT_BYTES, JwtLogin, presented_identity
from secretsd.clock import utcnow
from secretsd.domain.identity import Principal
from secretsd.errors import RequestError, UnauthenticatedError

log = logging.getLogger("secretsd.auth.jwt")

#: The configured login (None: ``[auth.jwt]`` is not set, and the route refuses every JWT).
JWT_LOGIN = web.AppKey("jwt_login", JwtLogin)


class JwtLoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # The size bound is checked here, before anything parses the JWT (a 400).
    jwt: str = Field(min_length=1, max_length=MAX_JWT_BYTES)


def _count(request: web.Request, outcome: str) -> None:
    counts = getattr(services(request).authenticators, "counts", None)
    if isinstance(counts, dict):
        counts[("jwt", outcome)] = counts.get(("jwt", outcome), 0) + 1


async def jwt_login(request: web.Request) -> web.Response:
    body = await read_body(request, JwtLoginBody)
    login = request.app.get(JWT_LOGIN)
    try:
        if login is None:
            raise UnauthenticatedError()
        identity = login.verify(body.jwt)
    except UnauthenticatedError:
        audit_note(request, presented=presented_identity(body.jwt))
        _count(request, "failure")
        raise
    who = Principal(identity.client, identity.policies, "jwt", expires_at=identity.expires_at)
    request[PRINCIPAL] = who
    audit_note(request, presented={"sub": identity.subject, "iss": identity.issuer})
    d = services(request)
    # Never longer than the JWT itself lives: the proof of identity ends there.
    ttl = min(login.token_ttl_seconds, int((identity.expires_at - utcnow()).total_seconds()))
    if ttl < 1:
        _count(request, "failure")
        raise UnauthenticatedError()
    try:
        token, record = await d.tokens.create(who, identity.client, list(identity.policies), ttl)
    except RequestError as exc:
        # A rule naming a policy that does not exist: the operator's mistake, said in the log only.
        log.error("JWT login for client %r refused: %s (fix [[auth.jwt.rules]] or the policy file)",
                  identity.client, exc.message)
        _count(request, "failure")
        raise UnauthenticatedError() from None
    _count(request, "success")
    expires_at = record.expires_at or (record.created_at + timedelta(seconds=ttl))
    return web.json_response({"token": token, "expires_at": expires_at.isoformat(),
                              "client": record.client, "policies": list(record.policies)})
