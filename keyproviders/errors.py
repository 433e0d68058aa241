"""Errors raised by key providers.

Every provider converts its foreign exceptions (OS errors, PKCS#11 return codes, KDF failures) into
these at its own boundary, with ``raise ... from``, so callers never match on message strings::

    KeyProviderError
    ├── ProviderConfigError       the provider's options are wrong: fix the configuration
    ├── ProviderUnavailableError  the key store cannot be reached now: retry later (retryable)
    ├── ProviderKeyNotFoundError  the named key does not exist in the key store
    ├── ProviderAuthError         the key store refused our credentials (bad PIN, bad passphrase)
    ├── KeyMismatchError          the key found under the expected name is not the key it was before
    └── UnwrapError               a wrapped key failed its integrity check (wrong key, AAD or blob)
"""

from __future__ import annotations


class KeyProviderError(Exception):
    """Base class of every key-provider failure."""

    retryable: bool = False


class ProviderConfigError(KeyProviderError):
    """The provider's configuration is invalid or unsafe."""


class ProviderUnavailableError(KeyProviderError):
    """The key store cannot be reached right now; the same call may succeed later."""

    retryable = True


class ProviderKeyNotFoundError(KeyProviderError):
    """The key the provider was asked to use does not exist."""


class ProviderAuthError(KeyProviderError):
    """The key store refused the credentials (PIN, passphrase)."""


class KeyMismatchError(KeyProviderError):
    """The key found under the expected name is a different key (a replaced token or key file).

    Not retryable by waiting alone: it clears only when the genuine key comes back.
    """


class UnwrapError(KeyProviderError):
    """A wrapped key could not be authenticated; deliberately says nothing more."""
