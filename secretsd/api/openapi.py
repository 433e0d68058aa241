"""The OpenAPI 3.1 description served at ``/v1/openapi.json``."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from secretsd import __version__
from secretsd.api.bodies import (
    MAX_VERSION,
    CreateTokenBody,
    PolicyCheckBody,
    PutSecretBody,
    RotateBody,
    SetMetadataBody,
    VersionsBody,
)
from secretsd.paths import MAX_PATH_LENGTH, PATH_PATTERN, PREFIX_PATTERN
from secretsd.problems import PROBLEM_CONTENT_TYPE

_PATH_PARAM = {
    "name": "path", "in": "path", "required": True,
    "description": "Secret path: segments of letters, digits, '.', '_', '-' separated by '/' (no '.' or '..' "
                   "segment, at most 128 characters a segment, not under 'sys/')",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_PATH_LENGTH, "pattern": PATH_PATTERN},
}
_BODY_MODELS = (PutSecretBody, VersionsBody, CreateTokenBody, PolicyCheckBody, RotateBody, SetMetadataBody)
_PROBLEM = {"$ref": "#/components/responses/Problem"}


def _op(summary: str, capability: str | None, *, body: str | None = None,
        params: list[dict[str, Any]] | None = None, ok: int = 200, more: tuple[str, ...] = ()) -> dict[str, Any]:
    # 415: a body that is not application/json; ``more``: what only this operation answers.
    problems = ("400", "401", "403", "404", "409", "413", *(("415",) if body else ()), "503", *more)
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(ok): {"description": "OK", "content": {"application/json": {}}}}
        | {code: _PROBLEM for code in sorted(problems)},
    }
    if capability:
        op["description"] = f"Requires the `{capability}` capability."
    else:
        op["security"] = []
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    return op


def _query(name: str, kind: str, description: str, **bounds: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": kind, **bounds}}


def _schemas() -> dict[str, Any]:
    """The body models and every model they nest, all under components/schemas (one namespace:
    pydantic's own ``#/$defs/...`` would not resolve from an operation)."""
    _, top = models_json_schema([(m, "validation") for m in _BODY_MODELS],
                                ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    return schemas


@cache
def document() -> dict[str, Any]:
    schemas = _schemas()
    schemas["Problem"] = {
        "type": "object",
        "properties": {k: {"type": "string"} for k in ("type", "title", "detail", "request_id")}
        | {"status": {"type": "integer"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "jarvis-secretsd", "version": __version__,
                 "description": "Secrets over HTTP. Errors are RFC 9457 problem documents."},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": _op("Liveness", None)},
            "/readyz": {"get": _op("Readiness: unsealed and storage reachable", None)},
            "/v1/secrets": {"get": _op("List secret paths (never values)", "list on the prefix", params=[
                _query("prefix", "string", "list this path and everything below it", pattern=PREFIX_PATTERN),
                _query("after", "string", "continue after this path (pagination)", pattern="^$|" + PATH_PATTERN),
                _query("limit", "integer", "at most this many (1-1000)", minimum=1, maximum=1000),
            ])},
            "/v1/secrets/{path}": {
                "parameters": [_PATH_PARAM],
                "get": _op("Read a secret (current version, ?version=N or ?label=current|previous|pending); "
                           "410 once expired or past its grace period (docs/rotation.md)", "read",
                           params=[_query("version", "integer", "a version number", minimum=1, maximum=MAX_VERSION),
                                   _query("label", "string", "current, previous or pending")], more=("410",)),
                "put": _op("Write a new version; `cas` makes it check-and-set", "write", body="PutSecretBody"),
                "delete": _op("Soft-delete the current version", "delete"),
            },
            **{
                f"/v1/secrets/{{path}}/{action}": {
                    "parameters": [_PATH_PARAM],
                    "post": _op(f"{action.capitalize()} the given versions", "delete", body="VersionsBody"),
                }
                for action in ("delete", "undelete", "destroy")
            },
            "/v1/secrets/{path}/rotate": {
                "parameters": [_PATH_PARAM],
                "post": _op("Rotate now: a generated (or the supplied) value becomes current, the old one "
                            "previous; 502 rotation-failed when the hook fails", "rotate", body="RotateBody",
                            more=("502",)),
            },
            "/v1/metadata/{path}": {"parameters": [_PATH_PARAM],
                                    "get": _op("Versions, labels, timestamps, creators, states, rotation", "read"),
                                    "put": _op("Set or remove the rotation policy", "rotate",
                                               body="SetMetadataBody")},
            "/v1/rotation/status": {"get": _op("Rotation policy, next due and last result per secret",
                                               "list on the prefix",
                                               params=[_query("prefix", "string", "this path and below",
                                                              pattern=PREFIX_PATTERN)])},
            "/v1/sys/status": {"get": _op("Seal state, provider, keyring term, version",
                                          "read on sys/status")},
            "/v1/sys/keyring/rotate": {"post": _op("Add a keyring term", "admin on sys/keyring")},
            "/v1/sys/policy/check": {"post": _op("Which rule decides a client's request",
                                                 "admin on sys/policy", body="PolicyCheckBody")},
            "/v1/auth/tokens": {
                "get": _op("List tokens (never the token itself)", "admin on sys/tokens"),
                "post": _op("Create a token for a client", "admin on sys/tokens",
                            body="CreateTokenBody", ok=201),
            },
            "/v1/auth/tokens/{token_id}": {
                "parameters": [{"name": "token_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "delete": _op("Revoke a token", "admin on sys/tokens"),
            },
            "/v1/auth/whoami": {"get": _op("The calling token's client and policies", "any valid token")},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
            "responses": {"Problem": {"description": "An RFC 9457 problem document", "content": {
                PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
        },
    }
