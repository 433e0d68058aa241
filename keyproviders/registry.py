"""Find key providers by name through the ``secretsd.keyproviders`` entry-point group.

Built-in providers register exactly as a third-party one would, so a provider is always chosen by
the name in configuration, never guessed from the shape of the options.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, cast

from keyproviders.base import KeyProvider, ProviderFactory
from keyproviders.errors import ProviderConfigError

ENTRY_POINT_GROUP = "secretsd.keyproviders"


def available_providers() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def provider_factory(kind: str) -> ProviderFactory:
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
    if not matches:
        known = ", ".join(available_providers()) or "none (is jarvis-secretsd installed?)"
        raise ProviderConfigError(f"unknown key provider kind {kind!r}; available: {known}")
    try:
        factory = matches[0].load()
    except ImportError as exc:
        raise ProviderConfigError(
            f"key provider {kind!r} could not be loaded ({exc}); reinstall the package that provides it"
        ) from exc
    return cast(ProviderFactory, factory)


def create_provider(
    options: Mapping[str, Any], *, base_dir: Path, create: bool = False
) -> KeyProvider:
    """Build the provider named by ``options['kind']`` from the rest of ``options``."""
    kind = options.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ProviderConfigError("key_provider.kind must name a provider, e.g. kind = \"file\"")
    rest = {k: v for k, v in options.items() if k != "kind"}
    return provider_factory(kind).from_config(rest, base_dir=base_dir, create=create)
