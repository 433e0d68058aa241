"""Options of the ``pkcs11`` key provider: parsed and checked once, and where the PIN is read.

Configuration (``[key_provider]`` with ``kind = "pkcs11"``)::

    module      = "/usr/lib/softhsm/libsofthsm2.so"   # the vendor's PKCS#11 library, absolute path
    token_label = "secretsd"                          # tokens are chosen by label, never by slot number
    key_label   = "secretsd-kek"                      # default
    pin_env     = "SECRETSD_PKCS11_PIN"               # or pin_file = "/run/secrets/hsm-pin" (mode 0600)
    mechanism   = "aes-gcm"                           # or "aes-key-wrap-pad"
    allow_imported_keys = false                       # true accepts a KEK not generated in this token

This module does not import python-pkcs11: options can be checked where the library is absent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyproviders.errors import KeyProviderError, ProviderConfigError
from keyproviders.file import check_private_file

DEFAULT_KEY_LABEL = "secretsd-kek"

MECHANISM_GCM = "aes-gcm"
MECHANISM_KWP = "aes-key-wrap-pad"

# What a WrappedKey record says about how it was made. The key-wrap record names its AAD binding
# too (keyproviders._crypto.kwp_header), so that a future binding is a new name, not a silent change.
RECORD_GCM = "CKM_AES_GCM"
RECORD_KWP = "CKM_AES_KEY_WRAP_PAD+sha256-aad-v1"
_RECORD_FOR = {MECHANISM_GCM: RECORD_GCM, MECHANISM_KWP: RECORD_KWP}

OPTIONS = frozenset({"module", "token_label", "key_label", "pin_env", "pin_file", "mechanism", "allow_imported_keys"})


# -- configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Pkcs11Options:
    """Validated provider options. Holds where the PIN is, never the PIN."""

    module: str
    token_label: str
    key_label: str
    mechanism: str
    pin_env: str | None
    pin_file: Path | None
    allow_imported_keys: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, Any], *, base_dir: Path) -> Pkcs11Options:
        if "pin" in options:
            raise ProviderConfigError(
                "pkcs11 key provider: a PIN must never be written in the configuration file; "
                'name an environment variable (pin_env = "SECRETSD_PKCS11_PIN") or an owner-only '
                'file (pin_file = "/run/secrets/hsm-pin") instead'
            )
        if {"slot", "slot_id"} & set(options):
            raise ProviderConfigError(
                "pkcs11 key provider: select the token with token_label, not a slot number "
                "(slot ids change, SoftHSM reassigns them when tokens are added)"
            )
        unknown = set(options) - OPTIONS
        if unknown:
            raise ProviderConfigError(
                f"pkcs11 key provider: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(OPTIONS))}"
            )
        module = _string(options, "module", required=True)
        if not os.path.isabs(module):
            raise ProviderConfigError(f"pkcs11 key provider: module must be an absolute path, not {module!r}")
        if not os.path.isfile(module):
            raise ProviderConfigError(f"pkcs11 key provider: PKCS#11 module {module} does not exist")
        mechanism = _string(options, "mechanism") or MECHANISM_GCM
        if mechanism not in _RECORD_FOR:
            raise ProviderConfigError(
                f"pkcs11 key provider: mechanism {mechanism!r} is not supported; "
                f"use {MECHANISM_GCM!r} or {MECHANISM_KWP!r}"
            )
        pin_env = _string(options, "pin_env")
        pin_file = _string(options, "pin_file")
        if bool(pin_env) == bool(pin_file):
            raise ProviderConfigError("pkcs11 key provider: set exactly one of pin_env and pin_file")
        allow_imported = options.get("allow_imported_keys", False)
        if not isinstance(allow_imported, bool):
            raise ProviderConfigError("pkcs11 key provider: option 'allow_imported_keys' must be true or false")
        return cls(
            module=module,
            token_label=_string(options, "token_label", required=True),
            key_label=_string(options, "key_label") or DEFAULT_KEY_LABEL,
            mechanism=mechanism,
            pin_env=pin_env or None,
            pin_file=(base_dir / pin_file) if pin_file else None,
            allow_imported_keys=allow_imported,
        )

    def read_pin(self) -> str:
        """Read the PIN now (not at parse time), so a rotated PIN file is picked up on re-login."""
        if self.pin_env is not None:
            pin = os.environ.get(self.pin_env, "")
            if not pin:
                raise ProviderConfigError(
                    f"pkcs11 key provider: environment variable {self.pin_env} (pin_env) is not set "
                    f"or empty; it must hold the user PIN of token {self.token_label!r}"
                )
            return pin
        assert self.pin_file is not None
        try:
            check_private_file(self.pin_file)  # the one owner-only rule, shared with key files
            text = self.pin_file.read_text(encoding="utf-8")
        except KeyProviderError as exc:
            raise ProviderConfigError(f"pkcs11 key provider: pin_file refused: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ProviderConfigError(f"pkcs11 key provider: cannot read pin_file {self.pin_file}") from exc
        pin = text.removesuffix("\n").removesuffix("\r")  # `echo PIN > file` adds a newline
        if not pin:
            raise ProviderConfigError(f"pkcs11 key provider: pin_file {self.pin_file} is empty")
        return pin

    @property
    def pin_source(self) -> str:
        return f"environment variable {self.pin_env}" if self.pin_env else f"file {self.pin_file}"

    def where(self) -> str:
        return f"token {self.token_label!r} (module {self.module})"


def _string(options: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = options.get(name)
    if value is None or value == "":
        if required:
            raise ProviderConfigError(f"pkcs11 key provider: option {name!r} is required")
        return ""
    if not isinstance(value, str):
        raise ProviderConfigError(f"pkcs11 key provider: option {name!r} must be a string")
    return value
