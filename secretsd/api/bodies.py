"""Request bodies: parsed strictly, and described without ever echoing what was sent."""

from __future__ import annotations

import json
from typing import Annotated, TypeVar

from aiohttp import web
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from secretsd.api.context import DAEMON
from secretsd.errors import PayloadTooLargeError, RequestError
from secretsd.rotation import RotationPolicy

M = TypeVar("M", bound=BaseModel)


def _rfc3339_text(value: object) -> object:
    # JSON numbers would be read as Unix times (1.5 = 1970-01-01T00:00:01.5): only strings are dates.
    if not isinstance(value, str):
        raise ValueError("expected an RFC 3339 date-time string with a UTC offset")
    return value


Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text), Field(strict=False)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PutSecretBody(_Body):
    value: str
    cas: int | None = Field(None, ge=0)
    metadata: dict[str, str] | None = None
    #: RFC 3339 with a UTC offset; from then on the version is not served (docs/rotation.md).
    expires_at: Rfc3339 | None = None


class RotateBody(_Body):
    #: A supplied value; without one, the secret's generator makes the new value.
    value: str | None = None
    expires_at: Rfc3339 | None = None


class SetMetadataBody(_Body):
    #: The rotation policy (see secretsd.rotation.RotationPolicy), or null to remove it.
    rotation: RotationPolicy | None


class VersionsBody(_Body):
    versions: list[int] = Field(min_length=1, max_length=1000)


class CreateTokenBody(_Body):
    client: str
    policies: list[str] = Field(min_length=1, max_length=64)
    ttl_seconds: int | None = Field(None, ge=1)


class PolicyCheckBody(_Body):
    client: str
    capability: str
    path: str


def describe(exc: ValidationError) -> str:
    # pydantic's own text includes the input value, which may be the secret: build our own.
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "invalid request body: " + "; ".join(parts)


async def read_body(request: web.Request, model: type[M]) -> M:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLargeError(
            f"the request body is larger than {request.app[DAEMON].settings.max_body_bytes} bytes"
        ) from exc
    if not raw:
        raise RequestError("the request needs a JSON body")
    try:
        data = json.loads(raw)
        # JSON may spell lone surrogates (\ud800), which are not text: refuse them here, once.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError):
        raise RequestError("the request body is not valid JSON text") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestError(describe(exc)) from None
