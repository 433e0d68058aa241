"""The aiohttp application: middleware for request ids, authentication and problem documents."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Awaitable, Callable

from aiohttp import web

from secretsd import tokens
from secretsd.api import routes, vault_routes
from secretsd.api.access_log import AccessLog, LoggingAccessLog
from secretsd.api.context import (
    AUDIT_NOTES,
    AUDIT_PATH,
    AUTHORIZED,
    OPENAPI,
    PRINCIPAL,
    REQUEST_ID,
    SERVICES,
    audit_note,
    audit_record,
)
from secretsd.api.handlers import metrics_response
from secretsd.api.jwt_login import JWT_LOGIN
from secretsd.api.services import Services
from secretsd.api.vault import MOUNT
from secretsd.auth import authenticate
from secretsd.auth.jwt import JwtLogin
from secretsd.domain.identity import Credentials
from secretsd.errors import AuditError, RequestError, SealedError, SecretsdError, UnauthenticatedError
from secretsd.problems import INTERNAL, PROBLEM_CONTENT_TYPE, ProblemType, problem_document, problem_for

log = logging.getLogger("secretsd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCESS_LOG = web.AppKey("access_log", AccessLog)
#: The public paths of this app's table (the native ones, and the Vault façade's when enabled).
PUBLIC_PATHS = web.AppKey("public_paths", frozenset)
#: The paths whose handler authenticates the caller itself (POST /v1/auth/jwt/login).
LOGIN_PATHS = web.AppKey("login_paths", frozenset)
#: A token sent as Vault's clients send it (secretsd.api.vault): taken like ``Authorization: Bearer``.
VAULT_TOKEN_HEADER = "X-Vault-Token"  # noqa: S105 (a header name, not a secret)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The shape of ``_RequestIds``' ids (16 hex digits of prefix, 12 of counter).
_FRESH_ID_RE = re.compile(r"[0-9a-f]{28}")
# Both derived from the route table (secretsd/api/routes.py); the middleware decides by path.
PUBLIC_ROUTES = routes.PUBLIC_PATHS
SEALED_ROUTES = routes.SEALED_PATHS

_HTTP_PROBLEMS = {
    404: ProblemType("not-found", 404, "Not found"),
    405: ProblemType("method-not-allowed", 405, "Method not allowed"),
    413: ProblemType("payload-too-large", 413, "Request body too large"),
}
# How the Vault façade answers an unauthenticated request: Vault's 403, our problem type.
VAULT_UNAUTHENTICATED = ProblemType("unauthenticated", 403, "Authentication required")
# What a request whose client left before the answer is recorded as (nginx's 499): nobody reads it.
CLIENT_GONE = ProblemType("client-closed-request", 499, "Client closed request")


def problem_response(ptype: ProblemType, detail: str, request_id: str, *, vault: bool = False) -> web.Response:
    body = problem_document(ptype, detail, request_id=request_id)
    if vault:
        # Vault's clients read the reasons from ``errors`` (an extension member of the problem).
        body["errors"] = [body["detail"]]
    return web.Response(
        text=json.dumps(body), status=ptype.status, content_type=PROBLEM_CONTENT_TYPE,
        headers={"WWW-Authenticate": "Bearer"} if ptype.status == 401 else None,
    )


def _credentials(request: web.Request) -> Credentials:
    """The request's credentials: one Authorization header at most.

    Two are refused (400), never one of them picked: a proxy, a log or an auditor could each take
    a different one than we did, and RFC 9110 does not allow a list here.
    """
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise RequestError("send one Authorization header, not several")
    bearer = None
    # The one lookup a native request pays for the façade; with the façade off, the header is nobody's.
    if VAULT_TOKEN_HEADER in request.headers and MOUNT in request.app:
        bearer = _vault_token(request, authorization=bool(headers))
    elif headers:
        bearer = bearer_of(headers[0])
    # The Unix-socket peer, read by the listener once per connection (runtime/unix_listener.py);
    # a TCP connection's handler has none.
    # And a TLS client certificate, verified by the handshake and read once per connection (runtime/edge.py).
    protocol = request.protocol
    return Credentials(bearer=bearer, peer=getattr(protocol, "peer", None),
                       client_cert=getattr(protocol, "client_cert", None))


def bearer_of(authorization: str) -> str:
    """The rule "a credential presented decides": the token of an ``Authorization: Bearer TOKEN``
    header. Any other header that is present (another scheme, ``Bearer`` with nothing after it) is
    a 401 here, never a fall-back to the connection's own identity (a Unix peer, a client
    certificate), as it is a 401 on a connection that has none."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise UnauthenticatedError()
    return value.strip()


