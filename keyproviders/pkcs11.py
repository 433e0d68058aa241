"""The ``pkcs11`` key provider: the KEK is an AES-256 key inside a PKCS#11 token and never leaves it.

Configuration (``[key_provider]`` with ``kind = "pkcs11"``)::

    module      = "/usr/lib/softhsm/libsofthsm2.so"   # the vendor's PKCS#11 library, absolute path
    token_label = "secretsd"                          # tokens are chosen by label, never by slot number
    key_label   = "secretsd-kek"                      # default
    pin_env     = "SECRETSD_PKCS11_PIN"               # or pin_file = "/run/secrets/hsm-pin" (mode 0600)
    mechanism   = "aes-gcm"                           # or "aes-key-wrap-pad"
    allow_imported_keys = false                       # true accepts a KEK not generated in this token

KEK versions share the key label and differ in CKA_ID (ASCII decimal "1", "2", ...); the highest
version wraps, every version unwraps. ``key_id()`` is ``"<key_label>/v<version>"``.

How this module talks to the library, and why (measured with python-pkcs11 0.10.1 + SoftHSM 2.6.1):

* python-pkcs11 calls ``C_Initialize(NULL)``, without CKF_OS_LOCKING_OK, and SoftHSM then does no
  locking at all: concurrent calls crash the process or return a wrong key silently. Every call
  into a library therefore happens under that library's one process-wide lock (``_Library.lock``),
  shared by every provider using the same module.
* ``pkcs11.lib(path)`` is a per-process singleton keyed by the path string, and
  ``lib.reinitialize()`` (C_Finalize + C_Initialize) kills every session of every user of that
  library. So libraries are keyed by the resolved path here, re-initialisation bumps a generation
  counter, and each provider re-opens its session and re-finds its keys when the generation moved.
* Login is per process and per token: a second C_Login answers USER_ALREADY_LOGGED_IN without
  looking at the PIN, and closing a logged-in session logs out every session. So one logged-in
  session per token is shared by reference count and closed with its last user.
* A token that disappears and comes back leaves old handles dead (OBJECT_HANDLE_INVALID) until the
  library is re-initialised; recovery re-initialises, logs in and re-finds the keys, with backoff.
* SoftHSM reports a failed GCM tag or key-wrap integrity check as CKR_GENERAL_ERROR, the same code
  as a broken device. A GENERAL_ERROR while unwrapping is therefore resolved by probing the key: if
  the token still answers, the blob was bad (UnwrapError); otherwise the token is gone (recover).
* Keys are found by label and version, and a replaced token (same label, same PIN, an attacker's
  key) would answer to the same names. So every KEK version found is *pinned*: a random probe is
  wrapped under it when it is first found, and whenever the keys are found again (after an outage,
  a re-initialisation, a refresh) each pinned version must open its probe. One that does not is a
  different key: the provider refuses every operation (``KeyMismatchError``) until the genuine
  token is back. Binding to the *store* (that these are the keys the store was sealed with) is the
  caller's proof, by unwrapping what the store holds.
* python-pkcs11 exceptions carry no message. They are mapped by class, at this boundary, to
  ``keyproviders.errors`` with messages that say what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from keyproviders._crypto import kwp_header
from keyproviders.base import ProviderHealth, WrappedKey
from keyproviders.errors import (
    KeyMismatchError,
    KeyProviderError,
    ProviderAuthError,
    ProviderConfigError,
    ProviderKeyNotFoundError,
    ProviderUnavailableError,
    UnwrapError,
)
from keyproviders.file import check_private_file

__all__ = [
    "MECHANISM_GCM",
    "MECHANISM_KWP",
    "Attribute",
    "CheckResult",
    "KeyType",
    "Pkcs11KeyProvider",
    "Pkcs11Options",
    "check_kek_attributes",
    "create_key",
    "doctor",
]

T = TypeVar("T")
log = logging.getLogger("keyproviders.pkcs11")

DEFAULT_KEY_LABEL = "secretsd-kek"
KEK_BITS = 256
GCM_NONCE_BYTES = 12
GCM_TAG_BITS = 128
KWP_NONCE_BYTES = 16

MECHANISM_GCM = "aes-gcm"
MECHANISM_KWP = "aes-key-wrap-pad"

# What a WrappedKey record says about how it was made. The key-wrap record names its AAD binding
# too (keyproviders._crypto.kwp_header), so that a future binding is a new name, not a silent change.
RECORD_GCM = "CKM_AES_GCM"
RECORD_KWP = "CKM_AES_KEY_WRAP_PAD+sha256-aad-v1"
_RECORD_FOR = {MECHANISM_GCM: RECORD_GCM, MECHANISM_KWP: RECORD_KWP}

# Least privilege: a KEK may do exactly what its mechanism needs. A key that can both wrap and
# decrypt allows the classic wrap-then-decrypt extraction of other keys in the token.
_CAPABILITIES = {
    MECHANISM_GCM: MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
    MECHANISM_KWP: MechanismFlag.WRAP | MechanismFlag.UNWRAP,
}
_REQUIRED_ATTRIBUTES = {
    RECORD_GCM: (Attribute.ENCRYPT, Attribute.DECRYPT),
    RECORD_KWP: (Attribute.WRAP, Attribute.UNWRAP),
}

OPTIONS = frozenset({"module", "token_label", "key_label", "pin_env", "pin_file", "mechanism", "allow_imported_keys"})
#: The associated data of the identity probes (see the module docstring); never used for a DEK.
_PROBE_AAD = b"keyproviders/pkcs11/identity-probe/v1"

# The token, session or handle went away (or was never there): re-initialise and retry. A bare
# PKCS11Error is how python-pkcs11 reports unmapped codes such as CRYPTOKI_NOT_INITIALIZED.
_GONE = (
    p11.DeviceError,
    p11.DeviceMemory,
    p11.DeviceRemoved,
    p11.FunctionFailed,
    p11.GeneralError,
    p11.KeyHandleInvalid,
    p11.ObjectHandleInvalid,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.UnwrappingKeyHandleInvalid,  # key-wrap mechanism's way of saying the handle died
    p11.UserNotLoggedIn,
    p11.WrappingKeyHandleInvalid,
)
_BAD_BLOB = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.WrappedKeyInvalid,
    p11.WrappedKeyLenRange,
    p11.DataLenRange,
)


# What re-finding the keys after an outage may meet while the genuine token is not back: nothing, a
# token without our key (a cached session of a token deleted since), or a planted one. Each is cured
# only by re-initialising the library once the genuine token returns, so each is retried with backoff.
_LOST = (ProviderUnavailableError, ProviderKeyNotFoundError, KeyMismatchError)


def _is_gone(exc: BaseException) -> bool:
    return isinstance(exc, _GONE) or type(exc) is p11.PKCS11Error


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


# -- one PKCS#11 library per process -------------------------------------------------------------
@dataclass
class _Login:
    session: Any = None
    generation: int = -1
    pin_digest: bytes = b""
    users: int = 0


class _Library:
    """A loaded PKCS#11 module, its lock, and the shared logged-in session of each token.

    Every method must be called with ``lock`` held.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.generation = 0
        self._lib: Any = None
        self._logins: dict[str, _Login] = {}
        # Keyed digests let a second provider prove it holds the same PIN without keeping PINs.
        self._digest_key = secrets.token_bytes(32)
        # A real HSM locks its PIN after a few failures; a PIN that was refused is not tried again
        # (until the environment variable or file changes), however often the daemon retries.
        self._refused_pins: dict[str, bytes] = {}

    def lib(self) -> Any:
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.path)
            except p11.PKCS11Error as exc:
                # A loader failure carries dlerror's text, the one python-pkcs11 message worth keeping;
                # a failed C_Initialize carries none, and for SoftHSM means an unreadable config.
                reason = str(exc) or type(exc).__name__
                raise ProviderConfigError(
                    f"cannot load or initialise PKCS#11 module {self.path} ({reason}); "
                    f"for SoftHSM check that SOFTHSM2_CONF names a readable config and token directory"
                ) from exc
        return self._lib

    def reinitialize(self) -> None:
        """C_Finalize + C_Initialize: the only way to revive a token that went away and came back."""
        self.generation += 1
        for login in self._logins.values():
            login.session = None
        if self._lib is not None:
            self._lib.reinitialize()

    def acquire(self, token_label: str) -> None:
        self._logins.setdefault(token_label, _Login()).users += 1

    def release(self, token_label: str) -> None:
        login = self._logins.get(token_label)
        if login is None:
            return
        login.users -= 1
        if login.users > 0:
            return
        del self._logins[token_label]
        if login.session is not None and login.generation == self.generation:
            # Logs out: we were the last user of this token. If the token is gone, so is the login.
            with contextlib.suppress(p11.PKCS11Error):
                login.session.close()

    def session(self, opts: Pkcs11Options, *, rescan: bool = False) -> Any:
        """The logged-in read/write session of the token, opened and logged in if needed.

        ``rescan``: if the token cannot be found, re-initialise once and look again. SoftHSM reads
        its token directory only in C_Initialize, so a token provisioned after the module was loaded
        stays invisible until then, and a token directory deleted since makes every token lookup
        fail with GENERAL_ERROR (python-pkcs11's get_token walks all slots).
        """
        login = self._logins.setdefault(opts.token_label, _Login())
        pin = opts.read_pin()
        digest = hmac.new(self._digest_key, pin.encode("utf-8"), hashlib.sha256).digest()
        if login.session is not None and login.generation == self.generation:
            if not hmac.compare_digest(digest, login.pin_digest):
                raise ProviderAuthError(
                    f"PIN incorrect for {opts.where()}: this process is already logged in to it with a "
                    f"different PIN; check {opts.pin_source}"
                )
            return login.session
        if hmac.compare_digest(digest, self._refused_pins.get(opts.token_label, b"")):
            raise ProviderAuthError(
                f"PIN incorrect for {opts.where()}: not tried again, to avoid locking the token; fix {opts.pin_source}"
            )
        loaded_before = self._lib is not None
        try:
            token = self.lib().get_token(token_label=opts.token_label)
        except p11.PKCS11Error as exc:
            if not (rescan and loaded_before and (isinstance(exc, p11.NoSuchToken) or _is_gone(exc))):
                raise
            self.reinitialize()
            token = self.lib().get_token(token_label=opts.token_label)
        try:
            session = token.open(rw=True, user_pin=pin)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
            self._refused_pins[opts.token_label] = digest
            raise
        except p11.UserAlreadyLoggedIn:
            # Logged in by a session we no longer track; a session opened without a PIN inherits
            # the login and, unlike a logged-in one, does not log everyone out when closed.
            session = token.open(rw=True)
        self._refused_pins.pop(opts.token_label, None)
        login.session, login.generation, login.pin_digest = session, self.generation, digest
        return session


