"""Defaults shared by the daemon and the client: defined in ``secretsd_client.defaults``, re-exported here."""

from secretsd_client.defaults import DEFAULT_ADDR, DEFAULT_HOST, DEFAULT_LISTEN, DEFAULT_PORT

__all__ = ["DEFAULT_ADDR", "DEFAULT_HOST", "DEFAULT_LISTEN", "DEFAULT_PORT"]