def _vault_token(request: web.Request, *, authorization: bool) -> str:
    """The rule "one credential at most": an X-Vault-Token beside an Authorization header, or two
    X-Vault-Token headers, is a 400, for the reason two Authorization headers are."""
    sent = request.headers.getall(VAULT_TOKEN_HEADER)
    if len(sent) > 1 or authorization:
        raise RequestError("send one credential: one Authorization or one X-Vault-Token header, not several")
    # Present but empty is refused like an unusable Authorization header (bearer_of), never a fall-back.
    token = sent[0].strip()
    if not token:
        raise UnauthenticatedError()
    return token


def _note_presented(request: web.Request, credentials: Credentials) -> None:
    """A refused client certificate's identity, for the audit record of the refusal: its SHA-256
    fingerprint and first URI SAN or CN (clipped), never anything secret. Only on the failure path."""
    cert = credentials.client_cert
    if cert is None or credentials.bearer is not None:
        return  # a token decided: the certificate was not what was refused
    presented = {"cert_sha256": cert.fingerprint_sha256}
    if cert.uri_sans:
        presented["uri_san"] = cert.uri_sans[0][:256]
    elif cert.subject_cn:
        presented["subject_cn"] = cert.subject_cn[:256]
    audit_note(request, presented=presented)


def _on_vault_surface(request: web.Request) -> bool:
    """Whether the request reached a route of the Vault façade (asked on errors only)."""
    op = routes.operation_of(request)
    return op is not None and op.vault


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(unmatched)"


def _audit_fields(request: web.Request, request_id: str, status: int) -> dict[str, object]:
    decision = "deny" if status in (401, 403) else "allow" if request.get(AUTHORIZED) else "none"
    return audit_record(request, request_id, action=routes.action_of(request), status=status,
                        path=_audit_path(request), decision=decision, **request.get(AUDIT_NOTES, {}))


def _audit_path(request: web.Request) -> str | None:
    """The path a request's record names: what its handler said it acted on, else its ``{path}``,
    else its ``prefix`` query, only on an operation that takes one (on any other route a caller could
    write any path it likes into the record)."""
    noted: str | None = request.get(AUDIT_PATH)
    if noted is not None:
        return noted
    path: str | None = request.match_info.get("path")
    if path is not None:
        return path
    op = routes.operation_of(request)
    return request.query.get("prefix") if op is not None and op.takes_prefix else None


