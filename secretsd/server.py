"""Compatibility alias: the server moved to ``secretsd.runtime.server`` (issue 11's layout).

Kept because scripts written against the previous release import it (the shared peer-bench kit
checks ``import secretsd.server, secretsd.daemon`` before each run); new code imports the new path.
"""

from secretsd.runtime.server import serve, tls_context

__all__ = ["serve", "tls_context"]
