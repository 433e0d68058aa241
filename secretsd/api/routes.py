"""The route table: every HTTP operation declared once.

Each `Operation` names its method, path, handler, audit action, the capability it needs, its
request body model and whether it is public or answers while sealed. From this one table come the
aiohttp router (`register`), the public and sealed path sets and the audit action the middleware
records (`action_of`), and the OpenAPI document (`secretsd.api.openapi.build`). Adding an endpoint is
one entry here plus its handler and the service method it calls.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from pydantic import BaseModel

from secretsd.api import handlers as h
from secretsd.api import jwt_login
from secretsd.api.bodies import (
    MAX_VERSION,
    BatchWriteBody,
    CreateTokenBody,
    PolicyCheckBody,
    PutSecretBody,
    RotateBody,
    SetMetadataBody,
    VersionsBody,
)
from secretsd.api.services import METRICS_CONTENT_TYPE
from secretsd.domain.policy import Capability
from secretsd.paths import PATH_PATTERN, PREFIX_PATTERN

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON = "application/json"


@dataclass(frozen=True)
class Query:
    """A query parameter, for the document (the handler parses it)."""

    name: str
    kind: str  # JSON Schema type
    description: str
    bounds: tuple[tuple[str, Any], ...] = ()  # JSON Schema keywords: pattern, minimum, ...


@dataclass(frozen=True)
class Variant:
    """One value of an operation's ``{action}`` segment: its own audit action, capability and
    summary, documented as its own path (one aiohttp route serves them all)."""

    value: str
    action: str
    capability: Capability
    summary: str


@dataclass(frozen=True)
class Operation:
    method: str
    #: aiohttp path; ``{action}`` is filled with the variants' values when there are variants.
    path: str
    handler: Handler
    summary: str
    #: The audit action recorded for the request; None only on public operations (never recorded).
    action: str | None
    #: The capability the handler checks (None: any valid token, or public), and on what.
    capability: Capability | None = None
    scope: str = ""
    body: type[BaseModel] | None = None
    query: tuple[Query, ...] = ()
    #: Anyone may call it, without a token, and it is not recorded: it reveals no secret state.
    public: bool = False
    #: Answers while sealed, so an operator can learn why it is sealed.
    while_sealed: bool = False
    #: Authenticates itself (a login: its body is the credential): recorded, but the middleware does
    #: not ask the authenticators; the handler sets the principal (secretsd.api.jwt_login).
    login: bool = False
    ok: int = 200
    ok_type: str = JSON
    #: Statuses only this operation answers, beyond the common ones.
    more: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = ()
    #: (query parameter, value, action when the request has that value, action otherwise): an
    #: operation whose audit action depends on its query (Vault's ``?list=true``), with ``action`` None.
    query_actions: tuple[str, str, str, str] | None = None
    #: Part of the Vault façade (secretsd.api.vault): its errors also carry Vault's ``errors`` list.
    vault: bool = False

    def __post_init__(self) -> None:
        # Checked when the table is built, so a route without its audit action cannot start.
        if not self.public and self.action is None and not self.variants and not self.query_actions:
            raise ValueError(f"{self.method} {self.path}: an audited operation needs an audit action")
        if self.public and (self.action is not None or self.capability is not None or self.while_sealed):
            raise ValueError(f"{self.method} {self.path}: a public operation is neither recorded nor authorized")
        if bool(self.variants) != ("{action}" in self.path):
            raise ValueError(f"{self.method} {self.path}: variants and an {{action}} segment go together")
        if self.variants and self.action is not None:
            raise ValueError(f"{self.method} {self.path}: with variants, each variant names the audit action")

    @property
    def takes_prefix(self) -> bool:
        """Whether it reads a ``prefix`` query (its audit record names that prefix)."""
        return any(q.name == "prefix" for q in self.query)

    @property
    def router_path(self) -> str:
        """The path aiohttp matches: ``{action}`` accepts exactly the variants' values."""
        if not self.variants:
            return self.path
        return self.path.replace("{action}", "{action:" + "|".join(re.escape(v.value) for v in self.variants) + "}")

    def audit_action(self, match_info: Mapping[str, str], query: Mapping[str, str] | None = None) -> str:
        if self.action is not None:
            return self.action
        if self.query_actions is not None:
            name, wanted, when, otherwise = self.query_actions
            return when if query is not None and query.get(name) == wanted else otherwise
        value = match_info.get("action")
        return next((v.action for v in self.variants if v.value == value), "http.unknown")


_PREFIX = Query("prefix", "string", "list this path and everything below it", (("pattern", PREFIX_PATTERN),))
#: A page of a listing: the prefix, the cursor and the page size.
_LISTING = (
    _PREFIX,
    Query("after", "string", "continue after this path (pagination)", (("pattern", "^$|" + PATH_PATTERN),)),
    Query("limit", "integer", "at most this many (1-1000)", (("minimum", 1), ("maximum", 1000))),
)