_libraries: dict[str, _Library] = {}
_libraries_lock = threading.Lock()


def _library(module: str) -> _Library:
    # python-pkcs11 keeps one lib object per path *string*; two spellings of one file would load
    # it twice and the second C_Initialize would fail, so the resolved path is the key.
    path = os.path.realpath(module)
    with _libraries_lock:
        return _libraries.setdefault(path, _Library(path))


# -- error mapping -------------------------------------------------------------------------------
def _map_error(exc: p11.PKCS11Error, opts: Pkcs11Options, *, seen_token: bool) -> KeyProviderError:
    """Convert a python-pkcs11 exception (they carry no message) into an actionable one."""
    where = opts.where()
    if isinstance(exc, p11.NoSuchToken):
        if seen_token:
            return ProviderUnavailableError(f"{where} is not present any more; retrying")
        # Never seen: a typo or a token not provisioned. Not retryable (retrying a typo forever
        # hides it), and not "key not found" (create-key must not try to create into no token).
        return ProviderConfigError(
            f"token {opts.token_label!r} not found in module {opts.module}: check token_label, "
            f"SOFTHSM2_CONF or provision the token"
        )
    if isinstance(exc, p11.MultipleTokensReturned):
        return ProviderConfigError(f"several tokens are labelled {opts.token_label!r} in module {opts.module}")
    if isinstance(exc, p11.PinIncorrect | p11.PinInvalid | p11.PinLenRange):
        return ProviderAuthError(f"PIN incorrect for {where}: check {opts.pin_source}")
    if isinstance(exc, p11.PinLocked):
        return ProviderAuthError(f"the user PIN of {where} is locked: the security officer must reset it")
    if isinstance(exc, p11.PinExpired):
        return ProviderAuthError(f"the user PIN of {where} has expired: set a new one")
    if isinstance(exc, p11.UserPinNotInitialized):
        return ProviderConfigError(f"{where} has no user PIN yet: initialise it "
            "(for SoftHSM2: pkcs11-tool --module MODULE --login-type so --init-pin --new-pin PIN)")
    if isinstance(exc, p11.AnotherUserAlreadyLoggedIn | p11.UserTooManyTypes):
        return ProviderAuthError(f"the security officer is logged in to {where}; log it out first")
    if isinstance(exc, p11.MechanismInvalid | p11.MechanismParamInvalid | p11.FunctionNotSupported):
        return ProviderConfigError(f"{where} does not support mechanism {opts.mechanism!r}")
    if isinstance(exc, p11.TokenWriteProtected | p11.SessionReadOnly):
        return ProviderConfigError(f"{where} is write-protected; cannot create a key in it")
    if _is_gone(exc):
        return ProviderUnavailableError(f"{where} is not reachable ({type(exc).__name__}); retrying")
    return KeyProviderError(f"{where} refused the operation ({type(exc).__name__})")


