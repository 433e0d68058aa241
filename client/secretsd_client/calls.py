"""The API's calls as data: one description per operation, shared by the sync and async faces."""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from secretsd_client.problems import error_from_problem


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    #: Safe to send again after a connection error or 503 (the server changes nothing twice).
    idempotent: bool = True

    def target(self) -> str:
        return self.path + ("?" + urlencode(self.query) if self.query else "")

    def payload(self) -> bytes | None:
        return None if self.body is None else json.dumps(self.body).encode("utf-8")


def _p(path: str) -> str:
    return quote(path.strip("/"), safe="/")


def get_secret(path: str, version: int | None = None, label: str | None = None) -> Call:
    query = {"version": str(version)} if version else {}
    if label:
        query["label"] = label
    return Call("GET", f"/v1/secrets/{_p(path)}", query)


def rotate_secret(path: str, value: str | None = None) -> Call:
    # Never retried: a second attempt would rotate twice.
    return Call("POST", f"/v1/secrets/{_p(path)}/rotate", body={} if value is None else {"value": value},
                idempotent=False)


def set_rotation(path: str, policy: dict[str, Any] | None) -> Call:
    return Call("PUT", f"/v1/metadata/{_p(path)}", body={"rotation": policy})


def rotation_status(prefix: str = "") -> Call:
    return Call("GET", "/v1/rotation/status", {"prefix": prefix.strip("/")})


def value_field(value: str | bytes) -> dict[str, str]:
    """A value as a write sends it: text as ``value``, bytes as ``value_base64``."""
    if isinstance(value, bytes):
        return {"value_base64": base64.b64encode(value).decode("ascii")}
    return {"value": value}


def value_of(data: dict[str, Any]) -> str | bytes:
    """The value of a read's answer (or one item of a batch read): text, or bytes for a binary value."""
    if "value_base64" in data:
        return base64.b64decode(data["value_base64"])
    return str(data["value"])


def put_secret(path: str, value: str | bytes, cas: int | None = None,
               metadata: dict[str, str] | None = None) -> Call:
    body: dict[str, Any] = value_field(value)
    if cas is not None:
        body["cas"] = cas
    if metadata is not None:
        body["metadata"] = metadata
    # Retrying a write could store the value twice as two versions unless it is check-and-set.
    return Call("PUT", f"/v1/secrets/{_p(path)}", body=body, idempotent=cas is not None)


def write_batch(items: list[dict[str, Any]]) -> Call:
    # Retried only if every item is check-and-set: a retry cannot then store anything twice.
    return Call("POST", "/v1/secrets:batch", body={"items": items},
                idempotent=all(item.get("cas") is not None for item in items))


def read_batch(prefix: str = "", after: str = "", limit: int | None = None, *, children: bool = False) -> Call:
    call = list_secrets(prefix, after, limit)
    query = call.query | ({"children": "1"} if children else {})
    return dataclasses.replace(call, path="/v1/secrets:read", query=query)


def list_secrets(prefix: str = "", after: str = "", limit: int | None = None) -> Call:
    query = {"prefix": prefix.strip("/")}
    if after:
        query["after"] = after
    if limit:
        query["limit"] = str(limit)
    return Call("GET", "/v1/secrets", query)


def metadata(path: str) -> Call:
    return Call("GET", f"/v1/metadata/{_p(path)}")


def delete_secret(path: str, versions: list[int] | None = None) -> Call:
    if versions:
        return Call("POST", f"/v1/secrets/{_p(path)}/delete", body={"versions": versions})
    return Call("DELETE", f"/v1/secrets/{_p(path)}", idempotent=False)


def version_action(path: str, action: str, versions: list[int]) -> Call:
    return Call("POST", f"/v1/secrets/{_p(path)}/{action}", body={"versions": versions})


def status() -> Call:
    return Call("GET", "/v1/sys/status")


def health() -> Call:
    return Call("GET", "/readyz")


def rotate_keyring() -> Call:
    return Call("POST", "/v1/sys/keyring/rotate", idempotent=False)


def policy_check(client: str | None, capability: str, path: str, policies: list[str] | None = None) -> Call:
    subject: dict[str, Any] = {"client": client} if policies is None else {"policies": policies}
    return Call("POST", "/v1/sys/policy/check", body=subject | {"capability": capability, "path": path})


def policy_list() -> Call:
    return Call("GET", "/v1/sys/policies")


def policy_show(name: str) -> Call:
    return Call("GET", f"/v1/sys/policies/{quote(name, safe='')}")


def policy_reload() -> Call:
    return Call("POST", "/v1/sys/policy/reload")


def create_token(client: str, policies: list[str], ttl_seconds: int | None = None,
                 max_ttl_seconds: int | None = None) -> Call:
    body: dict[str, Any] = {"client": client, "policies": policies}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    if max_ttl_seconds is not None:
        body["max_ttl_seconds"] = max_ttl_seconds
    return Call("POST", "/v1/auth/tokens", body=body, idempotent=False)


def list_tokens(after: str = "", limit: int | None = None, include_expired: bool = False) -> Call:
    query: dict[str, str] = {}
    if after:
        query["after"] = after
    if limit:
        query["limit"] = str(limit)
    if include_expired:
        query["include_expired"] = "1"
    return Call("GET", "/v1/auth/tokens", query)


def revoke_token(token_id: str) -> Call:
    return Call("DELETE", f"/v1/auth/tokens/{quote(token_id, safe='')}")


def whoami() -> Call:
    return Call("GET", "/v1/auth/whoami")


def renew_self() -> Call:
    return Call("POST", "/v1/auth/tokens/renew-self")


def jwt_login(jwt: str) -> Call:
    # Not sent twice: each answer is a new token.
    return Call("POST", "/v1/auth/jwt/login", body={"jwt": jwt}, idempotent=False)


def decode(call: Call, status: int, content_type: str, body: bytes) -> dict[str, Any]:
    """Turn a response into its JSON object, or raise the error its problem document names."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = None
    if status >= 400 or not isinstance(data, dict):
        if call.path == "/readyz" and status == 503 and isinstance(data, dict):
            return data
        doc = data if isinstance(data, dict) else {}
        raise error_from_problem(doc, status)
    return data


