"""A service that loads its settings from secretsd with pydantic-settings.

Run it with a token whose policy can read ``billing/**`` and ``shared/stripe-key``::

    export SECRETSD_ADDR=http://127.0.0.1:8750 SECRETSD_TOKEN=sdt_...
    python docs/examples/settings_app.py

Where each field comes from, first match wins:

1. keyword arguments to ``Settings(...)``;
2. environment variables (``BILLING_PORT=9000``; ``env_prefix`` below);
3. secretsd: ``billing/DATABASE_URL``, ``billing/PORT``, ... (the prefix plus the field name in
   upper case, as ``secretsd import-env .env --prefix billing`` stored them), and
   ``shared/stripe-key`` for the field that names its own path;
4. the field's default.

It prints what it loaded -- never a secret value: a service should not either.
"""

from __future__ import annotations

import json
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from secretsd_client.settings_source import SecretPath, SecretsdSettingsSource


class Settings(BaseSettings):
    # hide_input_in_errors: a value that fails validation (a secret!) is not quoted in the error.
    model_config = SettingsConfigDict(env_prefix="BILLING_", hide_input_in_errors=True)

    database_url: SecretStr                                             # billing/DATABASE_URL
    stripe_key: Annotated[SecretStr, SecretPath("shared/stripe-key")]   # an explicit path
    port: int = 8000                                                    # billing/PORT if stored
    debug: bool = False
    allowed_hosts: list[str] = ["localhost"]                            # JSON, as for env vars

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        secretsd = SecretsdSettingsSource(settings_cls, prefix="billing")
        return init_settings, env_settings, dotenv_settings, secretsd, file_secret_settings


def main() -> None:
    settings = Settings()  # type: ignore[call-arg]  # required fields come from the sources
    print(json.dumps({
        "port": settings.port,
        "debug": settings.debug,
        "allowed_hosts": settings.allowed_hosts,
        "database_host": urlsplit(settings.database_url.get_secret_value()).hostname,
        "stripe_key_length": len(settings.stripe_key.get_secret_value()),
        "settings_repr_hides_secrets": "sk_live" not in repr(settings),
    }, sort_keys=True))


if __name__ == "__main__":
    main()
