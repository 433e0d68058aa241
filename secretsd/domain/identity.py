"""Identity, a domain notion: who is calling (``Principal``) and what a request presented (``Credentials``).

Both live here, below the HTTP layer, so that the domain services (``service``, ``rotation``,
``token_service``) name a caller without importing the transport or the authenticators. How
credentials become a principal is the ``Authenticator`` seam (``secretsd.auth``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from secretsd import tokens


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. Carries no secret: it is logged, audited and shown to the caller."""

    client: str
    policies: tuple[str, ...]
    method: str  # the authenticator's method ("token", "unix", "tls", "jwt"), or "internal" for the daemon's own actors
    token_id: str | None = None  # the public id of the token used, never its secret part
    expires_at: datetime | None = None  # the credential's own end: what it may delegate is bounded by it

    @property
    def display(self) -> str:
        return f"{self.client} ({tokens.display_id(self.token_id)})" if self.token_id else self.client


@dataclass(frozen=True)
class PeerCredentials:
    """The Unix-socket peer as the kernel saw it when it connected (``SO_PEERCRED``): not a secret,
    and not something the caller can choose -- the kernel records them at ``connect()``."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class ClientCertificate:
    """A TLS client certificate the handshake verified (chain to ``client_ca_file``, validity, CRL),
    as the facts the ``[[auth.tls.rules]]`` match on: read once per connection
    (secretsd.auth.tls.read_certificate). Public data, no secret."""

    fingerprint_sha256: str  # lower-case hex of the DER's SHA-256
    subject_cn: str | None
    dns_sans: tuple[str, ...]
    uri_sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    #: False when an extended key usage is present without clientAuth, for a CA certificate
    #: (basicConstraints CA:TRUE), or when the DER did not parse.
    client_auth: bool


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """What one request presented, as the transport saw it; a field stays None when not presented.

    Growing this type is how a new authentication method arrives without breaking the seam: a
    verified TLS client certificate or the Unix-socket peer's credentials become new keyword-only
    fields with a None default, filled in by the transport. Every authenticator reads only the
    fields of its own kind and answers "not mine" when they are None, so existing authenticators,
    and third-party ones built against an older version of this type, keep working unchanged.

    Secret fields are kept out of ``repr`` (a credential that reaches a log line or a traceback
    must not carry the secret with it).
    """

    bearer: str | None = field(default=None, repr=False)
    #: Set only on a connection accepted on the Unix socket (``listen_unix``): read once per
    #: connection by the listener (secretsd.runtime.unix_listener), never from anything sent.
    peer: PeerCredentials | None = None
    #: Set only on a TLS connection whose client presented a certificate the handshake verified:
    #: read once per connection (secretsd.runtime.edge), never from anything sent in a request.
    client_cert: ClientCertificate | None = None


@runtime_checkable
class CredentialCache(Protocol):
    """Whatever remembers verified credentials, and so must hear of each revocation.

    The token service calls it when it revokes a token, the replica sync when another process did;
    an authenticator that caches implements it (``secretsd.auth.Authenticators`` fans out to all).
    """

    def invalidate(self, token_id: str) -> None: ...

    def invalidate_all(self) -> None: ...
