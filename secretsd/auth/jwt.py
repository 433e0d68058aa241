"""Workload JWT login: a Kubernetes service-account token (or any OIDC issuer's JWT) for a daemon token.

``POST /v1/auth/jwt/login`` hands the JWT to ``JwtLogin.verify``; what it returns names the client
and policies of the first ``[[auth.jwt.rules]]`` entry whose claims all equal the token's, and the
daemon mints a short-lived token for them through the token service (no second token store).

The rules, each in one function:

- ``check_jwt_size``: a JWT longer than ``MAX_JWT_BYTES`` is refused before anything parses it.
- ``check_algorithm``: only RS256, ES256 and EdDSA; ``none`` and every HMAC algorithm are refused
  before a key is looked up (algorithm confusion: an HS256 token "signed" with the public key).
- the signature by the JWKS key named by ``kid`` (a JWKS of one key serves tokens without ``kid``);
  ``iss`` equal to ``issuer``, ``aud`` among ``audiences``, ``exp`` required, ``exp``/``nbf``/``iat``
  within ``leeway_seconds`` (PyJWT's checks, every one switched on).
- ``token_expiry``: ``exp`` is a JSON integer from 1 to ``MAX_EXP`` (year 9999), never a string or
  float PyJWT would coerce.
- ``claims_match``: a rule's ``claims`` table, where a nested table names a nested claim:
  ``claims = { "kubernetes.io" = { namespace = "billing" } }`` matches
  ``{"kubernetes.io": {"namespace": "billing", ...}}``. Keys are never split on dots (``kubernetes.io``
  is one key); every listed claim must be present and equal (same JSON type), other claims are ignored.

Every refusal is one bare ``UnauthenticatedError``: which check failed, and which rules exist, is not
the caller's business. The JWKS (``JwksCache``) comes from ``jwks_file`` or ``jwks_url``
(``secretsd.addresses.check_jwks_url``: https, or http to loopback; redirects are not followed), read again every
``refresh_interval_seconds`` in a thread of its own, one read at a time, with a total deadline and a
size bound; a failed refresh keeps the last good keys, for at most ``max_stale_seconds``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt as pyjwt
from pydantic import Field, ValidationError, field_validator

from secretsd.addresses import check_jwks_url
from secretsd.auth.rules import IdentityRule
from secretsd.errors import ConfigError, UnauthenticatedError
from secretsd.tokens import redact_secrets

log = logging.getLogger("secretsd.auth.jwt")

#: Longer than any service-account or OIDC token seen in practice (about 1-2 KiB), short enough that
#: an anonymous caller cannot make us base64-decode and JSON-parse megabytes.
MAX_JWT_BYTES = 16 * 1024
#: The asymmetric algorithms accepted; everything else (none, HS*, PS* unless added here) is refused.
ALLOWED_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
#: A JWKS bigger than this is refused (a fetched document is read up to this many bytes).
MAX_JWKS_BYTES = 1024 * 1024
_Scalar = str | int | bool


class JwtRule(IdentityRule):
    """One ``[[auth.jwt.rules]]`` entry: claims that must all equal, the client and its policies."""

    claims: dict[str, Any] = Field(min_length=1)

    @field_validator("claims")
    @classmethod
    def _claims(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_claims(value)
        return value


def _check_claims(claims: Mapping[str, Any], where: str = "claims") -> None:
    if not claims:
        raise ValueError(f"{where} is empty (a rule that matches every token is not allowed)")
    for name, expected in claims.items():
        if isinstance(expected, Mapping):
            _check_claims(expected, f"{where}.{name}")
        elif not isinstance(expected, _Scalar):
            raise ValueError(f"{where}.{name}: a claim is matched against a string, number, boolean or table")


def claims_match(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """The rule "every claim a rule lists equals the token's": nested tables name nested claims;
    ``True`` never equals ``1`` (JSON types must agree)."""
    for name, want in expected.items():
        if name not in actual:
            return False
        got = actual[name]
        if isinstance(want, Mapping):
            if not isinstance(got, Mapping) or not claims_match(want, got):
                return False
        elif type(got) is not type(want) or got != want:
            return False
    return True


def parse_rules(raw: Sequence[Mapping[str, Any]]) -> tuple[JwtRule, ...]:
    try:
        return tuple(JwtRule.model_validate(dict(r)) for r in raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'rule'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid [[auth.jwt.rules]]: {problems}") from None


def check_jwt_size(token: str) -> None:
    """The rule "a JWT larger than MAX_JWT_BYTES is refused before parsing"."""
    if len(token) > MAX_JWT_BYTES:
        raise UnauthenticatedError()


def check_algorithm(header: Mapping[str, Any]) -> str:
    """The rule "only RS256, ES256 and EdDSA": ``none`` and HMAC are algorithm confusion."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise UnauthenticatedError()
    return alg


