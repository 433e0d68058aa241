"""Secret path rules: the one function that decides what a valid path is, ``validate_path``, lives in
``secretsd_client.paths`` (the client checks a settings class's paths with the same rule the daemon
enforces, without the daemon installed); this module re-exports it for the daemon's layers.
"""

from __future__ import annotations

from secretsd_client.paths import (
    MAX_DEPTH,
    MAX_PATH_LENGTH,
    MAX_SEGMENT_LENGTH,
    PATH_PATTERN,
    PREFIX_PATTERN,
    RESERVED_FIRST_SEGMENTS,
    is_child,
    validate_path,
    validate_prefix,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_PATH_LENGTH",
    "MAX_SEGMENT_LENGTH",
    "PATH_PATTERN",
    "PREFIX_PATTERN",
    "RESERVED_FIRST_SEGMENTS",
    "is_child",
    "validate_path",
    "validate_prefix",
]
