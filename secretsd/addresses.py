"""Network address rules shared by the listener and the rotation hooks."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals: traffic that never leaves the machine.

    A DNS name other than "localhost" is not trusted to resolve to loopback.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