# -- the keys -------------------------------------------------------------------------------------
def parse_jwks(raw: bytes) -> dict[str | None, pyjwt.PyJWK]:
    """The usable signing keys of a JWKS document by kid (ValueError if none is usable)."""
    try:
        document = json.loads(raw)
        keys = document["keys"] if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise ValueError("a JWKS is a JSON object with a list 'keys'")
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a JWKS document ({exc.__class__.__name__})") from None
    found: dict[str | None, pyjwt.PyJWK] = {}
    for entry in keys:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue  # encryption keys and symmetric keys never verify a login
        try:
            key = pyjwt.PyJWK(entry)
        except pyjwt.PyJWTError:
            continue  # an algorithm or key type this library does not know: skipped, not fatal
        found[entry.get("kid")] = key
    if not found:
        raise ValueError("the JWKS holds no usable signing key (RSA, EC or OKP)")
    return found


@dataclass
class _Keys:
    keys: dict[str | None, pyjwt.PyJWK]
    fetched: float  # time.monotonic() of the last good read


class JwksCache:
    """The JWKS from a file or a URL, refreshed in the background; the last good keys are kept while
    refreshes fail, for ``max_stale`` seconds at most (then every login is refused until one succeeds).

    Reads run in one thread of their own (never the event loop's shared default executor, which
    getaddrinfo, health checks and audit retention need), one at a time: a refresh while the last
    read is still running is a failed refresh, not a second thread. A URL read has a total deadline
    (``timeout``), checked between socket reads that each wait at most that long, and the socket is
    shut down when the deadline passes, so a server that drips bytes cannot hold the thread."""

    def __init__(self, *, file: Path | None, url: str | None, ca_file: Path | None = None, timeout: float = 5.0,
                 refresh: float = 300.0, max_stale: float = 3600.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if (file is None) == (url is None):
            raise ConfigError("[auth.jwt] needs jwks_file or jwks_url (one of them)")
        if url is not None:
            try:
                check_jwks_url(url)
            except ValueError as exc:
                raise ConfigError(f"[auth.jwt] {exc}") from None
        self._file, self._url, self._ca_file = file, url, ca_file
        self._timeout, self._refresh, self._max_stale = timeout, refresh, max_stale
        self._monotonic = monotonic
        self._current: _Keys | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="secretsd-jwks")
        self._reading: concurrent.futures.Future[bytes] | None = None
        self._socket: socket.socket | None = None  # the URL read's socket, shut down at the deadline
        self.failures = 0

    @property
    def source(self) -> str:
        return str(self._file) if self._file is not None else str(self._url)

    @property
    def reading(self) -> bool:
        """True while a read runs in the JWKS thread."""
        return self._reading is not None and not self._reading.done()

    def _read(self, deadline: float) -> bytes:
        """One read of the source, blocking: called in the JWKS thread."""
        if self._file is not None:
            with self._file.open("rb") as f:
                return f.read(MAX_JWKS_BYTES + 1)
        assert self._url is not None
        return self._read_url(self._url, deadline)

    def _read_url(self, url: str, deadline: float) -> bytes:
        """GET ``url``, no redirect followed (a 3xx is a failure: an https URL must not lead to
        http), every socket read bounded by ``timeout`` and the whole by ``deadline``."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
            connection = http.client.HTTPSConnection(host, parts.port, timeout=self._timeout, context=context)
        else:
            connection = http.client.HTTPConnection(host, parts.port, timeout=self._timeout)
        try:
            connection.connect()
            self._socket = connection.sock
            connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else "") or "/",
                               headers={"Accept": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                why = " (redirects are not followed)" if 300 <= response.status < 400 else ""
                raise OSError(f"HTTP {response.status}{why}")
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_JWKS_BYTES:
                if time.monotonic() > deadline:
                    raise OSError(f"reading the JWKS took longer than {self._timeout}s")
                chunk = response.read1(64 * 1024)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            self._socket = None
            connection.close()

    def _abort_read(self) -> None:
        """The deadline passed: shut the URL read's socket down, so the blocked recv returns now."""
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def refresh(self) -> None:
        """Read the source once (in the JWKS thread, bounded); raises ValueError/OSError on failure."""
        if self.reading:
            raise OSError(f"the previous read of the JWKS from {self.source} is still running")
        deadline = time.monotonic() + self._timeout
        self._reading = self._executor.submit(self._read, deadline)
        try:
            raw = await asyncio.wait_for(asyncio.wrap_future(self._reading), timeout=self._timeout + 0.5)
        except TimeoutError as exc:
            self._abort_read()
            raise OSError(f"reading the JWKS from {self.source} took longer than {self._timeout}s") from exc
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError(f"the JWKS at {self.source} is larger than {MAX_JWKS_BYTES} bytes")
        self._current = _Keys(parse_jwks(raw), self._monotonic())

    async def start(self) -> None:
        """The first read: a file must load (ConfigError); a URL that fails is retried in the background."""
        try:
            await self.refresh()
        except (OSError, ValueError) as exc:
            if self._file is not None:
                raise ConfigError(f"[auth.jwt] jwks_file {self._file}: {exc}") from exc
            self.failures += 1
            log.warning("cannot fetch the JWKS from %s yet (%s); JWT logins are refused until it loads",
                        self._url, exc)
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._abort_read()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            try:
                await self.refresh()
            except (OSError, ValueError) as exc:
                self.failures += 1
                log.warning("JWKS refresh from %s failed (%s); the last good keys stay in use for at most %ds",
                            self.source, exc, self._max_stale)

    def key(self, kid: object) -> pyjwt.PyJWK:
        """The key a token names (``kid``); a single-key JWKS serves a token without one."""
        current = self._current
        if current is None or self._monotonic() - current.fetched > self._max_stale + self._refresh:
            raise UnauthenticatedError()  # no keys, or keys too old to trust
        if isinstance(kid, str) and kid in current.keys:
            return current.keys[kid]
        if kid is None and len(current.keys) == 1:
            return next(iter(current.keys.values()))
        raise UnauthenticatedError()


