"""``serve --workers N``: N daemon processes on one listening port.

A worker is just a replica on the same host (DESIGN.md): it has its own keyring in memory, its own
token cache and its own audit chain (``<chain>-w<N>``, or a name derived from ``main-w<N>`` when no
chain is configured), shares the store, sees keyring changes by
polling, and only one worker at a time holds the scheduler's leader lock. The supervisor starts the
workers, forwards SIGTERM, SIGINT and SIGHUP to them, and stops them all when one of them exits.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger("secretsd.runtime.workers")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _limit(root: Path, relative: str, v1: bool) -> float | None:
    """The CPUs one cgroup's quota allows, or None if it sets none."""
    folder = root / relative.lstrip("/")
    if v1:
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    else:
        quota, _, period = (_read(folder / "cpu.max") or "max").partition(" ")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:  # "max", -1 is caught below, a missing file
        return None
    return q / p if q > 0 and p > 0 else None


def cpu_quota(
    *, cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """The CPUs this process's cgroup CPU quota allows, rounded up (v2 ``cpu.max`` or v1 CFS quota,
    its own cgroup's and every ancestor's), or None if there is none or it cannot be read.

    A container limited to one CPU on a large host still has every CPU in its affinity mask, so
    ``--workers auto`` counts this too.
    """
    limits: list[float] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            base, v1 = cgroup_root, False
            if (cgroup_root / "unified").is_dir() and not (cgroup_root / "cgroup.controllers").exists():
                base = cgroup_root / "unified"  # hybrid v1/v2 layout
        elif "cpu" in controllers.split(","):
            base, v1 = cgroup_root / controllers, True
        else:
            continue
        parts = [p for p in relative.split("/") if p]
        for depth in range(len(parts), -1, -1):
            limit = _limit(base, "/".join(parts[:depth]), v1)
            if limit is not None:
                limits.append(limit)
    return math.ceil(min(limits)) if limits else None


#: The most processes ``serve --workers`` runs (also the cap of ``auto``).
MAX_WORKERS = 64


def auto_workers(**cgroup: Path) -> int:
    """``--workers auto``: one per CPU this process may use, its affinity mask (taskset, cpusets)
    and its CPU quota (``cpu_quota``) both counted, at most ``MAX_WORKERS``."""
    return min(len(os.sched_getaffinity(0)), cpu_quota(**cgroup) or MAX_WORKERS, MAX_WORKERS)


def worker_env(chain: str | None, index: int) -> dict[str, str]:
    """Two processes must never write one audit chain: each worker gets its own name. A configured
    chain becomes ``<chain>-wN`` (exclusive, like any configured chain); without one (None) the
    worker derives a free name from ``main-wN`` itself (``Daemon(worker=N)``, secretsd.audit.chains)."""
    if chain is None:
        return dict(os.environ)
    return os.environ | {"SECRETSD_AUDIT__CHAIN": f"{chain}-w{index}"}


def supervise(serve_args: Sequence[str], workers: int, chain: str | None) -> int:
    """Run ``secretsd serve SERVE_ARGS --worker I`` for each I; return the first failing exit code.

    ``chain``: the configured ``[audit] chain``, or None to let each worker derive its own."""
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
