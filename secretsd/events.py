"""Domain events: what the service did, for the audit trail and metrics to attach to.

The service emits an event after each state change; subscribers must not raise for ordinary
failures, and an event never carries a secret value or a token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger("secretsd.events")


@dataclass(frozen=True)
class Event:
    action: str  # e.g. "secret.write", "keyring.rotate", "token.create"
    at: datetime
    client: str
    path: str | None = None
    version: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in self._subscribers:
            subscriber(event)
