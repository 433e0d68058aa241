"""A pydantic-settings source that fills fields from secretsd.

Declare the settings as usual and add the source in ``settings_customise_sources``::

    from typing import Annotated
    from pydantic import SecretStr
    from pydantic_settings import BaseSettings
    from secretsd_client.settings_source import SecretPath, SecretsdSettingsSource

    class Settings(BaseSettings):
        database_url: SecretStr                                    # <- billing/DATABASE_URL
        stripe_key: Annotated[SecretStr, SecretPath("shared/stripe/api-key")]
        port: int = 8000                                           # not stored: the default

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                       dotenv_settings, file_secret_settings):
            return (init_settings, env_settings, dotenv_settings,
                    SecretsdSettingsSource(settings_cls, prefix="billing"), file_secret_settings)

Which secret a field reads:

1. an explicit path: ``Annotated[..., SecretPath("a/b")]`` on the field, or ``paths={"field": "a/b"}``;
2. else, with ``prefix="P"``: ``P/FIELD_NAME`` -- the field name (or its alias) upper-cased by
   default, as ``secretsd import-env`` stores the keys of a ``.env`` file (``name_case="exact"`` or
   ``"lower"`` to change that);
3. else (no prefix, no explicit path) the field is not this source's business.

A secret that does not exist (404) leaves the field to the sources after this one and then to its
default (a required field without one fails validation as usual). Any other error -- daemon
unreachable or sealed (after the client's retries), token refused, policy denial -- is raised:
a service must not start on defaults because its secrets could not be read.

Precedence is the order of the tuple, first wins. The recommended order above gives
**init kwargs > environment > .env file > secretsd > secrets dir > field defaults**, so an
operator can still override one value with an environment variable for a debugging session.

Complex fields (lists, dicts, models) are read as JSON, as pydantic-settings does for
environment variables. The daemon is reached with ``client`` if given, else a ``SecretsClient``
built from ``addr``/``token`` or ``SECRETSD_ADDR``/``SECRETSD_TOKEN``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from secretsd_client.calls import value_of
from secretsd_client.errors import NotFoundError
from secretsd_client.paths import validate_path
from secretsd_client.sync import SecretsClient

__all__ = ["SecretPath", "SecretsdSettingsSource"]


@dataclass(frozen=True)
class SecretPath:
    """Field metadata naming the secret a field is read from: ``Annotated[str, SecretPath("a/b")]``."""

    path: str

    def __post_init__(self) -> None:
        validate_path(self.path.strip("/"))


class SecretsdSettingsSource(PydanticBaseSettingsSource):
    """Reads each field it is responsible for with one GET; see the module docstring."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        *,
        prefix: str | None = None,
        paths: dict[str, str] | None = None,
        name_case: Literal["upper", "lower", "exact"] = "upper",
        client: SecretsClient | None = None,
        addr: str | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(settings_cls)
        self.prefix = prefix.strip("/") if prefix else None
        if self.prefix:
            validate_path(self.prefix)
        self.paths = dict(paths or {})
        unknown = set(self.paths) - set(settings_cls.model_fields)
        if unknown:
            raise ValueError(f"paths names fields that {settings_cls.__name__} does not have: {sorted(unknown)}")
        for path in self.paths.values():
            validate_path(path.strip("/"))
        if name_case not in ("upper", "lower", "exact"):
            raise ValueError("name_case must be 'upper', 'lower' or 'exact'")
        self.name_case = name_case
        self._client = client
        self._addr = addr
        self._token = token

    def path_for(self, field_name: str, field: FieldInfo) -> str | None:
        """The secret path this source reads ``field`` from, or None if it does not read it."""
        if field_name in self.paths:
            return self.paths[field_name].strip("/")
        for meta in field.metadata:
            if isinstance(meta, SecretPath):
                return meta.path.strip("/")
        if not self.prefix:
            return None
        name = _key(field_name, field)
        name = {"upper": name.upper(), "lower": name.lower(), "exact": name}[self.name_case]
        return f"{self.prefix}/{name}"

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        path = self.path_for(field_name, field)
        if path is None:
            return None, _key(field_name, field), False
        client = self._client or SecretsClient(self._addr, self._token)
        try:
            value = value_of(client.get(path))
        except NotFoundError:
            value = None
        finally:
            if self._client is None:
                client.close()
        return value, _key(field_name, field), False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        own = self._client is None
        if own:
            self._client = SecretsClient(self._addr, self._token)
        try:
            for field_name, field in self.settings_cls.model_fields.items():
                value, key, is_complex = self.get_field_value(field, field_name)
                value = self.prepare_field_value(field_name, field, value, is_complex)
                if value is not None:
                    data[key] = value
        finally:
            if own and self._client is not None:
                self._client.close()
                self._client = None
        return data

    def __repr__(self) -> str:
        return f"SecretsdSettingsSource(prefix={self.prefix!r}, paths={self.paths!r})"


def _key(field_name: str, field: FieldInfo) -> str:
    alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
    return alias or field_name
