"""Keep the daemon's memory, where the key material lives, out of core files, debuggers and swap.

``harden_process`` runs first thing in ``secretsd serve`` (each worker too), before any key is
unwrapped. Core dumps are always turned off; locking memory is the opt-in ``lock_memory`` setting,
because it is all-or-nothing and fails (or later starves allocations) under a small RLIMIT_MEMLOCK.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys

log = logging.getLogger("secretsd.hardening")

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
_MCL_CURRENT = 1
_MCL_FUTURE = 2
_CAP_IPC_LOCK = 14


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def disable_core_dumps() -> None:
    """No core file, and (Linux) not dumpable: a crash writes no memory image to disk, and a
    same-uid non-root process can neither ptrace us nor read our /proc/PID/mem or environ."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        if _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            log.warning("could not mark the process non-dumpable: %s", os.strerror(err))


def is_dumpable() -> bool:
    """PR_GET_DUMPABLE (Linux); elsewhere only the core-file limit can say."""
    if sys.platform.startswith("linux"):
        return bool(_libc().prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
    return resource.getrlimit(resource.RLIMIT_CORE) != (0, 0)


def _has_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            caps = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps, 16) >> _CAP_IPC_LOCK & 1)


def lock_memory() -> bool:
    """mlockall(MCL_CURRENT | MCL_FUTURE): no page of ours, keys included, is written to swap.

    Only with room for it: MCL_FUTURE makes every later allocation count against RLIMIT_MEMLOCK,
    so under a finite limit the daemon would fail some later request with MemoryError rather than
    now. Without CAP_IPC_LOCK the limit must be unlimited (systemd: LimitMEMLOCK=infinity).
    Returns whether memory is locked; a failure is a warning, never a refusal to start.
    """
    if not sys.platform.startswith("linux"):
        log.warning("lock_memory is set but only supported on Linux; memory is not locked")
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and not _has_ipc_lock():
        log.warning("lock_memory is set but RLIMIT_MEMLOCK is %d bytes and the process lacks CAP_IPC_LOCK; "
                    "memory is NOT locked and may be swapped (set LimitMEMLOCK=infinity)", soft)
        return False
    if _libc().mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        log.warning("lock_memory is set but mlockall failed (%s); memory is NOT locked and may be swapped",
                    os.strerror(ctypes.get_errno()))
        return False
    log.info("memory locked: key material stays out of swap")
    return True


def harden_process(*, lock: bool) -> None:
    disable_core_dumps()
    if lock:
        lock_memory()