# -- the KEK -------------------------------------------------------------------------------------
def check_kek_attributes(attrs: Mapping[Attribute, Any], *, what: str) -> None:
    """The rule: a KEK is a token AES-256 key that is sensitive and can never be extracted."""
    problems = []
    if attrs.get(Attribute.KEY_TYPE) != KeyType.AES or attrs.get(Attribute.VALUE_LEN) != KEK_BITS // 8:
        problems.append("it is not an AES-256 key")
    if attrs.get(Attribute.SENSITIVE) is not True:
        problems.append("CKA_SENSITIVE is not true")
    if attrs.get(Attribute.EXTRACTABLE) is not False:
        problems.append("CKA_EXTRACTABLE is not false")
    if attrs.get(Attribute.TOKEN) is not True:
        problems.append("it is a session object, not a token object")
    if problems:
        raise ProviderConfigError(
            f"{what} is unfit to be a KEK: {'; '.join(problems)}. Create a new one with 'secretsd hsm create-key'"
        )


def check_generated_in_token(attrs: Mapping[Attribute, Any], *, what: str, allow_imported: bool) -> None:
    """The rule: a KEK was generated inside its token (CKA_LOCAL), unless imports are allowed.

    A key that was imported existed outside the HSM at some point, so someone may hold a copy; an
    attacker who plants a token brings exactly such a key. Cloning a key between HSMs of one
    deployment is legitimate, hence the explicit option, and even then it is logged.
    """
    if attrs.get(Attribute.LOCAL) is True:
        return
    if not allow_imported:
        raise ProviderConfigError(
            f"{what} was not generated inside the token (CKA_LOCAL is false): it existed outside the HSM "
            f"and may have been copied or planted. Create the KEK in the token with 'secretsd hsm create-key', "
            f"or, if it was cloned between your own HSMs on purpose, set allow_imported_keys = true"
        )
    log.warning("%s was imported into the token (CKA_LOCAL false); accepted because allow_imported_keys = true", what)


