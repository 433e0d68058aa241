"""The Vault KV version 2 façade: Vault's paths, shapes and status codes over our own services.

Thin handlers, like ``secretsd.api.handlers``: each authorizes on OUR path (``secret/data/app/db``
is ``app/db``) with the same policy decision, calls the same ``SecretsService`` and is audited by
the same middleware under its ``vault.*`` action (``secretsd.api.vault_routes``). Nothing is stored
twice: a Vault map is one value of ours (``secretsd.domain.kv_map``). What is and is not supported,
and why: docs/vault-compat.md.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from secretsd import __version__, tokens
from secretsd.api.context import (
    AUDIT_PATH,
    REQUEST_ID,
    allowed_paths,
    audit_note,
    authorize,
    int_query,
    principal,
    secret_path,
    services,
)
from secretsd.api.handlers import apply_version_action, version_action_capability
from secretsd.api.vault_bodies import KvPatchBody, KvVersionsBody, KvWriteBody, read_vault_body
from secretsd.domain import kv_map
from secretsd.domain.policy import Capability
from secretsd.domain.secret_service import MAX_LIST_LIMIT
from secretsd.errors import ConflictError, NotFoundError, RequestError
from secretsd.paths import validate_prefix
from secretsd.records import VersionInfo, VersionState

MOUNT = web.AppKey("vault_mount", str)
#: Pages of a listing one Vault LIST reads at most (Vault's LIST has no pages: beyond this, ours).
MAX_LIST_PAGES = 50
#: Vault's answer to a check-and-set that does not match (a 400 in Vault, not our 409).
CAS_MISMATCH = "check-and-set parameter did not match the current version"


def vault_time(value: datetime | None) -> str:
    """Vault's time format (RFC 3339 in UTC, ``Z``); Vault writes "" for no time."""
    return "" if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _reply(request: web.Request, data: dict[str, Any] | None, *, auth: dict[str, Any] | None = None) -> web.Response:
    """Vault's response envelope."""
    return web.json_response({
        "request_id": request[REQUEST_ID], "lease_id": "", "renewable": False, "lease_duration": 0,
        "data": data, "wrap_info": None, "warnings": None, "auth": auth,
    })


def _no_content() -> web.Response:
    return web.Response(status=204)


def _version_metadata(info: VersionInfo) -> dict[str, Any]:
    return {"created_time": vault_time(info.created_at), "custom_metadata": None,
            "deletion_time": vault_time(info.deleted_at), "destroyed": info.state is VersionState.DESTROYED,
            "version": info.version}


def _allows(request: web.Request, capability: Capability, path: str) -> bool:
    return services(request).policies.current.decide(principal(request).policies, capability, path).allowed


# -- KV version 2 -----------------------------------------------------------------------------
async def kv_read(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.READ, path)
    # Vault's version=0 is the current one.
    version = int_query(request, "version") or None
    found = await services(request).secrets.get(
        who, path, version,
        # As the native GET: a version past its grace is admin's, a pending one rotate's.
        privileged=version is not None and _allows(request, Capability.ADMIN, path),
        may_read_pending=version is not None and _allows(request, Capability.ROTATE, path))
    audit_note(request, version=found.info.version)
    return _reply(request, {"data": kv_map.as_map(found.data), "metadata": _version_metadata(found.info)})


async def kv_write(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.WRITE, path)
    body = await read_vault_body(request, KvWriteBody)
    return await _store(request, who, path, kv_map.check_map(body.data), body.options.cas if body.options else None)


async def _store(request: web.Request, who: Any, path: str, data: dict[str, str], cas: int | None) -> web.Response:
    d = services(request)
    value = kv_map.stored_value(data)
    try:
        info = await d.secrets.put(who, path, value, cas=cas)
    except ConflictError:
        if cas is None:
            raise
        raise RequestError(CAS_MISMATCH) from None
    audit_note(request, version=info.version, value_hmac=d.value_hmac(value))
    return _reply(request, _version_metadata(info))