class _RequestIds:
    """Fresh request ids: a random per-process prefix and a counter (a uuid4 costs ten times more).

    Ids correlate, they grant nothing, so they need to be unique, not unguessable: 64 random bits
    per process (drawn again in a forked child) keep workers and restarts apart.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


_new_request_id = _RequestIds()


def _request_id(request: web.Request) -> str:
    """The caller's X-Request-Id if it sent exactly one well-formed one, else a fresh id.

    Two are not refused (the id correlates, it grants nothing), but neither is used: a proxy may
    log the other one, and a record must not be tied to a request it does not name. Nor is one in
    the shape of our fresh ids: their prefix is in every answer and their counter counts, so a
    caller could claim the id the next request will get and tie its records to that request.
    """
    incoming = request.headers.getall("X-Request-Id", [])
    # A token fits the id's alphabet and length: one sent as an id is neither echoed nor recorded.
    if (len(incoming) == 1 and _REQUEST_ID_RE.fullmatch(incoming[0]) and not _FRESH_ID_RE.fullmatch(incoming[0])
            and not tokens.looks_like_token(incoming[0])):
        return incoming[0]
    return _new_request_id()


def _client_gone(request: web.Request) -> bool:
    """The peer closed (or reset) the connection: an answer can no longer reach it."""
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, authentication, error-to-problem conversion and one log line per request."""
    started = time.perf_counter()
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    d = request.app[SERVICES]
    audited = request.path not in request.app[PUBLIC_PATHS]
    response: web.StreamResponse
    vault_unauthenticated = False
    try:
        if audited:
            # Authenticate before anything else, so an unauthenticated caller learns nothing, not
            # even whether a route or a path exists. A login route authenticates itself (its handler).
            if request.path not in request.app[LOGIN_PATHS]:
                credentials = _credentials(request)
                try:
                    request[PRINCIPAL] = await authenticate(d.authenticators, credentials)
                except UnauthenticatedError:
                    _note_presented(request, credentials)
                    raise
            if d.barrier.sealed and request.path not in SEALED_ROUTES:
                raise SealedError()
            await d.audit_ready()
        response = await handler(request)
    except SecretsdError as exc:
        ptype = problem_for(exc)
        vault = _on_vault_surface(request)
        vault_unauthenticated = vault and ptype.status == 401
        response = problem_response(ptype, exc.message, request_id, vault=vault)
    except web.HTTPException as exc:
        ptype = _HTTP_PROBLEMS.get(exc.status) or ProblemType("http-error", exc.status, exc.reason)
        response = problem_response(ptype, exc.reason, request_id, vault=_on_vault_surface(request))
        if "Allow" in exc.headers:
            # Only a caller past authentication gets here, so the methods of a route are no news.
            response.headers["Allow"] = exc.headers["Allow"]
    except asyncio.CancelledError:
        # The handler was cancelled (the client left, with handler cancellation on, or shutdown):
        # the request still gets its record, then the cancellation goes on.
        if audited:
            # A record that cannot be written is the audit log's own failure to report; there is
            # no answer left to refuse.
            with contextlib.suppress(AuditError):
                await asyncio.shield(d.record_request(_audit_fields(request, request_id, CLIENT_GONE.status)))
        raise
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and _client_gone(request):
            # A client that hangs up mid-body is the network, not our fault: no error, no traceback.
            log.info("client left before the answer (request %s)", request_id)
            response = problem_response(CLIENT_GONE, CLIENT_GONE.title, request_id)
        else:
            # Frames only: an exception's message may quote data, and data may be a secret.
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("unhandled %s (request %s)\n%s", type(exc).__name__, request_id, frames)
            response = problem_response(INTERNAL, INTERNAL.title, request_id)
    if audited:
        # Fail closed: nothing leaves before its record is durable.
        try:
            await d.record_request(_audit_fields(request, request_id, response.status))
        except AuditError as exc:
            response = problem_response(problem_for(exc), exc.message, request_id,
                                        vault=_on_vault_surface(request))
    if vault_unauthenticated:
        # Vault answers a missing or unknown token with 403 (hvac's is_authenticated counts on it).
        # Only after the record, which says 401: unauthenticated failures keep their audit budget.
        response = problem_response(VAULT_UNAUTHENTICATED, VAULT_UNAUTHENTICATED.title, request_id, vault=True)
    response.headers["X-Request-Id"] = request_id
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    who = request.get(PRINCIPAL)
    route = _route_name(request)
    elapsed = time.perf_counter() - started
    d.metrics.observe_request(route, request.method, response.status, elapsed)
    request.app[ACCESS_LOG](request.method, route, response.status, elapsed, request_id,
                            getattr(who, "client", None))
    return response


def create_metrics_app(daemon: Services) -> web.Application:
    """The separate, unauthenticated metrics listener ([metrics] listen): /metrics and nothing else."""

    async def serve_metrics(request: web.Request) -> web.Response:
        return await metrics_response(daemon)

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    return app


def create_app(daemon: Services, *, access_log: AccessLog | None = None,
               vault_mount: str | None = None, jwt_login: JwtLogin | None = None) -> web.Application:
    """The API application; ``access_log`` writes the line per request (default: through ``logging``);
    ``vault_mount``: serve the Vault KV version 2 façade at ``/v1/{vault_mount}`` ([vault] settings)."""
    app = web.Application(middlewares=[request_middleware], client_max_size=daemon.max_body_bytes)
    table = vault_routes.table(vault_mount)
    app[SERVICES] = daemon
    app[ACCESS_LOG] = access_log or LoggingAccessLog()
    app[OPENAPI] = vault_routes.document(vault_mount)
    app[PUBLIC_PATHS] = routes.public_paths(table)
    app[LOGIN_PATHS] = routes.login_paths(table)
    if jwt_login is not None:
        app[JWT_LOGIN] = jwt_login
    if vault_mount is not None:
        app[MOUNT] = vault_mount
    routes.register(app, table)
    return app