_READ_ATTRIBUTES = (
    Attribute.ID,
    Attribute.LOCAL,
    Attribute.KEY_TYPE,
    Attribute.VALUE_LEN,
    Attribute.TOKEN,
    Attribute.SENSITIVE,
    Attribute.EXTRACTABLE,
    Attribute.ALWAYS_SENSITIVE,
    Attribute.NEVER_EXTRACTABLE,
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.WRAP,
    Attribute.UNWRAP,
)


def read_attributes(obj: Any) -> dict[Attribute, Any]:
    return {attr: obj[attr] for attr in _READ_ATTRIBUTES}


@dataclass(frozen=True)
class _Kek:
    version: int
    handle: Any
    attrs: Mapping[Attribute, Any]


@dataclass(frozen=True)
class _Probe:
    """A random value wrapped under one KEK version when first found: opening it again proves the key."""

    nonce: bytes
    blob: bytes
    digest: bytes


def _version_of(cka_id: bytes) -> int | None:
    text = cka_id.decode("ascii", "replace")
    return int(text) if text.isdigit() and text[0] != "0" else None


def _find_keks(session: Any, opts: Pkcs11Options) -> dict[int, _Kek]:
    found: dict[int, _Kek] = {}
    foreign = 0
    for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: opts.key_label})):
        attrs = read_attributes(obj)
        version = _version_of(attrs[Attribute.ID])
        if version is None:
            foreign += 1
            continue
        if version in found:
            raise ProviderConfigError(
                f"key {opts.key_label!r} version {version} exists twice in {opts.where()}; destroy the newer copy"
            )
        what = f"key {opts.key_label!r} v{version} in {opts.where()}"
        check_kek_attributes(attrs, what=what)
        check_generated_in_token(attrs, what=what, allow_imported=opts.allow_imported_keys)
        found[version] = _Kek(version, obj, attrs)
    if not found:
        extra = f" ({foreign} object(s) have that label but no secretsd version CKA_ID)" if foreign else ""
        raise ProviderKeyNotFoundError(
            f"key {opts.key_label!r} not found in {opts.where()}{extra}: create it with "
            f"'secretsd hsm create-key --config FILE'"
        )
    return found


