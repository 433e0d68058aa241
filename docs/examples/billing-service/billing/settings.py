"""The service's settings: environment first, then secretsd (``billing/FIELD``), then defaults.

The daemon is found through ``SECRETSD_ADDR`` and ``SECRETSD_TOKEN``, as for the ``secretsd`` command.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from secretsd_client.settings_source import SecretPath, SecretsdSettingsSource


class Settings(BaseSettings):
    # hide_input_in_errors: a value that fails validation (a secret!) is not quoted in the error.
    model_config = SettingsConfigDict(env_prefix="BILLING_", hide_input_in_errors=True)

    database_url: SecretStr                                             # billing/DATABASE_URL
    stripe_key: Annotated[SecretStr, SecretPath("shared/stripe-key")]   # an explicit path
    port: int = 8000                                                    # billing/PORT if stored

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


def load() -> Settings:
    return Settings()  # type: ignore[call-arg]  # the required fields come from the sources
