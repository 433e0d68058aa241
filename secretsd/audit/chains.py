"""Which audit chain a daemon writes when ``[audit] chain`` is not configured.

One chain has one writer, ever: two writers would fork it and overwrite each other's head in the
store. A configured chain is exclusive (a second process on it is refused, as before). An
unconfigured one is *derived* here: the daemon takes the first free name of ``main``,
``main-<host>``, ``main-<host>-2``, ... (``main-wN`` first for worker N). "Free" is decided twice:

- on this host, by the ``flock`` on the chain file's ``.lock`` (what ``AuditLog`` has always taken);
  the lock stays held and ``AuditLog`` takes it over, so no other process can slip in between;
- in the store, which replicas on other hosts share, by an owner record ``audit_owner:<chain>``
  written only if absent. It holds a random claim id that is also kept beside the chain's file, in
  ``<chain>.claim``, so the same data directory (any process on it, after any restart) recognises
  its own chain, and a daemon with another data directory (another host) never takes it. (Not in
  the ``.lock`` file: tools read ``audit/*.jsonl*`` as records.)

A store from before this rule has heads without owners: a chain with a stored head and no owner
belongs to the data directory that has its log files, so an upgraded single daemon keeps ``main``.
The host name only makes the name readable; uniqueness comes from the claim, so two hosts with the
same name (or two data directories on one host) still get distinct chains.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from secretsd.audit.verify import log_files
from secretsd.errors import AuditError
from secretsd.storage import Storage

log = logging.getLogger("secretsd.audit")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # the pattern of [audit] chain
OWNER_META = "audit_owner:"
HEAD_META = "audit_head:"
#: Names tried before giving up: more daemons than this on one store need configured chains.
MAX_CANDIDATES = 64
_HOST_LABEL_MAX = 32
_NOT_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def host_label(node: str) -> str:
    """A host name made fit for a chain name: other characters become ``-``, at most 32 of them."""
    label = _NOT_NAME.sub("-", node).strip("-.")[:_HOST_LABEL_MAX].strip("-.")
    return label or "host"


def candidates(base: str, node: str, count: int = MAX_CANDIDATES) -> list[str]:
    """``base``, then ``base-<host>``, ``base-<host>-2``, ...: ``count`` names, each within 64 characters."""
    host = host_label(node)
    names = [base]
    for n in range(1, count):
        suffix = f"-{host}" if n == 1 else f"-{host}-{n}"
        names.append(base[: 64 - len(suffix)] + suffix)
    return names


@dataclass
class ChainClaim:
    """The chain this process writes: its name, its file, and the held lock (``AuditLog`` takes it over)."""

    name: str
    path: Path
    lock_fd: int

    @property
    def head_key(self) -> str:
        return HEAD_META + self.name


def _lock(path: Path) -> int | None:
    """Open and lock ``<path>.lock`` without waiting; None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claim_file(path: Path) -> Path:
    """Where a chain's claim id is kept: ``<chain>.claim`` beside its log file."""
    return path.with_suffix(".claim")


def _read_claim(path: Path) -> str | None:
    """The claim id kept beside the chain's file, if there is one."""
    try:
        current = claim_file(path).read_text("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    return current if re.fullmatch(r"[0-9a-f]{32}", current) else None


def _new_claim(path: Path) -> str:
    """Write a new claim id beside the chain's file (with the chain's lock held: no other writer)."""
    claim = secrets.token_hex(16)
    fd = os.open(claim_file(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, claim.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return claim


async def _is_ours(storage: Storage, name: str, path: Path, node: str) -> bool:
    """Whether chain ``name`` belongs to this data directory, claiming it in the store if it is free."""
    claim = _read_claim(path)
    raw = await storage.get_meta(OWNER_META + name)
    if raw is None:
        if await storage.get_meta(HEAD_META + name) is not None and not log_files(path):
            # A head from before owners existed, and none of its files here: another host's chain.
            return False
        claim = claim or _new_claim(path)  # written only for a chain we are about to claim
        record = json.dumps({"claim": claim, "host": node, "since": datetime.now(UTC).isoformat()})
        if await storage.put_meta(OWNER_META + name, record, only_if_absent=True):
            return True
        raw = await storage.get_meta(OWNER_META + name)  # another daemon claimed it a moment ago
    try:
        owner = json.loads(raw or "{}")
    except ValueError:
        owner = {}
    if claim is not None and isinstance(owner, dict) and owner.get("claim") == claim:
        return True
    holder = owner.get("host") if isinstance(owner, dict) else None
    if holder == node:
        # Same host name, other claim: another data directory here, or this one lost its .claim file.
        log.warning("audit chain %r is claimed by another daemon on a host named %r (another data directory, "
                    "or %s was removed); taking the next name", name, node, claim_file(path))
    return False


async def claim_chain(storage: Storage, names: Sequence[str], path_of: Callable[[str], Path], *,
                      node: str) -> ChainClaim:
    """Take the first free chain of ``names`` (a daemon's: ``candidates(base, node)``); ``AuditError``
    if none is free.

    ``path_of`` gives a chain's log file. The winner's lock is held on return: close it (or hand
    it to ``AuditLog``) when done.
    """
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"not a chain name: {name!r}")
        path = path_of(name)
        try:
            fd = _lock(path)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log's lock {path}.lock: {exc.strerror or exc}") from exc
        if fd is None:
            continue  # another process on this host writes it
        try:
            if await _is_ours(storage, name, path, node):
                return ChainClaim(name, path, fd)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise AuditError(f"cannot claim the audit chain {name!r} in {path.parent}: "
                                 f"{exc.strerror or exc}") from exc
            raise
        os.close(fd)
    raise AuditError(f"no free audit chain among {names[0]!r} and {len(names) - 1} derived names; "
                     "set [audit] chain for each daemon")


def release(claim: ChainClaim | None) -> None:
    if claim is not None:
        with contextlib.suppress(OSError):
            os.close(claim.lock_fd)
