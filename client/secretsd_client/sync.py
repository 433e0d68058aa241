"""The synchronous client: ``SecretsClient(addr, token).get("app/db-password")["value"]``."""

from __future__ import annotations

import copy
import http.client
import socket
import threading
import time
from pathlib import Path
from typing import Any, Self

from secretsd_client import calls
from secretsd_client.errors import SecretsdError
from secretsd_client.operations import Endpoint, Operations, Pages
from secretsd_client.renewal import RenewalPlan
from secretsd_client.retry import RetryPolicy


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix-domain socket (``unix:///PATH`` addresses); Host: localhost."""

    def __init__(self, path: str, *, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Renewer(threading.Thread):
    """The background renewal of ``SecretsClient(auto_renew=True)``: ``RenewalPlan`` decides when."""

    def __init__(self, client: SecretsClient) -> None:
        super().__init__(name="secretsd-token-renewal", daemon=True)
        self._client = client
        self._stopped = threading.Event()
        self.plan = RenewalPlan()

    def run(self) -> None:
        delay: float | None = 0.0
        try:
            while delay is not None and not self._stopped.wait(delay):
                try:
                    delay = self.plan.after_answer(self._client.renew_self())
                except SecretsdError as exc:
                    delay = self.plan.after_error(exc)
        finally:
            self._client.close()

    def stop(self) -> None:
        self._stopped.set()


class SecretsClient(Operations[dict[str, Any]]):
    """One keep-alive connection to a daemon; not thread-safe (make one per thread).

    Configured from arguments or ``SECRETSD_ADDR`` / ``SECRETSD_TOKEN`` / ``SECRETSD_CA_FILE``. ``ca_file`` and
    ``client_cert`` (a certificate file with ``client_key``, or a (certificate, key) pair; else
    ``SECRETSD_CLIENT_CERT`` / ``SECRETSD_CLIENT_KEY``) apply to ``https://`` addresses; ``timeout`` bounds each
    attempt; ``retry`` says how idempotent calls are retried on 503s and connection errors.
    """

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
        auto_renew: bool = False,
    ) -> None:
        self.endpoint = Endpoint(addr, token, timeout=timeout, ca_file=ca_file, client_cert=client_cert,
                                 client_key=client_key, retry=retry)
        self.addr = self.endpoint.addr
        self.token = self.endpoint.token
        self.retry = self.endpoint.retry
        self._conn: http.client.HTTPConnection | None = None
        #: ``auto_renew``: a thread renews the token (secretsd_client.renewal) until ``close``.
        self.renewer: Renewer | None = None
        if auto_renew:
            self.renewer = Renewer(self._renewal_client())
            self.renewer.start()

    def _renewal_client(self) -> SecretsClient:
        # Its own connection (a client is not thread-safe), the same endpoint and token.
        clone = copy.copy(self)
        clone._conn, clone.renewer = None, None
        return clone

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            e = self.endpoint
            if e.unix_path is not None:
                self._conn = UnixHTTPConnection(e.unix_path, timeout=e.timeout)
            elif e.https:
                self._conn = http.client.HTTPSConnection(e.host, e.port, timeout=e.timeout, context=e.ssl_context)
            else:
                self._conn = http.client.HTTPConnection(e.host, e.port, timeout=e.timeout)
        return self._conn

    def close(self) -> None:
        """Close the keep-alive connection (a later call opens a new one) and stop renewing."""
        if self.renewer is not None:
            self.renewer.stop()
            self.renewer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, call: calls.Call) -> dict[str, Any]:
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._once(call)
            except SecretsdError as exc:
                wait = self.retry.next_delay(call, exc, attempt, time.monotonic() - start)
                if wait is None:
                    raise
            time.sleep(wait)

    def _once(self, call: calls.Call) -> dict[str, Any]:
        headers = self.endpoint.headers(call)
        payload = call.payload()
        # A kept-alive connection the server closed fails on first use: reconnect at once for
        # calls that are safe to repeat (the retry policy then decides about anything further).
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request(call.method, call.target(), body=payload, headers=headers)
                response = conn.getresponse()
                body = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2 or not reused or not call.idempotent:
                    raise self.endpoint.unreachable(exc) from exc
        return calls.decode(call, response.status, response.getheader("Content-Type", ""), body)

    def read_all(self, prefix: str = "", *, children: bool = False,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every value below ``prefix`` (with ``children``: only one segment below it) this token may
        read (all pages of ``read_batch``), and the secrets that could not be served (each with its
        status and error)."""
        pages = Pages()
        while pages.add(self.read_batch(prefix, after=pages.after, children=children)):
            pass
        return pages.found, pages.skipped

    def list_all(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every secret below ``prefix`` (all pages of ``list_secrets``)."""
        pages = Pages()
        while pages.add(self.list_secrets(prefix, after=pages.after)):
            pass
        return pages.found

    def list_all_tokens(self, *, include_expired: bool = False) -> list[dict[str, Any]]:
        """Every token (all pages of ``list_tokens``), by id."""
        pages = Pages("tokens")
        while pages.add(self.list_tokens(after=pages.after, include_expired=include_expired)):
            pass
        return pages.found
