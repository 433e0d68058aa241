"""The one table between the error hierarchy and RFC 9457 problem documents.

The server turns an exception into ``{type, title, status, detail}`` (``secretsd.problems.problem_document``,
which redacts the detail); the client turns ``type`` back into the same exception class. Both directions
read this one table, which lives here, in the client distribution, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from secretsd_client import errors

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:jarvis-secretsd:problem:"


@dataclass(frozen=True)
class ProblemType:
    slug: str
    status: int
    title: str

    @property
    def uri(self) -> str:
        return TYPE_PREFIX + self.slug


# Ordered most specific first: the first class the exception is an instance of wins.
PROBLEMS: dict[type[errors.SecretsdError], ProblemType] = {
    errors.InvalidPathError: ProblemType("invalid-path", 400, "Invalid secret path"),
    # A reload refused: the request was fine, the file it names is not (its detail says why).
    errors.PolicyFileError: ProblemType("invalid-policy-file", 422, "Invalid policy file"),
    errors.PayloadTooLargeError: ProblemType("payload-too-large", 413, "Request body too large"),
    errors.UnsupportedMediaTypeError: ProblemType("unsupported-media-type", 415, "Unsupported media type"),
    errors.RequestTimeoutError: ProblemType("request-timeout", 408, "Request timeout"),
    errors.RequestError: ProblemType("invalid-request", 400, "Invalid request"),
    errors.UnauthenticatedError: ProblemType("unauthenticated", 401, "Authentication required"),
    errors.PermissionDeniedError: ProblemType("permission-denied", 403, "Permission denied"),
    errors.AuthError: ProblemType("permission-denied", 403, "Permission denied"),
    errors.GoneError: ProblemType("gone", 410, "Gone"),
    errors.NotFoundError: ProblemType("not-found", 404, "Not found"),
    errors.ConflictError: ProblemType("conflict", 409, "Conflict"),
    errors.StorageUnavailableError: ProblemType("storage-unavailable", 503, "Storage unavailable"),
    errors.SealedError: ProblemType("sealed", 503, "Sealed"),
    errors.NotInitializedError: ProblemType("not-initialized", 503, "Not initialised"),
    errors.AlreadyInitializedError: ProblemType("already-initialized", 409, "Already initialised"),
    errors.ProviderKeyMismatch: ProblemType("provider-key-mismatch", 503, "Key provider holds a different key"),
    errors.KeyProviderFailure: ProblemType("provider-unavailable", 503, "Key provider unavailable"),
    errors.AuditError: ProblemType("audit-failed", 503, "Audit unavailable"),
    errors.RotationFailedError: ProblemType("rotation-failed", 502, "Rotation failed"),
    errors.CryptoError: ProblemType("internal", 500, "Internal error"),
    errors.SecretsdError: ProblemType("internal", 500, "Internal error"),
}

_BY_SLUG: dict[str, type[errors.SecretsdError]] = {}
for _cls, _ptype in PROBLEMS.items():
    _BY_SLUG.setdefault(_ptype.slug, _cls)
# The server hides what an internal error was, so the client cannot know it was a CryptoError.
_BY_SLUG["internal"] = errors.SecretsdError
# Provider failures cross the wire as one retryable type.
_BY_SLUG["provider-unavailable"] = errors.ProviderUnavailable

INTERNAL = PROBLEMS[errors.SecretsdError]


def problem_for(exc: errors.SecretsdError) -> ProblemType:
    for cls, ptype in PROBLEMS.items():
        if isinstance(exc, cls):
            return ptype
    return INTERNAL


def error_from_problem(doc: dict[str, Any], status: int) -> errors.SecretsdError:
    """The client side: rebuild the exception a problem document stands for."""
    uri = str(doc.get("type", ""))
    detail = str(doc.get("detail") or doc.get("title") or f"HTTP {status}")
    cls = _BY_SLUG.get(uri.removeprefix(TYPE_PREFIX)) if uri.startswith(TYPE_PREFIX) else None
    if cls is None:
        cls = {
            400: errors.RequestError,
            401: errors.UnauthenticatedError,
            403: errors.PermissionDeniedError,
            404: errors.NotFoundError,
            409: errors.ConflictError,
            413: errors.PayloadTooLargeError,
            503: errors.StorageUnavailableError,
        }.get(status, errors.SecretsdError)
    return cls(detail)
