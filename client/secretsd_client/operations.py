"""What both client faces share: configuration, and every operation as a call.

``Operations[R]`` turns each method into a ``calls.Call`` and hands it to the face's ``call``:
the sync face returns the decoded JSON (``R = dict``), the async face an awaitable of it.
"""

from __future__ import annotations

import os
import ssl
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from secretsd_client import calls
from secretsd_client.defaults import DEFAULT_ADDR
from secretsd_client.errors import ConfigError, UnreachableError
from secretsd_client.retry import DEFAULT_RETRY, RetryPolicy

R = TypeVar("R")


CLIENT_CERT_ENV = "SECRETSD_CLIENT_CERT"
CLIENT_KEY_ENV = "SECRETSD_CLIENT_KEY"


def client_certificate(cert: tuple[Path | str, Path | str] | Path | str | None,
                       key: Path | str | None) -> tuple[str, str] | None:
    """The client certificate and key files for mTLS: the arguments (a (cert, key) pair, or a cert
    and ``key``), else ``SECRETSD_CLIENT_CERT`` / ``SECRETSD_CLIENT_KEY``; a certificate without its
    key (or the reverse) is a ConfigError, not a silent connection without one."""
    if isinstance(cert, tuple):
        if key is not None:
            raise ConfigError("give client_cert as a (certificate, key) pair or with client_key, not both")
        cert, key = cert
    if cert is None and key is None:
        cert, key = os.environ.get(CLIENT_CERT_ENV) or None, os.environ.get(CLIENT_KEY_ENV) or None
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(f"a client certificate needs both its certificate and its key file "
                          f"(client_cert and client_key, or {CLIENT_CERT_ENV} and {CLIENT_KEY_ENV})")
    return str(cert), str(key)


