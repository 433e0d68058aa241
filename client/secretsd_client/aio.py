"""The asynchronous client, on aiohttp: ``await AsyncSecretsClient().get("app/db-password")``.

The same calls (``secretsd_client.calls``), operations, retry policy and exceptions as the sync
face; only the transport differs. Use it as ``async with AsyncSecretsClient() as client: ...`` or
call ``await client.close()``: the aiohttp session is opened on first use, inside the running loop.
aiohttp is the ``[aio]`` extra of ``jarvis-secretsd-client``: without it, importing this module raises
an ``ImportError`` that says what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Self

try:
    import aiohttp
except ImportError as exc:  # the light distribution's base install has no aiohttp (the sync client needs none)
    raise ImportError(
        "AsyncSecretsClient needs aiohttp: pip install 'jarvis-secretsd-client[aio]' "
        f"(or use the synchronous SecretsClient) [{exc}]"
    ) from exc

from secretsd_client import calls
from secretsd_client.errors import SecretsdError
from secretsd_client.operations import Endpoint, Operations, Pages
from secretsd_client.renewal import RenewalPlan
from secretsd_client.retry import RetryPolicy


class AsyncSecretsClient(Operations[Awaitable[dict[str, Any]]]):
    """A pooled keep-alive aiohttp session to one daemon; safe to share between tasks of one loop."""

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
        connection_limit: int = 16,
        auto_renew: bool = False,
    ) -> None:
        self.endpoint = Endpoint(addr, token, timeout=timeout, ca_file=ca_file, client_cert=client_cert,
                                 client_key=client_key, retry=retry)
        self.addr = self.endpoint.addr
        self.token = self.endpoint.token
        self.retry = self.endpoint.retry
        self._limit = connection_limit
        # Over a Unix socket the URL only names the Host header: the connector knows the path.
        self._base = "http://localhost" if self.endpoint.unix_path is not None else self.addr
        self._session: aiohttp.ClientSession | None = None
        #: ``auto_renew``: a task renews the token (secretsd_client.renewal) from the first call
        #: (or ``async with``) until ``close``; the plan it follows is ``renewal_plan``.
        self._auto_renew = auto_renew
        self._renewal: asyncio.Task[None] | None = None
        self.renewal_plan = RenewalPlan()

    async def _renew_forever(self) -> None:
        delay: float | None = 0.0
        while delay is not None:
            await asyncio.sleep(delay)
            try:
                delay = self.renewal_plan.after_answer(await self.renew_self())
            except SecretsdError as exc:
                delay = self.renewal_plan.after_error(exc)

    def _open(self) -> aiohttp.ClientSession:
        if self._auto_renew and self._renewal is None:
            self._renewal = asyncio.get_running_loop().create_task(self._renew_forever())
        if self._session is None or self._session.closed:
            e = self.endpoint
            ssl_option: ssl.SSLContext | bool = e.ssl_context if e.ssl_context is not None else False
            connector: aiohttp.BaseConnector
            if e.unix_path is not None:
                connector = aiohttp.UnixConnector(path=e.unix_path, limit=self._limit)
            else:
                connector = aiohttp.TCPConnector(limit=self._limit, ssl=ssl_option)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=e.timeout),
            )
        return self._session

    async def close(self) -> None:
        """Stop renewing and close the aiohttp session (a later call opens a new one)."""
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        if self._auto_renew:
            self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def call(self, call: calls.Call) -> Awaitable[dict[str, Any]]:
        return self._call(call)

    async def _call(self, call: calls.Call) -> dict[str, Any]:
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(call)
            except SecretsdError as exc:
                wait = self.retry.next_delay(call, exc, attempt, time.monotonic() - start)
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    async def _once(self, call: calls.Call) -> dict[str, Any]:
        session = self._open()
        url = self._base + call.target()
        headers = self.endpoint.headers(call)
        # As in the sync face: a pooled connection the server closed is replaced at once for calls
        # that are safe to repeat.
        for attempt in (1, 2):
            try:
                async with session.request(call.method, url, data=call.payload(), headers=headers) as resp:
                    body = await resp.read()
                    status, content_type = resp.status, resp.headers.get("Content-Type", "")
                break
            except aiohttp.ServerDisconnectedError as exc:
                if attempt == 2 or not call.idempotent:
                    raise self.endpoint.unreachable(exc) from exc
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise self.endpoint.unreachable(exc) from exc
        return calls.decode(call, status, content_type, body)

    async def read_all(self, prefix: str = "", *, children: bool = False,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every value below ``prefix`` (with ``children``: only one segment below it) this token may
        read (all pages of ``read_batch``), and the secrets that could not be served (each with its
        status and error)."""
        pages = Pages()
        while pages.add(await self.read_batch(prefix, after=pages.after, children=children)):
            pass
        return pages.found, pages.skipped

    async def list_all(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every secret below ``prefix`` (all pages of ``list_secrets``)."""
        pages = Pages()
        while pages.add(await self.list_secrets(prefix, after=pages.after)):
            pass
        return pages.found

    async def list_all_tokens(self, *, include_expired: bool = False) -> list[dict[str, Any]]:
        """Every token (all pages of ``list_tokens``), by id."""
        pages = Pages("tokens")
        while pages.add(await self.list_tokens(after=pages.after, include_expired=include_expired)):
            pass
        return pages.found
