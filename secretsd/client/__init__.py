"""Python client for jarvis-secretsd. Reads ``SECRETSD_ADDR`` and ``SECRETSD_TOKEN`` by default."""

from secretsd.client.sync import SecretsClient

__all__ = ["SecretsClient"]
