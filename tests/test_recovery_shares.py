"""Recovery shares (issue 14 item 5): a recovery key split among operators, K of N unseal.

The drill runs on real SoftHSM2 tokens: init with 5 shares, threshold 3; the token is deleted; 3
shares mint a root token offline and migrate the keyring to a key in another token; a daemon on
the new token serves every value. The refusals (too few shares, a changed word, another store's
shares, a replaced public key) and the rules (1 < K <= N <= 16; a key file beside the daemon is
warned about) are checked in process on the file provider, where the HSM is not the point.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import secretsd.cli.masterkey  # noqa: F401  (in one process 'token' registers the keyring group first)
from keyproviders import KeyProvider
from keyproviders.pkcs11 import create_key
from keyproviders.shares import RecoverySharesKeyProvider, combine_shares, split_new_secret
from keyproviders.testing import KeyProviderConformance
from secretsd import errors
from secretsd.cli import main
from secretsd.custody.keyring import prove_custody
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import build_storage
from softhsm.pytest_plugin import SoftHSMKek, SoftHSMToken
from tests.conftest import running

VALUES = {f"app/{n}": f"recoverable-{n}" for n in range(6)}


def cli(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def write_config(path: Path, data_dir: Path, provider: dict[str, Any], extra: str = "") -> Path:
    lines = [f"data_dir = {json.dumps(str(data_dir))}", "[key_provider]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in provider.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def init_with_shares(*args: str, n: int = 5, k: int = 3) -> tuple[str, list[str]]:
    done = cli("init", *args, "--recovery-shares", str(n), "--recovery-threshold", str(k), "--json")
    assert done.exit_code == 0, done.stderr
    doc = json.loads(done.stdout)
    assert len(doc["recovery_shares"]) == n and doc["recovery_threshold"] == k
    return doc["admin_token"], doc["recovery_shares"]


def token_count(config: Path) -> int:
    async def count() -> int:
        storage = build_storage(load_settings(config))
        await storage.open()
        try:
            return len(await storage.list_tokens())
        finally:
            await storage.close()

    return asyncio.run(count())


def changed_word(share: str, position: int = 10) -> str:
    words = share.split()
    words[position] = "academic" if words[position] != "academic" else "acid"
    return " ".join(words)


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


def assert_nowhere(shares: list[str], places: list[bytes]) -> None:
    """No share, nor any run of six of its words (a share's value), appears in any of ``places``."""
    for share in shares:
        words = share.split()
        runs = [" ".join(words[i:i + 6]).encode() for i in range(4, len(words) - 6, 6)]
        for blob in places:
            assert share.encode() not in blob
            assert not any(run in blob for run in runs)


# -- the drill, on real SoftHSM2 tokens ------------------------------------------------------------------
def test_hsm_lost_three_of_five_shares_create_root_and_migrate_to_a_new_token(
        softhsm_removable_token: tuple[SoftHSMToken, Path], make_softhsm_kek: Callable[..., SoftHSMKek],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token, token_dir = softhsm_removable_token
    old_options = {"kind": "pkcs11", **token.provider_options("lost-kek")}
    create_key(token.provider_options("lost-kek"), base_dir=tmp_path)
    data = tmp_path / "data"
    old = write_config(tmp_path / "old.toml", data, old_options)
    admin, shares = init_with_shares("--config", str(old))
    outputs: list[bytes] = []

    async def populate() -> None:
        async with running(load_settings(old), admin) as api:
            for path, value in VALUES.items():
                await api.put(path, value)
            # The daemon holds only the recovery key's public half, yet wraps a new term for it.
            resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
            assert resp.status == 200, await resp.text()
            await api.put("app/after-rekey", "term-2")

    asyncio.run(populate())
    shutil.rmtree(token_dir)  # the HSM is lost

    tokens_before = token_count(old)
    no_shares = cli("token", "create-root", "--config", str(old), "--json")
    assert no_shares.exit_code != 0
    two = cli("token", "create-root", "--config", str(old), "--recovery-shares-stdin", "--json",
              stdin="\n".join(shares[:2]) + "\n")
    assert two.exit_code == 1 and "3 recovery shares are needed; 2 given" in two.stderr, two.stderr
    assert len(two.stderr.strip().splitlines()) == 1
    assert token_count(old) == tokens_before  # fewer than K shares created nothing

    created = cli("token", "create-root", "--config", str(old), "--recovery-shares-stdin", "--json",
                  stdin="\n".join([shares[4], shares[1], shares[3]]) + "\n")
    assert created.exit_code == 0, created.stderr
    new_admin = json.loads(created.stdout)["admin_token"]
    assert json.loads(created.stdout)["providers"] == ["recovery-shares"]
    assert token_count(old) == tokens_before + 1

    kek = make_softhsm_kek()  # a key in another token: the new HSM
    new = write_config(tmp_path / "new.toml", data, {"kind": "pkcs11", **kek.options})
    share_files = []
    for number in (0, 2, 4):
        path = tmp_path / f"share-{number}.txt"
        path.write_text(shares[number] + "\n")
        share_files += ["--share-file", str(path)]
    migrated = cli("keyring", "migrate", "--config", str(old), "--to-config", str(new), *share_files, "--json")
    assert migrated.exit_code == 0, migrated.stderr
    report = json.loads(migrated.stdout)
    assert report["terms"] == 2 and set(report["providers"]) == {"pkcs11", "recovery-shares"}
    outputs += [created.stdout.encode(), created.stderr.encode(), migrated.stdout.encode(), migrated.stderr.encode()]
    for path in tmp_path.glob("share-*.txt"):
        path.unlink()  # the operators take their shares home

    async def serve_on_new_token() -> None:
        async with running(load_settings(new), new_admin) as api:
            for path, value in VALUES.items():
                assert (await api.get(path))["value"] == value
            assert (await api.get("app/after-rekey"))["value"] == "term-2"
            resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
            assert resp.status == 200, await resp.text()
            terms = await api.daemon.storage.keyring_terms()
            for term in terms:  # the lost token's wrappings are gone; the recovery key still covers all
                assert {w.provider for w in term.wrappings} == {"pkcs11", "recovery-shares"}
                assert all(w.key_id != "lost-kek" and "lost-kek" not in w.key_id for w in term.wrappings)

    asyncio.run(serve_on_new_token())
    # Shares appear nowhere: not in the store, the audit log, the logs or the commands' other output.
    places = [p.read_bytes() for p in files_under(tmp_path)] + outputs + [caplog.text.encode()]
    assert_nowhere(shares, places)


# -- refusals, in process on the file provider ---------------------------------------------------------
@pytest.fixture
def shared_store(tmp_path: Path) -> tuple[Path, str, list[str]]:
    data = tmp_path / "store"
    admin, shares = init_with_shares("--data-dir", str(data))
    return data, admin, shares


def lose_key_file(data: Path) -> None:
    (data / "master.key").rename(data.parent / "master.key.lost")


def create_root(data: Path, lines: list[str]) -> Result:
    return cli("token", "create-root", "--data-dir", str(data), "--recovery-shares-stdin", "--json",
               stdin="\n".join(lines) + "\n")


def test_any_three_of_five_shares_recover_the_same_key(shared_store: tuple[Path, str, list[str]]) -> None:
    data, _admin, shares = shared_store
    public = json.loads((data / "recovery-shares.pub").read_text())["key_id"]
    for chosen in itertools.combinations(shares, 3):
        assert RecoverySharesKeyProvider.from_shares(list(chosen)).key_id() == public
    lose_key_file(data)
    assert create_root(data, [shares[0], shares[2], shares[3]]).exit_code == 0


def test_a_changed_word_is_refused_by_the_checksum(shared_store: tuple[Path, str, list[str]]) -> None:
    data, _admin, shares = shared_store
    lose_key_file(data)
    refused = create_root(data, [shares[0], changed_word(shares[1]), shares[2]])
    assert refused.exit_code == 1
    assert "recovery share 2 is not a valid share" in refused.stderr and "checksum" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert_nowhere(shares, [refused.stderr.encode(), refused.stdout.encode()])


def test_another_stores_shares_are_refused(shared_store: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    data, _admin, shares = shared_store
    _other_admin, foreign = init_with_shares("--data-dir", str(tmp_path / "other"))
    tokens_before = token_count_dir(data)
    whole_set = create_root(data, foreign[:3])
    assert whole_set.exit_code == 1 and "another store" in whole_set.stderr, whole_set.stderr
    mixed = create_root(data, [shares[0], shares[1], foreign[2]])
    assert mixed.exit_code == 1 and "different sets" in mixed.stderr, mixed.stderr
    lose_key_file(data)  # the data directory's public key file lost too: the wrappings still refuse them
    (data / "recovery-shares.pub").unlink()
    lost = create_root(data, foreign[:3])
    assert lost.exit_code == 1 and "another store" in lost.stderr, lost.stderr
    assert token_count_dir(data) == tokens_before
    assert not (data / "recovery-shares.pub").exists()  # foreign shares never become the store's key


def test_a_deleted_public_key_file_stops_rekeys_until_the_shares_put_it_back(
        shared_store: tuple[Path, str, list[str]]) -> None:
    data, admin, shares = shared_store
    public = (data / "recovery-shares.pub").read_text()
    (data / "recovery-shares.pub").unlink()

    async def rotate() -> tuple[int, str, list[set[str]]]:
        async with running(load_settings(None, data_dir=data), admin) as api:
            resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
            terms = await api.daemon.storage.keyring_terms()
            return resp.status, await resp.text(), [{w.provider for w in t.wrappings} for t in terms]

    status, body, wrapped = asyncio.run(rotate())
    assert status == 503 and "recovery-shares" in body  # refused: the recovery path never lapses silently
    assert wrapped == [{"file", "recovery-shares"}]
    assert create_root(data, shares[2:]).exit_code == 0
    assert (data / "recovery-shares.pub").read_text() == public
    status, body, wrapped = asyncio.run(rotate())
    assert status == 200, body
    assert wrapped == [{"file", "recovery-shares"}] * 2


def token_count_dir(data: Path) -> int:
    async def count() -> int:
        storage = build_storage(load_settings(None, data_dir=data))
        await storage.open()
        try:
            return len(await storage.list_tokens())
        finally:
            await storage.close()

    return asyncio.run(count())


@pytest.mark.parametrize("args", [
    ("--recovery-shares", "1", "--recovery-threshold", "1"),
    ("--recovery-shares", "5", "--recovery-threshold", "1"),
    ("--recovery-shares", "3", "--recovery-threshold", "4"),
    ("--recovery-shares", "17", "--recovery-threshold", "3"),
    ("--recovery-shares", "5"),
    ("--recovery-threshold", "3"),
])
def test_recovery_split_rule_one_line_exit_2(args: tuple[str, ...], tmp_path: Path) -> None:
    done = cli("init", "--data-dir", str(tmp_path / "d"), *args, "--json")
    assert done.exit_code == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""
    assert not (tmp_path / "d").exists()  # nothing was created


def test_init_on_an_initialised_store_leaves_no_recovery_key_behind(tmp_path: Path) -> None:
    data = tmp_path / "d"
    assert cli("init", "--data-dir", str(data)).exit_code == 0
    again = cli("init", "--data-dir", str(data), "--recovery-shares", "3", "--recovery-threshold", "2")
    assert again.exit_code == 1 and "already initialised" in again.stderr
    assert not (data / "recovery-shares.pub").exists()


def test_wrap_only_provider_proves_custody_by_its_public_key_id(
        shared_store: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    data, admin, _shares = shared_store
    _other, foreign = init_with_shares("--data-dir", str(tmp_path / "attacker"))
    # A replaced public key file would capture every new term for whoever holds its shares.
    shutil.copy(tmp_path / "attacker" / "recovery-shares.pub", data / "recovery-shares.pub")

    async def rekey() -> None:
        settings = load_settings(None, data_dir=data)
        async with running(settings, admin) as api:
            states = {s.kind: s for s in api.daemon.providers.states()}
            assert not states["recovery-shares"].ok and "replaced" in states["recovery-shares"].detail
            resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
            assert resp.status >= 400 and resp.status != 500
            terms = await api.daemon.storage.keyring_terms()
            assert len(terms) == 1  # nothing was wrapped for the planted key

    asyncio.run(rekey())
    del foreign


def test_prove_custody_rule_for_a_public_key_only_provider() -> None:
    genuine = RecoverySharesKeyProvider.from_secret(secrets.token_bytes(32))
    planted = RecoverySharesKeyProvider.from_secret(secrets.token_bytes(32))
    public_only = RecoverySharesKeyProvider(genuine.public_key)
    from secretsd.clock import utcnow
    from secretsd.records import KeyringTerm

    term = KeyringTerm(1, (public_only.wrap(secrets.token_bytes(32), b"x"),), utcnow())
    prove_custody(public_only, [term])  # the stored wrapping names this very public key
    with pytest.raises(errors.ProviderKeyMismatch):
        prove_custody(RecoverySharesKeyProvider(planted.public_key), [term])


def test_daemon_without_the_shares_cannot_unwrap_and_says_how(shared_store: tuple[Path, str, list[str]]) -> None:
    data, _admin, _shares = shared_store
    lose_key_file(data)
    refused = cli("token", "create-root", "--data-dir", str(data), "--json")
    assert refused.exit_code == 1 and "held only as shares" in refused.stderr, refused.stderr


def test_file_recovery_provider_on_daemon_host_is_warned(tmp_path: Path) -> None:
    data = tmp_path / "d"
    config = write_config(tmp_path / "c.toml", data, {"kind": "file"},
                          extra=f'[[recovery_providers]]\nkind = "file"\npath = "{tmp_path / "recovery.key"}"\n')
    done = cli("init", "--config", str(config))
    assert done.exit_code == 0, done.stderr
    assert "warning: recovery key file" in done.stderr and "same filesystem" in done.stderr
    plain = cli("init", "--data-dir", str(tmp_path / "plain"))
    assert "warning" not in plain.stderr


def test_hsm_doctor_warns_about_a_file_recovery_provider(softhsm_kek: SoftHSMKek, tmp_path: Path) -> None:
    config = write_config(tmp_path / "hsm.toml", tmp_path / "d", {"kind": "pkcs11", **softhsm_kek.options},
                          extra=f'[[recovery_providers]]\nkind = "file"\npath = "{tmp_path / "r.key"}"\n')
    done = cli("hsm", "doctor", "--config", str(config), "--json")
    rows = json.loads(done.stdout)
    warned = [r for r in rows if r["check"] == "recovery provider"]
    assert warned and warned[0]["status"] == "warn" and "--recovery-shares" in warned[0]["detail"]


def test_share_options_never_take_a_share_on_the_command_line() -> None:
    # A share in argv is visible to every user through ps: the options are flags and file paths only.
    for command in (["token", "create-root"], ["keyring", "migrate"]):
        done = cli(*command, "--help")
        assert "--recovery-shares-stdin" in done.stdout and "--share-file" in done.stdout
    refused = cli("token", "create-root", "--data-dir", "/nonexistent", "--recovery-shares", "word " * 33)
    assert refused.exit_code == 2


def test_split_and_combine_use_slip39_word_lists() -> None:
    secret, shares = split_new_secret(4, 2)
    assert all(len(share.split()) == 33 for share in shares)
    assert combine_shares([shares[3], shares[1]]) == secret
    with pytest.raises(Exception, match="the same recovery share was given twice"):
        combine_shares([shares[0], shares[0]])


class TestRecoverySharesProviderConformance(KeyProviderConformance):
    supports_rotation = False  # a new recovery key means new shares for every operator

    @pytest.fixture
    def provider(self) -> Iterator[KeyProvider]:
        p = RecoverySharesKeyProvider.from_secret(secrets.token_bytes(32))
        yield p
        p.close()

    @pytest.fixture
    def impostor(self) -> Iterator[KeyProvider]:
        p = RecoverySharesKeyProvider.from_secret(secrets.token_bytes(32))
        yield p
        p.close()


def test_shares_typed_at_the_prompt_are_not_echoed(shared_store: tuple[Path, str, list[str]]) -> None:
    data, _admin, shares = shared_store
    lose_key_file(data)
    typed = cli("token", "create-root", "--data-dir", str(data), "--recovery-shares", "--json",
                stdin="\n".join([shares[1], shares[4], shares[0]]) + "\n")
    assert typed.exit_code == 0, typed.stderr
    assert "Recovery share 2 of 3" in typed.stderr  # asked for as many as the set needs
    assert_nowhere(shares, [typed.stdout.encode(), typed.stderr.encode()])
    both = cli("token", "create-root", "--data-dir", str(data), "--recovery-shares", "--recovery-shares-stdin")
    assert both.exit_code == 2


# -- recovery split: shares for an existing store, or new ones ------------------------------------------
def split(data: Path, n: int = 3, k: int = 2) -> dict[str, Any]:
    done = cli("recovery", "split", "--data-dir", str(data), "--recovery-shares", str(n),
               "--recovery-threshold", str(k), "--json")
    assert done.exit_code == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_recovery_split_adds_shares_to_a_store_made_without_them(tmp_path: Path) -> None:
    data = tmp_path / "plain"
    admin = json.loads(cli("init", "--data-dir", str(data), "--json").stdout)["admin_token"]

    async def rekey() -> None:
        async with running(load_settings(None, data_dir=data), admin) as api:
            await api.put("app/x", "before")
            assert (await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())).status == 200

    asyncio.run(rekey())
    made = split(data)
    assert made["replaced_key_id"] is None and len(made["recovery_shares"]) == 3
    lose_key_file(data)
    assert create_root(data, made["recovery_shares"][1:]).exit_code == 0


def test_recovery_split_replaces_the_old_shares(shared_store: tuple[Path, str, list[str]]) -> None:
    data, _admin, old = shared_store
    before = json.loads(cli_pub(data))["key_id"]
    made = split(data)
    assert made["replaced_key_id"] == before != made["recovery_key_id"]
    assert json.loads(cli_pub(data))["key_id"] == made["recovery_key_id"]
    lose_key_file(data)
    stale = create_root(data, old[:3])
    assert stale.exit_code == 1 and "re-split" in stale.stderr, stale.stderr
    assert create_root(data, made["recovery_shares"][:2]).exit_code == 0


def cli_pub(data: Path) -> str:
    return (data / "recovery-shares.pub").read_text()


def test_recovery_split_interrupted_after_showing_the_shares_leaves_both_sets_working(
        shared_store: tuple[Path, str, list[str]]) -> None:
    from secretsd.runtime.recovery import Split, split_recovery_key

    data, _admin, old = shared_store
    shown: list[Split] = []

    def crash(split: Split) -> None:
        shown.append(split)
        raise KeyboardInterrupt  # the operator's terminal dies right after the shares were printed

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(split_recovery_key(load_settings(None, data_dir=data), 3, 2, crash))
    lose_key_file(data)
    assert create_root(data, old[:3]).exit_code == 0  # the old shares still open every term
    new = RecoverySharesKeyProvider.from_shares(shown[0].shares[:2])

    async def opens_with_new_shares() -> None:
        storage = build_storage(load_settings(None, data_dir=data))
        await storage.open()
        try:
            for term in await storage.keyring_terms():
                prove_custody(new, [term])  # unwraps the new key's wrapping of each term
        finally:
            await storage.close()

    asyncio.run(opens_with_new_shares())


def test_recovery_wrapping_known_answer() -> None:
    # Pins the construction (HKDF label, ECIES KDF binding, AES-256-GCM): a store wrapped by this
    # release must open with every later one, given the same shares.
    from keyproviders import WrappedKey

    holder = RecoverySharesKeyProvider.from_secret(bytes(range(32)))
    assert holder.public_key.hex() == "3bf9ecdd560f873d98b673a26318fb353fb151d3f99023b2532fb5ba87696c5a"
    assert holder.key_id() == "shares-7fd85b0ca0cf7525"
    record = WrappedKey.from_json(
        '{"ciphertext":"XswaomoVdsucraru7nawGAENhzXMGCQX4WOUPuCxV1jQKX5z33ZYhSKLWuduGND1lYkG539Mah/XJ4LCh54dOO4N9FNKeQk9'
        'rUS+jJKl/Z8=","format":1,"key_id":"shares-7fd85b0ca0cf7525","mechanism":"X25519-HKDF-SHA256-AES-256-GCM",'
        '"nonce":"5vUEAn3p+b9rnAhy","params":{},"provider":"recovery-shares"}')
    assert holder.unwrap(record, b"secretsd:dek:term=1") == bytes(range(100, 132))
