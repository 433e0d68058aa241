"""The OpenAPI 3.1 description served at ``/v1/openapi.json``, generated from the route table."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from secretsd import __version__
from secretsd.api.routes import OPERATIONS, Operation, Query
from secretsd.domain.policy import NAME_PATTERN as POLICY_NAME_PATTERN
from secretsd.paths import MAX_PATH_LENGTH, PATH_PATTERN
from secretsd.problems import PROBLEM_CONTENT_TYPE

# The path parameters the routes use, by name; a route with another one fails `document` (and
# the test that compares the router with the document).
_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "path": {
        "name": "path", "in": "path", "required": True,
        "description": "Secret path: segments of letters, digits, '.', '_', '-' separated by '/' (no '.' or '..' "
                       "segment, at most 128 characters a segment, not under 'sys/')",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_PATH_LENGTH, "pattern": PATH_PATTERN},
    },
    "token_id": {"name": "token_id", "in": "path", "required": True, "schema": {"type": "string"}},
    "name": {"name": "name", "in": "path", "required": True, "description": "A policy's name",
             "schema": {"type": "string", "pattern": POLICY_NAME_PATTERN}},
}
_PROBLEM = {"$ref": "#/components/responses/Problem"}
# The Vault façade's errors: a problem document that also carries Vault's ``errors`` list, or (sys/health
# while sealed) Vault's own JSON body.
_VAULT_PROBLEM = {"$ref": "#/components/responses/VaultProblem"}
_TEMPLATE_PARAM = re.compile(r"\{(\w+)(?::[^{}]*)?\}")


def _op(summary: str, requires: str | None, *, body: str | None = None,
        params: list[dict[str, Any]] | None = None, ok: int = 200, ok_type: str = "application/json",
        more: tuple[str, ...] = (), vault: bool = False) -> dict[str, Any]:
    # 415: a body that is not application/json; ``more``: what only this operation answers.
    problems = ("400", "401", "403", "404", "409", "413", *(("415",) if body else ()), "503", *more)
    # 204 (the Vault façade's deletes) has no body.
    success: dict[str, Any] = {"description": "OK"} | ({} if ok == 204 else {"content": {ok_type: {}}})
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(ok): success}
        | {code: _VAULT_PROBLEM if vault else _PROBLEM for code in sorted(problems)},
    }
    if requires:
        op["description"] = f"Requires {requires}."
    else:
        op["security"] = []
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    return op


def _query(q: Query) -> dict[str, Any]:
    return {"name": q.name, "in": "query", "required": False, "description": q.description,
            "schema": {"type": q.kind, **dict(q.bounds)}}


def _schemas(operations: tuple[Operation, ...]) -> dict[str, Any]:
    """The body models and every model they nest, all under components/schemas (one namespace:
    pydantic's own ``#/$defs/...`` would not resolve from an operation)."""
    models = list(dict.fromkeys(op.body for op in operations if op.body is not None))
    _, top = models_json_schema([(m, "validation") for m in models],
                                ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    return schemas


def _requires(op: Operation, capability: str | None) -> str | None:
    if op.public or op.login:
        return None  # no bearer token: public, or the body is the credential (a login)
    if capability is None:
        return "any valid token (no capability)"
    return f"the `{capability}{' ' + op.scope if op.scope else ''}` capability"


def _path_items(op: Operation) -> list[tuple[str, dict[str, Any]]]:
    """(document path, operation object) for ``op``: one per variant of its ``{action}`` segment."""
    template = _TEMPLATE_PARAM.sub(r"{\1}", op.path)
    params = [_query(q) for q in op.query]
    body = op.body.__name__ if op.body else None
    if not op.variants:
        cap = op.capability.value if op.capability else None
        return [(template, _op(op.summary, _requires(op, cap), body=body, params=params, ok=op.ok,
                               ok_type=op.ok_type, more=op.more, vault=op.vault))]
    return [(template.replace("{action}", v.value),
             _op(v.summary, _requires(op, v.capability.value), body=body, params=params, ok=op.ok,
                 ok_type=op.ok_type, more=op.more, vault=op.vault))
            for v in op.variants]


def build(operations: tuple[Operation, ...]) -> dict[str, Any]:
    """The document of ``operations``: every one of them, nothing else."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        for path, item in _path_items(op):
            entry = paths.setdefault(path, {})
            names = _TEMPLATE_PARAM.findall(path)
            if names:
                entry.setdefault("parameters", [_PATH_PARAMS[name] for name in names])
            if op.method.lower() in entry:
                raise ValueError(f"{op.method} {path} is declared twice")
            entry[op.method.lower()] = item
    schemas = _schemas(operations)
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
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
            "responses": {
                "Problem": {"description": "An RFC 9457 problem document", "content": {
                    PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}},
                "VaultProblem": {
                    "description": "A problem document with Vault's `errors` list (docs/vault-compat.md)",
                    "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}},
                                "application/json": {}}},
            },
        },
    }


@cache
def document() -> dict[str, Any]:
    """The document of the route table, built once."""
    return build(OPERATIONS)
