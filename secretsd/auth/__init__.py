"""Authentication: who is calling. The ``Authenticator`` seam, its registry and the one decision step.

An authenticator turns what a request presented (``Credentials``) into a ``Principal``; both types
are domain identity (``secretsd.domain.identity``). Authorisation is separate: see ``secretsd.domain.policy``.

Authenticators are found by method name in the entry-point group ``secretsd.authenticators``; the
built-in token authenticator (``secretsd.auth.token``) registers there exactly as a third party
would. The daemon builds the ones named in ``[[authenticators]]`` (default: ``token`` alone) and
asks them in order. Every authenticator passes one conformance suite (``secretsd.auth.testing``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, cast

from secretsd.clock import Clock, utcnow
from secretsd.domain.identity import CredentialCache, Credentials, Principal
from secretsd.errors import ConfigError, UnauthenticatedError
from secretsd.storage import Storage

ENTRY_POINT_GROUP = "secretsd.authenticators"


class Authenticator(Protocol):
    """One authentication method.

    ``authenticate`` answers in one of three ways:

    * a ``Principal`` (with ``method`` set to this authenticator's ``method``): the credentials are
      of its kind and valid;
    * ``None``: "not mine" -- the fields of ``Credentials`` this method reads were not presented,
      so the next authenticator is asked;
    * ``UnauthenticatedError()``, always without a message of its own: the credentials are of its
      kind but unknown, wrong, revoked or expired. Which of these it was is never said (to the
      caller, in the error, or in a chained exception), so a caller learns nothing, not even
      whether an identity exists.

    Where a presented secret is compared with a stored one the comparison is constant-time, and it
    is made even when the identity is unknown. Nothing secret reaches the ``Principal``.

    ``Credentials`` grows a keyword-only field (default None) for each new kind of evidence -- a
    verified TLS client certificate, the Unix-socket peer's uid/gid/pid -- so a new method is a new
    module plus an entry point, and the methods already registered do not change: they read only
    their own fields.
    """

    method: str

    async def authenticate(self, credentials: Credentials) -> Principal | None: ...


@dataclass(frozen=True)
class AuthenticatorContext:
    """What the daemon lends an authenticator it builds. New fields get defaults (the seam stays stable)."""

    storage: Storage
    clock: Clock = utcnow
    #: The longest a verification may be reused without re-reading its source (``token_cache_seconds``):
    #: the bound on how late a revocation made by another replica or worker takes effect here.
    cache_seconds: float = 0.0


class AuthenticatorFactory(Protocol):
    """What an entry point in ``secretsd.authenticators`` names (usually the authenticator class)."""

    def from_config(self, options: Mapping[str, Any], context: AuthenticatorContext) -> Authenticator: ...


class Authenticators:
    """The configured authenticators, in the order they are asked; one ``CredentialCache`` for all."""

    def __init__(self, members: Sequence[Authenticator]) -> None:
        self._members = tuple(members)
        self._caches = tuple(m for m in self._members if isinstance(m, CredentialCache))
        #: Authentications by (method, outcome): plain integers, read by the metrics at scrape time
        #: (secretsd.runtime.metrics), so a request pays one dict update. Method "none": nothing
        #: presented that any method recognised.
        self.counts: dict[tuple[str, str], int] = {}

    def __iter__(self) -> Iterator[Authenticator]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m.method for m in self._members)

    def invalidate(self, token_id: str) -> None:
        for cache in self._caches:
            cache.invalidate(token_id)

    def invalidate_all(self) -> None:
        for cache in self._caches:
            cache.invalidate_all()

    def member(self, method: str) -> Authenticator | None:
        return next((m for m in self._members if m.method == method), None)

    async def authenticate(self, credentials: Credentials) -> Principal:
        """``authenticate`` over these members, each outcome counted under the method that decided."""
        counts = self.counts
        for authenticator in self._members:
            try:
                principal = await authenticator.authenticate(credentials)
            except UnauthenticatedError:
                key = (authenticator.method, "failure")
                counts[key] = counts.get(key, 0) + 1
                raise
            if principal is not None:
                key = (authenticator.method, "success")
                counts[key] = counts.get(key, 0) + 1
                return principal
        counts[_NOTHING] = counts.get(_NOTHING, 0) + 1
        raise UnauthenticatedError()


_NOTHING = ("none", "failure")


async def authenticate(authenticators: Iterable[Authenticator], credentials: Credentials) -> Principal:
    """The rule: the first authenticator that recognises the credentials decides; none means 401.

    The order is the configured one, the token method first by default: a bearer token, when
    present, wins over the connection's own identity (a Unix peer, a client certificate).
    """
    if isinstance(authenticators, Authenticators):
        return await authenticators.authenticate(credentials)
    for authenticator in authenticators:
        principal = await authenticator.authenticate(credentials)
        if principal is not None:
            return principal
    raise UnauthenticatedError()


# -- the registry ---------------------------------------------------------------------------------
def available_authenticators() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def authenticator_factory(method: str) -> AuthenticatorFactory:
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == method]
    if not matches:
        known = ", ".join(available_authenticators()) or "none (is jarvis-secretsd installed?)"
        raise ConfigError(f"unknown authenticator method {method!r}; available: {known}")
    try:
        factory = matches[0].load()
    except ImportError as exc:
        raise ConfigError(f"authenticator {method!r} could not be loaded ({exc}); is its extra installed?") from exc
    return cast(AuthenticatorFactory, factory)


def create_authenticators(specs: Sequence[Mapping[str, Any]], context: AuthenticatorContext) -> Authenticators:
    """Build the authenticators named by ``specs`` (each: ``method`` plus that method's options), in order."""
    if not specs:
        raise ConfigError("no authenticators configured: every request would be refused (add "
                          "[[authenticators]] method = \"token\", or leave the setting out)")
    built: list[Authenticator] = []
    for spec in specs:
        method = spec.get("method")
        if not isinstance(method, str) or not method:
            raise ConfigError("each [[authenticators]] entry needs a method, e.g. method = \"token\"")
        if method in (a.method for a in built):
            raise ConfigError(f"authenticator {method!r} is configured twice")
        options = {k: v for k, v in spec.items() if k != "method"}
        authenticator = authenticator_factory(method).from_config(options, context)
        if authenticator.method != method:
            raise ConfigError(f"the entry point {method!r} built an authenticator of method "
                              f"{authenticator.method!r}; they must agree (it names the principal's method)")
        built.append(authenticator)
    return Authenticators(built)
