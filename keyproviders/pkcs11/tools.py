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
from keyproviders.pkcs11.kek import _generate_kek, describe_object, is_kek_version
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
            existing = list(session.get_objects({Attribute.LABEL: opts.key_label}))
            if existing:
                raise _label_taken(opts, existing)
            _generate_kek(session, opts, 1)
        except p11.PKCS11Error as exc:
            raise _map_error(exc, opts, seen_token=False) from exc
        finally:
            library.release(opts.token_label)
    return f"{opts.key_label}/v1"


def _label_taken(opts: Pkcs11Options, existing: list[Any]) -> ProviderConfigError:
    """Why create-key refuses a label in use: a KEK to add a version to, or something else to move away from."""
    if any(is_kek_version(obj) for obj in existing):
        return ProviderConfigError(
            f"an object labelled {opts.key_label!r} already exists in {opts.where()}; refusing to "
            f"create another (to add a version, run 'secretsd keyring rewrap')"
        )
    found = ", ".join(sorted({describe_object(obj) for obj in existing}))
    return ProviderConfigError(
        f"label {opts.key_label!r} in {opts.where()} is taken ({found}), not by a secretsd KEK: "
        f"set key_label to another name, or remove that object"
    )


Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class CheckResult:
    """One line of ``secretsd hsm doctor``."""

    name: str
    status: Status
    detail: str


@dataclass
class _Doctor:
    """What the checks of one ``doctor`` run share: its inputs, then what earlier checks built."""

    options: Mapping[str, Any]
    base_dir: Path
    rounds: int
    parsed: Pkcs11Options | None = None
    provider: Pkcs11KeyProvider | None = None

    # Each check runs only after the one that builds what it needs, so these never fail in a run;
    # if the order were ever broken, the AssertionError would become that check's "fail" line.
    def opts(self) -> Pkcs11Options:
        assert self.parsed is not None, "the configuration check runs first"
        return self.parsed

    def kek_provider(self) -> Pkcs11KeyProvider:
        assert self.provider is not None, "the token check runs first"
        return self.provider


_Check = Callable[[_Doctor], tuple[Status, str]]
_DOCTOR_AAD = b"secretsd:doctor"


def _check_configuration(run: _Doctor) -> tuple[Status, str]:
    run.parsed = opts = Pkcs11Options.parse(run.options, base_dir=run.base_dir)
    return "ok", f"{opts.where()}, key {opts.key_label!r}, {opts.mechanism}, PIN from {opts.pin_source}"


def _check_module(run: _Doctor) -> tuple[Status, str]:
    library = _library(run.opts().module)
    with library.lock:
        lib = library.lib()
        return "ok", f"{lib.manufacturer_id} {lib.library_description} {lib.library_version}"


def _check_token(run: _Doctor) -> tuple[Status, str]:
    run.provider = p = Pkcs11KeyProvider(run.opts())
    return "ok", f"logged in; versions {sorted(p.kek_attributes())}, current {p.key_id()}"


def _check_attributes(run: _Doctor) -> tuple[Status, str]:
    warnings = []
    for version, attrs in sorted(run.kek_provider().kek_attributes().items()):
        # Already enforced by check_kek_attributes; the history flags are advisory: an imported
        # key was once outside this token.
        if not (attrs[Attribute.ALWAYS_SENSITIVE] and attrs[Attribute.NEVER_EXTRACTABLE]):
            warnings.append(f"v{version} was not generated in the token (imported once)")
    detail = "sensitive=True, extractable=False, AES-256, token object"
    return ("warn", f"{detail}; {'; '.join(warnings)}") if warnings else ("ok", detail)


def _check_mechanism(run: _Doctor) -> tuple[Status, str]:
    p = run.kek_provider()
    key = secrets.token_bytes(32)
    if p.unwrap(p.wrap(key, _DOCTOR_AAD), _DOCTOR_AAD) != key:
        raise UnwrapError("the round trip returned a different key")
    try:
        p.unwrap(p.wrap(key, _DOCTOR_AAD), _DOCTOR_AAD + b":other")
    except UnwrapError:
        return "ok", f"{_RECORD_FOR[p.options.mechanism]} wraps, unwraps and rejects the wrong AAD"
    raise UnwrapError("unwrap with the wrong AAD succeeded: the mechanism does not bind AAD")


def _check_latency(run: _Doctor) -> tuple[Status, str]:
    p = run.kek_provider()
    key, timings = secrets.token_bytes(32), []
    for _ in range(run.rounds):
        start = time.perf_counter()
        p.unwrap(p.wrap(key, _DOCTOR_AAD), _DOCTOR_AAD)
        timings.append(time.perf_counter() - start)
    return "ok", f"wrap+unwrap median {statistics.median(timings) * 1e3:.2f} ms, max {max(timings) * 1e3:.2f} ms"


# In this order; each check may use what the ones before it built, so the first "fail" ends the run.
_CHECKS: tuple[tuple[str, _Check], ...] = (
    ("configuration", _check_configuration),
    ("module loads", _check_module),
    ("token, login and key", _check_token),
    ("key attributes", _check_attributes),
    ("mechanism by trial", _check_mechanism),
    ("wrap/unwrap latency", _check_latency),
)


def _run_check(name: str, check: _Check, run: _Doctor) -> CheckResult:
    """One check's line. Whatever it raises becomes its "fail" detail: doctor reports, never raises."""
    try:
        status, detail = check(run)
    except Exception as exc:
        status, detail = "fail", str(exc) or type(exc).__name__
    return CheckResult(name, status, detail)


def doctor(options: Mapping[str, Any], *, base_dir: Path, rounds: int = 20) -> list[CheckResult]:
    """Check module, token, login, key attributes, mechanisms (by trial) and latency. Never raises."""
    run = _Doctor(options, base_dir, rounds)
    results: list[CheckResult] = []
    try:
        for name, check in _CHECKS:
            results.append(_run_check(name, check, run))
            if results[-1].status == "fail":
                break
    finally:
        if run.provider is not None:
            run.provider.close()
    return results
