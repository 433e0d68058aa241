"""Known-answer vectors for every keyproviders construction (tests/data/keyprovider_vectors.json).

The vectors were computed from the code released before the crypto refactor of issue 11 and are
never regenerated: a wrapped key written by that release must keep opening, byte for byte. The
JSON file is for other implementations too (a verifier in another language, a future port); the
field meanings are in docs/architecture.md (keyproviders). Where the standard library can compute
a construction independently (HKDF-Expand with HMAC, scrypt, the SHA-256 key-wrap header), it is
recomputed here from the documented formula, so the documentation is checked as well as the code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from keyproviders import UnwrapError, WrappedKey, _crypto
from keyproviders.env_sealed import EnvSealedKeyProvider, KdfParams, _subkeys, derive_root_key
from keyproviders.file import FILE_FORMAT, FileKeyProvider, _key_id
from keyproviders.pkcs11 import Pkcs11KeyProvider
from softhsm.pytest_plugin import SoftHSMToken

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "keyprovider_vectors.json").read_text())


def _x(text: str) -> bytes:
    return bytes.fromhex(text)


def _hkdf_expand_one_block(prk: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 HKDF-Expand for outputs of at most one SHA-256 block: T(1) = HMAC(PRK, info || 0x01).
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


def test_every_construction_has_vectors() -> None:
    for section in ("file_key_id", "file_wrap", "env_sealed_kdf", "env_sealed_wrap", "pkcs11_kwp_header",
                    "pkcs11_wrap"):
        assert len(VECTORS[section]) >= 2, section


# -- file provider ---------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", VECTORS["file_key_id"], ids=lambda v: v["key_id"])
def test_file_key_id(vector: dict[str, str]) -> None:
    key = _x(vector["key"])
    assert _key_id(key) == vector["key_id"]
    assert vector["key_id"] == "file-" + hashlib.sha256(b"secretsd-file-kek-id\x00" + key).hexdigest()[:16]


@pytest.mark.parametrize("vector", VECTORS["file_wrap"] + VECTORS["env_sealed_wrap"], ids=lambda v: v["nonce"])
def test_aead_seal_and_open(vector: dict[str, Any]) -> None:
    """AES-256-GCM as both providers wrap with it: the vector's ciphertext, byte for byte."""
    kek, nonce, aad, key = (_x(vector[f]) for f in ("kek", "nonce", "aad", "key"))
    assert _crypto.aead_seal(kek, nonce, key, aad) == _x(vector["ciphertext"])
    assert _crypto.aead_open(kek, nonce, _x(vector["ciphertext"]), aad) == key
    with pytest.raises(UnwrapError):
        _crypto.aead_open(kek, nonce, _x(vector["ciphertext"]), aad + b"x")


@pytest.mark.parametrize("vector", VECTORS["file_wrap"], ids=lambda v: v["nonce"])
def test_file_provider_opens_the_vector_records(vector: dict[str, Any], tmp_path: Path) -> None:
    # A key file as the previous release wrote it, holding the vector's KEK.
    path = tmp_path / "master.key"
    kek = _x(vector["kek"])
    doc = {"format": FILE_FORMAT, "active": _key_id(kek),
           "keys": [{"id": _key_id(kek), "key": base64.b64encode(kek).decode()}]}
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    provider = FileKeyProvider.load(path)
    record = WrappedKey.from_dict(vector["record"])
    assert (record.nonce, record.ciphertext) == (_x(vector["nonce"]), _x(vector["ciphertext"]))
    assert record.key_id == provider.key_id()
    assert provider.unwrap(record, _x(vector["aad"])) == _x(vector["key"])


# -- env-sealed provider ---------------------------------------------------------------------------
def _params(vector: dict[str, Any]) -> KdfParams:
    record = vector["params"]
    # Built directly rather than with from_record: the scrypt vector's cost is below the bound a
    # provider accepts from a record (it exists to check the derivation, not to be a real KEK).
    cost = {k: v for k, v in record.items() if k not in ("scheme", "kdf", "salt")}
    return KdfParams(kdf=record["kdf"], salt=_x(vector["salt"]), **cost)


@pytest.mark.parametrize("vector", VECTORS["env_sealed_kdf"], ids=lambda v: v["key_id"])
def test_env_sealed_kdf(vector: dict[str, Any]) -> None:
    params = _params(vector)
    assert params.to_record() == vector["params"]
    root = derive_root_key(_x(vector["passphrase"]), params)
    assert root == _x(vector["root"])
    assert _subkeys(root) == (_x(vector["kek"]), vector["key_id"])
    assert _crypto.hkdf_expand(root, b"secretsd env-sealed v1 aes-256-gcm kek", 32) == _x(vector["kek"])


@pytest.mark.parametrize("vector", VECTORS["env_sealed_kdf"], ids=lambda v: v["key_id"])
def test_env_sealed_derivation_is_the_documented_formula(vector: dict[str, Any]) -> None:
    root = _x(vector["root"])
    assert _hkdf_expand_one_block(root, b"secretsd env-sealed v1 aes-256-gcm kek", 32) == _x(vector["kek"])
    kid = _hkdf_expand_one_block(root, b"secretsd env-sealed v1 key id", 8).hex()
    assert vector["key_id"] == "env-sealed-" + kid
    params = _params(vector)
    if params.kdf == "scrypt":  # the standard library has scrypt (not Argon2id)
        assert hashlib.scrypt(_x(vector["passphrase"]), salt=params.salt, n=params.n, r=params.r,
                              p=params.p, dklen=32) == root


