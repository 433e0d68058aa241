"""Request bodies: parsed strictly, and described without ever echoing what was sent.

The rules a body must pass, each in one function: JSON media type (``require_json_media_type``),
UTF-8 text without a byte-order mark (``body_text``), strict JSON with one value per key
(``parse_json_object``), then a strict model whose every integer is bounded (``read_body``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, NoReturn, TypeVar

from aiohttp import web
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from secretsd.api.context import SERVICES
from secretsd.domain.rotation import RotationPolicy
from secretsd.domain.token_service import MAX_TTL_SECONDS
from secretsd.errors import PayloadTooLargeError, RequestError, UnsupportedMediaTypeError

M = TypeVar("M", bound=BaseModel)

#: Versions (and check-and-set expectations) are PostgreSQL ``integer`` columns: a larger number
#: would be an overflow in the database, not "no such version".
MAX_VERSION = 2**31 - 1
JSON_MEDIA_TYPE = "application/json"

_AWARE = TypeAdapter(AwareDatetime)
_RFC3339_MESSAGE = "expected an RFC 3339 date-time string with a UTC offset"


def _rfc3339(value: object) -> datetime:
    # JSON numbers would be read as Unix times (1.5 = 1970-01-01T00:00:01.5): only strings are dates.
    # A plain validator, so strict validation of the body does not also refuse the string form.
    if not isinstance(value, str):
        raise ValueError(_RFC3339_MESSAGE)
    try:
        return _AWARE.validate_python(value)
    except ValidationError:
        raise ValueError(_RFC3339_MESSAGE) from None


Rfc3339 = Annotated[datetime, PlainValidator(_rfc3339), WithJsonSchema({"type": "string", "format": "date-time"})]
Version = Annotated[int, Field(ge=1, le=MAX_VERSION)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _SecretWrite(BaseModel):
    """The fields of one write: a PUT's body, or one item of a batch."""

    model_config = ConfigDict(extra="forbid", strict=True)
    #: The value as text (stored as its UTF-8 bytes)...
    value: str | None = None
    #: ...or as standard base64 (RFC 4648, padded), for a value that is not text: stored as decoded.
    value_base64: str | None = None
    cas: int | None = Field(None, ge=0, le=MAX_VERSION)
    metadata: dict[str, str] | None = None
    #: RFC 3339 with a UTC offset; from then on the version is not served (docs/rotation.md).
    expires_at: Rfc3339 | None = None

    @model_validator(mode="after")
    def _one_value(self) -> _SecretWrite:
        if (self.value is None) == (self.value_base64 is None):
            raise ValueError("give the value as exactly one of 'value' (text) or 'value_base64'")
        if self.value_base64 is not None:
            self.payload()  # refuse bad base64 here, as a 400 naming the field
        return self

    def payload(self) -> str | bytes:
        """What to store: the text, or the bytes the base64 stands for."""
        if self.value is not None:
            return self.value
        assert self.value_base64 is not None
        try:
            return base64.b64decode(self.value_base64, validate=True)
        except binascii.Error:
            raise ValueError("value_base64 is not standard, padded base64") from None


class PutSecretBody(_SecretWrite, _Body):
    pass


class BatchWriteItem(_SecretWrite):
    """One item of ``BatchWriteBody`` (never a body of its own)."""

    path: str


class BatchWriteBody(_Body):
    #: At most MAX_BATCH_ITEMS (secretsd.domain.secret_service); a bigger import is sent in several.
    items: list[BatchWriteItem] = Field(min_length=1, max_length=1000)


class RotateBody(_Body):
    #: A supplied value; without one, the secret's generator makes the new value.
    value: str | None = None
    expires_at: Rfc3339 | None = None


class SetMetadataBody(_Body):
    #: The rotation policy (see secretsd.domain.rotation.RotationPolicy), or null to remove it.
    rotation: RotationPolicy | None


class VersionsBody(_Body):
    versions: list[Version] = Field(min_length=1, max_length=1000)


class CreateTokenBody(_Body):
    client: str
    policies: list[str] = Field(min_length=1, max_length=64)
    ttl_seconds: int | None = Field(None, ge=1, le=MAX_TTL_SECONDS)
    #: Renewable (POST /v1/auth/tokens/renew-self) up to this long after creation.
    max_ttl_seconds: int | None = Field(None, ge=1, le=MAX_TTL_SECONDS)


class PolicyCheckBody(_Body):
    """Either a ``client`` (its tokens' policies) or ``policies`` named directly, not both."""

    client: str | None = None
    policies: list[str] | None = Field(default=None, min_length=1, max_length=64)
    capability: str
    path: str

    @model_validator(mode="after")
    def _one_subject(self) -> PolicyCheckBody:
        if (self.client is None) == (self.policies is None):
            raise ValueError("give either 'client' or 'policies'")
        return self


def describe(exc: ValidationError) -> str:
    # pydantic's own text includes the input value, which may be the secret: build our own.
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "invalid request body: " + "; ".join(parts)


def require_json_media_type(request: web.Request) -> None:
    """A body is ``application/json``, in UTF-8 if a charset is named; anything else is a 415.

    A form, text or multipart body is never guessed at: a browser can send those cross-site without
    a preflight, and a body read under another charset than the sender meant is another body.
    """
    charset = (request.charset or "utf-8").lower()
    if request.content_type != JSON_MEDIA_TYPE or charset != "utf-8":
        raise UnsupportedMediaTypeError("the request body must be application/json in UTF-8")


def body_text(raw: bytes) -> str:
    """The body as UTF-8 text: no byte-order mark, no other encoding (RFC 8259 section 8.1).

    ``json.loads`` on bytes would guess UTF-16 or UTF-32 and skip a BOM, so a body could mean one
    thing to us and another to a proxy or a log that reads it as UTF-8.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text") from None
    if text.startswith("\ufeff"):
        raise RequestError("the request body starts with a byte-order mark; send plain UTF-8")
    return text


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(text: str) -> dict[str, Any]:
    """Strict JSON: one object, each key once at any depth (readers disagree on which of two
    values wins), no NaN or Infinity, no lone surrogates."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        # JSON may spell lone surrogates (\ud800), which are not text: refuse them here, once.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except _DuplicateKey:
        raise RequestError("the request body has a duplicate key") from None
    except (ValueError, UnicodeError):
        raise RequestError("the request body is not valid JSON text") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    return data


async def read_body(request: web.Request, model: type[M], *,
                    media_type: Callable[[web.Request], None] | None = None) -> M:
    """The body as ``model``: ``media_type`` checks the Content-Type (default: ``require_json_media_type``)."""
    (media_type or require_json_media_type)(request)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLargeError(
            f"the request body is larger than {request.app[SERVICES].max_body_bytes} bytes"
        ) from exc
    if not raw:
        raise RequestError("the request needs a JSON body")
    text = body_text(raw)
    parse_json_object(text)
    try:
        # Strict, nested models included: "true" is not a boolean, "60" not a number. JSON mode,
        # so an array may fill a tuple field and a string an enum.
        return model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise RequestError(describe(exc)) from None
