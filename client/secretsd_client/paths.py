"""Secret path rules: one function decides what a valid path is."""

from __future__ import annotations

import re

from secretsd_client.errors import InvalidPathError

MAX_PATH_LENGTH = 512
MAX_DEPTH = 16
MAX_SEGMENT_LENGTH = 128
# System resources (status, tokens, keyring, policy) are authorised as paths under "sys/", so a
# secret may never live there: a rule meant for one must never grant the other.
RESERVED_FIRST_SEGMENTS = frozenset({"sys"})

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
# The rule as one regular expression, for the OpenAPI document: the characters, the separators, no
# '.' or '..' segment and the depth. Length limits and the reserved first segment it leaves to
# validate_path, which stays the one decision (a test checks the two agree).
_SEGMENT_NOT_DOTS = r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+)"
_PATH_BODY = rf"{_SEGMENT_NOT_DOTS}(?:/{_SEGMENT_NOT_DOTS}){{0,{MAX_DEPTH - 1}}}"
PATH_PATTERN = rf"^{_PATH_BODY}$"
#: validate_prefix's rule the same way: empty, '/', or a path with one optional trailing '/'.
PREFIX_PATTERN = rf"^(?:/?|{_PATH_BODY}/?)$"


def validate_path(path: str) -> str:
    """Return ``path`` if it is a valid secret path, else raise ``InvalidPathError``.

    Segments are letters, digits, '.', '_' and '-', separated by single '/'; no empty, '.' or
    '..' segment (nothing that a proxy or a file system could reinterpret), bounded length and
    depth.
    """
    if not path:
        raise InvalidPathError("the secret path is empty")
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidPathError(f"the secret path is longer than {MAX_PATH_LENGTH} characters")
    segments = path.split("/")
    if len(segments) > MAX_DEPTH:
        raise InvalidPathError(f"the secret path has more than {MAX_DEPTH} segments")
    for segment in segments:
        if not segment:
            raise InvalidPathError("the secret path has an empty segment (leading, trailing or '//')")
        if segment in (".", ".."):
            raise InvalidPathError("the secret path may not contain '.' or '..' segments")
        if len(segment) > MAX_SEGMENT_LENGTH:
            raise InvalidPathError(f"a path segment is longer than {MAX_SEGMENT_LENGTH} characters")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidPathError(
                "path segments may contain only letters, digits, '.', '_' and '-'"
            )
    if segments[0] in RESERVED_FIRST_SEGMENTS:
        raise InvalidPathError(f"paths under '{segments[0]}/' are reserved for the daemon")
    return path


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty (everything) or a valid path, with an optional trailing '/'."""
    stripped = prefix.rstrip("/")
    if stripped == "":
        if prefix not in ("", "/"):
            raise InvalidPathError("the prefix has an empty segment")
        return ""
    if prefix.endswith("//"):
        raise InvalidPathError("the prefix has an empty segment")
    return validate_path(stripped)


def is_child(prefix: str, path: str) -> bool:
    """``path`` sits directly under ``prefix`` (exactly one more segment; the prefix itself is not)."""
    base = prefix.strip("/")
    if not base:
        return "/" not in path
    return path.startswith(base + "/") and "/" not in path[len(base) + 1:]
