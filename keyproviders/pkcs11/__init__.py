"""The ``pkcs11`` key provider: the KEK is an AES-256 key inside a PKCS#11 token and never leaves it.

Only this package imports python-pkcs11 (a test says so), and its exceptions are converted to
``keyproviders.errors`` at this boundary. The modules, from the bottom up:

- ``options``: the ``[key_provider]`` options (the configuration is documented there) and the PIN.
- ``errors``: python-pkcs11 exceptions by class -> ``keyproviders.errors`` with actionable messages.
- ``library``: one loaded library per process, its lock, re-initialisation, one login per token
  (the measured facts about python-pkcs11 and SoftHSM that shape it are in its docstring).
- ``kek``: the KEK rules (AES-256, sensitive, never extractable, generated in the token), finding
  and generating versions.
- ``provider``: ``Pkcs11KeyProvider``: wrap/unwrap, identity probes, recovery with backoff.
- ``tools``: ``create_key`` and ``doctor`` for the ``secretsd hsm`` commands.

The names below are the public surface (``keyproviders.pkcs11:Pkcs11KeyProvider`` is the entry point).
"""

from pkcs11 import Attribute, KeyType

from keyproviders.pkcs11.kek import KEK_BITS, check_generated_in_token, check_kek_attributes, read_attributes
from keyproviders.pkcs11.options import (
    DEFAULT_KEY_LABEL,
    MECHANISM_GCM,
    MECHANISM_KWP,
    OPTIONS,
    RECORD_GCM,
    RECORD_KWP,
    Pkcs11Options,
)
from keyproviders.pkcs11.provider import Pkcs11KeyProvider
from keyproviders.pkcs11.tools import CheckResult, Status, create_key, doctor

__all__ = [
    "DEFAULT_KEY_LABEL",
    "KEK_BITS",
    "MECHANISM_GCM",
    "MECHANISM_KWP",
    "OPTIONS",
    "RECORD_GCM",
    "RECORD_KWP",
    "Attribute",
    "CheckResult",
    "KeyType",
    "Pkcs11KeyProvider",
    "Pkcs11Options",
    "Status",
    "check_generated_in_token",
    "check_kek_attributes",
    "create_key",
    "doctor",
    "read_attributes",
]
