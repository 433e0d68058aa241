"""The ``secretsd`` command. Online commands go through the HTTP client; ``init`` and ``serve`` are local.

Errors print one line to stderr and exit 1; usage errors exit 2. Each module adds its commands to
the root group when imported.
"""

from secretsd.cli import audit, env, local, masterkey, secrets, storage, system
from secretsd.cli import rotation as rotation  # registers rotate and rotation …
from secretsd.cli.common import main

__all__ = ["audit", "env", "local", "main", "masterkey", "secrets", "storage", "system"]
