"""Encodings shared by the storage backends for fields that have no native column type."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from keyproviders import WrappedKey


def wrappings_to_json(wrappings: Sequence[WrappedKey]) -> str:
    return json.dumps([w.to_dict() for w in wrappings], sort_keys=True, separators=(",", ":"))


def wrappings_from_json(text: str) -> tuple[WrappedKey, ...]:
    return tuple(WrappedKey.from_dict(item) for item in json.loads(text))


def metadata_to_json(metadata: Mapping[str, Any]) -> str:
    return json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))


def metadata_from_json(text: str) -> dict[str, Any]:
    if text == "{}":  # most secrets have no metadata: skip the parser on the read path
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def policies_to_json(policies: Sequence[str]) -> str:
    return json.dumps(list(policies))


def policies_from_json(text: str) -> tuple[str, ...]:
    return tuple(str(p) for p in json.loads(text))


def prefix_bounds(prefix: str) -> tuple[str, str]:
    """Half-open range [low, high) of paths strictly below ``prefix`` ('' means everything).

    '/' sorts just before '0', so every path under 'a/b' lies in ['a/b/', 'a/b0'): a range scan on
    the primary key, with no LIKE and no wildcard escaping.
    """
    if not prefix:
        return "", "\U0010ffff"
    return prefix + "/", prefix + "0"
