"""Backup drill (b), issue 14: the HSM token AND the data directory are lost; a backup and K of N
recovery shares bring the store back on a new token.

Real SoftHSM2 tokens (the softhsm plugin's fixtures), the real CLI commands (in process), a real
daemon process on the new token at the end. The backup carries the keyring terms wrapped for the
recovery key but not ``recovery-shares.pub`` (that lived in the lost data directory): ``backup
restore`` takes the shares itself, unwraps with them and writes the public file back, so the
operator needs nothing but the backup file, K operators and a new token. Fewer than K shares are
refused at each step, before anything is written.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import secretsd.cli.masterkey  # noqa: F401  (in one process 'token' registers the keyring group first)
from keyproviders.pkcs11 import create_key
from secretsd.cli import main
from secretsd.runtime.config import load_settings
from softhsm.pytest_plugin import SoftHSMKek, SoftHSMToken
from tests.conftest import running
from tests.helpers import DaemonProcess, http

VALUES = {f"app/{n}": f"hsm-and-disk-lost-{n}" for n in range(6)}


def cli(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def write_config(path: Path, data_dir: Path, provider: dict[str, Any]) -> Path:
    lines = [f"data_dir = {json.dumps(str(data_dir))}", "[key_provider]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in provider.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.e2e
def test_hsm_and_data_directory_lost_restore_with_three_of_five_shares_onto_a_new_token(
        softhsm_removable_token: tuple[SoftHSMToken, Path], make_softhsm_kek: Callable[..., SoftHSMKek],
        tmp_path: Path) -> None:
    token, token_dir = softhsm_removable_token
    old_options = {"kind": "pkcs11", **token.provider_options("lost-kek")}
    create_key(token.provider_options("lost-kek"), base_dir=tmp_path)
    data = tmp_path / "data"
    old = write_config(tmp_path / "old.toml", data, old_options)
    done = cli("init", "--config", str(old), "--recovery-shares", "5", "--recovery-threshold", "3", "--json")
    assert done.exit_code == 0, done.stderr
    admin, shares = json.loads(done.stdout)["admin_token"], json.loads(done.stdout)["recovery_shares"]

    async def populate() -> None:
        async with running(load_settings(old), admin) as api:
            for path, value in VALUES.items():
                await api.put(path, value)
            resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
            assert resp.status == 200, await resp.text()
            await api.put("app/after-rekey", "term-2")

    asyncio.run(populate())
    backup = tmp_path / "offsite.sdbk"
    made = cli("backup", "create", "--out", str(backup), "--config", str(old), "--json")
    assert made.exit_code == 0, made.stderr
    manifest = json.loads(made.stdout)

    # Both are lost: the token and the whole data directory (recovery-shares.pub with it).
    shutil.rmtree(token_dir)
    shutil.rmtree(data)

    # 1. Restore into a fresh data directory, with the old (lost) token's configuration.
    fresh = tmp_path / "fresh"
    lost = write_config(tmp_path / "lost.toml", fresh, old_options)
    no_shares = cli("backup", "restore", str(backup), "--config", str(lost))
    assert no_shares.exit_code != 0 and len(no_shares.stderr.strip().splitlines()) == 1, no_shares.stderr
    assert not fresh.exists()  # nothing written
    two = cli("backup", "restore", str(backup), "--config", str(lost), "--recovery-shares-stdin",
              stdin="\n".join(shares[:2]) + "\n")
    assert two.exit_code == 1 and "3 recovery shares are needed; 2 given" in two.stderr, two.stderr
    assert not fresh.exists()
    restored = cli("backup", "restore", str(backup), "--config", str(lost), "--recovery-shares-stdin", "--json",
                   stdin="\n".join([shares[3], shares[0], shares[4]]) + "\n")
    assert restored.exit_code == 0, restored.stderr
    report = json.loads(restored.stdout)
    assert report["manifest_sha256"] == manifest["manifest_sha256"] and report["terms_unwrapped"] == 2
    assert (fresh / "recovery-shares.pub").exists()  # written back: new terms stay covered by the shares

    # 2. A new admin token offline (the backup's tokens came back too; this one proves the shares).
    few = cli("token", "create-root", "--config", str(lost), "--recovery-shares-stdin", "--json",
              stdin="\n".join(shares[2:4]) + "\n")
    assert few.exit_code == 1 and "3 recovery shares are needed; 2 given" in few.stderr, few.stderr
    created = cli("token", "create-root", "--config", str(lost), "--recovery-shares-stdin", "--json",
                  stdin="\n".join(shares[1:4]) + "\n")
    assert created.exit_code == 0, created.stderr
    new_admin = json.loads(created.stdout)["admin_token"]

    # 3. A new token and key; the keyring moves there (the shares open it, the lost token is dropped).
    kek = make_softhsm_kek()
    new = write_config(tmp_path / "new.toml", fresh, {"kind": "pkcs11", **kek.options})
    two_files = []
    for number in (0, 2):
        path = tmp_path / f"share-{number}.txt"
        path.write_text(shares[number] + "\n")
        two_files += ["--share-file", str(path)]
    refused = cli("keyring", "migrate", "--config", str(lost), "--to-config", str(new), *two_files, "--json")
    assert refused.exit_code == 1 and "3 recovery shares are needed; 2 given" in refused.stderr, refused.stderr
    path = tmp_path / "share-4.txt"
    path.write_text(shares[4] + "\n")
    migrated = cli("keyring", "migrate", "--config", str(lost), "--to-config", str(new), *two_files,
                   "--share-file", str(path), "--json")
    assert migrated.exit_code == 0, migrated.stderr
    assert json.loads(migrated.stdout)["terms"] == 2
    for share_file in tmp_path.glob("share-*.txt"):
        share_file.unlink()

    # 4. A daemon on the new token serves every value, to the new admin and to the restored one.
    daemon = DaemonProcess(fresh, extra_args=["--config", str(new)]).start()
    try:
        for who in (new_admin, admin):
            for path_name, value in VALUES.items():
                got = http("GET", f"{daemon.url}/v1/secrets/{path_name}", token=who)
                assert got.status == 200 and got.body["value"] == value, got.body
            assert http("GET", f"{daemon.url}/v1/secrets/app/after-rekey", token=who).body["value"] == "term-2"
        status = http("GET", f"{daemon.url}/v1/sys/status", token=new_admin).body
        assert status["sealed"] is False and status["active_term"] == 2
        # A rekey on the new token still wraps for the recovery key (the public file came back).
        assert http("POST", f"{daemon.url}/v1/sys/keyring/rotate", token=new_admin).status == 200
    finally:
        daemon.stop()
    verified = cli("audit", "verify", "--config", str(new))
    assert verified.exit_code == 0, verified.output


def test_a_restore_with_another_stores_shares_writes_nothing(tmp_path: Path) -> None:
    """In process on the file provider (the HSM is not the point): shares of another store give a
    key that opens none of the backup's terms, so the file is refused before the target exists."""
    def init(data: Path) -> list[str]:
        done = cli("init", "--data-dir", str(data), "--recovery-shares", "3", "--recovery-threshold", "2", "--json")
        assert done.exit_code == 0, done.stderr
        return list(json.loads(done.stdout)["recovery_shares"])

    init(tmp_path / "a")
    other = init(tmp_path / "b")
    backup = tmp_path / "a.sdbk"
    assert cli("backup", "create", "--out", str(backup), "--data-dir", str(tmp_path / "a")).exit_code == 0
    fresh = tmp_path / "fresh"
    refused = cli("backup", "restore", str(backup), "--data-dir", str(fresh), "--recovery-shares-stdin",
                  stdin="\n".join(other[:2]) + "\n")
    assert refused.exit_code == 9, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not fresh.exists()