@pytest.mark.parametrize("vector", VECTORS["env_sealed_wrap"], ids=lambda v: v["nonce"])
def test_env_sealed_provider_opens_the_vector_records(vector: dict[str, Any]) -> None:
    provider = EnvSealedKeyProvider(_x(vector["passphrase"]), passphrase_env="KAT_PASSPHRASE",
                                    memory_kib=19 * 1024, iterations=2, lanes=1)
    try:
        record = WrappedKey.from_dict(vector["record"])
        assert (record.nonce, record.ciphertext) == (_x(vector["nonce"]), _x(vector["ciphertext"]))
        assert record.key_id == vector["key_id"]
        assert provider.unwrap(record, _x(vector["aad"])) == _x(vector["key"])
    finally:
        provider.close()


# -- pkcs11 key-wrap header --------------------------------------------------------------------------
@pytest.mark.parametrize("vector", VECTORS["pkcs11_kwp_header"], ids=lambda v: v["nonce"])
def test_pkcs11_kwp_header(vector: dict[str, str]) -> None:
    nonce, aad = _x(vector["nonce"]), _x(vector["aad"])
    assert _crypto.kwp_header(nonce, aad) == _x(vector["header"])
    documented = hashlib.sha256(b"secretsd/pkcs11/kwp-aad/v1\x00" + bytes([len(nonce)]) + nonce + aad).digest()
    assert documented == _x(vector["header"])


# -- pkcs11 wrapped keys -----------------------------------------------------------------------------
def _standard_unwrap(vector: dict[str, Any], ciphertext: bytes, nonce: bytes, aad: bytes) -> bytes:
    """What a verifier with any AES library does: GCM, or RFC 5649 key wrap and the header check."""
    kek = _x(vector["kek"])
    if vector["mechanism"] == "CKM_AES_GCM":
        return _crypto.aead_open(kek, nonce, ciphertext, aad)
    assert vector["mechanism"] == "CKM_AES_KEY_WRAP_PAD+sha256-aad-v1"
    plaintext = aes_key_unwrap_with_padding(kek, ciphertext)
    header = _crypto.kwp_header(nonce, aad)
    assert plaintext[: len(header)] == header
    return plaintext[len(header) :]


@pytest.mark.parametrize("vector", VECTORS["pkcs11_wrap"], ids=lambda v: f"{v['mechanism']}-{v['nonce']}")
def test_pkcs11_records_are_the_standard_constructions(vector: dict[str, Any]) -> None:
    record = WrappedKey.from_dict(vector["record"])
    assert (record.nonce, record.ciphertext) == (_x(vector["nonce"]), _x(vector["ciphertext"]))
    assert _standard_unwrap(vector, record.ciphertext, record.nonce, _x(vector["aad"])) == _x(vector["key"])


# A KEK with a known value, imported (CKA_LOCAL false) the way test_keyprovider_pkcs11 imports one: in
# another process, so this process's library state is not disturbed.
_IMPORT_KEK = """
import sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
module, label, pin, key_label, value, mechanism = sys.argv[1:7]
gcm = mechanism == "CKM_AES_GCM"
with pkcs11.lib(module).get_token(token_label=label).open(rw=True, user_pin=pin) as session:
    session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: bytes.fromhex(value), Attribute.LABEL: key_label, Attribute.ID: b"1",
        Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: gcm, Attribute.DECRYPT: gcm,
        Attribute.WRAP: not gcm, Attribute.UNWRAP: not gcm,
    })
"""


def test_pkcs11_provider_opens_the_vector_records_and_writes_the_same_construction(
    softhsm_removable_token: tuple[SoftHSMToken, Path], tmp_path: Path
) -> None:
    token, _ = softhsm_removable_token
    for label in sorted({v["key_label"] for v in VECTORS["pkcs11_wrap"]}):
        vectors = [v for v in VECTORS["pkcs11_wrap"] if v["key_label"] == label]
        first = vectors[0]
        subprocess.run([sys.executable, "-c", _IMPORT_KEK, token.module, token.label, token.user_pin, label,
                        first["kek"], first["mechanism"]], check=True, capture_output=True)
        mechanism = "aes-gcm" if first["mechanism"] == "CKM_AES_GCM" else "aes-key-wrap-pad"
        options = {**token.provider_options(label, mechanism), "allow_imported_keys": True}
        provider = Pkcs11KeyProvider.from_config(options, base_dir=tmp_path)
        try:
            for vector in vectors:
                aad = _x(vector["aad"])
                assert provider.unwrap(WrappedKey.from_dict(vector["record"]), aad) == _x(vector["key"])
                # The other direction: what the provider writes today opens with the standard construction.
                fresh = provider.wrap(_x(vector["key"]), aad)
                assert (fresh.mechanism, fresh.key_id) == (vector["mechanism"], vector["key_id"])
                assert _standard_unwrap(vector, fresh.ciphertext, fresh.nonce, aad) == _x(vector["key"])
        finally:
            provider.close()
