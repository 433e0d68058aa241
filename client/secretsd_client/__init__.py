"""Python client for jarvis-secretsd: the light distribution ``jarvis-secretsd-client``.

``SecretsClient`` (sync, http.client) and ``AsyncSecretsClient`` (asyncio, aiohttp: the ``[aio]``
extra) send the same calls (``secretsd_client.calls``) and raise the same ``secretsd_client.errors``
exceptions (which the daemon's ``secretsd.errors`` re-exports: one hierarchy); both retry idempotent
calls on 503s and connection errors per a ``RetryPolicy``. ``secretsd_client.settings_source`` fills a
pydantic-settings class from secrets. Reads ``SECRETSD_ADDR`` and ``SECRETSD_TOKEN`` by default.

Nothing is imported until it is asked for: the daemon's command line imports ``secretsd_client.defaults``
and ``secretsd_client.errors`` on every start, and should not pay for http.client or ssl there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secretsd_client.aio import AsyncSecretsClient
    from secretsd_client.retry import RetryPolicy
    from secretsd_client.sync import SecretsClient

__all__ = ["AsyncSecretsClient", "RetryPolicy", "SecretsClient"]

_LAZY = {"AsyncSecretsClient": "secretsd_client.aio", "RetryPolicy": "secretsd_client.retry",
         "SecretsClient": "secretsd_client.sync"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secretsd_client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