def _generate_kek(session: Any, opts: Pkcs11Options, version: int) -> None:
    session.generate_key(
        KeyType.AES,
        KEK_BITS,
        id=str(version).encode("ascii"),
        label=opts.key_label,
        store=True,
        capabilities=_CAPABILITIES[opts.mechanism],
        template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            # Nobody can later grant the key new capabilities (SENSITIVE and EXTRACTABLE are
            # one-way by the standard; the usage flags are not).
            Attribute.MODIFIABLE: False,
        },
    )


def _probe_mechanism(kek: _Kek) -> str:
    """The mechanism a key's own capabilities allow (the configured one may differ for old keys)."""
    return RECORD_GCM if kek.attrs.get(Attribute.ENCRYPT) is True else RECORD_KWP


# -- the provider --------------------------------------------------------------------------------
class Pkcs11KeyProvider:
    """KEK versions in a PKCS#11 token; every library call serialised under the library's lock."""

    name: ClassVar[str] = "pkcs11"

    def __init__(self, opts: Pkcs11Options, *, retry_initial: float = 0.5, retry_max: float = 30.0) -> None:
        self._opts = opts
        self._lib = _library(opts.module)
        self._session: Any = None  # shared with other providers on the same token
        self._keks: dict[int, _Kek] = {}
        self._probes: dict[int, _Probe] = {}  # the identity pin of each version ever found
        self._generation = -1  # library generation our session and handles belong to
        self._seen_token = False
        self._closed = False
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._backoff = 0.0  # 0 while healthy
        self._next_attempt = 0.0
        self._last_error = ""
        self._last_mismatch = False
        with self._lib.lock:
            self._lib.acquire(opts.token_label)
            try:
                self._connect(rescan=True)
            except BaseException:
                self._lib.release(opts.token_label)
                raise

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, base_dir: Path, create: bool = False) -> Pkcs11KeyProvider:
        # ``create`` is ignored on purpose: the KEK is provisioned with create_key (an explicit
        # operator step), never as a side effect of initialising a store.
        return cls(Pkcs11Options.parse(options, base_dir=base_dir))

    @property
    def options(self) -> Pkcs11Options:
        return self._opts

    # -- KeyProvider ----------------------------------------------------------------------------
    def key_id(self) -> str:
        with self._lib.lock:
            return self._key_id(max(self._keks))

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        if not key:
            raise ValueError("cannot wrap an empty key")
        mechanism = _RECORD_FOR[self._opts.mechanism]
        if mechanism == RECORD_KWP and len(key) % 8:
            raise ValueError("aes-key-wrap-pad wraps keys whose length is a multiple of 8 bytes only")
        nonce = secrets.token_bytes(GCM_NONCE_BYTES if mechanism == RECORD_GCM else KWP_NONCE_BYTES)

        def op() -> tuple[int, bytes]:
            kek = self._keks[max(self._keks)]
            self._require(kek, mechanism)
            if mechanism == RECORD_GCM:
                params = GCMParams(nonce, aad, GCM_TAG_BITS)
                return kek.version, kek.handle.encrypt(key, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            return kek.version, self._kwp_wrap(kek, kwp_header(nonce, aad) + key)

        version, blob = self._run(op)
        return WrappedKey(
            provider=self.name,
            key_id=self._key_id(version),
            mechanism=mechanism,
            nonce=nonce,
            ciphertext=blob,
        )

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if wrapped.provider != self.name or wrapped.mechanism not in _REQUIRED_ATTRIBUTES:
            raise UnwrapError(
                f"this key was wrapped by {wrapped.provider}/{wrapped.mechanism}, not by the pkcs11 provider"
            )
        version = self._parse_key_id(wrapped.key_id)

        def op() -> bytes:
            kek = self._kek(version)
            self._require(kek, wrapped.mechanism)
            try:
                if wrapped.mechanism == RECORD_GCM:
                    params = GCMParams(wrapped.nonce, aad, GCM_TAG_BITS)
                    return bytes(
                        kek.handle.decrypt(wrapped.ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
                    )
                value = self._kwp_unwrap(kek, wrapped.ciphertext)
            except _BAD_BLOB as exc:
                raise UnwrapError("wrapped key failed authentication") from exc
            except p11.GeneralError as exc:
                if self._token_answers(kek):
                    raise UnwrapError("wrapped key failed authentication") from exc
                raise
            header = kwp_header(wrapped.nonce, aad)
            if len(value) <= len(header) or not hmac.compare_digest(value[: len(header)], header):
                raise UnwrapError("wrapped key failed authentication")
            return value[len(header) :]

        if len(wrapped.nonce) != (GCM_NONCE_BYTES if wrapped.mechanism == RECORD_GCM else KWP_NONCE_BYTES):
            raise UnwrapError("wrapped key failed authentication")
        return self._run(op)

    def health(self) -> ProviderHealth:
        try:
            detail = self._run(lambda: self._describe(self._keks[max(self._keks)]))
        except Exception as exc:  # health() reports, it never raises
            return ProviderHealth(ok=False, detail=str(exc))
        return ProviderHealth(ok=True, detail=detail)

    def rotate(self) -> str:
        def op() -> int:
            version = max(self._keks) + 1
            _generate_kek(self._session, self._opts, version)
            self._keks = self._pinned(_find_keks(self._session, self._opts))
            return version

        # No automatic retry: if the token vanished mid-way the key may exist already, and a retry
        # would create a duplicate version. The operator re-runs rotation after a failure.
        return self._key_id(self._run(op, retry=False))

    def refresh(self) -> None:
        def op() -> None:
            self._keks = self._pinned(_find_keks(self._session, self._opts))

        self._run(op)

    def close(self) -> None:
        with self._lib.lock:
            if self._closed:
                return
            self._closed = True
            self._keks, self._session = {}, None
            self._lib.release(self._opts.token_label)

    # -- plumbing -------------------------------------------------------------------------------
    def _key_id(self, version: int) -> str:
        return f"{self._opts.key_label}/v{version}"

    def _parse_key_id(self, key_id: str) -> int:
        prefix = f"{self._opts.key_label}/v"
        version = _version_of(key_id.removeprefix(prefix).encode()) if key_id.startswith(prefix) else None
        if version is None:
            raise ProviderKeyNotFoundError(f"key {key_id!r} is not a version of key {self._opts.key_label!r}")
        return version

    def _kek(self, version: int) -> _Kek:
        if version not in self._keks:
            self._keks = self._pinned(_find_keks(self._session, self._opts))  # rotated by another process?
        try:
            return self._keks[version]
        except KeyError:
            raise ProviderKeyNotFoundError(
                f"key {self._key_id(version)} not found in {self._opts.where()}; was it destroyed?"
            ) from None

    def _require(self, kek: _Kek, mechanism: str) -> None:
        missing = [a.name for a in _REQUIRED_ATTRIBUTES[mechanism] if kek.attrs.get(a) is not True]
        if missing:
            raise ProviderConfigError(
                f"key {self._key_id(kek.version)} in {self._opts.where()} does not allow {mechanism} "
                f"(missing {', '.join(missing)}); was it created for the other mechanism?"
            )

    def kek_attributes(self) -> dict[int, Mapping[Attribute, Any]]:
        """Attributes of every KEK version as read from the token when it was last found."""
        with self._lib.lock:
            return {version: kek.attrs for version, kek in self._keks.items()}

    def _connect(self, *, rescan: bool = False) -> None:
        """Open (or share) the logged-in session and find the KEK versions. Lock held."""
        try:
            session = self._lib.session(self._opts, rescan=rescan)
            generation = self._lib.generation
            try:
                keks = _find_keks(session, self._opts)
            except ProviderConfigError as exc:
                if not self._probes:
                    raise
                # It held fit keys before: unfit ones now (imported, extractable) mean another token.
                raise KeyMismatchError(
                    f"{self._opts.where()} now holds a key unfit to be ours ({exc}); the token was replaced"
                ) from exc
            self._session = session  # the probes run in it; the keys are adopted only once they pass
            keks = self._pinned(keks)
        except p11.PKCS11Error as exc:
            raise _map_error(exc, self._opts, seen_token=self._seen_token) from exc
        self._keks, self._generation = keks, generation
        self._seen_token = True

    def _pinned(self, keks: dict[int, _Kek]) -> dict[int, _Kek]:
        """``keks`` once every version found before opens its probe; new versions get one. Lock held.

        Raises ``KeyMismatchError`` when a version answers to its name but is another key, which
        is what a token replaced by one holding an attacker's key under the same label looks like.
        """
        if self._probes and not self._probes.keys() & keks.keys():
            # None of the versions we held is there: a token holding only "new" versions is not
            # ours (a genuine token keeps the versions it had; they are destroyed only after a restart).
            held = ", ".join(self._key_id(v) for v in sorted(self._probes))
            found = ", ".join(self._key_id(v) for v in sorted(keks))
            raise KeyMismatchError(
                f"none of the key versions this provider held ({held}) is in {self._opts.where()} any more, only "
                f"{found}: the token was replaced. Refusing to use it; put the genuine token back and investigate"
            )
        for version, kek in keks.items():
            probe = self._probes.get(version)
            if probe is not None and not self._opens(kek, probe):
                raise KeyMismatchError(
                    f"key {self._key_id(version)} in {self._opts.where()} is not the key this provider found "
                    f"there before: the token was replaced or its key re-created. Refusing to use it; put the "
                    f"genuine token back (the daemon recovers by itself) and investigate"
                )
        for version, kek in keks.items():
            if version not in self._probes:
                self._probes[version] = self._probe(kek)
        return keks

    def _probe(self, kek: _Kek) -> _Probe:
        value, nonce = secrets.token_bytes(32), secrets.token_bytes(GCM_NONCE_BYTES)
        if _probe_mechanism(kek) == RECORD_GCM:
            blob = kek.handle.encrypt(value, mechanism=Mechanism.AES_GCM,
                                      mechanism_param=GCMParams(nonce, _PROBE_AAD, GCM_TAG_BITS))
        else:
            blob = self._kwp_wrap(kek, value)
        return _Probe(nonce, bytes(blob), hashlib.sha256(value).digest())

    def _opens(self, kek: _Kek, probe: _Probe) -> bool:
        try:
            if _probe_mechanism(kek) == RECORD_GCM:
                value = bytes(kek.handle.decrypt(probe.blob, mechanism=Mechanism.AES_GCM,
                                                 mechanism_param=GCMParams(probe.nonce, _PROBE_AAD, GCM_TAG_BITS)))
            else:
                value = self._kwp_unwrap(kek, probe.blob)
        except _BAD_BLOB:
            return False
        except p11.GeneralError:
            # SoftHSM's answer to a failed tag; a token that is really gone fails the next call too.
            if self._token_answers(kek):
                return False
            raise
        return hmac.compare_digest(hashlib.sha256(value).digest(), probe.digest)

    def _kwp_wrap(self, kek: _Kek, plaintext: bytes) -> bytes:
        # A session object lives in the library's memory only (CKA_TOKEN false), never on disk.
        obj = self._session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.VALUE: plaintext,
                Attribute.TOKEN: False,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: True,
            }
        )
        try:
            return bytes(kek.handle.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        finally:
            obj.destroy()

    def _kwp_unwrap(self, kek: _Kek, blob: bytes) -> bytes:
        obj = kek.handle.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.GENERIC_SECRET,
            blob,
            mechanism=Mechanism.AES_KEY_WRAP_PAD,
            store=False,
            capabilities=0,
            template={Attribute.PRIVATE: True, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
        try:
            return bytes(obj[Attribute.VALUE])
        finally:
            obj.destroy()

    def _token_answers(self, kek: _Kek) -> bool:
        try:
            kek.handle[Attribute.CLASS]
        except p11.PKCS11Error:
            return False
        return True

    def _describe(self, kek: _Kek) -> str:
        # Reading an attribute is the cheapest call that proves session, login and handle are alive.
        kek.handle[Attribute.SENSITIVE]
        return f"key {self._key_id(kek.version)} in {self._opts.where()}, {_RECORD_FOR[self._opts.mechanism]}"

    def _run(self, op: Callable[[], T], *, retry: bool = True) -> T:
        """Run ``op`` under the library lock; on a lost token re-initialise (with backoff) and retry once."""
        with self._lib.lock:
            if self._closed:
                raise ValueError("the pkcs11 key provider is closed")
            self._ensure_ready()
            try:
                return op()
            except KeyProviderError:
                raise
            except p11.PKCS11Error as exc:
                if not _is_gone(exc):
                    raise _map_error(exc, self._opts, seen_token=True) from exc
                lost: BaseException = exc
            self._recover()
            if not retry:
                raise ProviderUnavailableError(
                    f"{self._opts.where()} was lost during the operation; it is back now, run it again"
                ) from lost
            try:
                return op()
            except KeyProviderError:
                raise
            except p11.PKCS11Error as exc:
                error = _map_error(exc, self._opts, seen_token=True)
                if isinstance(error, ProviderUnavailableError):
                    self._back_off(error)
                raise error from exc

    def _ensure_ready(self) -> None:
        if self._backoff:
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                # A planted token stays a mismatch while we wait: never a mere "unavailable".
                error = KeyMismatchError if self._last_mismatch else ProviderUnavailableError
                raise error(f"{self._opts.where()} is unavailable ({self._last_error}); next attempt in {wait:.1f}s")
            self._recover()
        elif self._generation != self._lib.generation:
            # Another provider re-initialised the library: our session and handles died with it.
            try:
                self._connect()
            except _LOST:
                self._recover()

    def _recover(self) -> None:
        """Re-initialise the library, log in again and re-find the keys, or back off."""
        try:
            try:
                self._lib.reinitialize()
            except p11.PKCS11Error as exc:
                raise _map_error(exc, self._opts, seen_token=True) from exc
            self._connect()
        except _LOST as error:
            # A replaced token is retried like a missing one: it clears when the genuine one is back.
            self._back_off(error)
            raise
        self._backoff = 0.0
        self._last_error = ""

    def _back_off(self, error: KeyProviderError) -> None:
        if isinstance(error, KeyMismatchError):
            # A token that answers is not hammered by a retry, and the genuine one must be taken
            # back as soon as it returns: no exponential growth for a mismatch.
            self._backoff = self._retry_initial
        else:
            self._backoff = min(self._retry_max, self._backoff * 2) if self._backoff else self._retry_initial
        self._next_attempt = time.monotonic() + self._backoff
        self._last_error = str(error)
        self._last_mismatch = isinstance(error, KeyMismatchError)


# -- operator helpers: create-key and doctor ------------------------------------------------------
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
