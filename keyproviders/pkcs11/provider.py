"""``Pkcs11KeyProvider``: the KEK is an AES-256 key inside a PKCS#11 token and never leaves it.

Every library call is serialised under the library's lock (see ``library``). How the provider
survives a token that goes away and comes back, and proves it is the same token (measured with
python-pkcs11 0.10.1 + SoftHSM 2.6.1):

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
* CKM_AES_KEY_WRAP_PAD has no AAD input: the wrapped plaintext carries a header that binds it
  (``keyproviders._crypto.kwp_header``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from keyproviders._crypto import kwp_header
from keyproviders.base import ProviderHealth, WrappedKey
from keyproviders.errors import (
    KeyMismatchError,
    KeyProviderError,
    ProviderConfigError,
    ProviderKeyNotFoundError,
    ProviderUnavailableError,
    UnwrapError,
)
from keyproviders.pkcs11.errors import _BAD_BLOB, _is_gone, _map_error
from keyproviders.pkcs11.kek import (
    _REQUIRED_ATTRIBUTES,
    _find_keks,
    _generate_kek,
    _Kek,
    _probe_mechanism,
    _version_of,
)
from keyproviders.pkcs11.library import _library
from keyproviders.pkcs11.options import _RECORD_FOR, RECORD_GCM, RECORD_KWP, Pkcs11Options

T = TypeVar("T")

GCM_NONCE_BYTES = 12
GCM_TAG_BITS = 128
KWP_NONCE_BYTES = 16

#: The associated data of the identity probes (see the module docstring); never used for a DEK.
_PROBE_AAD = b"keyproviders/pkcs11/identity-probe/v1"


def _nonce_bytes(mechanism: str) -> int:
    return GCM_NONCE_BYTES if mechanism == RECORD_GCM else KWP_NONCE_BYTES


# What re-finding the keys after an outage may meet while the genuine token is not back: nothing, a
# token without our key (a cached session of a token deleted since), or a planted one. Each is cured
# only by re-initialising the library once the genuine token returns, so each is retried with backoff.
_LOST = (ProviderUnavailableError, ProviderKeyNotFoundError, KeyMismatchError)


@dataclass(frozen=True)
class _Probe:
    """A random value wrapped under one KEK version when first found: opening it again proves the key."""

    nonce: bytes
    blob: bytes
    digest: bytes


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
        nonce = secrets.token_bytes(_nonce_bytes(mechanism))

        def op() -> tuple[int, bytes]:
            kek = self._keks[max(self._keks)]
            self._require(kek, mechanism)
            return kek.version, self._seal(kek, mechanism, nonce, aad, key)

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
            return self._open(kek, wrapped.mechanism, wrapped.nonce, aad, wrapped.ciphertext)

        if len(wrapped.nonce) != _nonce_bytes(wrapped.mechanism):
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
        mechanism = _probe_mechanism(kek)
        value, nonce = secrets.token_bytes(32), secrets.token_bytes(_nonce_bytes(mechanism))
        return _Probe(nonce, self._seal(kek, mechanism, nonce, _PROBE_AAD, value), hashlib.sha256(value).digest())

    def _opens(self, kek: _Kek, probe: _Probe) -> bool:
        try:
            value = self._open(kek, _probe_mechanism(kek), probe.nonce, _PROBE_AAD, probe.blob)
        except UnwrapError:
            return False
        return hmac.compare_digest(hashlib.sha256(value).digest(), probe.digest)

    def _seal(self, kek: _Kek, mechanism: str, nonce: bytes, aad: bytes, key: bytes) -> bytes:
        """``key`` encrypted under ``kek`` with ``mechanism``, bound to ``aad``. Lock held."""
        if mechanism == RECORD_GCM:
            params = GCMParams(nonce, aad, GCM_TAG_BITS)
            return bytes(kek.handle.encrypt(key, mechanism=Mechanism.AES_GCM, mechanism_param=params))
        return self._kwp_wrap(kek, kwp_header(nonce, aad) + key)

    def _open(self, kek: _Kek, mechanism: str, nonce: bytes, aad: bytes, blob: bytes) -> bytes:
        """The inverse of ``_seal``; ``UnwrapError`` for a blob that fails authentication. Lock held."""
        try:
            if mechanism == RECORD_GCM:
                params = GCMParams(nonce, aad, GCM_TAG_BITS)
                return bytes(kek.handle.decrypt(blob, mechanism=Mechanism.AES_GCM, mechanism_param=params))
            value = self._kwp_unwrap(kek, blob)
        except _BAD_BLOB as exc:
            raise UnwrapError("wrapped key failed authentication") from exc
        except (p11.GeneralError, p11.ArgumentsBad) as exc:
            # SoftHSM's answers to a failed tag or key-wrap integrity check (which one depends on what
            # the wrong key decrypts to); a token that is really gone fails the next call too.
            if self._token_answers(kek):
                raise UnwrapError("wrapped key failed authentication") from exc
            raise
        header = kwp_header(nonce, aad)
        if len(value) <= len(header) or not hmac.compare_digest(value[: len(header)], header):
            raise UnwrapError("wrapped key failed authentication")
        return value[len(header) :]

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
