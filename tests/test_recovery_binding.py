"""The recovery key is bound to the keyring (hole H1): a planted public key never captures a term.

Whoever can write the data directory could replace ``recovery-shares.pub`` with their own key and
add a wrapping naming its id to the store; without the binding, the next rotation wrapped the new
term for them. Every test here plants with real files and the real SQLite store, as an attacker would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import secretsd.cli.masterkey  # noqa: F401  (in one process 'token' registers the keyring group first)
from keyproviders import _crypto
from keyproviders.shares import RecoverySharesKeyProvider, public_key_document, recovery_key_id
from secretsd import errors
from secretsd.cli import main
from secretsd.clock import utcnow
from secretsd.custody.crypto import DataKey
from secretsd.custody.keyring import BINDING_PARAM, bind_wrapping, prove_custody
from secretsd.records import KeyringTerm
from secretsd.runtime.config import load_settings
from secretsd.runtime.masterkey import rewrap
from tests.conftest import running

MISMATCH = "recovery-shares.pub does not match the key the keyring was bound to"


def cli(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def init_store(data: Path) -> tuple[str, list[str]]:
    done = cli("init", "--data-dir", str(data), "--recovery-shares", "3", "--recovery-threshold", "2", "--json")
    assert done.exit_code == 0, done.stderr
    doc = json.loads(done.stdout)
    return doc["admin_token"], doc["recovery_shares"]


def wrappings(data: Path) -> dict[int, list[dict[str, Any]]]:
    with sqlite3.connect(data / "secretsd.db") as db:
        return {term: json.loads(raw) for term, raw in db.execute("select term, wrappings from keyring_terms")}


def write_wrappings(data: Path, term: int, wrapped: list[dict[str, Any]]) -> None:
    db = sqlite3.connect(data / "secretsd.db")
    with db:
        db.execute("update keyring_terms set wrappings=? where term=?", (json.dumps(wrapped), term))
    db.close()


def plant(data: Path, *, tag: str | None = None) -> str:
    """/tmp/attackB/rec/plant.py: the attacker's public key file and a wrapping naming its id."""
    private = _crypto.x25519_private_from_secret(secrets.token_bytes(32))
    public = _crypto.x25519_public(private)
    (data / "recovery-shares.pub").write_text(public_key_document(public))
    planted = {"ciphertext": base64.b64encode(b"\0" * 64).decode(), "format": 1, "key_id": recovery_key_id(public),
               "mechanism": "X25519-HKDF-SHA256-AES-256-GCM", "nonce": base64.b64encode(b"\0" * 12).decode(),
               "params": {} if tag is None else {BINDING_PARAM: tag}, "provider": "recovery-shares"}
    write_wrappings(data, 1, [*wrappings(data)[1], planted])
    return recovery_key_id(public)


def make_legacy(data: Path) -> None:
    """What a store written before bindings holds: recovery wrappings with empty params."""
    for term, wrapped in wrappings(data).items():
        write_wrappings(data, term, [{**w, "params": {}} for w in wrapped])


def ids_of(data: Path) -> dict[int, set[str]]:
    return {t: {w["key_id"] for w in ws if w["provider"] == "recovery-shares"} for t, ws in wrappings(data).items()}


async def rotate_refused(data: Path, admin: str) -> str:
    """Start a daemon on ``data``: it serves, shows the recovery provider degraded, refuses to rotate."""
    async with running(load_settings(None, data_dir=data), admin) as api:
        states = {s.kind: s for s in api.daemon.providers.states()}
        resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
        assert 400 <= resp.status < 500 or resp.status == 503, await resp.text()
        assert resp.content_type == "application/problem+json"
        assert len(await api.daemon.storage.keyring_terms()) == 1  # nothing wrapped for the planted key
        assert not states["recovery-shares"].ok
        return states["recovery-shares"].detail


@pytest.mark.parametrize("forged_tag", [None, base64.b64encode(b"\1" * 32).decode()])
def test_planted_recovery_key_is_refused_before_any_term_is_wrapped_for_it(
        tmp_path: Path, forged_tag: str | None) -> None:
    data = tmp_path / "store"
    admin, _shares = init_store(data)
    assert all(BINDING_PARAM in w["params"] for w in wrappings(data)[1] if w["provider"] == "recovery-shares")
    planted = plant(data, tag=forged_tag)
    detail = asyncio.run(rotate_refused(data, admin))
    assert MISMATCH in detail and str(data / "recovery-shares.pub") in detail
    # The offline rotation refuses too, and writes nothing.
    before = wrappings(data)
    with pytest.raises(errors.ProviderKeyMismatch, match=MISMATCH):
        asyncio.run(rewrap(load_settings(None, data_dir=data)))
    assert wrappings(data) == before
    assert planted in ids_of(data)[1] and len(before) == 1


