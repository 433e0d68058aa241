"""The ``env-sealed`` key provider: the KEK is derived from a passphrase in an environment variable.

Configuration (the passphrase itself is never accepted from the configuration file)::

    [key_provider]
    kind = "env-sealed"
    passphrase_env = "SECRETSD_PASSPHRASE"   # required: the NAME of the variable holding it
    memory_kib = 65536                       # Argon2id memory cost, KiB   (min 19456, max 4194304)
    iterations = 3                           # Argon2id passes             (min 2,     max 64)
    lanes = 4                                # Argon2id parallelism        (min 1,     max 16)

Derivation (scheme 1), written out so that a key can be recovered with any Argon2/HKDF tool::

    root   = Argon2id(passphrase bytes, salt, m=memory_kib, t=iterations, p=lanes, 32 bytes)  # v1.3
    kek    = HKDF-Expand-SHA256(root, info="secretsd env-sealed v1 aes-256-gcm kek", 32 bytes)
    key_id = "env-sealed-" + hex(HKDF-Expand-SHA256(root, info="secretsd env-sealed v1 key id", 8 bytes))

The passphrase bytes are the environment variable's bytes exactly as the process received them
(no trimming, no Unicode normalisation). Data keys are wrapped with AES-256-GCM under ``kek``
(96-bit random nonce, the caller's AAD passed through). Every ``WrappedKey.params`` records the
scheme, KDF, salt and cost, so a wrapped key says by itself how to re-derive its KEK from the
passphrase; no file is needed, and the one thing to keep safe is the passphrase.

Key ids. ``key_id`` is a PRF output of the derived root key under its own label, so it commits to
the (passphrase, salt, parameters) combination and reveals nothing about the KEK. Testing a guessed
passphrase against it costs one full Argon2id derivation, exactly what testing it against the GCM
tag of any wrapped key already costs, so publishing it adds no offline-guessing shortcut. Separate
HKDF labels keep the id and the wrapping key independent (no key used by two primitives).

KEK versions. A version is a (salt, parameters) pair under the one passphrase. ``rotate()`` draws a
new random salt and makes it current; older versions stay unwrappable because their salt and cost
travel with each wrapped key. There is no persistent state, so each process start also begins a
new version (a fresh salt); unseal derives once per distinct version found in the keyring, and the
number of versions is bounded by keyring terms (``secretsd keyring rewrap`` consolidates them).
Changing the passphrase itself is not a rotation: it is ``secretsd keyring migrate`` from a provider
configured with the old passphrase to one with the new.

Derived keys are cached in memory per version, so unsealing N wrapped keys costs one derivation
per version, never one per key; derivations are serialised (bounding peak memory to one KDF).

KDF choice. Argon2id (RFC 9106) from ``cryptography`` (OpenSSL 3.2+). The default is RFC 9106's
second recommended option, m=64 MiB, t=3, p=4; the floor is OWASP's Argon2id minimum, m=19 MiB,
t=2, so an operator cannot configure a trivially cheap KDF. Parameters read back from a wrapped key
must lie within the same bounds: a tampered record can neither make us derive with a cheap KDF nor
make us allocate unbounded memory. If this build of ``cryptography``/OpenSSL has no Argon2id, new
versions fall back to scrypt with OWASP's parameters (N=2^17, r=8, p=1: 128 MiB), and the cost
options are then not used.

A missing or empty environment variable is a ``ProviderConfigError``, not the retryable
``ProviderUnavailableError``: a process's environment is fixed when it starts, so no retry inside
the process can ever see a variable set later. The daemon still starts sealed (``/healthz`` live,
the message on ``/readyz`` and ``/v1/sys/status``); the operator sets the variable and restarts.
Retrying stays cheap, because the error is raised before any derivation.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import os
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from keyproviders import _crypto
from keyproviders.base import ProviderHealth, WrappedKey
from keyproviders.errors import ProviderConfigError, ProviderUnavailableError, UnwrapError

log = logging.getLogger("keyproviders.env_sealed")
if not _crypto.HAVE_ARGON2ID:  # cryptography < 44
    log.warning("env-sealed key provider: cryptography has no Argon2id; new KEK versions use scrypt")

NAME = "env-sealed"
MECHANISM = "AES-256-GCM"
SCHEME = 1
KEY_BYTES = 32
NONCE_BYTES = _crypto.GCM_NONCE_BYTES
SALT_BYTES = 16
KEY_ID_PREFIX = "env-sealed-"
_KEK_INFO = b"secretsd env-sealed v1 aes-256-gcm kek"
_KEY_ID_INFO = b"secretsd env-sealed v1 key id"

ARGON2ID = "argon2id"
SCRYPT = "scrypt"

#: (default, minimum, maximum) of each Argon2id cost option. Minimum: OWASP's Argon2id floor.
#: Maximum: a sanity bound (4 GiB) so neither a typo nor a tampered record exhausts memory.
ARGON2_COST: dict[str, tuple[int, int, int]] = {
    "memory_kib": (64 * 1024, 19 * 1024, 4 * 1024 * 1024),
    "iterations": (3, 2, 64),
    "lanes": (4, 1, 16),
}
#: scrypt fallback: OWASP's first recommendation; bounds for parameters read back from records.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SCRYPT_N_RANGE = (2**17, 2**22)
SCRYPT_P_RANGE = (1, 16)
SALT_RANGE = (16, 64)

OPTIONS = frozenset({"passphrase_env", *ARGON2_COST})

# -- the passphrase-strength rule ------------------------------------------------------------------
MIN_PASSPHRASE_LENGTH = 16
MIN_DISTINCT_CHARACTERS = 8
#: A passphrase of one character class (only lower-case letters, say) must be at least this long.
MIN_SINGLE_CLASS_LENGTH = 24
#: Words from the top of every leaked-password list; a passphrase made only of these (after undoing
#: common letter substitutions and dropping digits and symbols) is refused. Deliberately tiny.
COMMON_WORDS = frozenset({
    "password", "passwort", "passphrase", "passwd", "pass", "secret", "secrets", "secretsd",
    "changeme", "change", "letmein", "welcome", "admin", "administrator", "root", "master",
    "default", "test", "testing", "example", "qwerty", "qwertyuiop", "asdf", "asdfgh", "asdfghjkl",
    "zxcv", "zxcvbn", "zxcvbnm", "abc", "abcd", "abcdef", "iloveyou", "monkey", "dragon", "shadow",
    "sunshine", "princess", "football", "baseball", "superman", "batman", "trustno", "hunter",
    "login", "jarvis", "vault", "correct", "horse", "battery", "staple", "hello", "world",
})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})


def _character_class(ch: str) -> str:
    if ch.islower():
        return "lower"
    if ch.isupper():
        return "upper"
    if ch.isdigit():
        return "digit"
    return "other"


def _only_common_words(passphrase: str) -> bool:
    """True if every letter of ``passphrase`` belongs to one of ``COMMON_WORDS``.

    Common substitutions are undone first (``P@ssw0rd`` is ``password``); digits and symbols may sit
    between and around the words (``Password-2024!``). A passphrase without letters is not judged here.
    """
    original = passphrase.lower()
    if not any(ch.isalpha() for ch in original):
        return False
    text = original.translate(_LEET)
    longest = max(map(len, COMMON_WORDS))
    reachable = [True] + [False] * len(text)
    for end in range(1, len(text) + 1):
        if reachable[end - 1] and not original[end - 1].isalpha():
            reachable[end] = True  # a digit or symbol between words
            continue
        reachable[end] = any(
            reachable[start] and text[start:end] in COMMON_WORDS for start in range(max(0, end - longest), end)
        )
    return reachable[-1]


def passphrase_weakness(passphrase: str) -> str | None:
    """Why ``passphrase`` is too weak to seal a KEK, or None if it is acceptable.

    The one place the passphrase rule lives. Reasons never quote the passphrase or its length.
    """
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        return f"it is shorter than {MIN_PASSPHRASE_LENGTH} characters"
    if passphrase != passphrase.strip():
        return "it begins or ends with whitespace (a stray newline?); remove it"
    if len(set(passphrase)) < MIN_DISTINCT_CHARACTERS:
        return f"it has fewer than {MIN_DISTINCT_CHARACTERS} distinct characters"
    size = len(passphrase)
    for period in range(1, size // 2 + 1):
        if all(passphrase[i] == passphrase[i % period] for i in range(period, size)):
            return "it is one short sequence repeated"
    steps = [ord(b) - ord(a) for a, b in itertools.pairwise(passphrase)]
    if 2 * sum(abs(step) == 1 for step in steps) > len(steps):
        return "it is mostly runs of consecutive characters (abcd, 4321)"
    if len({_character_class(ch) for ch in passphrase}) == 1 and size < MIN_SINGLE_CLASS_LENGTH:
        return (f"it uses only one kind of character; mix kinds (letters, digits, symbols) or use "
                f"at least {MIN_SINGLE_CLASS_LENGTH} characters")
    if _only_common_words(passphrase):
        return "it is made of common passwords"
    return None


# -- KDF ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KdfParams:
    """Everything (but the passphrase) that determines one KEK version. Not secret."""

    kdf: str
    salt: bytes
    memory_kib: int = 0
    iterations: int = 0
    lanes: int = 0
    n: int = 0
    r: int = 0
    p: int = 0

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "scheme": SCHEME,
            "kdf": self.kdf,
            "salt": base64.b64encode(self.salt).decode("ascii"),
        }
        if self.kdf == ARGON2ID:
            record.update(memory_kib=self.memory_kib, iterations=self.iterations, lanes=self.lanes)
        else:
            record.update(n=self.n, r=self.r, p=self.p)
        return record

    @classmethod
    def from_record(cls, params: Mapping[str, Any]) -> KdfParams:
        """Parse and bound-check ``WrappedKey.params``; ``ValueError`` says what is wrong."""
        if params.get("scheme") != SCHEME:
            raise ValueError(f"unsupported scheme {params.get('scheme')!r}")
        try:
            salt = base64.b64decode(str(params["salt"]).encode("ascii"), validate=True)
        except (KeyError, binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError("missing or invalid salt") from exc
        if not SALT_RANGE[0] <= len(salt) <= SALT_RANGE[1]:
            raise ValueError(f"salt must be {SALT_RANGE[0]} to {SALT_RANGE[1]} bytes")
        kdf = params.get("kdf")
        if kdf == ARGON2ID:
            cost = {name: _bounded_int(params.get(name), name, lo, hi)
                    for name, (_default, lo, hi) in ARGON2_COST.items()}
            return cls(kdf=ARGON2ID, salt=salt, **cost)
        if kdf == SCRYPT:
            n = _bounded_int(params.get("n"), "n", *SCRYPT_N_RANGE)
            if n & (n - 1):
                raise ValueError("scrypt n must be a power of two")
            r = _bounded_int(params.get("r"), "r", SCRYPT_R, SCRYPT_R)
            p = _bounded_int(params.get("p"), "p", *SCRYPT_P_RANGE)
            return cls(kdf=SCRYPT, salt=salt, n=n, r=r, p=p)
        raise ValueError(f"unsupported kdf {kdf!r}")

    def describe(self) -> str:
        if self.kdf == ARGON2ID:
            return f"argon2id m={self.memory_kib}KiB t={self.iterations} p={self.lanes}"
        return f"scrypt N={self.n} r={self.r} p={self.p}"


def _bounded_int(value: object, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, not {value}")
    return value


@cache
def argon2id_available() -> bool:
    """Whether this build of cryptography/OpenSSL can compute Argon2id (probed once, cheaply)."""
    if _crypto.argon2id_available():
        return True
    log.warning("env-sealed key provider: no Argon2id in this cryptography/OpenSSL; new KEK versions use scrypt")
    return False


def new_params(memory_kib: int, iterations: int, lanes: int) -> KdfParams:
    """Parameters of a new KEK version: a fresh random salt, Argon2id (or the scrypt fallback)."""
    salt = secrets.token_bytes(SALT_BYTES)
    if argon2id_available():
        return KdfParams(kdf=ARGON2ID, salt=salt, memory_kib=memory_kib, iterations=iterations, lanes=lanes)
    return KdfParams(kdf=SCRYPT, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)


def derive_root_key(passphrase: bytes, params: KdfParams) -> bytes:
    """The memory-hard step: passphrase + params -> 32-byte root key. Slow by design."""
    try:
        if params.kdf == ARGON2ID:
            return _crypto.argon2id(passphrase, params.salt, memory_kib=params.memory_kib,
                                    iterations=params.iterations, lanes=params.lanes, length=KEY_BYTES)
        return _crypto.scrypt(passphrase, params.salt, n=params.n, r=params.r, p=params.p, length=KEY_BYTES)
    except _crypto.KdfUnsupportedError as exc:
        raise ProviderConfigError(
            f"env-sealed key provider: this build of cryptography/OpenSSL cannot compute {params.kdf}; "
            f"install cryptography with OpenSSL 3.2 or newer"
        ) from exc
    except _crypto.KdfFailedError as exc:
        raise ProviderUnavailableError(
            f"env-sealed key provider: could not derive the KEK ({params.describe()}); "
            f"is there enough free memory?"
        ) from exc


def _subkeys(root: bytes) -> tuple[bytes, str]:
    """Split a root key into the AES-256-GCM wrapping key and the public key id (see module doc)."""
    kek = _crypto.hkdf_expand(root, _KEK_INFO, KEY_BYTES)
    kid = KEY_ID_PREFIX + _crypto.hkdf_expand(root, _KEY_ID_INFO, 8).hex()
    return kek, kid


# -- configuration --------------------------------------------------------------------------------
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_CONVENTIONAL_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _describe_variable(name: str) -> str:
    # A name that does not look like one may be the passphrase pasted into the wrong option: never
    # echo it into a log line.
    if _CONVENTIONAL_ENV_NAME.fullmatch(name):
        return f"environment variable {name}"
    return "the environment variable named by passphrase_env"


def _check_cost(name: str, value: object) -> int:
    default, lo, hi = ARGON2_COST[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProviderConfigError(f"env-sealed key provider: {name} must be an integer")
    if value < lo:
        raise ProviderConfigError(
            f"env-sealed key provider: {name} = {value} is below the minimum {lo}; a cheaper KDF would "
            f"make the passphrase easy to guess offline (default {default})"
        )
    if value > hi:
        raise ProviderConfigError(f"env-sealed key provider: {name} = {value} is above the maximum {hi}")
    return value


def _check_passphrase(passphrase: bytes, where: str) -> None:
    reason = passphrase_weakness(passphrase.decode("utf-8", "surrogateescape"))
    if reason is not None:
        raise ProviderConfigError(
            f"env-sealed key provider: the passphrase in {where} is too weak: {reason}. "
            f"Use {MIN_PASSPHRASE_LENGTH}+ random characters, e.g. the output of 'openssl rand -base64 32'"
        )


def read_passphrase(passphrase_env: str) -> bytes:
    """Read the passphrase now; a missing or empty variable is a configuration error (module doc)."""
    value = os.environ.get(passphrase_env, "")
    if not value:
        raise ProviderConfigError(
            f"env-sealed key provider: {_describe_variable(passphrase_env)} (passphrase_env) is not set or "
            f"empty; set it in the daemon's environment and restart"
        )
    # The exact bytes the process received (surrogateescape undoes Python's decoding).
    return value.encode("utf-8", "surrogateescape")


# -- the provider ---------------------------------------------------------------------------------
class EnvSealedKeyProvider:
    """KEK versions derived with Argon2id from one passphrase; wraps with AES-256-GCM."""

    name: ClassVar[str] = NAME

    def __init__(self, passphrase: bytes, *, passphrase_env: str, memory_kib: int = ARGON2_COST["memory_kib"][0],
                 iterations: int = ARGON2_COST["iterations"][0], lanes: int = ARGON2_COST["lanes"][0]) -> None:
        # Checked here, not only in from_config, so no way of building a provider skips the rules.
        self._source = _describe_variable(passphrase_env)
        _check_passphrase(passphrase, self._source)
        self._passphrase: bytes | None = passphrase
        self._cost = (_check_cost("memory_kib", memory_kib), _check_cost("iterations", iterations),
                      _check_cost("lanes", lanes))
        self._lock = threading.Lock()  # guards the fields below; held only briefly
        self._derive_lock = threading.Lock()  # serialises derivations (cost and peak memory)
        self._keks: dict[KdfParams, tuple[bytes, str]] = {}
        self._current = new_params(*self._cost)
        self._current_id = self._derive(self._current)[1]

    @classmethod
    def from_config(
        cls, options: Mapping[str, Any], *, base_dir: Path, create: bool = False
    ) -> EnvSealedKeyProvider:
        """Build from the ``[key_provider]`` table. ``base_dir`` and ``create`` are not used:
        there is no file, and the KEK is "provisioned" by setting the environment variable."""
        del base_dir, create
        if "passphrase" in options:
            raise ProviderConfigError(
                "env-sealed key provider: refusing a 'passphrase' in the configuration file; put the "
                "passphrase in an environment variable and name it with passphrase_env, e.g. "
                'passphrase_env = "SECRETSD_PASSPHRASE"'
            )
        unknown = set(options) - OPTIONS
        if unknown:
            raise ProviderConfigError(
                f"env-sealed key provider: unknown option(s) {', '.join(sorted(map(str, unknown)))}; "
                f"known: {', '.join(sorted(OPTIONS))}"
            )
        env = options.get("passphrase_env")
        if not isinstance(env, str) or not env:
            raise ProviderConfigError(
                'env-sealed key provider: option passphrase_env is required: the name of the environment '
                'variable that holds the passphrase, e.g. passphrase_env = "SECRETSD_PASSPHRASE"'
            )
        if not _ENV_NAME.fullmatch(env):
            raise ProviderConfigError(
                "env-sealed key provider: passphrase_env must be the name of an environment variable "
                "(letters, digits and underscores), not the passphrase itself"
            )
        cost = {name: _check_cost(name, options.get(name, spec[0])) for name, spec in ARGON2_COST.items()}
        return cls(read_passphrase(env), passphrase_env=env, **cost)

    def __repr__(self) -> str:
        return f"<EnvSealedKeyProvider key_id={self._current_id} passphrase from {self._source}>"

    # -- derivation cache -------------------------------------------------------------------------
    def _derive(self, params: KdfParams) -> tuple[bytes, str]:
        with self._lock:
            cached = self._keks.get(params)
        if cached is not None:
            return cached
        with self._derive_lock:
            with self._lock:
                cached = self._keks.get(params)
                passphrase = self._passphrase
            if cached is not None:
                return cached
            if passphrase is None:
                raise ValueError("the env-sealed key provider is closed")
            derived = _subkeys(derive_root_key(passphrase, params))
            with self._lock:
                if self._passphrase is not None:  # not closed meanwhile
                    self._keks[params] = derived
            return derived

    # -- KeyProvider ------------------------------------------------------------------------------
    def key_id(self) -> str:
        with self._lock:
            return self._current_id

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        with self._lock:
            params = self._current
        kek, kid = self._derive(params)  # cached: derived at construction or rotation
        nonce = secrets.token_bytes(NONCE_BYTES)
        return WrappedKey(
            provider=self.name,
            key_id=kid,
            mechanism=MECHANISM,
            nonce=nonce,
            ciphertext=_crypto.aead_seal(kek, nonce, key, aad),
            params=params.to_record(),
        )

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if wrapped.provider != self.name or wrapped.mechanism != MECHANISM:
            raise UnwrapError(
                f"this key was wrapped by {wrapped.provider}/{wrapped.mechanism}, not by the env-sealed provider"
            )
        try:
            params = KdfParams.from_record(wrapped.params)
        except ValueError as exc:
            raise UnwrapError(f"wrapped key {wrapped.key_id} has unusable env-sealed KDF parameters: {exc}") from None
        kek, kid = self._derive(params)
        if not secrets.compare_digest(kid, wrapped.key_id):
            # Never name the id we derived: for parameters chosen by whoever wrote the record it
            # would be a cheap oracle on the passphrase.
            raise UnwrapError(
                f"wrapped key {wrapped.key_id} was sealed with a different passphrase than the one in "
                f"{self._source}, or the record is damaged (a changed passphrase needs 'secretsd keyring migrate')"
            )
        return _crypto.aead_open(kek, wrapped.nonce, wrapped.ciphertext, aad)

    def health(self) -> ProviderHealth:
        try:
            with self._lock:
                closed = self._passphrase is None
                params, kid = self._current, self._current_id
                ready = params in self._keks
            if closed:
                return ProviderHealth(ok=False, detail="env-sealed key provider is closed")
            if not ready:
                return ProviderHealth(ok=False, detail=f"KEK {kid} is not derived")
            return ProviderHealth(ok=True, detail=f"passphrase from {self._source}; KEK {kid} ({params.describe()})")
        except Exception as exc:  # health() reports, it never raises
            return ProviderHealth(ok=False, detail=f"env-sealed health check failed: {type(exc).__name__}")

    def rotate(self) -> str:
        """A new salt under the same passphrase (with the configured cost) becomes current."""
        params = new_params(*self._cost)
        _kek, kid = self._derive(params)
        with self._lock:
            self._current, self._current_id = params, kid
        log.info("env-sealed key provider: KEK version %s is now current (%s)", kid, params.describe())
        return kid

    def refresh(self) -> None:
        # Each process seals under its own salt; there is nothing shared to re-read.
        return None

    def close(self) -> None:
        # Best effort: Python cannot wipe immutable bytes; dropping the references is what we can do.
        with self._derive_lock, self._lock:
            self._keks.clear()
            self._passphrase = None
