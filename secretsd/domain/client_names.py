"""Client names: the rule for a name an identity is known by (a token's client, a unix rule's client).

Here, below the token service and the authenticators, so that every way of naming a client -- a
token minted over the API, a ``[[auth.unix.rules]]`` entry in the configuration -- obeys one rule.
"""

from __future__ import annotations

import re

from secretsd.errors import RequestError

_CLIENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
#: The client names the daemon itself writes into ``client`` and ``created_by``: ``system`` (its own
#: records: unseal, rotation scheduler, hooks, policy reloads), ``admin`` (the tokens made by
#: ``init`` and ``token create-root``), ``init`` and ``recovery`` (their ``created_by``), and
#: ``root`` (the policy's name: a client so named reads as the superuser in any listing).
RESERVED_CLIENTS = frozenset({"admin", "system", "root", "init", "recovery"})
#: Name spaces kept for the daemon's own actors to come (``system.scheduler``, ``secretsd-worker``):
#: ``system`` followed by a separator, and anything beginning with ``secretsd``.
_RESERVED_PREFIX = re.compile(r"(?:system[._@-]|secretsd)")


def is_reserved_client(client: str) -> bool:
    # Case-folded: "Admin" and "SYSTEM" read the same as the real ones in an audit log.
    name = client.lower()
    return name in RESERVED_CLIENTS or _RESERVED_PREFIX.match(name) is not None


def check_client_name(client: str) -> None:
    """The rule for a client name given to a new token: well formed, and not one the daemon uses.

    Without the reservation a delegated token admin could mint a token for ``admin`` or
    ``system`` whose actions then read, in ``created_by`` and the audit log, as the store's own
    administrator or the daemon itself.
    """
    if not _CLIENT.fullmatch(client):
        raise RequestError("client names are 1-128 letters, digits, '.', '_', '@' or '-'")
    if is_reserved_client(client):
        raise RequestError(
            f"the client name {client!r} is reserved for the daemon itself (reserved: "
            f"{', '.join(sorted(RESERVED_CLIENTS))}, and names beginning with 'system.', 'system-', "
            "'system_', 'system@' or 'secretsd', in any case); choose another name"
        )