def test_mismatch_is_logged_naming_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "store"
    admin, _shares = init_store(data)
    plant(data)
    asyncio.run(rotate_refused(data, admin))
    assert any(MISMATCH in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_legacy_store_is_bound_on_first_unseal_then_rotates_and_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "store"
    admin, shares = init_store(data)
    make_legacy(data)  # an old store: no binding anywhere
    genuine = ids_of(data)[1]

    async def first_start() -> int:
        async with running(load_settings(None, data_dir=data), admin) as api:
            resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
            assert resp.status == 200, await resp.text()
            return len(await api.daemon.storage.keyring_terms())

    assert asyncio.run(first_start()) == 2
    assert [r for r in caplog.records if "trusted on first use" in r.getMessage()]  # said, for monitoring
    assert ids_of(data) == {1: genuine, 2: genuine}
    for wrapped in wrappings(data).values():  # every recovery wrapping is bound now
        assert all(BINDING_PARAM in w["params"] for w in wrapped if w["provider"] == "recovery-shares")
    # The honest recovery still works: K shares open every term, the new one included.
    (data / "master.key").rename(tmp_path / "master.key.lost")
    done = cli("token", "create-root", "--data-dir", str(data), "--recovery-shares-stdin", "--json",
               stdin="\n".join(shares[:2]) + "\n")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["admin_token"]


def test_legacy_store_once_bound_refuses_a_plant(tmp_path: Path) -> None:
    data = tmp_path / "store"
    admin, _shares = init_store(data)
    make_legacy(data)

    async def start() -> None:
        async with running(load_settings(None, data_dir=data), admin):
            pass

    asyncio.run(start())  # bound here (trust on first use)
    plant(data)
    assert MISMATCH in asyncio.run(rotate_refused(data, admin))


def test_legacy_store_planted_before_the_upgrade_is_refused_and_not_bound(tmp_path: Path) -> None:
    data = tmp_path / "store"
    admin, _shares = init_store(data)
    make_legacy(data)
    planted = plant(data)  # the reproduction's plant: a second recovery key id beside the genuine one
    detail = asyncio.run(rotate_refused(data, admin))
    assert "replaced" in detail
    assert not any(w["params"] for w in wrappings(data)[1] if w["key_id"] == planted)


def test_recovery_key_binding_rule() -> None:
    """prove_custody for a public key: a tag made with the term's DEK over this very public key."""
    genuine = RecoverySharesKeyProvider(RecoverySharesKeyProvider.from_secret(secrets.token_bytes(32)).public_key)
    other = RecoverySharesKeyProvider(RecoverySharesKeyProvider.from_secret(secrets.token_bytes(32)).public_key)
    dek = secrets.token_bytes(32)
    key = DataKey(dek)
    bound = bind_wrapping(genuine, genuine.wrap(dek, b"aad"), key, 1)
    term = KeyringTerm(1, (bound,), utcnow())
    prove_custody(genuine, [term], {1: key})
    for known in (None, {}, {1: DataKey(secrets.token_bytes(32))}):  # no keys, or another term's key
        with pytest.raises(errors.ProviderKeyMismatch):
            prove_custody(genuine, [term], known)
    with pytest.raises(errors.ProviderKeyMismatch):  # the tag is for this term only
        prove_custody(genuine, [KeyringTerm(2, (bound,), utcnow())], {2: key})
    # A tag made with the DEK but over another public key (the genuine one) does not vouch for this one.
    forged = bind_wrapping(genuine, other.wrap(dek, b"aad"), key, 1)
    with pytest.raises(errors.ProviderKeyMismatch):
        prove_custody(other, [KeyringTerm(1, (bound, forged), utcnow())], {1: key})
    # One made with the DEK over this key is what 'keyring migrate' writes for a new recovery key: genuine.
    added = bind_wrapping(other, other.wrap(dek, b"aad"), key, 1)
    prove_custody(other, [KeyringTerm(1, (bound, added), utcnow())], {1: key})