class Endpoint:
    """The daemon's address, credentials and transport options, from arguments or the environment."""

    def __init__(
        self,
        addr: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        ca_file: Path | str | None = None,
        client_cert: tuple[Path | str, Path | str] | Path | str | None = None,
        client_key: Path | str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.addr = (addr or os.environ.get("SECRETSD_ADDR") or DEFAULT_ADDR).rstrip("/")
        self.token = token if token is not None else os.environ.get("SECRETSD_TOKEN")
        if self.token and not (self.token.isascii() and self.token.isprintable() and " " not in self.token):
            # The HTTP library's own error would quote the header, token included.
            raise ConfigError("SECRETSD_TOKEN is malformed (a stray newline or carriage return from a file?)")
        #: The socket file of a ``unix:///PATH`` address (then host and port only name the HTTP Host).
        self.unix_path = unix_socket_path(self.addr)
        parts = urlsplit(self.addr)
        if self.unix_path is None and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ConfigError(f"SECRETSD_ADDR must be http(s)://HOST:PORT or unix:///PATH, got {self.addr!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 80)
        self.timeout = timeout
        self.retry = retry if retry is not None else DEFAULT_RETRY
        self.ssl_context: ssl.SSLContext | None = None
        ca_file = ca_file or os.environ.get("SECRETSD_CA_FILE") or None
        if self.https:
            self.ssl_context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            pair = client_certificate(client_cert, client_key)
            if pair is not None:
                try:
                    self.ssl_context.load_cert_chain(pair[0], pair[1])
                except (OSError, ssl.SSLError) as exc:
                    # Names the files, never their contents (a key file's text must not reach a log).
                    raise ConfigError(f"cannot load the client certificate {pair[0]} / key {pair[1]}: "
                                      f"{exc.__class__.__name__}") from None

    def unreachable(self, exc: BaseException) -> UnreachableError:
        """The error for a call that never got an HTTP answer, with a hint where one helps."""
        reason = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "")
        hint = ""
        if _certificate_error(exc):
            hint = (" (if the daemon's certificate comes from a private CA, trust that CA with ca_file, "
                    "--ca-file or SECRETSD_CA_FILE)")
        return UnreachableError(f"cannot reach secretsd at {self.addr}: {exc.__class__.__name__}: {reason}{hint}")

    def headers(self, call: calls.Call) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        return headers


def unix_socket_path(addr: str) -> str | None:
    """The socket path of a ``unix:///PATH`` address; None for any other scheme.

    The rule: a unix address is the scheme and an absolute path, nothing else. ``unix://host/path``
    (a host part), a port, a query or a fragment is a ConfigError, never half-used.
    """
    parts = urlsplit(addr)
    if parts.scheme != "unix":
        return None
    if parts.netloc or parts.query or parts.fragment or not parts.path.startswith("/") or parts.path == "/":
        raise ConfigError(f"a unix address is unix:///ABSOLUTE/PATH with no host, port or query, got {addr!r}")
    return parts.path


def _certificate_error(exc: BaseException | None) -> bool:
    # aiohttp wraps the ssl module's error (as .certificate_error); http.client raises it as is.
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ssl.SSLCertVerificationError) or isinstance(
                getattr(exc, "certificate_error", None), ssl.SSLCertVerificationError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class Operations(ABC, Generic[R]):
    """Every operation of the API, each one line: build the call, let the face send it."""

    @abstractmethod
    def call(self, call: calls.Call) -> R:
        """Send ``call``, retrying per the retry policy; return the decoded response."""

    def get(self, path: str, version: int | None = None, *, label: str | None = None) -> R:
        """Read a secret: the current version, or ``version``, or the one ``label`` (``previous``...) names."""
        return self.call(calls.get_secret(path, version, label))

    def rotate(self, path: str, value: str | None = None) -> R:
        """Rotate now: the generated (or the given) value becomes current, the old one previous."""
        return self.call(calls.rotate_secret(path, value))

    def set_rotation(self, path: str, policy: dict[str, Any] | None) -> R:
        """Set (or with None remove) the rotation policy of ``path``."""
        return self.call(calls.set_rotation(path, policy))

    def rotation_status(self, prefix: str = "") -> R:
        """Rotation policy, last rotation and next due time of each secret under ``prefix``."""
        return self.call(calls.rotation_status(prefix))

    def put(self, path: str, value: str | bytes, *, cas: int | None = None,
            metadata: dict[str, str] | None = None) -> R:
        """Write ``value`` (text, or bytes for a binary value) as a new version. ``cas``: only if the
        current version is that number (0: only if the path is new); then the call is also safe to
        retry. ``metadata`` (stored in clear) replaces the secret's metadata. A read answers a binary
        value as ``value_base64``; ``secretsd.client.calls.value_of`` gives either kind back."""
        return self.call(calls.put_secret(path, value, cas, metadata))

    def write_batch(self, items: list[dict[str, Any]]) -> R:
        """Write up to 1,000 secrets in one transaction (``{"path", "value"[, "cas", "metadata"]}``
        each); the answer has a result per item, in order (docs/api.md)."""
        return self.call(calls.write_batch(items))

    def read_batch(self, prefix: str = "", *, after: str = "", limit: int | None = None,
                   children: bool = False) -> R:
        """A page of the current values below ``prefix`` (with ``children``: only one segment below
        it) that this token may read (docs/api.md)."""
        return self.call(calls.read_batch(prefix, after, limit, children=children))

    def list_secrets(self, prefix: str = "", *, after: str = "", limit: int | None = None) -> R:
        """One page of the paths under ``prefix``, in order, starting after ``after``; never values."""
        return self.call(calls.list_secrets(prefix, after, limit))

    def metadata(self, path: str) -> R:
        """The versions of ``path`` (numbers, times, states) and its metadata; never values."""
        return self.call(calls.metadata(path))

    def delete(self, path: str, versions: list[int] | None = None) -> R:
        """Soft-delete the current version, or the listed ``versions``; ``undelete`` brings them back."""
        return self.call(calls.delete_secret(path, versions))

    def undelete(self, path: str, versions: list[int]) -> R:
        """Restore soft-deleted ``versions`` of ``path``."""
        return self.call(calls.version_action(path, "undelete", versions))

    def destroy(self, path: str, versions: list[int]) -> R:
        """Erase the ciphertext of ``versions`` for good (the metadata stays). Cannot be undone."""
        return self.call(calls.version_action(path, "destroy", versions))

    def renew_self(self) -> R:
        """Extend the calling token by its TTL, up to its max TTL; answers its ``expires_at`` now."""
        return self.call(calls.renew_self())

    def status(self) -> R:
        """The daemon's state (``/v1/sys/status``): sealed or not, its key provider and key id, and more."""
        return self.call(calls.status())

    def health(self) -> R:
        """Readiness (``/readyz``): answers, instead of raising, when the daemon is sealed."""
        return self.call(calls.health())

    def rotate_keyring(self) -> R:
        """Add a keyring term: new secret versions are encrypted under a new data key."""
        return self.call(calls.rotate_keyring())

    def policy_check(self, client: str | None, capability: str, path: str,
                     policies: list[str] | None = None) -> R:
        """Would ``client`` (or a holder of ``policies``, when given instead) be allowed
        ``capability`` on ``path``, and which rule decides."""
        return self.call(calls.policy_check(client, capability, path, policies))

    def policy_list(self) -> R:
        """The policies the daemon has loaded: names, descriptions, rule counts."""
        return self.call(calls.policy_list())

    def policy_show(self, name: str) -> R:
        """One loaded policy's rules (``NotFoundError`` if there is none by that name)."""
        return self.call(calls.policy_show(name))

    def policy_reload(self) -> R:
        """Reload the daemon's policy file; ``PolicyFileError`` (and no change) if it is invalid."""
        return self.call(calls.policy_reload())

    def create_token(self, client: str, policies: list[str], ttl_seconds: int | None = None,
                     max_ttl_seconds: int | None = None) -> R:
        """Issue a token for ``client`` holding ``policies``; the token is in the answer, once.
        ``max_ttl_seconds``: it renews (``renew_self``) up to that long after creation."""
        return self.call(calls.create_token(client, policies, ttl_seconds, max_ttl_seconds))

    def list_tokens(self, *, after: str = "", limit: int | None = None, include_expired: bool = False) -> R:
        """One page of the tokens (ids, clients, policies, times; never the tokens themselves), by id
        after ``after``; expired ones only with ``include_expired``. ``next_after`` names the next page."""
        return self.call(calls.list_tokens(after, limit, include_expired))

    def revoke_token(self, token_id: str) -> R:
        """Revoke the token with id ``token_id``: it is refused from then on."""
        return self.call(calls.revoke_token(token_id))

    def whoami(self) -> R:
        """The client name, policies and authentication method of the token this client sends."""
        return self.call(calls.whoami())

    def jwt_login(self, jwt: str) -> R:
        """Exchange a workload JWT (a Kubernetes service-account token, say) for a short-lived daemon
        token: ``{"token", "expires_at", "client", "policies"}``. Use the token with a new client."""
        return self.call(calls.jwt_login(jwt))


class Pages:
    """What the pages of a listing or batch read add up to: each face loops ``while
    pages.add(await-or-not self.<call>(prefix, after=pages.after))``."""

    def __init__(self, key: str = "secrets") -> None:
        self.key = key  # what the pages list: "secrets", or "tokens"
        self.found: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.after = ""

    def add(self, page: dict[str, Any]) -> bool:
        """Take one page; True while there is a next one."""
        self.found.extend(page[self.key])
        self.skipped.extend(page.get("skipped", ()))
        self.after = page.get("next_after") or ""
        return bool(self.after)


def children(listing: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """The entries of a listing that sit directly under ``prefix`` (one more path segment)."""
    base = prefix.strip("/")
    depth = base.count("/") + 1 if base else 0
    return [s for s in listing if s["path"].count("/") == depth and s["path"] != base]
