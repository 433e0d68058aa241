"""The Python client, as the daemon's distribution has always exposed it: ``secretsd.client``.

The client lives in the light distribution ``jarvis-secretsd-client`` (import package
``secretsd_client``), which this distribution depends on; a service that only reads its settings
installs that one alone. These modules re-export it, so ``from secretsd.client import SecretsClient``
and ``secretsd.client.settings_source`` keep working and name the very same classes.
The async face is imported lazily (it needs aiohttp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from secretsd_client.retry import RetryPolicy
from secretsd_client.sync import SecretsClient

if TYPE_CHECKING:
    from secretsd_client.aio import AsyncSecretsClient

__all__ = ["AsyncSecretsClient", "RetryPolicy", "SecretsClient"]


def __getattr__(name: str) -> Any:
    if name == "AsyncSecretsClient":
        from secretsd_client.aio import AsyncSecretsClient

        return AsyncSecretsClient
    raise AttributeError(name)
