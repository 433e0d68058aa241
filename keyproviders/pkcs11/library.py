"""One loaded PKCS#11 library per process: its lock, its re-initialisation, one login per token.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import exceptions as p11

from keyproviders.errors import ProviderAuthError, ProviderConfigError
from keyproviders.pkcs11.errors import _is_gone
from keyproviders.pkcs11.options import Pkcs11Options


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
