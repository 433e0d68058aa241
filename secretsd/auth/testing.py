"""The conformance suite every authenticator must pass.

Subclass ``AuthenticatorConformance`` in a test module and provide an async ``harness`` fixture that
yields an ``AuthenticatorHarness`` for the method under test: the authenticator (built through its
entry point, as the daemon builds it, with a verification cache long enough that revocation must
reach it), and the means to issue, spoil and revoke that method's credentials and to move its clock::

    class TestMyMethod(AuthenticatorConformance):
        @pytest.fixture
        async def harness(self, tmp_path: Path) -> AsyncIterator[AuthenticatorHarness]:
            yield MyHarness(...)

What it checks, for every method: valid credentials give their principal and nothing presented is
"not mine"; unknown, malformed, tampered, revoked and expired credentials are all refused with one
and the same bare ``UnauthenticatedError``; presented secrets are compared in constant time, even
for an unknown identity; no secret reaches a principal, a repr or an error; concurrent requests each
get their own answer.
"""

from __future__ import annotations

import asyncio
import hmac
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import pytest

from secretsd.auth import Authenticator, authenticator_factory
from secretsd.domain.identity import Credentials, Principal
from secretsd.errors import UnauthenticatedError


@dataclass(frozen=True)
class Issued:
    """Credentials the harness made valid, with what they must authenticate as."""

    credentials: Credentials
    client: str
    policies: tuple[str, ...]
    #: Every string that is secret in these credentials (a whole token, its secret part...).
    secrets: tuple[str, ...]


class AuthenticatorHarness(Protocol):
    authenticator: Authenticator
    #: False for methods that compare no presented secret (a verified certificate, peer credentials).
    compares_secrets: bool

    async def issue(self, client: str, policies: tuple[str, ...], *, ttl_seconds: float | None = None) -> Issued:
        """Make valid credentials for ``client`` (expiring ``ttl_seconds`` from the clock's now)."""
        ...

    def unknown(self) -> Credentials:
        """Well-formed credentials of this method's kind that were never issued."""
        ...

    def malformed(self) -> Sequence[Credentials]:
        """Credentials of this method's kind that are not well formed."""
        ...

    def tampered(self, issued: Issued) -> Credentials:
        """The same identity as ``issued`` with a wrong secret (or a wrong signature)."""
        ...

    async def revoke(self, issued: Issued) -> None:
        """Revoke ``issued`` the way the daemon does (its revocation path, cache notice included)."""
        ...

    def advance(self, seconds: float) -> None:
        """Move the authenticator's clock forward."""
        ...


def _refusal() -> str:
    return str(UnauthenticatedError())


async def _refused(authenticator: Authenticator, credentials: Credentials) -> UnauthenticatedError:
    with pytest.raises(UnauthenticatedError) as caught:
        await authenticator.authenticate(credentials)
    return caught.value


def _assert_says_nothing(exc: UnauthenticatedError) -> None:
    """The one refusal: the bare error, no message of its own, nothing chained that could tell why."""
    assert type(exc) is UnauthenticatedError
    assert str(exc) == _refusal()
    assert exc.__cause__ is None and exc.__context__ is None


def _assert_no_secret(secrets: Sequence[str], *texts: str) -> None:
    for secret in secrets:
        for text in texts:
            assert secret not in text


def _principal_texts(principal: Principal) -> list[str]:
    return [repr(principal), str(principal), principal.display,
            *(str(getattr(principal, f.name)) for f in fields(principal))]