OPERATIONS: tuple[Operation, ...] = (
    # -- health and the description: public ---------------------------------------------------
    Operation("GET", "/healthz", h.healthz, "Liveness", None, public=True),
    Operation("GET", "/readyz", h.readyz, "Readiness: unsealed and storage reachable", None, public=True),
    Operation("GET", "/v1/openapi.json", h.openapi_document, "This OpenAPI document", None, public=True),
    Operation("GET", "/metrics", h.metrics, "Prometheus metrics (also on the separate [metrics] listener)",
              "sys.metrics", Capability.READ, "on sys/metrics", ok_type=METRICS_CONTENT_TYPE),
    # -- secrets --------------------------------------------------------------------------------
    Operation("PUT", "/v1/secrets/{path:.+}", h.put_secret, "Write a new version; `cas` makes it check-and-set",
              "secret.write", Capability.WRITE, body=PutSecretBody),
    Operation("GET", "/v1/secrets/{path:.+}", h.get_secret,
              "Read a secret (current version, ?version=N or ?label=current|previous|pending); "
              "410 once expired or past its grace period (docs/rotation.md)",
              "secret.read", Capability.READ, more=("410",), query=(
                  Query("version", "integer", "a version number", (("minimum", 1), ("maximum", MAX_VERSION))),
                  Query("label", "string", "current, previous or pending"))),
    Operation("POST", "/v1/secrets:batch", h.write_batch,
              "Write up to 1,000 secrets in one transaction; a result per item, each item decided and "
              "audited as its own PUT (docs/api.md)", "batch.write", body=BatchWriteBody),
    Operation("GET", "/v1/secrets:read", h.read_batch,
              "Read the current values below a prefix, a page at a time (list on the prefix; only the "
              "paths the caller may list and read); each item audited as its own GET", "batch.read",
              Capability.LIST, "on the prefix", query=(*_LISTING, Query(
                  "children", "integer", "1: only the secrets one segment below the prefix",
                  (("minimum", 0), ("maximum", 1))))),
    Operation("POST", "/v1/secrets/{path:.+}/rotate", h.rotate_secret,
              "Rotate now: a generated (or the supplied) value becomes current, the old one previous; "
              "502 rotation-failed when the hook fails",
              "secret.rotate", Capability.ROTATE, body=RotateBody, more=("502",)),
    Operation("PUT", "/v1/metadata/{path:.+}", h.put_metadata, "Set or remove the rotation policy",
              "secret.policy", Capability.ROTATE, body=SetMetadataBody),
    Operation("GET", "/v1/rotation/status", h.rotation_status,
              "Rotation policy, next due and last result per secret", "rotation.status",
              Capability.LIST, "on the prefix",
              query=(Query("prefix", "string", "this path and below", (("pattern", PREFIX_PATTERN),)),)),
    Operation("GET", "/v1/secrets", h.list_secrets, "List secret paths (never values)", "secret.list",
              Capability.LIST, "on the prefix", query=_LISTING),
    Operation("DELETE", "/v1/secrets/{path:.+}", h.delete_secret, "Soft-delete the current version",
              "secret.delete", Capability.DELETE),
    Operation("POST", "/v1/secrets/{path:.+}/{action}", h.version_action, "Change the state of versions", None,
              body=VersionsBody, variants=(
                  Variant("delete", "secret.delete", Capability.DELETE, "Delete the given versions"),
                  Variant("undelete", "secret.undelete", Capability.DELETE, "Undelete the given versions"),
                  # Destroy cannot be undone, so it takes more than the right to (soft) delete.
                  Variant("destroy", "secret.destroy", Capability.ADMIN, "Destroy the given versions"))),
    Operation("GET", "/v1/metadata/{path:.+}", h.get_metadata,
              "Versions, labels, timestamps, creators, states, rotation", "secret.metadata", Capability.READ),
    # -- system ---------------------------------------------------------------------------------
    Operation("GET", "/v1/sys/status", h.status, "Seal state, provider, keyring term, version", "sys.status",
              Capability.READ, "on sys/status", while_sealed=True),
    Operation("POST", "/v1/sys/keyring/rotate", h.rotate_keyring, "Add a keyring term", "keyring.rotate",
              Capability.ADMIN, "on sys/keyring"),
    Operation("GET", "/v1/sys/backup", h.backup_create,
              "A backup of the whole store, streamed (docs/backup.md); a cut stream lacks its manifest",
              "backup.create", Capability.ADMIN, "on sys/backup", ok_type=h.BACKUP_CONTENT_TYPE),
    Operation("POST", "/v1/sys/policy/check", h.policy_check,
              "Which rule decides a request of a client (or of the named policies)",
              "policy.check", Capability.ADMIN, "on sys/policy", body=PolicyCheckBody),
    Operation("POST", "/v1/sys/policy/reload", h.policy_reload,
              "Reload the policy file, all or nothing; 422 invalid-policy-file (the detail says why) "
              "keeps the policies in force", "policy.reload", Capability.ADMIN, "on sys/policy",
              more=("422",)),
    Operation("GET", "/v1/sys/policies", h.policy_list, "The loaded policies: names, descriptions, counts",
              "policy.list", Capability.ADMIN, "on sys/policy"),
    Operation("GET", "/v1/sys/policies/{name}", h.policy_show, "One loaded policy's rules", "policy.show",
              Capability.ADMIN, "on sys/policy"),
    # -- tokens ---------------------------------------------------------------------------------
    Operation("POST", "/v1/auth/tokens", h.create_token, "Create a token for a client", "token.create",
              Capability.ADMIN, "on sys/tokens", body=CreateTokenBody, ok=201),
    Operation("GET", "/v1/auth/tokens", h.list_tokens,
              "List tokens (never the token itself), a page at a time by token id; expired ones hidden "
              "unless include_expired=1", "token.list", Capability.ADMIN, "on sys/tokens", query=(
                  Query("after", "string", "continue after this token id (next_after of the previous page)",
                        (("pattern", "^$|^(sdt_)?[0-9a-f]{16}$"),)),
                  Query("limit", "integer", "at most this many (1-1000)", (("minimum", 1), ("maximum", 1000))),
                  Query("include_expired", "integer", "1: list expired tokens too",
                        (("minimum", 0), ("maximum", 1))))),
    Operation("DELETE", "/v1/auth/tokens/{token_id}", h.revoke_token, "Revoke a token", "token.revoke",
              Capability.ADMIN, "on sys/tokens"),
    Operation("POST", "/v1/auth/tokens/renew-self", h.renew_self,
              "Extend the calling token by its TTL, up to its max TTL (answers the new expires_at)",
              "token.renew"),
    Operation("POST", "/v1/auth/jwt/login", jwt_login.jwt_login,
              "Exchange a workload JWT (Kubernetes service account, OIDC) for a short-lived token",
              "auth.login", body=jwt_login.JwtLoginBody, login=True),
    # Every caller may ask who it is: it reveals only what its own token already carries.
    Operation("GET", "/v1/auth/whoami", h.whoami, "The calling token's client and policies", "auth.whoami",
              while_sealed=True),
)


