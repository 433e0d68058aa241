"""The ``recovery-shares`` key provider: a recovery key split among operators (SLIP-0039 shares).

The recovery key is a 256-bit random secret made once (``secretsd init --recovery-shares N
--recovery-threshold K``) and split with Shamir's scheme by ``shamir-mnemonic`` (SatoshiLabs'
SLIP-0039 reference implementation: word lists with an RS1024 checksum and a digest of the secret).
It is never stored: only the shares leave the process, printed once.

From the secret an X25519 key pair is derived. The daemon is configured with the *public* key only,
so it wraps every new keyring term for the recovery key without ever holding it (a rekey needs every
provider: a symmetric recovery key would have to sit beside the daemon, which is what shares
replace). Unwrapping needs the private key, which exists only in a process that was given K shares
(``token create-root``, ``keyring migrate``); nothing stored lets fewer than K shares recover it.

Configuration (a data directory initialised with shares holds ``recovery-shares.pub``, which the
daemon picks up by itself; a table is needed only to name another file or inline the key)::

    [[recovery_providers]]
    kind = "recovery-shares"
    public_key_file = "recovery-shares.pub"   # relative to the data directory
    # or: public_key = "<base64 of the 32-byte X25519 public key>"

The key id is only a name: whoever can write the store can add a wrapping under any id. So each
wrapping for the recovery key carries a binding tag, an HMAC over the public key keyed from the
term's data key, which only the unsealed keyring can make; a public key without a valid tag is
refused before anything is wrapped for it (``secretsd.custody.keyring.prove_custody``, docs/recovery.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import shamir_mnemonic  # type: ignore[import-untyped]  # no type information shipped

from keyproviders import _crypto
from keyproviders.base import ProviderHealth, WrappedKey
from keyproviders.errors import (
    ProviderAuthError,
    ProviderConfigError,
    ProviderKeyNotFoundError,
    ProviderUnavailableError,
    UnwrapError,
)

MECHANISM = "X25519-HKDF-SHA256-AES-256-GCM"
PUBLIC_KEY_BYTES = 32
SECRET_BYTES = 32
DEFAULT_PUBLIC_KEY_FILE = "recovery-shares.pub"
PUBLIC_FILE_FORMAT = 1
MIN_THRESHOLD, MAX_SHARES = 2, 16
OPTIONS = frozenset({"public_key", "public_key_file"})


def recovery_key_id(public_key: bytes) -> str:
    """The public name of a recovery key: a truncated hash of its public key."""
    return "shares-" + hashlib.sha256(b"secretsd-recovery-shares-id\x00" + public_key).hexdigest()[:16]


def check_split(shares: int, threshold: int) -> None:
    """The rule: 1 < K <= N <= 16 (one share alone must never be enough; SLIP-0039 allows 16)."""
    if not MIN_THRESHOLD <= threshold <= shares <= MAX_SHARES:
        raise ValueError(f"recovery shares need 1 < threshold <= shares <= {MAX_SHARES}; "
                         f"got {threshold} of {shares}")


def split_new_secret(shares: int, threshold: int) -> tuple[bytes, list[str]]:
    """A fresh 256-bit recovery secret and its ``shares`` SLIP-0039 shares, any ``threshold`` of which recover it."""
    check_split(shares, threshold)
    secret = secrets.token_bytes(SECRET_BYTES)
    groups = shamir_mnemonic.generate_mnemonics(1, [(threshold, shares)], secret)
    return secret, list(groups[0])


def combine_shares(lines: Sequence[str]) -> bytes:
    """The recovery secret from K or more shares, or ``ProviderAuthError`` saying what is wrong.

    Messages never quote a share (a share word is secret); shares are named by their position.
    """
    mnemonics = [" ".join(line.split()) for line in lines if line.strip()]
    if not mnemonics:
        raise ProviderAuthError("no recovery shares were given")
    decoded = []
    for number, mnemonic in enumerate(mnemonics, start=1):
        try:
            decoded.append(shamir_mnemonic.Share.from_mnemonic(mnemonic))
        except shamir_mnemonic.MnemonicError:
            raise ProviderAuthError(
                f"recovery share {number} is not a valid share: a word is misspelt, missing or changed "
                "(its checksum does not match)") from None
    if len({(s.identifier, s.group_threshold, s.group_count) for s in decoded}) != 1:
        raise ProviderAuthError("the recovery shares come from different sets (another store's shares, or "
                                "shares made before the recovery key was re-split)")
    if len({s.index for s in decoded}) != len(decoded):
        raise ProviderAuthError("the same recovery share was given twice")
    threshold = decoded[0].member_threshold
    if len(decoded) < threshold:
        raise ProviderAuthError(f"{threshold} recovery shares are needed; {len(decoded)} given. Nothing was done")
    try:
        secret = bytes(shamir_mnemonic.combine_mnemonics(mnemonics))
    except shamir_mnemonic.MnemonicError:
        # The digest inside the shares did not match: shares altered consistently, or mixed sets.
        raise ProviderAuthError("the recovery shares do not combine to a valid secret (a share was "
                                "altered, or the shares come from different sets)") from None
    if len(secret) != SECRET_BYTES:
        raise ProviderAuthError("the recovery shares hold a secret of the wrong size: not secretsd shares")
    return secret


def public_key_document(public_key: bytes) -> str:
    """The text of ``recovery-shares.pub``: the public key and its id (nothing secret)."""
    return json.dumps({"format": PUBLIC_FILE_FORMAT, "kind": "recovery-shares", "key_id": recovery_key_id(public_key),
                       "public_key": base64.b64encode(public_key).decode("ascii")}, indent=1) + "\n"


def _decode_public(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ProviderConfigError(f"{where}: the recovery public key is not base64") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ProviderConfigError(f"{where}: the recovery public key is not 32 bytes (X25519)")
    return raw


def read_public_key_file(path: Path) -> bytes:
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ProviderKeyNotFoundError(f"recovery public key file {path} does not exist") from None
    except OSError as exc:
        raise ProviderUnavailableError(f"recovery public key file {path} cannot be read: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError):
        raise ProviderConfigError(f"{path} is not a secretsd recovery public key file") from None
    if (not isinstance(doc, dict) or doc.get("format") != PUBLIC_FILE_FORMAT
            or not isinstance(doc.get("public_key"), str)):
        raise ProviderConfigError(f"{path} is not a secretsd recovery public key file")
    return _decode_public(doc["public_key"], str(path))


class RecoverySharesKeyProvider:
    """Wraps for the recovery key with its public key; unwraps only when built from K shares."""

    name: ClassVar[str] = "recovery-shares"

    def __init__(self, public_key: bytes, *, private_key: bytes | None = None, source: str = "") -> None:
        if private_key is not None and _crypto.x25519_public(private_key) != public_key:
            raise ValueError("the private key does not belong to the public key")
        self._public = public_key
        self._private = private_key
        self._source = source or "configuration"
        self._id = recovery_key_id(public_key)

    @classmethod
    def from_config(
        cls, options: Mapping[str, Any], *, base_dir: Path, create: bool = False
    ) -> RecoverySharesKeyProvider:
        """Build the wrap-only provider from its public key. ``create`` is not used: the key is made by
        ``secretsd init --recovery-shares``, never by a provider."""
        del create
        unknown = set(options) - OPTIONS
        if unknown:
            raise ProviderConfigError(
                f"recovery-shares key provider: unknown option(s) {', '.join(sorted(map(str, unknown)))}; known: "
                f"{', '.join(sorted(OPTIONS))} (the shares themselves are never configured: they are given "
                "to the command that needs them)")
        if "public_key" in options and "public_key_file" in options:
            raise ProviderConfigError("recovery-shares key provider: give public_key or public_key_file, not both")
        if "public_key" in options:
            value = options["public_key"]
            if not isinstance(value, str):
                raise ProviderConfigError("recovery-shares key provider: public_key must be a base64 string")
            return cls(_decode_public(value, "recovery-shares key provider"), source="configuration")
        raw = options.get("public_key_file", DEFAULT_PUBLIC_KEY_FILE)
        if not isinstance(raw, str) or not raw:
            raise ProviderConfigError("recovery-shares key provider: public_key_file must be a file path")
        path = Path(raw) if Path(raw).is_absolute() else base_dir / raw
        return cls(read_public_key_file(path), source=str(path))

    @classmethod
    def from_secret(cls, secret: bytes) -> RecoverySharesKeyProvider:
        private = _crypto.x25519_private_from_secret(secret)
        return cls(_crypto.x25519_public(private), private_key=private, source="recovery shares")

    @classmethod
    def from_shares(cls, lines: Sequence[str]) -> RecoverySharesKeyProvider:
        """The unwrapping provider, from K or more shares (``ProviderAuthError`` otherwise)."""
        return cls.from_secret(combine_shares(lines))

    def __repr__(self) -> str:
        held = "private key held" if self._private is not None else "public key only"
        return f"<RecoverySharesKeyProvider key_id={self._id} {held}>"

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def source(self) -> str:
        """Where the public key came from (a file path), for messages."""
        if self._source == "configuration":
            return "the recovery public key in the configuration"
        return self._source

    @property
    def can_unwrap(self) -> bool:
        """False for the daemon's provider (public key only): custody is then proven by a binding tag."""
        return self._private is not None

    # -- KeyProvider ------------------------------------------------------------------------------
    def key_id(self) -> str:
        return self._id

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        nonce = secrets.token_bytes(_crypto.GCM_NONCE_BYTES)
        ephemeral, ciphertext = _crypto.x25519_seal(self._public, nonce, key, aad)
        return WrappedKey(provider=self.name, key_id=self._id, mechanism=MECHANISM, nonce=nonce,
                          ciphertext=ephemeral + ciphertext)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if wrapped.provider != self.name or wrapped.mechanism != MECHANISM:
            raise UnwrapError(
                f"this key was wrapped by {wrapped.provider}/{wrapped.mechanism}, not by the recovery-shares provider")
        private = self._private
        if private is None:
            raise ProviderKeyNotFoundError(
                "the recovery key is held only as shares by its operators; give K shares to the command that "
                "needs it ('secretsd token create-root --recovery-shares-stdin', 'secretsd keyring migrate "
                "--recovery-shares-stdin')")
        if not secrets.compare_digest(wrapped.key_id, self._id):
            raise ProviderKeyNotFoundError(
                f"these recovery shares recover key {self._id}, not {wrapped.key_id}: they are another store's "
                "shares, or shares of a recovery key that was re-split since")
        if len(wrapped.ciphertext) <= PUBLIC_KEY_BYTES:
            raise UnwrapError("wrapped key failed authentication")
        return _crypto.x25519_open(private, wrapped.ciphertext[:PUBLIC_KEY_BYTES], wrapped.nonce,
                                   wrapped.ciphertext[PUBLIC_KEY_BYTES:], aad)

    def health(self) -> ProviderHealth:
        held = "shares given" if self._private is not None else "public key only; unwrapping needs K shares"
        return ProviderHealth(ok=True, detail=f"recovery key {self._id} from {self._source} ({held})")

    def rotate(self) -> str:
        # A new recovery key means new shares for every operator, which no unattended rotation can
        # hand out: the recovery key stays as it is (docs/recovery.md says how to re-split it).
        return self._id

    def refresh(self) -> None:
        # The public key is read once; a replaced file is caught at the next start by the binding proof.
        return None

    def close(self) -> None:
        # Best effort: Python cannot wipe immutable bytes; dropping the reference is what we can do.
        self._private = None


def share_threshold(line: str) -> int:
    """How many shares the set that ``line`` belongs to needs (to prompt for the rest)."""
    try:
        return int(shamir_mnemonic.Share.from_mnemonic(" ".join(line.split())).member_threshold)
    except shamir_mnemonic.MnemonicError:
        raise ProviderAuthError("that recovery share is not a valid share: a word is misspelt, missing or "
                                "changed (its checksum does not match)") from None
