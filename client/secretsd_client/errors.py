"""The one exception hierarchy of secretsd.

Messages are meant for the person who has to act on them; none ever carries a secret value, a
token or key material::

    SecretsdError
    ├── ConfigError                    configuration is invalid or unsafe
    │   └── PolicyFileError            the policy file is invalid (a reload keeps the previous policies)
    ├── StateError
    │   ├── NotInitializedError        the store has not been initialised (run `secretsd init`)
    │   ├── AlreadyInitializedError    `init` on a store that exists
    │   └── SealedError                the keyring is not unsealed yet (retry later)
    ├── CryptoError                    decryption failed; deliberately opaque
    ├── KeyProviderFailure
    │   ├── ProviderUnavailable        the key provider cannot be reached (retryable)
    │   ├── ProviderKeyNotFound        the provider has no such key
    │   ├── ProviderKeyMismatch        the provider's key is not the one the store was sealed with
    │   └── ProviderAuthFailed         the provider refused our credentials (bad PIN)
    ├── StorageError
    │   ├── NotFoundError              no such secret, version or token
    │   │   └── GoneError              the version expired, or its grace period ended
    │   ├── ConflictError              check-and-set or uniqueness conflict
    │   └── StorageUnavailableError    the database cannot be reached (retryable)
    ├── RequestError                   the request itself is malformed
    │   ├── InvalidPathError
    │   ├── PayloadTooLargeError
    │   ├── UnsupportedMediaTypeError  a body that is not application/json
    │   └── RequestTimeoutError        the body did not arrive in time
    ├── AuthError
    │   ├── UnauthenticatedError       no valid credential
    │   └── PermissionDeniedError      a policy denies the operation
    ├── RotationFailedError            a rotation hook failed or timed out; nothing changed
    ├── AuditError                     an audit record could not be written (fail closed)
    └── UnreachableError               (client side) the daemon did not answer

``secretsd.problems`` maps each class to one HTTP problem type; the client maps them back.
Programming mistakes stay ``ValueError`` / ``TypeError``.
"""

from __future__ import annotations


class SecretsdError(Exception):
    """Base of every error secretsd reports to a user."""

    retryable: bool = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.default_message())

    @classmethod
    def default_message(cls) -> str:
        return (cls.__doc__ or cls.__name__).strip().splitlines()[0]

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.default_message()


class ConfigError(SecretsdError):
    """The configuration is invalid."""


class PolicyFileError(ConfigError):
    """The policy file cannot be read or is invalid; the policies in force are unchanged."""


class StateError(SecretsdError):
    """The daemon is not in a state that allows this operation."""


class NotInitializedError(StateError):
    """The store is not initialised; run 'secretsd init' first."""


class AlreadyInitializedError(StateError):
    """The store is already initialised."""


class SealedError(StateError):
    """The daemon is sealed: its key provider has not unwrapped the keyring yet."""

    retryable = True


class CryptoError(SecretsdError):
    """A stored value could not be decrypted."""


class KeyProviderFailure(SecretsdError):
    """The key provider failed."""


class ProviderUnavailable(KeyProviderFailure):
    """The key provider cannot be reached right now."""

    retryable = True


class ProviderKeyNotFound(KeyProviderFailure):
    """The key provider does not hold the requested key."""


class ProviderKeyMismatch(KeyProviderFailure):
    """The provider holds a key under the expected name that is not the store's key (a replaced
    token or key file, a changed passphrase): it is never used to wrap anything."""


class ProviderAuthFailed(KeyProviderFailure):
    """The key provider refused the credentials."""


class StorageError(SecretsdError):
    """The storage backend failed."""


class NotFoundError(StorageError):
    """Not found."""


class GoneError(NotFoundError):
    """The version is no longer served: it expired, or its grace period ended."""


class ConflictError(StorageError):
    """The write conflicts with the current state."""


class StorageUnavailableError(StorageError):
    """The storage backend cannot be reached right now."""

    retryable = True


class RequestError(SecretsdError):
    """The request is malformed."""


class InvalidPathError(RequestError):
    """The secret path is not valid."""


class PayloadTooLargeError(RequestError):
    """The request body is too large."""


class UnsupportedMediaTypeError(RequestError):
    """The request body is not application/json."""


class RequestTimeoutError(RequestError):
    """The request body did not arrive within the body deadline ([http] body_timeout_seconds)."""


class AuthError(SecretsdError):
    """Authentication or authorization failed."""


class UnauthenticatedError(AuthError):
    """A valid token is required."""


class PermissionDeniedError(AuthError):
    """Permission denied."""


class RotationFailedError(SecretsdError):
    """The rotation failed: its pending version was discarded and the current one is unchanged."""


class AuditError(SecretsdError):
    """The audit record could not be written, so the request was refused."""

    retryable = True


class UnreachableError(SecretsdError):
    """The daemon could not be reached."""

    retryable = True
