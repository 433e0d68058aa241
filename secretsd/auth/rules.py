"""What every identity method's rule maps an identity to: a client and its policies.

The operator declares them in the configuration (``[[auth.unix.rules]]``, ``[[auth.tls.rules]]``,
``[[auth.jwt.rules]]``), never the caller; each method's rule model adds its own matcher fields.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from secretsd.domain.client_names import check_client_name
from secretsd.errors import RequestError


class IdentityRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    client: str
    policies: tuple[str, ...] = Field(min_length=1)

    @field_validator("client")
    @classmethod
    def _client_name(cls, value: str) -> str:
        # The same rule as a token's client name: well formed, and none of the daemon's own names.
        try:
            check_client_name(value)
        except RequestError as exc:
            raise ValueError(exc.message) from None
        return value
