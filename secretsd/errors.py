"""The one exception hierarchy of secretsd, defined in the client distribution and re-exported here.

The classes live in ``secretsd_client.errors`` (its docstring draws the tree) because the client
raises them too and is installed without the daemon; this module gives the daemon's code (and every
caller that catches ``secretsd.errors.X`` today) the very same class objects: there is one hierarchy,
not a copy. A server-only error class may be added here as a subclass of these.
"""

from __future__ import annotations

from secretsd_client.errors import (
    AlreadyInitializedError,
    AuditError,
    AuthError,
    ConfigError,
    ConflictError,
    CryptoError,
    GoneError,
    InvalidPathError,
    KeyProviderFailure,
    NotFoundError,
    NotInitializedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PolicyFileError,
    ProviderAuthFailed,
    ProviderKeyMismatch,
    ProviderKeyNotFound,
    ProviderUnavailable,
    RequestError,
    RequestTimeoutError,
    RotationFailedError,
    SealedError,
    SecretsdError,
    StateError,
    StorageError,
    StorageUnavailableError,
    UnauthenticatedError,
    UnreachableError,
    UnsupportedMediaTypeError,
)

__all__ = [
    "AlreadyInitializedError",
    "AuditError",
    "AuthError",
    "ConfigError",
    "ConflictError",
    "CryptoError",
    "GoneError",
    "InvalidPathError",
    "KeyProviderFailure",
    "NotFoundError",
    "NotInitializedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PolicyFileError",
    "ProviderAuthFailed",
    "ProviderKeyMismatch",
    "ProviderKeyNotFound",
    "ProviderUnavailable",
    "RequestError",
    "RequestTimeoutError",
    "RotationFailedError",
    "SealedError",
    "SecretsdError",
    "StateError",
    "StorageError",
    "StorageUnavailableError",
    "UnauthenticatedError",
    "UnreachableError",
    "UnsupportedMediaTypeError",
]
