"""What the HTTP surface uses of the assembled daemon: the services, and nothing of the assembly.

The handlers and the middleware see this protocol only. ``secretsd.runtime.daemon.Daemon`` is the
one implementation, so the runtime sits above the API in the layers (pyproject's import-linter
contract) and a handler cannot reach the storage, the providers or the scheduler behind it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from secretsd.auth import Authenticator
from secretsd.backup.format import Manifest
from secretsd.custody.barrier import Barrier
from secretsd.domain.policy import PolicyStore
from secretsd.domain.rotation import RotationService
from secretsd.domain.secret_service import SecretsService
from secretsd.domain.token_service import TokenService

#: The Prometheus text exposition format ``GET /metrics`` answers in.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestMetrics(Protocol):
    """The two measurements the request path takes."""

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None: ...
    def policy_decision(self, allowed: bool) -> None: ...


class Services(Protocol):
    """The daemon as the HTTP surface sees it."""

    @property
    def secrets(self) -> SecretsService: ...
    @property
    def rotation(self) -> RotationService: ...
    @property
    def tokens(self) -> TokenService: ...
    @property
    def policies(self) -> PolicyStore: ...
    @property
    def barrier(self) -> Barrier: ...
    @property
    def authenticators(self) -> Iterable[Authenticator]: ...
    @property
    def metrics(self) -> RequestMetrics: ...
    @property
    def max_body_bytes(self) -> int: ...
    @property
    def max_versions(self) -> int: ...

    def value_hmac(self, value: str | bytes) -> str | None:
        """The audit log's keyed HMAC of ``value`` (None while there is no audit log)."""

    async def audit_ready(self) -> None:
        """Raise ``AuditError`` while the audit log cannot take records (fail closed)."""

    async def record_request(self, fields: dict[str, Any]) -> None:
        """Write a request's audit record and wait until it is durable (or count it, if it is an
        unauthenticated failure beyond its budget)."""

    async def record_requests(self, records: list[dict[str, Any]]) -> None:
        """Write the records of a batch's items, in order, and wait until all are durable."""

    async def readiness(self) -> tuple[bool, dict[str, str]]: ...
    async def status(self) -> dict[str, Any]: ...

    async def backup(self, send: Callable[[bytes], Awaitable[None]]) -> Manifest:
        """Write a backup of the whole store through ``send``, a batch at a time; its manifest."""

    async def metrics_page(self) -> bytes:
        """The metrics in ``METRICS_CONTENT_TYPE``; ``NotFoundError`` when they are disabled."""
