"""The synchronous client: ``SecretsClient(addr, token).get("app/db-password")["value"]``."""

from __future__ import annotations

import http.client
import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from secretsd.client import calls
from secretsd.defaults import DEFAULT_ADDR
from secretsd.errors import ConfigError, UnreachableError


class SecretsClient:
    """One keep-alive connection to a daemon; not thread-safe (make one per thread)."""

    def __init__(
        self,
        addr: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        ca_file: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.addr = (addr or os.environ.get("SECRETSD_ADDR") or DEFAULT_ADDR).rstrip("/")
        self.token = token if token is not None else os.environ.get("SECRETSD_TOKEN")
        parts = urlsplit(self.addr)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"SECRETSD_ADDR must be http(s)://HOST:PORT, got {self.addr!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._timeout = timeout
        self._context: ssl.SSLContext | None = None
        if self._https:
            self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if client_cert:
                self._context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._context)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> SecretsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, call: calls.Call) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        payload = call.payload()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        # A kept-alive connection the server closed fails on first use: reconnect once for calls
        # that are safe to repeat.
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(call.method, call.target(), body=payload, headers=headers)
                response = conn.getresponse()
                body = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2 or not call.idempotent:
                    raise UnreachableError(
                        f"cannot reach secretsd at {self.addr}: {exc.__class__.__name__}: {exc}"
                    ) from exc
        return calls.decode(call, response.status, response.getheader("Content-Type", ""), body)

    # -- operations -----------------------------------------------------------------------------
    def get(self, path: str, version: int | None = None) -> dict[str, Any]:
        return self.call(calls.get_secret(path, version))

    def put(self, path: str, value: str, *, cas: int | None = None,
            metadata: dict[str, str] | None = None) -> dict[str, Any]:
        return self.call(calls.put_secret(path, value, cas, metadata))

    def list_secrets(self, prefix: str = "", *, after: str = "", limit: int | None = None) -> dict[str, Any]:
        return self.call(calls.list_secrets(prefix, after, limit))

    def metadata(self, path: str) -> dict[str, Any]:
        return self.call(calls.metadata(path))

    def delete(self, path: str, versions: list[int] | None = None) -> dict[str, Any]:
        return self.call(calls.delete_secret(path, versions))

    def undelete(self, path: str, versions: list[int]) -> dict[str, Any]:
        return self.call(calls.version_action(path, "undelete", versions))

    def destroy(self, path: str, versions: list[int]) -> dict[str, Any]:
        return self.call(calls.version_action(path, "destroy", versions))

    def status(self) -> dict[str, Any]:
        return self.call(calls.status())

    def health(self) -> dict[str, Any]:
        return self.call(calls.health())

    def rotate_keyring(self) -> dict[str, Any]:
        return self.call(calls.rotate_keyring())

    def policy_check(self, client: str, capability: str, path: str) -> dict[str, Any]:
        return self.call(calls.policy_check(client, capability, path))

    def create_token(self, client: str, policies: list[str], ttl_seconds: int | None = None) -> dict[str, Any]:
        return self.call(calls.create_token(client, policies, ttl_seconds))

    def list_tokens(self) -> dict[str, Any]:
        return self.call(calls.list_tokens())

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self.call(calls.revoke_token(token_id))

    def whoami(self) -> dict[str, Any]:
        return self.call(calls.whoami())
