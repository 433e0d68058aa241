"""The ``secretsd`` command. Online commands go through the HTTP client; ``init`` and ``serve`` are local.

Errors print one line to stderr and exit 1; usage errors exit 2. Each module adds its commands to
the root group when imported.
"""

import signal
import sys

# `serve` treats SIGHUP as "reload policies". Until its handler exists, the default action would
# terminate it: ignore the signal from the first line we run (before the imports below).
if len(sys.argv) > 1 and sys.argv[1] == "serve":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from secretsd.cli import audit, env, local, masterkey, recovery, secrets, storage, system
from secretsd.cli import rotation as rotation  # registers rotate and rotation …
from secretsd.cli.common import main

__all__ = ["audit", "env", "local", "main", "masterkey", "recovery", "secrets", "storage", "system"]
