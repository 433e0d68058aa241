"""What a record may copy from a request: bounded, encodable strings.

Anything a caller sends (a path, a prefix) is copied into a durable, signed record, so its size is
the caller's to choose unless it is cut here. The bound is on the bytes the string takes in the
record's canonical JSON, not on characters: a control character is written as a six-byte escape
and a character outside the BMP as four bytes, so 128 characters could otherwise be 768 bytes.
"""

from __future__ import annotations

import json

#: A path or prefix from an authenticated request (accountable to a token).
MAX_PATH_BYTES = 1024
#: A path or prefix from a request that failed authentication: anyone can send one.
MAX_UNAUTHENTICATED_PATH_BYTES = 128
#: The peer address as the server reports it (an IPv6 address with a zone is at most ~60).
MAX_REMOTE_BYTES = 64

_ENCODER = json.JSONEncoder(ensure_ascii=False)


def _size(text: str) -> int:
    return len(_ENCODER.encode(text).encode("utf-8")) - 2  # without the quotes


def clip(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` bytes of canonical JSON, and whether it was cut.

    The rule "a record copies a bounded number of bytes from a request". A lone surrogate (which a
    percent-decoded URL can hold) cannot be written as UTF-8 at all: it is spelled out as ``\\udXXX``
    text, so such a path is recorded instead of failing the record.
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) * 6 <= limit or _size(text) <= limit:  # no character takes more than 6 bytes
        return text, False
    low, high = 0, min(len(text), limit)  # the longest prefix that fits: sizes grow with the prefix
    while low < high:
        mid = (low + high + 1) // 2
        if _size(text[:mid]) <= limit:
            low = mid
        else:
            high = mid - 1
    return text[:low], True
