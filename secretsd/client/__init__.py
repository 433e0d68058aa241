"""Python client for jarvis-secretsd. Reads ``SECRETSD_ADDR`` and ``SECRETSD_TOKEN`` by default.

``SecretsClient`` (sync, http.client) and ``AsyncSecretsClient`` (asyncio, aiohttp) send the same
calls (``secretsd.client.calls``) and raise the same ``secretsd.errors`` exceptions; both retry
idempotent calls on 503s and connection errors per a ``RetryPolicy``. ``secretsd.client.settings_source``
fills a pydantic-settings class from secrets. The async face is imported lazily (it needs aiohttp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from secretsd.client.retry import RetryPolicy
from secretsd.client.sync import SecretsClient

if TYPE_CHECKING:
    from secretsd.client.aio import AsyncSecretsClient

__all__ = ["AsyncSecretsClient", "RetryPolicy", "SecretsClient"]


def __getattr__(name: str) -> Any:
    if name == "AsyncSecretsClient":
        from secretsd.client.aio import AsyncSecretsClient

        return AsyncSecretsClient
    raise AttributeError(name)