def _paths(want: Callable[[Operation], bool], operations: tuple[Operation, ...] = OPERATIONS) -> frozenset[str]:
    """The paths of the operations ``want`` picks, after checking that every operation on such a
    path is picked too: the middleware decides by path, so a wrong method on a public path is
    answered (405) without a token, as the right one is."""
    picked = {op.path for op in operations if want(op)}
    mixed = [op for op in operations if op.path in picked and not want(op)]
    if mixed:
        raise ValueError(f"{mixed[0].method} {mixed[0].path} differs from the other operations on its path")
    return frozenset(picked)


#: Paths anyone may call: liveness, readiness and the API description reveal no secret state.
PUBLIC_PATHS = _paths(lambda op: op.public)
#: While sealed the API answers 503 `sealed` (after authentication), except on these paths.
SEALED_PATHS = _paths(lambda op: op.while_sealed)


def login_paths(operations: tuple[Operation, ...] = OPERATIONS) -> frozenset[str]:
    """The paths of the operations that authenticate themselves (``Operation.login``)."""
    return _paths(lambda op: op.login, operations)


def public_paths(operations: tuple[Operation, ...]) -> frozenset[str]:
    """PUBLIC_PATHS of another table (the native one with the Vault façade's operations added)."""
    return _paths(lambda op: op.public, operations)

OPERATIONS_KEY = web.AppKey("operations", dict)


def register(app: web.Application, operations: tuple[Operation, ...] = OPERATIONS) -> None:
    """Add every operation to the app's router and remember each route's operation (a HEAD route
    aiohttp adds beside a GET is the same operation), for `action_of`: computed once, here."""
    by_route: dict[AbstractRoute, Operation] = {}
    for op in operations:
        if op.method == "GET":
            route = app.router.add_get(op.router_path, op.handler)
        else:
            route = app.router.add_route(op.method, op.router_path, op.handler)
        resource = route.resource
        assert resource is not None  # a route added by path always has its resource
        for sibling in resource:
            if sibling.handler is op.handler and sibling.method in (op.method, "HEAD"):
                by_route[sibling] = op
    app[OPERATIONS_KEY] = by_route


def action_of(request: web.Request) -> str:
    """The audit action of a request; ``http.unknown`` for one no operation matched (404, 405).

    On every audited request: a dict lookup and an attribute, no call for the common case.
    """
    match_info = request.match_info
    op: Operation | None = match_info.current_app[OPERATIONS_KEY].get(match_info.route)
    if op is None:
        return "http.unknown"
    return op.action if op.action is not None else op.audit_action(match_info, request.query)


def operation_of(request: web.Request) -> Operation | None:
    """The operation a request reached (None: no route matched)."""
    match_info = request.match_info
    found: Operation | None = match_info.current_app[OPERATIONS_KEY].get(match_info.route)
    return found