async def kv_patch(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.WRITE, path)
    authorize(request, Capability.READ, path)  # a patch reads the map it changes
    body = await read_vault_body(request, KvPatchBody)
    current = await services(request).secrets.get(who, path)
    if current.value is None:
        raise RequestError("a binary value cannot be patched as a map; write it through /v1/secrets")
    merged = kv_map.as_map(current.data)
    for key, value in body.data.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    # Check-and-set on the version read, unless the caller named one: a concurrent write is not lost.
    cas = body.options.cas if body.options and body.options.cas is not None else current.info.version
    return await _store(request, who, path, merged, cas)


async def kv_delete(request: web.Request) -> web.Response:
    path = secret_path(request)
    who = authorize(request, Capability.DELETE, path)
    changed = await services(request).secrets.delete(who, path)
    audit_note(request, versions=changed)
    return _no_content()


async def kv_versions(request: web.Request) -> web.Response:
    path = secret_path(request)
    action = request.match_info["action"]
    who = authorize(request, version_action_capability(action), path)
    body = await read_vault_body(request, KvVersionsBody)
    await apply_version_action(request, who, path, action, body.versions)
    return _no_content()


async def kv_metadata(request: web.Request) -> web.Response:
    if request.query.get("list") == "true":
        return await _list(request, request.match_info["path"])
    path = secret_path(request)
    who = authorize(request, Capability.READ, path)
    d = services(request)
    secret, versions = await d.secrets.metadata(who, path)
    return _reply(request, {
        "cas_required": False,
        "created_time": vault_time(secret.created_at),
        "current_version": secret.current_version,
        "custom_metadata": dict(secret.metadata) or None,
        "delete_version_after": "0s",
        "max_versions": d.max_versions,
        "oldest_version": min((v.version for v in versions), default=0),
        "updated_time": vault_time(secret.updated_at),
        "versions": {str(v.version): {"created_time": vault_time(v.created_at),
                                      "deletion_time": vault_time(v.deleted_at),
                                      "destroyed": v.state is VersionState.DESTROYED} for v in versions},
    })


async def kv_list_root(request: web.Request) -> web.Response:
    if request.query.get("list") != "true":
        raise RequestError("the mount's metadata root is listed with ?list=true")
    return await _list(request, "")


async def _list(request: web.Request, raw: str) -> web.Response:
    """Vault's LIST: the keys one level below ``raw`` (a folder ends in '/'), those the caller may list."""
    # Vault's clients name a folder with its trailing slash; ours is a prefix without it.
    prefix = validate_prefix(raw[:-1] if raw.endswith("/") else raw) if raw else ""
    request[AUDIT_PATH] = prefix  # what was listed, not the spelling of the URL
    who = authorize(request, Capability.LIST, prefix)
    start = f"{prefix}/" if prefix else ""
    keys: set[str] = set()
    after = ""
    for _ in range(MAX_LIST_PAGES):
        page = await services(request).secrets.list_page(
            who, prefix, after=after, limit=MAX_LIST_LIMIT,
            visible=lambda paths: allowed_paths(request, Capability.LIST, paths))
        for secret in page.secrets:
            if secret.path.startswith(start):  # not the prefix itself, a secret of its own
                head, folder, _ = secret.path[len(start):].partition("/")
                keys.add(head + folder)
        if page.next_after is None:
            break
        after = page.next_after
    else:
        raise RequestError(f"more than {MAX_LIST_PAGES * MAX_LIST_LIMIT} secrets below this prefix for one "
                           "Vault list; page through GET /v1/secrets?prefix=")
    if not keys:
        raise NotFoundError(f"nothing to list below {prefix or 'the mount'}")
    audit_note(request, items=len(keys))
    return _reply(request, {"keys": sorted(keys)})


async def kv_delete_metadata(request: web.Request) -> web.Response:
    # Vault forgets the secret; we destroy every version (the values are erased for good) and keep
    # the record of its versions, as our destroy does (docs/vault-compat.md).
    path = secret_path(request)
    who = authorize(request, Capability.ADMIN, path)
    service = services(request).secrets
    _, versions = await service.metadata(who, path)
    changed = await service.destroy(who, path, [v.version for v in versions])
    audit_note(request, versions=changed)
    return _no_content()