# -- the login ------------------------------------------------------------------------------------
#: The latest ``exp`` accepted: 9999-12-31T23:59:59Z, the last instant a datetime holds. A later one
#: (or one that is not an integer) is a malformed token, refused like any other.
MAX_EXP = 253402300799


def token_expiry(claims: Mapping[str, Any]) -> datetime:
    """The rule "exp is an integer NumericDate within range": a JSON integer (not a string, float or
    boolean, which PyJWT would coerce) from 1 to ``MAX_EXP``; ValueError otherwise."""
    exp = claims.get("exp")
    if type(exp) is not int or not 0 < exp <= MAX_EXP:
        raise ValueError("exp is not an integer NumericDate within range")
    return datetime.fromtimestamp(exp, UTC)


@dataclass(frozen=True)
class JwtIdentity:
    """What a verified JWT proved: the rule's client and policies, the token's own end, and the
    identity it presented (``sub``, ``iss``) for the audit log -- never the JWT itself."""

    client: str
    policies: tuple[str, ...]
    expires_at: datetime
    subject: str | None
    issuer: str


def presented_identity(token: str) -> dict[str, str]:
    """``sub`` and ``iss`` as the caller presented them (unverified, clipped), for the audit record of
    a refusal; empty when the token does not even parse. Never the token."""
    try:
        claims = pyjwt.decode(token, options={"verify_signature": False})
    except pyjwt.PyJWTError:
        return {}
    # The caller chose these: clipped, and a token pasted into them keeps only its public id.
    return {k: redact_secrets(v[:256]) for k in ("sub", "iss") if isinstance(v := claims.get(k), str)}


class JwtLogin:
    """Verifies JWTs against the JWKS and maps their claims by the rules."""

    def __init__(self, keys: JwksCache, *, issuer: str, audiences: Sequence[str], rules: Sequence[JwtRule],
                 leeway_seconds: int = 30, token_ttl_seconds: int = 900) -> None:
        if not issuer or not audiences:
            raise ConfigError("[auth.jwt] needs issuer and audiences: a token for another service, or from "
                              "another issuer, must not log in here")
        self.keys = keys
        self.issuer = issuer
        self.audiences = list(audiences)
        self._rules = tuple(rules)
        self.leeway = leeway_seconds
        self.token_ttl_seconds = token_ttl_seconds

    def replace_rules(self, rules: Sequence[JwtRule]) -> None:
        """New rules (SIGHUP); tokens already minted keep their client and policies."""
        self._rules = tuple(rules)

    @classmethod
    def from_settings(cls, settings: Any) -> JwtLogin | None:
        """From ``[auth.jwt]`` (secretsd.runtime.config.JwtAuthSettings); None when it is not configured."""
        if settings.jwks_file is None and settings.jwks_url is None:
            return None
        keys = JwksCache(file=settings.jwks_file, url=settings.jwks_url, ca_file=settings.jwks_ca_file,
                         timeout=settings.fetch_timeout_seconds, refresh=settings.refresh_interval_seconds,
                         max_stale=settings.max_stale_seconds)
        return cls(keys, issuer=settings.issuer or "", audiences=settings.audiences,
                   rules=parse_rules(settings.rules), leeway_seconds=settings.leeway_seconds,
                   token_ttl_seconds=settings.token_ttl_seconds)

    def verify(self, token: str) -> JwtIdentity:
        """The identity a JWT proves, by the first rule its claims match; UnauthenticatedError otherwise."""
        check_jwt_size(token)
        try:
            header = pyjwt.get_unverified_header(token)
            alg = check_algorithm(header)
            key = self.keys.key(header.get("kid"))
            claims = pyjwt.decode(
                token, key=key.key, algorithms=[alg], audience=self.audiences, issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"], "verify_signature": True, "verify_exp": True,
                         "verify_nbf": True, "verify_iat": True, "verify_aud": True, "verify_iss": True},
            )
            expires_at = token_expiry(claims)
        except (pyjwt.PyJWTError, ValueError, TypeError, OverflowError, OSError):
            claims, expires_at = None, None
        if claims is None or expires_at is None:
            # Raised here, not in the handler: no chained exception says which check failed.
            raise UnauthenticatedError()
        for rule in self._rules:
            if claims_match(rule.claims, claims):
                sub = claims.get("sub")
                return JwtIdentity(rule.client, rule.policies, expires_at,
                                   sub if isinstance(sub, str) else None, self.issuer)
        raise UnauthenticatedError()
