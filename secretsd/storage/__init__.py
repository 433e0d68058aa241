"""Storage backends behind one async protocol; chosen by name through entry points."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from secretsd.errors import ConfigError
from secretsd.storage.base import (
    KeyringTerm,
    RotationStatus,
    SecretRecord,
    Storage,
    TokenRecord,
    VersionInfo,
    VersionRecord,
    VersionState,
    WriteResult,
)

ENTRY_POINT_GROUP = "secretsd.storage"

__all__ = [
    "KeyringTerm",
    "RotationStatus",
    "SecretRecord",
    "Storage",
    "TokenRecord",
    "VersionInfo",
    "VersionRecord",
    "VersionState",
    "WriteResult",
    "create_storage",
]


def create_storage(options: Mapping[str, Any], *, data_dir: Path) -> Storage:
    """Build the backend named by ``options['backend']`` from the rest of ``options``."""
    backend = str(options.get("backend") or "sqlite")
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == backend]
    if not matches:
        known = ", ".join(sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)))
        raise ConfigError(f"unknown storage backend {backend!r}; available: {known or 'none'}")
    try:
        factory = matches[0].load()
    except ImportError as exc:
        raise ConfigError(f"storage backend {backend!r} could not be loaded ({exc}); is its extra installed?") from exc
    rest = {k: v for k, v in options.items() if k != "backend"}
    storage: Storage = factory.from_config(rest, data_dir=data_dir)
    return storage
