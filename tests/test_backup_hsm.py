"""Backup drill (a) with the master key in a real SoftHSM2 token: the data directory is lost, the token is
not; the restored store serves every value. A backup checked against another HSM key is refused (exit 9)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from secretsd.cli import main
from secretsd.cli.exits import Exit
from secretsd.runtime.config import load_settings
from softhsm.pytest_plugin import SoftHSMKek
from tests.conftest import running


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_config(path: Path, data_dir: Path, provider: dict[str, Any]) -> Path:
    lines = [f"data_dir = {json.dumps(str(data_dir))}", "[key_provider]", 'kind = "pkcs11"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in provider.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


VALUES = {f"db/{n}": f"hsm-protected-{n}" for n in range(8)}


def test_data_directory_lost_restored_with_the_same_softhsm_token(
        make_softhsm_kek: Callable[..., SoftHSMKek], tmp_path: Path) -> None:
    kek = make_softhsm_kek()
    data = tmp_path / "data"
    config = write_config(tmp_path / "hsm.toml", data, kek.options)

    async def populate() -> str:
        async with running(load_settings(config)) as api:
            for path, value in VALUES.items():
                await api.put(path, value)
            resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
            assert resp.status == 200
            await api.put("db/after-rekey", "term-2")
            return api.admin

    admin = asyncio.run(populate())
    backup = tmp_path / "hsm.sdbk"
    made = cli("backup", "create", "--out", str(backup), "--config", str(config), "--json")
    assert made.exit_code == 0, made.stderr
    shutil.rmtree(data)  # the disk is gone; the token stays

    other = write_config(tmp_path / "other.toml", tmp_path / "other", make_softhsm_kek().options)
    wrong = cli("backup", "verify", str(backup), "--config", str(other))
    assert wrong.exit_code == Exit.NO_KEY, wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1

    assert cli("backup", "verify", str(backup), "--config", str(config)).exit_code == 0
    restored = cli("backup", "restore", str(backup), "--config", str(config), "--json")
    assert restored.exit_code == 0, restored.stderr
    assert json.loads(restored.stdout)["terms_unwrapped"] == 2

    async def read_back() -> None:
        async with running(load_settings(config), admin) as api:
            for path, value in VALUES.items():
                assert (await api.get(path))["value"] == value
            assert (await api.get("db/after-rekey"))["value"] == "term-2"

    asyncio.run(read_back())