async def kv_config(request: web.Request) -> web.Response:
    return _reply(request, {"cas_required": False, "delete_version_after": "0s",
                            "max_versions": services(request).max_versions})


# -- what the clients ask first ------------------------------------------------------------------
def _mount_entry(mount: str) -> dict[str, Any]:
    return {
        "accessor": f"kv_{mount}", "config": {"default_lease_ttl": 0, "force_no_cache": False, "max_lease_ttl": 0},
        "description": "jarvis-secretsd secrets (Vault KV version 2 façade)", "external_entropy_access": False,
        "local": False, "options": {"version": "2"}, "path": f"{mount}/", "plugin_version": "",
        "running_plugin_version": "", "running_sha256": "", "seal_wrap": False, "type": "kv", "uuid": "",
    }


async def ui_mounts(request: web.Request) -> web.Response:
    """The CLIs' preflight: which mount a path is under and its KV version."""
    mount = request.app[MOUNT]
    asked = request.match_info["path"]
    if asked.rstrip("/") != mount and not asked.startswith(mount + "/"):
        raise NotFoundError(f"no mount serves {tokens.redact_secrets(asked)[:200]}")
    return _reply(request, _mount_entry(mount))


async def sys_mounts(request: web.Request) -> web.Response:
    mount = request.app[MOUNT]
    mounts = {f"{mount}/": _mount_entry(mount)}
    # Vault answers both at the top level (older clients) and under data.
    return web.json_response(mounts | {"request_id": request[REQUEST_ID], "data": mounts})


def _status_code(request: web.Request, name: str, default: int) -> int:
    code = int_query(request, name)
    if code is None:
        return default
    if not 200 <= code <= 599:
        raise RequestError(f"{name} must be an HTTP status code from 200 to 599")
    return code


async def sys_health(request: web.Request) -> web.Response:
    """Vault's health: 200 active and unsealed, 503 sealed (``sealedcode`` and ``activecode``
    override them). Never 429 standby: every replica of ours serves, none stands by."""
    sealed = services(request).barrier.sealed
    status = _status_code(request, "sealedcode", 503) if sealed else _status_code(request, "activecode", 200)
    return web.json_response({
        "initialized": True, "sealed": sealed, "standby": False, "performance_standby": False,
        "replication_performance_mode": "disabled", "replication_dr_mode": "disabled",
        "server_time_utc": int(time.time()), "version": __version__, "enterprise": False,
        "cluster_name": "jarvis-secretsd", "cluster_id": "",
    }, status=status)


# -- the token's own view ----------------------------------------------------------------------------
def _ttl(expires_at: datetime | None) -> int:
    return 0 if expires_at is None else max(0, int((expires_at - datetime.now(UTC)).total_seconds()))


async def lookup_self(request: web.Request) -> web.Response:
    # What the calling token carries, as whoami shows it; never the token itself (its public id only).
    who = principal(request)
    return _reply(request, {
        "accessor": "", "display_name": f"token-{who.client}", "entity_id": "",
        "expire_time": vault_time(who.expires_at) or None, "explicit_max_ttl": 0,
        "id": tokens.display_id(who.token_id) if who.token_id else "", "meta": {"client": who.client},
        "num_uses": 0, "orphan": True, "path": "auth/token/create", "policies": list(who.policies),
        "renewable": False, "ttl": _ttl(who.expires_at), "type": "service",
    })


async def renew_self(request: web.Request) -> web.Response:
    # The one renewal rule (TokenService.renew_self, as POST /v1/auth/tokens/renew-self): a token
    # made with a max TTL is extended by its TTL up to it; any other answers its unchanged lifetime.
    who = principal(request)
    record = await services(request).tokens.renew_self(who)
    return _reply(request, None, auth={
        "client_token": "", "accessor": "", "policies": list(who.policies), "token_policies": list(who.policies),
        "metadata": {"client": who.client}, "lease_duration": _ttl(record.expires_at),
        "renewable": record.max_expires_at is not None,
        "entity_id": "", "token_type": "service", "orphan": True,
    })
