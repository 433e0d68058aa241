"""Operator helpers: ``create_key`` (``secretsd hsm create-key``) and ``doctor`` (``secretsd hsm doctor``)."""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pkcs11 import Attribute
from pkcs11 import exceptions as p11

from keyproviders.errors import ProviderConfigError, UnwrapError
from keyproviders.pkcs11.errors import _map_error
from keyproviders.pkcs11.kek import _generate_kek
from keyproviders.pkcs11.library import _library
from keyproviders.pkcs11.options import _RECORD_FOR, Pkcs11Options
from keyproviders.pkcs11.provider import Pkcs11KeyProvider


def create_key(options: Mapping[str, Any], *, base_dir: Path) -> str:
    """Create version 1 of the KEK in the token; refuse if anything already has its label.

    This is what ``secretsd hsm create-key`` runs. Returns the new key id.
    """
    opts = Pkcs11Options.parse(options, base_dir=base_dir)
    library = _library(opts.module)
    with library.lock:
        library.acquire(opts.token_label)
        try:
            session = library.session(opts, rescan=True)
            if list(session.get_objects({Attribute.LABEL: opts.key_label})):
                raise ProviderConfigError(
                    f"an object labelled {opts.key_label!r} already exists in {opts.where()}; refusing to "
                    f"create another (to add a version, run 'secretsd keyring rewrap')"
                )
            _generate_kek(session, opts, 1)
        except p11.PKCS11Error as exc:
            raise _map_error(exc, opts, seen_token=False) from exc
        finally:
            library.release(opts.token_label)
    return f"{opts.key_label}/v1"


Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class CheckResult:
    """One line of ``secretsd hsm doctor``."""

    name: str
    status: Status
    detail: str


def doctor(options: Mapping[str, Any], *, base_dir: Path, rounds: int = 20) -> list[CheckResult]:
    """Check module, token, login, key attributes, mechanisms (by trial) and latency. Never raises."""
    results: list[CheckResult] = []

    def step(name: str, fn: Callable[[], tuple[Status, str]]) -> bool:
        try:
            status, detail = fn()
        except Exception as exc:
            status, detail = "fail", str(exc) or type(exc).__name__
        results.append(CheckResult(name, status, detail))
        return status != "fail"

    holder: dict[str, Any] = {}

    def config() -> tuple[Literal["ok"], str]:
        holder["opts"] = opts = Pkcs11Options.parse(options, base_dir=base_dir)
        return "ok", f"{opts.where()}, key {opts.key_label!r}, {opts.mechanism}, PIN from {opts.pin_source}"

    def module() -> tuple[Literal["ok"], str]:
        library = _library(holder["opts"].module)
        with library.lock:
            lib = library.lib()
            return "ok", f"{lib.manufacturer_id} {lib.library_description} {lib.library_version}"

    def provider() -> tuple[Literal["ok"], str]:
        holder["provider"] = p = Pkcs11KeyProvider(holder["opts"])
        return "ok", f"logged in; versions {sorted(p.kek_attributes())}, current {p.key_id()}"

    def attributes() -> tuple[Literal["ok", "warn"], str]:
        p: Pkcs11KeyProvider = holder["provider"]
        warnings = []
        for version, attrs in sorted(p.kek_attributes().items()):
            # Already enforced by check_kek_attributes; the history flags are advisory: an imported
            # key was once outside this token.
            if not (attrs[Attribute.ALWAYS_SENSITIVE] and attrs[Attribute.NEVER_EXTRACTABLE]):
                warnings.append(f"v{version} was not generated in the token (imported once)")
        detail = "sensitive=True, extractable=False, AES-256, token object"
        return ("warn", f"{detail}; {'; '.join(warnings)}") if warnings else ("ok", detail)

    def mechanisms() -> tuple[Literal["ok"], str]:
        p: Pkcs11KeyProvider = holder["provider"]
        key = secrets.token_bytes(32)
        if p.unwrap(p.wrap(key, b"secretsd:doctor"), b"secretsd:doctor") != key:
            raise UnwrapError("the round trip returned a different key")
        try:
            p.unwrap(p.wrap(key, b"secretsd:doctor"), b"secretsd:doctor:other")
        except UnwrapError:
            return "ok", f"{_RECORD_FOR[p.options.mechanism]} wraps, unwraps and rejects the wrong AAD"
        raise UnwrapError("unwrap with the wrong AAD succeeded: the mechanism does not bind AAD")

    def latency() -> tuple[Literal["ok"], str]:
        p: Pkcs11KeyProvider = holder["provider"]
        key, timings = secrets.token_bytes(32), []
        for _ in range(rounds):
            start = time.perf_counter()
            p.unwrap(p.wrap(key, b"secretsd:doctor"), b"secretsd:doctor")
            timings.append(time.perf_counter() - start)
        return (
            "ok",
            f"wrap+unwrap median {statistics.median(timings) * 1e3:.2f} ms, max {max(timings) * 1e3:.2f} ms",
        )

    checks: list[tuple[str, Callable[[], tuple[Status, str]]]] = [
        ("configuration", config),
        ("module loads", module),
        ("token, login and key", provider),
        ("key attributes", attributes),
        ("mechanism by trial", mechanisms),
        ("wrap/unwrap latency", latency),
    ]
    try:
        for name, fn in checks:
            if not step(name, fn):
                break
    finally:
        if "provider" in holder:
            holder["provider"].close()
    return results
