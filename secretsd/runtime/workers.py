"""``serve --workers N``: N daemon processes on one listening port.

A worker is just a replica on the same host (DESIGN.md): it has its own keyring in memory, its own
token cache and its own audit chain (``<chain>-w<N>``), shares the store, sees keyring changes by
polling, and only one worker at a time holds the scheduler's leader lock. The supervisor starts the
workers, forwards SIGTERM, SIGINT and SIGHUP to them, and stops them all when one of them exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("secretsd.runtime.workers")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def worker_env(chain: str, index: int) -> dict[str, str]:
    # Two processes must never write one audit chain: each worker gets its own name.
    return os.environ | {"SECRETSD_AUDIT__CHAIN": f"{chain}-w{index}"}


def supervise(serve_args: Sequence[str], workers: int, chain: str) -> int:
    """Run ``secretsd serve SERVE_ARGS --worker I`` for each I; return the first failing exit code."""
    children = [
        subprocess.Popen(  # noqa: S603 - our own interpreter and command line
            [sys.executable, "-m", "secretsd", "serve", *serve_args, "--worker", str(i)],
            env=worker_env(chain, i),
        )
        for i in range(workers)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
        # One worker ended (a signal, or a failure): the others follow, so the port closes cleanly.
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        codes = []
        for child in children:
            try:
                codes.append(child.wait(timeout=30))
            except subprocess.TimeoutExpired:
                child.kill()
                codes.append(child.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [c for c in codes if c not in (0, -signal.SIGTERM, -signal.SIGINT)]
    return failed[0] if failed else 0
