"""The ``secretsd`` command. Online commands go through the HTTP client; ``init`` and ``serve`` are local.

Each command's module is imported only when that command runs (``secretsd.cli.lazy``), so a
``secretsd get`` never loads the server, storage or crypto stacks. Exit statuses: ``secretsd.cli.exits``.
"""

import signal
import sys

# `serve` treats SIGHUP as "reload policies". Until its handler exists, the default action would
# terminate it: ignore the signal from the first line we run (before the imports below).
if len(sys.argv) > 1 and sys.argv[1] == "serve":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from secretsd.cli.common import main

__all__ = ["main"]
