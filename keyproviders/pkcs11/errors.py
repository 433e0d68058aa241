"""Conversion of python-pkcs11 exceptions, at this one boundary, into ``keyproviders.errors``.

python-pkcs11 exceptions carry no message (measured with python-pkcs11 0.10.1 + SoftHSM 2.6.1). They
are mapped by class, here, to ``keyproviders.errors`` with messages that say what to do; the classes
that mean "the token, session or handle went away" and "the blob is bad" are named here too, so the
library, the provider and the tools agree on them.
"""

from __future__ import annotations

from pkcs11 import exceptions as p11

from keyproviders.errors import (
    KeyProviderError,
    ProviderAuthError,
    ProviderConfigError,
    ProviderUnavailableError,
)
from keyproviders.pkcs11.options import Pkcs11Options

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


def _is_gone(exc: BaseException) -> bool:
    return isinstance(exc, _GONE) or type(exc) is p11.PKCS11Error


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
        return ProviderAuthError(
            f"the user PIN of {where} is locked (too many wrong PINs): the security officer must set a new "
            f"one (pkcs11-tool --module {opts.module} --login --login-type so --init-pin), then update "
            f"{opts.pin_source}"
        )
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
