"""The one mapping between a Vault KV secret (a map of keys to strings) and our one value per path.

Decided once, here, and used by the Vault façade (``secretsd.api.vault``) and ``secretsd get --field``
(docs/vault-compat.md, "Value mapping"):

- writing a map (``stored_value``): exactly ``{"value": s}`` is stored as ``s`` itself, so
  ``bao kv put secret/app/db value=x`` reads back as ``x`` through the native API, ``secretsd get``
  and ``run``; any other map is stored as its canonical JSON object text (sorted keys, no spaces).
  ``{"value": s}`` where ``s`` is itself the text of a JSON object of strings is stored canonically
  too, or it would read back as that other map;
- reading (``as_map``): a stored value that is the text of a JSON object whose values are all
  strings reads as that map, except a text ``{"value": s}`` that ``stored_value`` would not have
  made (``s`` not itself a map's text): that is a plain value; any other text as
  ``{"value": text}``; bytes that are not UTF-8 as ``{"value_base64": ...}``;
- a binary value written back: exactly ``{"value_base64": b}``, ``b`` the standard base64 of bytes
  that are not UTF-8, is stored as those bytes; and a stored *text* of exactly that form reads as
  ``{"value": text}``, so a text never reads like a binary value.

So the mapping is one-to-one both ways: ``as_map(stored_value(m)) == m`` for every map of strings,
and reading any stored value then writing its map back stores the same value, text or bytes (a
map's JSON text in its canonical spelling: the same map) (``tests/test_vault_values.py``): a
read-modify-write through a Vault client changes only what it changes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from secretsd.errors import RequestError

#: The field a plain value reads as, and the one a map must be exactly to be stored as its value.
VALUE_KEY = "value"
#: The field a binary (not UTF-8) value reads as.
BINARY_KEY = "value_base64"


class _Duplicate(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Duplicate
    return obj


def string_map(text: str) -> dict[str, str] | None:
    """The map ``text`` is the JSON object text of (every value a string), else None."""
    if not text.startswith("{"):  # the common case, a plain value: no parse at all
        return None
    try:
        data = json.loads(text, object_pairs_hook=_unique)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return None
    return data


def canonical(data: dict[str, str]) -> str:
    """The canonical JSON object text of a map: sorted keys, no spaces, non-ASCII kept as is."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_map(data: object) -> dict[str, str]:
    """A Vault ``data`` map as we store it: an object of string values (a 400 otherwise).

    Non-string values (numbers, lists, objects) are refused rather than stored: they could not read
    back as what was written, and the mapping promises that they do.
    """
    if not isinstance(data, dict):
        raise RequestError("data must be a JSON object of keys to string values")
    for key, value in data.items():
        if not isinstance(value, str):
            raise RequestError(f"data.{key} must be a string: this server stores Vault secrets as maps of strings")
    return data


def _binary(encoded: str) -> bytes | None:
    """The bytes ``encoded`` is the standard base64 of, if they are not UTF-8 (what a binary value
    reads as); None for anything else."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        return None
    if base64.b64encode(raw).decode("ascii") != encoded:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    return None


def _text_map(text: str) -> dict[str, str] | None:
    """The map a stored text reads as, if it reads as one. Not a text that spells what a binary value
    reads as (``{"value_base64": <base64 of bytes that are not UTF-8>}``): that text reads as
    ``{"value": text}``, so a text and a binary value never read alike."""
    found = string_map(text)
    if found is None:
        return None
    if set(found) == {BINARY_KEY}:
        return None if _binary(found[BINARY_KEY]) is not None else found
    if set(found) == {VALUE_KEY}:
        # {"value": s} is what a plain s is written as, so only the form stored_value gives it (s
        # itself reading as a map) reads as a map: any other such text is a plain value of its own.
        # Each level halves what is left to parse (escapes double), so the recursion is shallow.
        return found if _text_map(found[VALUE_KEY]) is not None else None
    return found


def stored_value(data: dict[str, str]) -> str | bytes:
    """What a map written through the Vault façade is stored as (the module's rule)."""
    if set(data) == {BINARY_KEY} and (raw := _binary(data[BINARY_KEY])) is not None:
        return raw  # a binary value read through the façade and written back: the same bytes
    if set(data) == {VALUE_KEY} and _text_map(data[VALUE_KEY]) is None:
        return data[VALUE_KEY]
    return canonical(data)


def as_map(stored: bytes) -> dict[str, str]:
    """What a stored value reads as through the Vault façade (the module's rule)."""
    try:
        text = stored.decode("utf-8")
    except UnicodeDecodeError:
        return {BINARY_KEY: base64.b64encode(stored).decode("ascii")}
    found = _text_map(text)
    return found if found is not None else {VALUE_KEY: text}


def field_of(text: str, key: str) -> str:
    """``key``'s value in a stored value, read as the façade reads it (``secretsd get --field``)."""
    data = as_map(text.encode("utf-8"))
    if key not in data:
        raise RequestError(f"the value has no field {key!r} (fields: {', '.join(sorted(data)) or 'none'})")
    return data[key]