class AuthenticatorConformance:
    async def test_valid_credentials_give_their_principal(self, harness: AuthenticatorHarness) -> None:
        issued = await harness.issue("svc-a", ("alpha", "beta"))
        principal = await harness.authenticator.authenticate(issued.credentials)
        assert principal is not None
        assert principal.client == "svc-a" and principal.policies == ("alpha", "beta")
        assert principal.method == harness.authenticator.method
        # Asked again (a cached verification, where the method caches): the same answer.
        assert await harness.authenticator.authenticate(issued.credentials) == principal

    async def test_nothing_presented_is_not_mine(self, harness: AuthenticatorHarness) -> None:
        assert await harness.authenticator.authenticate(Credentials()) is None

    async def test_unknown_credentials_are_refused_without_saying_why(self, harness: AuthenticatorHarness) -> None:
        issued = await harness.issue("svc-a", ("alpha",))
        for credentials in (harness.unknown(), harness.tampered(issued), *harness.malformed()):
            _assert_says_nothing(await _refused(harness.authenticator, credentials))

    async def test_revoked_credentials_are_refused(self, harness: AuthenticatorHarness) -> None:
        issued = await harness.issue("svc-a", ("alpha",))
        other = await harness.issue("svc-b", ("alpha",))
        assert await harness.authenticator.authenticate(issued.credentials) is not None  # now cached, if it caches
        await harness.revoke(issued)
        _assert_says_nothing(await _refused(harness.authenticator, issued.credentials))
        assert await harness.authenticator.authenticate(other.credentials) is not None  # only that one

    async def test_expired_credentials_are_refused(self, harness: AuthenticatorHarness) -> None:
        issued = await harness.issue("svc-a", ("alpha",), ttl_seconds=60)
        harness.advance(59)
        assert await harness.authenticator.authenticate(issued.credentials) is not None
        harness.advance(1)  # the expiry instant itself is already too late
        _assert_says_nothing(await _refused(harness.authenticator, issued.credentials))

    async def test_secret_comparison_is_constant_time(
        self, harness: AuthenticatorHarness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every presented secret is compared with ``hmac.compare_digest``, the unknown ones too (so
        the time taken does not tell whether an identity exists)."""
        if not harness.compares_secrets:
            pytest.skip("this method compares no presented secret")
        issued = await harness.issue("svc-a", ("alpha",))
        calls: list[int] = []
        real: Callable[..., bool] = hmac.compare_digest

        def counting(a: bytes, b: bytes) -> bool:
            calls.append(1)
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", counting)
        assert await harness.authenticator.authenticate(issued.credentials) is not None
        assert calls, "a valid secret was compared without hmac.compare_digest"
        for credentials in (harness.tampered(issued), harness.unknown()):
            calls.clear()
            await _refused(harness.authenticator, credentials)
            assert calls, "a presented secret was refused without a hmac.compare_digest comparison"

    async def test_no_secret_in_principal_repr_or_errors(self, harness: AuthenticatorHarness) -> None:
        issued = await harness.issue("svc-a", ("alpha",))
        assert issued.secrets
        principal = await harness.authenticator.authenticate(issued.credentials)
        assert principal is not None
        _assert_no_secret(issued.secrets, *_principal_texts(principal), repr(issued.credentials),
                          repr(harness.authenticator))
        await harness.revoke(issued)
        for credentials in (issued.credentials, harness.tampered(issued)):
            exc = await _refused(harness.authenticator, credentials)
            _assert_no_secret(issued.secrets, str(exc), repr(exc), "".join(traceback.format_exception(exc)))

    async def test_concurrent_requests_each_get_their_own_answer(self, harness: AuthenticatorHarness) -> None:
        good = [await harness.issue(f"svc-{i}", (f"p{i}",)) for i in range(4)]
        gone = await harness.issue("svc-gone", ("p",))
        await harness.revoke(gone)
        cases: list[tuple[Credentials, str | None]] = []
        for round_ in range(25):
            issued = good[round_ % len(good)]
            cases += [(issued.credentials, issued.client), (harness.tampered(issued), None),
                      (gone.credentials, None), (harness.unknown(), None)]
        results = await asyncio.gather(*(harness.authenticator.authenticate(c) for c, _ in cases),
                                       return_exceptions=True)
        for (_, client), result in zip(cases, results, strict=True):
            if client is None:
                assert isinstance(result, UnauthenticatedError), result
            else:
                assert isinstance(result, Principal) and result.client == client, result

    def test_registered_as_an_entry_point(self, harness: AuthenticatorHarness) -> None:
        """Built-in or not, a method is found by its name in ``secretsd.authenticators``."""
        factory = authenticator_factory(harness.authenticator.method)
        if isinstance(factory, type):
            assert isinstance(harness.authenticator, factory)
