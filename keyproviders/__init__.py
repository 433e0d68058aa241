"""Master-key custody for jarvis-secretsd: a standalone library that never imports secretsd."""

from keyproviders.base import WRAPPED_KEY_FORMAT, KeyProvider, ProviderHealth, WrappedKey
from keyproviders.errors import (
    KeyMismatchError,
    KeyProviderError,
    ProviderAuthError,
    ProviderConfigError,
    ProviderKeyNotFoundError,
    ProviderUnavailableError,
    UnwrapError,
)
from keyproviders.registry import available_providers, create_provider, provider_factory

__all__ = [
    "WRAPPED_KEY_FORMAT",
    "KeyMismatchError",
    "KeyProvider",
    "KeyProviderError",
    "ProviderAuthError",
    "ProviderConfigError",
    "ProviderHealth",
    "ProviderKeyNotFoundError",
    "ProviderUnavailableError",
    "UnwrapError",
    "WrappedKey",
    "available_providers",
    "create_provider",
    "provider_factory",
]
