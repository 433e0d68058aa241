"""The ``unix`` authenticator: the kernel's peer credentials of a Unix-socket connection.

A connection accepted on ``listen_unix`` carries the peer's uid, gid and pid as the kernel recorded
them at ``connect()`` (``SO_PEERCRED``, read once per connection by secretsd.runtime.unix_listener).
``[[auth.unix.rules]]`` map them to a client and policies, first match wins; the caller names
neither. Registered under the entry point ``secretsd.authenticators: unix``.

The executable path of the peer's pid is not matched: reading it by pid races with the pid's reuse
(the peer may exit and another process take its pid between connect and the read), and a race-free
read needs a pidfd taken from the socket (SO_PEERPIDFD, Linux 6.5), which this daemon does not rely
on. docs/auth.md says so.

The overflow ids (``/proc/sys/kernel/overflowuid`` and ``overflowgid``, usually 65534) are never an
identity: a daemon in a user namespace sees every peer whose uid or gid its namespace does not map
as that id, so a rule naming it would admit every such peer. Both are read once, when the rules are
loaded; a rule naming one is refused, and a peer carrying one is refused (``OverflowIds``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from secretsd.auth import AuthenticatorContext
from secretsd.auth.rules import IdentityRule
from secretsd.domain.identity import Credentials, PeerCredentials, Principal
from secretsd.errors import ConfigError, UnauthenticatedError


class UnixRule(IdentityRule):
    """One ``[[auth.unix.rules]]`` entry: uid and/or gid (both must match when both are given)."""

    uid: int | None = Field(default=None, ge=0)
    gid: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _names_someone(self) -> UnixRule:
        if self.uid is None and self.gid is None:
            raise ValueError("a unix rule needs uid, gid or both (a rule matching every peer is not allowed)")
        return self

    def matches(self, peer: PeerCredentials) -> bool:
        return (self.uid is None or self.uid == peer.uid) and (self.gid is None or self.gid == peer.gid)


_OVERFLOW_FILES = (Path("/proc/sys/kernel/overflowuid"), Path("/proc/sys/kernel/overflowgid"))
#: The kernel's default overflow id, used where /proc does not say.
_DEFAULT_OVERFLOW = 65534


@dataclass(frozen=True)
class OverflowIds:
    """The uid and gid the kernel reports for an id the reader's user namespace cannot map."""

    uid: int
    gid: int

    @classmethod
    def of_this_system(cls, files: tuple[Path, Path] = _OVERFLOW_FILES) -> OverflowIds:
        def read(file: Path) -> int:
            try:
                return int(file.read_text().strip())
            except (OSError, ValueError):
                return _DEFAULT_OVERFLOW
        return cls(read(files[0]), read(files[1]))

    def carried_by(self, peer: PeerCredentials) -> bool:
        """The rule "an unmapped peer is nobody": a uid or gid equal to the overflow id is no identity."""
        return peer.uid == self.uid or peer.gid == self.gid


def parse_rules(raw: Sequence[Mapping[str, Any]], overflow: OverflowIds | None = None) -> tuple[UnixRule, ...]:
    try:
        rules = tuple(UnixRule.model_validate(dict(r)) for r in raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'rule'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid [[auth.unix.rules]]: {problems}") from None
    overflow = overflow or OverflowIds.of_this_system()
    for index, rule in enumerate(rules):
        if rule.uid == overflow.uid or rule.gid == overflow.gid:
            named = f"uid {rule.uid}" if rule.uid == overflow.uid else f"gid {rule.gid}"
            raise ConfigError(
                f"invalid [[auth.unix.rules]]: rule {index + 1} (client {rule.client!r}) names {named}, the "
                "kernel's overflow id (/proc/sys/kernel/overflowuid, overflowgid): every peer a user "
                "namespace cannot map is reported as it, so it identifies nobody. Run the service under "
                "its own uid and name that")
    return rules


@dataclass(frozen=True)
class _Decision:
    client: str
    policies: tuple[str, ...]


class UnixAuthenticator:
    """Peer credentials mapped by the operator's rules; the rules are the only source of identity."""

    method = "unix"

    def __init__(self, rules: Sequence[UnixRule], overflow: OverflowIds | None = None) -> None:
        self._overflow = overflow or OverflowIds.of_this_system()  # read once, at start
        self._rules = tuple(rules)

    @classmethod
    def from_config(cls, options: Mapping[str, Any], context: AuthenticatorContext) -> UnixAuthenticator:
        unknown = set(options) - {"rules"}
        if unknown:
            raise ConfigError(f"authenticator 'unix' takes only rules (given: {', '.join(sorted(unknown))})")
        rules = options.get("rules", [])
        if not isinstance(rules, list | tuple):
            raise ConfigError("authenticator 'unix': rules must be a list of tables ([[auth.unix.rules]])")
        overflow = OverflowIds.of_this_system()
        return cls(parse_rules(rules, overflow), overflow)

    def __repr__(self) -> str:
        return f"UnixAuthenticator(rules={len(self._rules)})"

    @property
    def rules(self) -> tuple[UnixRule, ...]:
        return self._rules

    def replace_rules(self, rules: Sequence[UnixRule]) -> None:
        """New rules (a reload); requests already authenticated keep their principal."""
        self._rules = tuple(rules)

    def decide(self, peer: PeerCredentials) -> Principal | None:
        """The rule "peer credentials map by the first matching rule": None when no rule matches,
        or when the peer is one the kernel could not map (``OverflowIds.carried_by``)."""
        if self._overflow.carried_by(peer):
            return None
        for rule in self._rules:
            if rule.matches(peer):
                return Principal(rule.client, rule.policies, self.method)
        return None

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        if credentials.peer is None:
            return None
        principal = self.decide(credentials.peer)
        if principal is None:
            # One refusal for every peer no rule names: which rules exist is not the caller's business.
            raise UnauthenticatedError()
        return principal
