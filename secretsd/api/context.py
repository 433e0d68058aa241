"""Per-request helpers the handlers share: who is calling, and may they."""

from __future__ import annotations

from aiohttp import web

from secretsd import tokens
from secretsd.api.services import Services
from secretsd.audit import fields
from secretsd.domain.identity import Principal
from secretsd.domain.policy import Capability
from secretsd.errors import PermissionDeniedError, RequestError
from secretsd.paths import validate_path, validate_prefix

SERVICES = web.AppKey("services", Services)
#: The OpenAPI document, built from the route table once per app.
OPENAPI = web.AppKey("openapi", dict)
PRINCIPAL = web.RequestKey("principal", Principal)
AUTHORIZED = web.RequestKey("authorized", bool)
AUDIT_NOTES = web.RequestKey("audit_notes", dict)
#: The path a handler acted on, for its record, when the request does not spell it as ``{path}``.
AUDIT_PATH = web.RequestKey("audit_path", str)
REQUEST_ID = web.RequestKey("request_id", str)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def principal(request: web.Request) -> Principal:
    who = request.get(PRINCIPAL)
    if not isinstance(who, Principal):
        raise RuntimeError("route reached without authentication")
    return who


def authorize(request: web.Request, capability: Capability, path: str) -> Principal:
    """Raise 403 unless the caller's policies grant ``capability`` on ``path``.

    The message never says whether the path exists: a denied caller learns nothing about it.
    """
    who = principal(request)
    d = services(request)
    decision = d.policies.current.decide(who.policies, capability, path)
    d.metrics.policy_decision(decision.allowed)
    if not decision.allowed:
        raise PermissionDeniedError(f"permission denied: {capability.value} on {path}")
    request[AUTHORIZED] = True
    return who


def audit_note(request: web.Request, **fields: object) -> None:
    """Add fields (version, value HMAC...) to this request's audit record."""
    request.setdefault(AUDIT_NOTES, {}).update(fields)


def audit_record(request: web.Request, request_id: str, *, action: str, status: int, path: str | None,
                 decision: str, **notes: object) -> dict[str, object]:
    """The fields of an audit record about this request (or one item of a batch it carries)."""
    return _audit_base(request, request_id, action) | _audit_path(request, path) | {
        "decision": decision, "outcome": status, **notes}


def audit_records(request: web.Request, request_id: str, action: str,
                  items: list[tuple[str, int, dict[str, object]]]) -> list[dict[str, object]]:
    """``audit_record`` for each item of a batch (path, status, notes), the request's own fields
    worked out once: a 1,000-item page is 1,000 records."""
    base = _audit_base(request, request_id, action)
    return [base | _audit_path(request, path) | {"decision": "deny" if status == 403 else "allow",
                                                  "outcome": status, "batch_item": n, **notes}
            for n, (path, status, notes) in enumerate(items)]


def _audit_base(request: web.Request, request_id: str, action: str) -> dict[str, object]:
    who = request.get(PRINCIPAL)
    return {
        "request_id": request_id,
        "client": who.client if who else None,
        "auth": who.method if who else None,
        "token": tokens.display_id(who.token_id) if who and who.token_id else None,
        "action": action,
        "remote": _remote(request),
    }


def _remote(request: web.Request) -> str | None:
    """Who connected: the peer address, or on the Unix socket the uid and gid the kernel reported
    (recorded for refusals too: the identity presented, never a credential). Not the pid: the
    unauthenticated failure budget is kept per remote, and a new process must not buy a new one."""
    peer = getattr(request.protocol, "peer", None)
    if peer is not None:
        return f"unix:uid={peer.uid},gid={peer.gid}"
    remote = request.remote
    return fields.clip(remote, fields.MAX_REMOTE_BYTES)[0] if remote else remote


def _audit_path(request: web.Request, path: str | None) -> dict[str, object]:
    if path is None:
        return {"path": None}
    # Anyone may send a path: an unauthenticated one gets less room.
    path = tokens.redact_secrets(path)  # a token pasted into a URL never reaches the log
    path, cut = fields.clip(path, fields.MAX_PATH_BYTES if request.get(PRINCIPAL)
                            else fields.MAX_UNAUTHENTICATED_PATH_BYTES)
    return {"path": path, "path_truncated": True} if cut else {"path": path}


def allowed_paths(request: web.Request, capability: Capability, paths: list[str]) -> set[str]:
    """The subset of ``paths`` the caller's policies grant ``capability`` on (a deny on one hides it)."""
    who = principal(request)
    policies = services(request).policies.current
    return {p for p in paths if policies.decide(who.policies, capability, p).allowed}


def secret_path(request: web.Request) -> str:
    return validate_path(request.match_info["path"])


def list_prefix(request: web.Request) -> str:
    return validate_prefix(request.query.get("prefix", ""))


# No query integer of the API (a version, a page size) exceeds a PostgreSQL ``integer``; a larger one
# must be a 400 here, not an overflow in the database.
MAX_QUERY_INT = 2**31 - 1


def int_query(request: web.Request, name: str, default: int | None = None) -> int | None:
    """A query integer in 0..MAX_QUERY_INT (each handler applies its own narrower rule after)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > MAX_QUERY_INT:
        raise RequestError(f"query parameter {name!r} must be an integer from 0 to {MAX_QUERY_INT}")
    return int(raw)
