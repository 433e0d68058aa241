"""Network address rules shared by the listener, the rotation hooks and JWT login's JWKS URL.

Light on purpose: the settings import it (``serve --workers``' supervisor loads no server stack)."""

from __future__ import annotations

import ipaddress
import urllib.parse


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


def check_jwks_url(url: str) -> str:
    """The rule "the JWKS comes over https": ``jwks_url`` is ``https://``; plain ``http://`` only to a
    loopback host (a sidecar or a test server: nothing crosses a network). Whoever can change the keys
    in transit can log in as any workload. ValueError otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return url
    raise ValueError("jwks_url must be https:// (plain http:// only to a loopback address)")
