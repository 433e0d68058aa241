"""The KEK in the token: the rules a key must meet, finding its versions, generating a new one.

KEK versions share the key label and differ in CKA_ID (ASCII decimal "1", "2", ...); the highest
version wraps, every version unwraps. ``key_id()`` is ``"<key_label>/v<version>"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from keyproviders.errors import ProviderConfigError, ProviderKeyNotFoundError
from keyproviders.pkcs11.options import (
    MECHANISM_GCM,
    MECHANISM_KWP,
    RECORD_GCM,
    RECORD_KWP,
    Pkcs11Options,
)

log = logging.getLogger("keyproviders.pkcs11")

KEK_BITS = 256

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


def check_kek_attributes(attrs: Mapping[Attribute, Any], *, what: str) -> None:
    """The rule: a KEK is a token AES-256 key that is sensitive and can never be extracted."""
    problems = []
    if attrs.get(Attribute.KEY_TYPE) != KeyType.AES or attrs.get(Attribute.VALUE_LEN) != KEK_BITS // 8:
        problems.append(f"it is not an AES-256 key (it is {_describe_key(attrs)})")
    if attrs.get(Attribute.SENSITIVE) is not True:
        problems.append("CKA_SENSITIVE is not true")
    if attrs.get(Attribute.EXTRACTABLE) is not False:
        problems.append("CKA_EXTRACTABLE is not false")
    if attrs.get(Attribute.TOKEN) is not True:
        problems.append("it is a session object, not a token object")
    if problems:
        raise ProviderConfigError(
            f"{what} is unfit to be a KEK: {'; '.join(problems)}. Create a new one with 'secretsd hsm create-key' "
            f"under another key_label"
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


def read_attributes(obj: Any, which: tuple[Attribute, ...] = _READ_ATTRIBUTES) -> dict[Attribute, Any]:
    """The attributes the KEK rules look at; one the object's type lacks reads as ``None``.

    A key of another type under our label (a DES3 key has no CKA_VALUE_LEN) must reach the KEK rule
    and be refused by name there, not end in AttributeTypeInvalid.
    """
    attrs: dict[Attribute, Any] = {}
    for attr in which:
        try:
            attrs[attr] = obj[attr]
        except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
            attrs[attr] = None
    return attrs


def _name(enum: Any, value: Any) -> str:
    try:
        return str(enum(value).name)
    except ValueError:
        return f"0x{int(value):x}"


def _describe_key(attrs: Mapping[Attribute, Any]) -> str:
    """'AES-128', 'DES3': what an unfit key is, for the message that refuses it."""
    key_type = attrs.get(Attribute.KEY_TYPE)
    if key_type is None:
        return "of unknown type"
    if key_type == KeyType.AES and isinstance(attrs.get(Attribute.VALUE_LEN), int):
        return f"AES-{attrs[Attribute.VALUE_LEN] * 8}"
    return _name(KeyType, key_type)


def describe_object(obj: Any) -> str:
    """'RSA private key', 'DES3 secret key', 'certificate': what an object under our label is."""
    attrs = read_attributes(obj, (Attribute.CLASS, Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.ID))
    cls = attrs[Attribute.CLASS]
    kind = {ObjectClass.SECRET_KEY: "secret", ObjectClass.PRIVATE_KEY: "private", ObjectClass.PUBLIC_KEY: "public"}
    if cls not in kind:
        return "object of unknown class" if cls is None else _name(ObjectClass, cls).lower().replace("_", " ")
    return f"{_describe_key(attrs)} {kind[cls]} key"


def is_kek_version(obj: Any) -> bool:
    """An AES-256 secret key with a secretsd version CKA_ID: a version of a KEK (its other flags aside)."""
    attrs = read_attributes(obj, (Attribute.CLASS, Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.ID))
    return (attrs[Attribute.CLASS] == ObjectClass.SECRET_KEY and attrs[Attribute.KEY_TYPE] == KeyType.AES
            and attrs[Attribute.VALUE_LEN] == KEK_BITS // 8 and _version_of(attrs[Attribute.ID] or b"") is not None)


@dataclass(frozen=True)
class _Kek:
    version: int
    handle: Any
    attrs: Mapping[Attribute, Any]


def _version_of(cka_id: bytes) -> int | None:
    text = cka_id.decode("ascii", "replace")
    return int(text) if text.isdigit() and text[0] != "0" else None


def _find_keks(session: Any, opts: Pkcs11Options) -> dict[int, _Kek]:
    found: dict[int, _Kek] = {}
    foreign = 0
    for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: opts.key_label})):
        attrs = read_attributes(obj)
        version = _version_of(attrs[Attribute.ID] or b"")
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
        others = [] if foreign else _others_under(session, opts.key_label)
        if others:
            # Not "not found": create-key would refuse the label, so that advice would go round in a circle.
            raise ProviderConfigError(
                f"key {opts.key_label!r} in {opts.where()} is not an AES-256 secret key ({', '.join(others)}): "
                f"set key_label to another name and run 'secretsd hsm create-key', or remove that object"
            )
        extra = f" ({foreign} object(s) have that label but no secretsd version CKA_ID)" if foreign else ""
        raise ProviderKeyNotFoundError(
            f"key {opts.key_label!r} not found in {opts.where()}{extra}: create it with "
            f"'secretsd hsm create-key --config FILE'"
        )
    return found


def _others_under(session: Any, label: str) -> list[str]:
    """What lies under ``label`` when no secret key does (a key pair, a certificate): described, sorted."""
    return sorted({describe_object(obj) for obj in session.get_objects({Attribute.LABEL: label})})


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
