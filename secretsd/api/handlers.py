"""HTTP handlers: thin adapters from requests to the domain services and back to JSON.

Each handler parses its request, calls a service and answers; which method and path reach it,
its audit action and its place in the OpenAPI document are declared in `secretsd.api.routes`.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from aiohttp import web

from secretsd import tokens
from secretsd.api.bodies import (
    BatchWriteBody,
    CreateTokenBody,
    PolicyCheckBody,
    PutSecretBody,
    RotateBody,
    SetMetadataBody,
    VersionsBody,
    read_body,
)
from secretsd.api.context import (
    AUTHORIZED,
    OPENAPI,
    REQUEST_ID,
    allowed_paths,
    audit_note,
    audit_records,
    authorize,
    int_query,
    list_prefix,
    principal,
    secret_path,
    services,
)
from secretsd.api.services import METRICS_CONTENT_TYPE, Services
from secretsd.domain.identity import Principal
from secretsd.domain.policy import Capability
from secretsd.domain.rotation import RotationPolicy, labels_of
from secretsd.domain.secret_service import MAX_LIST_LIMIT, Put, SecretValue
from secretsd.domain.token_service import MAX_TOKEN_PAGE
from secretsd.errors import PermissionDeniedError, RequestError, SealedError, SecretsdError
from secretsd.paths import is_child, validate_path
from secretsd.problems import problem_document, problem_for
from secretsd.records import SecretRecord, TokenRecord, VersionInfo


def _t(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _version(info: VersionInfo) -> dict[str, Any]:
    return {
        "version": info.version,
        "created_at": _t(info.created_at),
        "created_by": info.created_by,
        "state": info.state.value,
        "deleted_at": _t(info.deleted_at),
        "expires_at": _t(info.expires_at),
        "grace_until": _t(info.grace_until),
    }


def _value(found: SecretValue) -> dict[str, str]:
    """A value as the API shows it: ``value`` when it is text, else ``value_base64`` (its exact bytes)."""
    text = found.value
    return {"value": text} if text is not None else {"value_base64": base64.b64encode(found.data).decode("ascii")}


def _rotation(secret: SecretRecord) -> dict[str, Any]:
    status = dict(secret.rotation_status)
    return {
        "policy": None if secret.rotation is None else RotationPolicy.parse(secret.rotation).model_dump(mode="json"),
        "next_due": _t(secret.rotation_due),
        "pending_version": secret.pending_version,
        "last_result": status.get("last_result"),
        "last_reason": status.get("last_reason"),
        "last_attempt_at": status.get("last_attempt_at"),
        "last_success_at": status.get("last_success_at"),
        "failures": status.get("failures", 0),
    }


def _allows(request: web.Request, capability: Capability, path: str) -> bool:
    """Whether the caller also holds ``capability`` on ``path`` (no error, no audit note)."""
    return services(request).policies.current.decide(principal(request).policies, capability, path).allowed


def _token(record: TokenRecord) -> dict[str, Any]:
    return {
        "token_id": tokens.display_id(record.token_id),
        "client": record.client,
        "policies": list(record.policies),
        "created_at": _t(record.created_at),
        "created_by": record.created_by,
        "expires_at": _t(record.expires_at),
        "revoked_at": _t(record.revoked_at),
        "max_expires_at": _t(record.max_expires_at),
    }


# -- health -----------------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def metrics(request: web.Request) -> web.Response:
    authorize(request, Capability.READ, "sys/metrics")
    return await metrics_response(services(request))


async def metrics_response(d: Services) -> web.Response:
    return web.Response(body=await d.metrics_page(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def readyz(request: web.Request) -> web.Response:
    ready, checks = await services(request).readiness()
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


# -- secrets ----------------------------------------------------------------------------------
async def put_secret(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.WRITE, path)
    body = await read_body(request, PutSecretBody)
    d = services(request)
    value = body.payload()
    info = await d.secrets.put(who, path, value, cas=body.cas, metadata=body.metadata,
                               expires_at=body.expires_at)
    audit_note(request, version=info.version, value_hmac=d.value_hmac(value))
    return web.json_response({"path": path, "version": info.version, "created_at": _t(info.created_at)})


async def get_secret(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.READ, path)
    version, label = int_query(request, "version"), request.query.get("label")
    # Only a non-current version can be past its grace (admin) or pending (rotate): the plain
    # read of the current value, the hot path, needs no further policy decision.
    other = version is not None or label is not None
    found = await services(request).secrets.get(
        who, path, version, label=label,
        privileged=other and _allows(request, Capability.ADMIN, path),
        may_read_pending=other and _allows(request, Capability.ROTATE, path),
    )
    audit_note(request, version=found.info.version, **({"label": label} if label else {}))
    return web.json_response({"path": path} | _value(found) | {"labels": list(found.labels)}
                             | _version(found.info))


def _item_error(path: str, exc: SecretsdError) -> dict[str, Any]:
    ptype = problem_for(exc)
    return {"path": path, "status": ptype.status, "error": problem_document(ptype, exc.message)}


async def _record_items(request: web.Request, action: str, items: list[tuple[str, int, dict[str, Any]]]) -> None:
    """One audit record per item of a batch, like the request each item stands for; all durable
    before the answer (the request's own record follows them in the chain)."""
    await services(request).record_requests(audit_records(request, request[REQUEST_ID], action, items))


async def write_batch(request: web.Request) -> web.Response:
    who = principal(request)
    body = await read_body(request, BatchWriteBody)
    d = services(request)
    # The batch takes any valid token; each item is decided on its own path, as its PUT would be.
    request[AUTHORIZED] = True
    allowed = allowed_paths(request, Capability.WRITE, [item.path for item in body.items])
    todo = [n for n, item in enumerate(body.items) if item.path in allowed]
    values = [item.payload() for item in body.items]
    done = await d.secrets.put_batch(who, [
        Put(body.items[n].path, values[n], body.items[n].cas, body.items[n].metadata, body.items[n].expires_at)
        for n in todo])
    outcomes: dict[int, VersionInfo | SecretsdError] = dict(zip(todo, done, strict=True))
    results: list[dict[str, Any]] = []
    records: list[tuple[str, int, dict[str, Any]]] = []
    for n, (item, value) in enumerate(zip(body.items, values, strict=True)):
        outcome = outcomes.get(n) or PermissionDeniedError(f"permission denied: write on {item.path}")
        if isinstance(outcome, SecretsdError):
            results.append(_item_error(item.path, outcome))
            records.append((item.path, results[-1]["status"], {}))
        else:
            results.append({"path": item.path, "status": 200, "version": outcome.version,
                            "created_at": _t(outcome.created_at)})
            records.append((item.path, 200, {"version": outcome.version, "value_hmac": d.value_hmac(value)}))
    await _record_items(request, "secret.write", records)
    audit_note(request, items=len(results), written=sum(1 for r in results if r["status"] == 200))
    return web.json_response({"results": results})


async def read_batch(request: web.Request) -> web.Response:
    prefix = list_prefix(request)
    who = authorize(request, Capability.LIST, prefix)
    limit = int_query(request, "limit")
    after = request.query.get("after", "")
    children = int_query(request, "children", 0)
    if children not in (0, 1):
        raise RequestError("children must be 0 or 1")

    def visible(paths: list[str]) -> set[str]:
        # Listed as GET /v1/secrets lists (a path hidden from `list` stays hidden), keeping only the
        # paths the caller may also read; with children=1 only those one segment below the prefix
        # (what `run` injects), so nothing else is decrypted or recorded as read.
        if children:
            paths = [p for p in paths if is_child(prefix, p)]
        return allowed_paths(request, Capability.LIST, paths) & allowed_paths(request, Capability.READ, paths)

    found, next_after = await services(request).secrets.read_page(
        who, prefix, after=after, limit=MAX_LIST_LIMIT if limit is None else limit, visible=visible)
    secrets: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    records: list[tuple[str, int, dict[str, Any]]] = []
    for path, got in found:
        if isinstance(got, SecretsdError):
            skipped.append(_item_error(path, got))
            records.append((path, skipped[-1]["status"], {}))
        else:
            # The current version of each: no labels, state or deletion fields (always current,
            # active and undeleted here); a caller wanting those reads the one secret.
            info = got.info
            secrets.append({"path": path} | _value(got) | {"version": info.version, "created_at": _t(info.created_at),
                                                           "expires_at": _t(info.expires_at)})
            records.append((path, 200, {"version": got.info.version}))
    await _record_items(request, "secret.read", records)
    audit_note(request, items=len(records))
    return web.json_response({"prefix": prefix, "secrets": secrets, "skipped": skipped, "next_after": next_after})


async def rotate_secret(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.ROTATE, path)
    body = await read_body(request, RotateBody) if request.body_exists else RotateBody.model_validate({})
    if body.value is not None:
        # Choosing the new value is writing it: `rotate` alone only lets the generator choose.
        authorize(request, Capability.WRITE, path)
    d = services(request)
    if body.value is not None:
        audit_note(request, value_hmac=d.value_hmac(body.value))
    try:
        done = await d.rotation.rotate(who, path, body.value, expires_at=body.expires_at)
    except SecretsdError as exc:
        audit_note(request, rotation="failed", reason=exc.message)
        raise
    audit_note(request, rotation="succeeded", version=done.version, previous_version=done.previous_version)
    return web.json_response({
        "path": path, "version": done.version, "previous_version": done.previous_version,
        "grace_until": _t(done.grace_until), "generated": body.value is None,
    })


async def put_metadata(request: web.Request) -> web.Response:
    # The rotation policy decides a secret's lifecycle, like rotating it does: `rotate` (and an
    # explicit deny of `rotate` wins). Hooks are named, never defined, here (docs/rotation.md).
    path = secret_path(request)
    who = authorize(request, Capability.ROTATE, path)
    body = await read_body(request, SetMetadataBody)
    secret = await services(request).rotation.set_policy(who, path, body.rotation)
    audit_note(request, rotation="enabled" if body.rotation and body.rotation.enabled else
               "disabled" if body.rotation else "removed")
    return web.json_response({"path": path, "rotation": _rotation(secret)})


async def rotation_status(request: web.Request) -> web.Response:
    prefix = list_prefix(request)
    authorize(request, Capability.LIST, prefix)
    found = await services(request).rotation.list_status(prefix)
    visible = allowed_paths(request, Capability.LIST, [s.path for s in found])
    return web.json_response({
        "prefix": prefix,
        "secrets": [{"path": s.path, "current_version": s.current_version} | _rotation(s)
                    for s in found if s.path in visible],
    })


async def list_secrets(request: web.Request) -> web.Response:
    prefix = list_prefix(request)
    who = authorize(request, Capability.LIST, prefix)
    limit = int_query(request, "limit")
    page = await services(request).secrets.list_page(
        who, prefix, after=request.query.get("after", ""), limit=MAX_LIST_LIMIT if limit is None else limit,
        visible=lambda paths: allowed_paths(request, Capability.LIST, paths),
    )
    return web.json_response({
        "prefix": prefix,
        "secrets": [
            {"path": s.path, "current_version": s.current_version, "updated_at": _t(s.updated_at)}
            for s in page.secrets
        ],
        "next_after": page.next_after,
    })


async def delete_secret(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.DELETE, path)
    changed = await services(request).secrets.delete(who, path)
    audit_note(request, versions=changed)
    return web.json_response({"path": path, "deleted": changed})


def version_action_capability(action: str) -> Capability:
    """What a version action (delete, undelete, destroy) takes, on this API and the Vault façade's."""
    # Destroy cannot be undone, so it takes more than the right to (soft) delete.
    return Capability.ADMIN if action == "destroy" else Capability.DELETE


async def apply_version_action(request: web.Request, who: Principal, path: str, action: str,
                               versions: list[int]) -> list[int]:
    """Delete, undelete or destroy ``versions`` of ``path``; the versions changed, noted for the audit."""
    service = services(request).secrets
    change = {"delete": service.delete, "undelete": service.undelete, "destroy": service.destroy}[action]
    changed = await change(who, path, versions)
    audit_note(request, versions=changed)
    return changed


async def version_action(request: web.Request) -> web.Response:
    path = secret_path(request)
    action = request.match_info["action"]
    who = authorize(request, version_action_capability(action), path)
    body = await read_body(request, VersionsBody)
    changed = await apply_version_action(request, who, path, action, body.versions)
    key = {"delete": "deleted", "undelete": "undeleted", "destroy": "destroyed"}[action]
    return web.json_response({"path": path, key: changed})


async def get_metadata(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.READ, path)
    secret, versions = await services(request).secrets.metadata(who, path)
    return web.json_response({
        "path": path,
        "current_version": secret.current_version,
        "created_at": _t(secret.created_at),
        "updated_at": _t(secret.updated_at),
        "metadata": dict(secret.metadata),
        "max_versions": services(request).max_versions,
        "labels": {"current": secret.current_version, "previous": secret.previous_version,
                   "pending": secret.pending_version},
        "rotation": _rotation(secret),
        "versions": [_version(v) | {"labels": labels_of(secret, v.version)} for v in versions],
    })


# -- system -----------------------------------------------------------------------------------
async def status(request: web.Request) -> web.Response:
    authorize(request, Capability.READ, "sys/status")
    return web.json_response(await services(request).status())


async def rotate_keyring(request: web.Request) -> web.Response:
    who = authorize(request, Capability.ADMIN, "sys/keyring")
    term = await services(request).barrier.rekey(reason="requested", client=who.client)
    audit_note(request, active_term=term)
    return web.json_response({"active_term": term})


#: The media type of a backup file (docs/backup.md).
BACKUP_CONTENT_TYPE = "application/vnd.secretsd.backup"


async def backup_create(request: web.Request) -> web.StreamResponse:
    authorize(request, Capability.ADMIN, "sys/backup")
    d = services(request)
    if d.barrier.sealed:
        raise SealedError("the daemon is sealed: a backup needs the keyring")
    response = web.StreamResponse(headers={
        "Content-Type": BACKUP_CONTENT_TYPE, "Content-Disposition": 'attachment; filename="secretsd.sdbk"',
        "Cache-Control": "no-store",
    })
    await response.prepare(request)
    # Once the first bytes are out, a failure can only cut the stream short: the manifest is its last
    # line, so a cut file is refused by 'backup verify' and 'backup restore' (exit 7).
    manifest = await d.backup(response.write)
    audit_note(request, manifest_sha256=manifest.sha256, backup_id=manifest.backup_id, rows=manifest.total_rows)
    await response.write_eof()
    return response


async def policy_check(request: web.Request) -> web.Response:
    authorize(request, Capability.ADMIN, "sys/policy")
    body = await read_body(request, PolicyCheckBody)
    capability = Capability.parse(body.capability)
    path = body.path if body.path.startswith("sys/") else validate_path(body.path)
    d = services(request)
    current = d.policies.current
    if body.policies is not None:  # the policies themselves, as docs/operations.md checks them
        unknown = current.unknown(body.policies)
        if unknown:
            raise RequestError(f"unknown policy: {', '.join(unknown)}")
        held = sorted(set(body.policies))
    else:
        assert body.client is not None  # PolicyCheckBody: one of the two
        held = await d.tokens.policies_of(body.client)
    decision = current.decide(held, capability, path)
    rule = decision.rule
    return web.json_response({
        "client": body.client,
        "capability": capability.value,
        "path": path,
        "policies": held,
        "allowed": decision.allowed,
        "explanation": decision.explain(),
        "rule": None if rule is None else {
            "policy": rule.policy, "index": rule.index + 1, "path": rule.path,
            "effect": "allow" if decision.allowed else "deny",
        },
    })


async def policy_list(request: web.Request) -> web.Response:
    authorize(request, Capability.ADMIN, "sys/policy")
    return web.json_response({"policies": services(request).policies.current.summary()})


async def policy_show(request: web.Request) -> web.Response:
    authorize(request, Capability.ADMIN, "sys/policy")
    return web.json_response(services(request).policies.current.describe_policy(request.match_info["name"]))


async def policy_reload(request: web.Request) -> web.Response:
    who = authorize(request, Capability.ADMIN, "sys/policy")
    store = services(request).policies
    # PolicyFileError (422, its detail the reason) leaves the policies in force unchanged.
    new = store.reload(who.client)
    return web.json_response(store.status() | {"policies": new.names()})


# -- tokens -----------------------------------------------------------------------------------
async def create_token(request: web.Request) -> web.Response:
    who = authorize(request, Capability.ADMIN, "sys/tokens")
    body = await read_body(request, CreateTokenBody)
    token, record = await services(request).tokens.create(who, body.client, body.policies, body.ttl_seconds,
                                                          body.max_ttl_seconds)
    audit_note(request, subject_token=tokens.display_id(record.token_id), subject_client=record.client)
    return web.json_response({"token": token} | _token(record), status=201)


async def list_tokens(request: web.Request) -> web.Response:
    authorize(request, Capability.ADMIN, "sys/tokens")
    limit = int_query(request, "limit")
    include_expired = int_query(request, "include_expired", 0)
    if include_expired not in (0, 1):
        raise RequestError("query parameter 'include_expired' must be 0 or 1")
    page, next_after = await services(request).tokens.list_page(
        after=request.query.get("after", ""), limit=MAX_TOKEN_PAGE if limit is None else limit,
        include_expired=include_expired == 1)
    return web.json_response({"tokens": [_token(t) for t in page], "next_after": next_after})


async def revoke_token(request: web.Request) -> web.Response:
    who = authorize(request, Capability.ADMIN, "sys/tokens")
    token_id = await services(request).tokens.revoke(who, request.match_info["token_id"])
    audit_note(request, subject_token=tokens.display_id(token_id))
    return web.json_response({"revoked": tokens.display_id(token_id)})


async def whoami(request: web.Request) -> web.Response:
    # Every caller may ask who it is: it reveals only what its own token already carries.
    who = principal(request)
    return web.json_response({"client": who.client, "policies": list(who.policies), "method": who.method,
                              "expires_at": _t(who.expires_at)})


async def renew_self(request: web.Request) -> web.Response:
    # Any token may renew itself (within its own max TTL): it gains no right it did not have.
    record = await services(request).tokens.renew_self(principal(request))
    audit_note(request, subject_token=tokens.display_id(record.token_id))
    return web.json_response(_token(record))
