"""Request bodies of the Vault façade, read as strictly as ours (``secretsd.api.bodies``) except for
the media type: Vault's own Go client (the ``vault`` and ``bao`` CLIs) sends JSON without a
Content-Type, and ``PATCH`` sends ``application/merge-patch+json``.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from secretsd.api.bodies import MAX_VERSION, read_body
from secretsd.errors import UnsupportedMediaTypeError

M = TypeVar("M", bound=BaseModel)

#: What a Vault client may label its JSON body with; no label at all is accepted too.
VAULT_MEDIA_TYPES = ("application/json", "application/merge-patch+json")


def require_vault_media_type(request: web.Request) -> None:
    """A body without a Content-Type (Vault's Go client sends none), or JSON in UTF-8; else 415.

    Leaving the label out is what a browser cannot do with a body (it adds text/plain), so the
    rule that keeps cross-site forms and text out (``bodies.require_json_media_type``) still holds.
    """
    if "Content-Type" not in request.headers:
        return
    charset = (request.charset or "utf-8").lower()
    if request.content_type not in VAULT_MEDIA_TYPES or charset != "utf-8":
        raise UnsupportedMediaTypeError("the request body must be JSON (application/json) in UTF-8")


async def read_vault_body(request: web.Request, model: type[M]) -> M:
    return await read_body(request, model, media_type=require_vault_media_type)


def _version(value: object) -> int:
    # The bao CLI sends versions as strings ("versions": ["1", "2"]), hvac as numbers: both are Vault's.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_VERSION:
        raise ValueError(f"a version is an integer from 1 to {MAX_VERSION}")
    return value


KvVersion = Annotated[int, PlainValidator(_version),
                      WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_VERSION})]


class _VaultBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class KvOptions(_VaultBody):
    #: Check-and-set: 0 writes only a new secret, N only when the current version is N.
    cas: int | None = Field(None, ge=0, le=MAX_VERSION)


class KvWriteBody(_VaultBody):
    """``POST|PUT /v1/{mount}/data/{path}``: the map to store (docs/vault-compat.md, value mapping)."""

    data: dict[str, str]
    options: KvOptions | None = None


class KvPatchBody(_VaultBody):
    """``PATCH /v1/{mount}/data/{path}``: a JSON merge patch of the map (null removes a key)."""

    data: dict[str, str | None]
    options: KvOptions | None = None


class KvVersionsBody(_VaultBody):
    """``POST|PUT /v1/{mount}/delete|undelete|destroy/{path}``."""

    versions: list[KvVersion] = Field(min_length=1, max_length=1000)
