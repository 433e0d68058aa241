"""The manifest's key: HKDF of one keyring term's data key, so only the unsealed keyring yields it.

The term is named in the manifest (``mac_term``); a provider that cannot unwrap it cannot check, nor
forge, a manifest. The data key is unwrapped through the keyring's own ``unwrap_term`` (the unseal
path, with its custody checks), used once for the derivation and dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from keyproviders import KeyProvider
from secretsd.custody.crypto import derive_key
from secretsd.custody.keyring import unwrap_term
from secretsd.records import KeyringTerm
from secretsd.storage import codec, rows

#: HKDF info of the manifest key: domain-separated from every other key derived from a DEK.
MANIFEST_LABEL = "secretsd backup manifest v1"


def term_from_row(row: Mapping[str, Any]) -> KeyringTerm:
    """A keyring term from its exported row (``rows`` neutral values); ``ValueError`` if malformed."""
    try:
        wrappings = codec.wrappings_from_json(rows.to_json_text(row["wrappings"]))
        return KeyringTerm(term=int(row["term"]), wrappings=wrappings, created_at=row["created_at"],
                           encryptions=int(row.get("encryptions") or 0))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"a keyring term row is malformed ({exc.__class__.__name__})") from exc


async def manifest_key(providers: Sequence[KeyProvider], term: KeyringTerm) -> bytes:
    """The manifest key of ``term``: raises the keyring's errors when no provider unwraps it."""
    dek = await unwrap_term(providers, term)
    return derive_key(dek, MANIFEST_LABEL)
