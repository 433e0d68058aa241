"""Online ``backup create`` (issue 14 item 4 of items 1-4): ``GET /v1/sys/backup`` (admin on sys/backup)
streams the same file as the offline command; ``secretsd backup create --out F`` with SECRETSD_ADDR and
a token downloads it. In process: a real aiohttp server, the CLI in a thread beside it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner, Result

from secretsd.backup.format import BackupReader
from secretsd.backup.restore import verify_backup
from secretsd.cli import main
from secretsd.cli.exits import Exit
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import provider_set
from tests.conftest import Api, running


def cli(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def addr(api: Api) -> str:
    return str(api.client.make_url("")).rstrip("/")


async def verified(settings: Settings, path: Path) -> int:
    group = provider_set(settings)
    try:
        result = await verify_backup(path, await group.ready_any())
    finally:
        group.close()
    return result.manifest.section("secrets").rows


async def test_admin_downloads_a_backup_that_verifies_and_is_audited(settings: Settings, tmp_path: Path) -> None:
    async with running(settings) as api:
        for n in range(30):
            await api.put(f"app/k{n}", f"v{n}")
        resp = await api.client.get("/v1/sys/backup", headers=api.auth())
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/vnd.secretsd.backup"
        body = await resp.read()
        reader = await api.token("reader", "root")  # a second token: the CLI's turn
        env = {"SECRETSD_ADDR": addr(api), "SECRETSD_TOKEN": reader}
        out = tmp_path / "online.sdbk"
        result = await asyncio.to_thread(cli, env, "backup", "create", "--out", str(out), "--json")
        assert result.exit_code == 0, result.stderr
        again = await asyncio.to_thread(cli, env, "backup", "create", "--out", str(out))
        assert again.exit_code == Exit.CONFLICT and "exists" in again.stderr
    (tmp_path / "api.sdbk").write_bytes(body)
    assert await verified(settings, tmp_path / "api.sdbk") == 30
    assert await verified(settings, out) == 30
    manifest = json.loads(result.stdout)
    records = [json.loads(line) for line in (settings.require_data_dir() / "audit" / "main.jsonl").read_text()
               .splitlines()]
    created = [r for r in records if r.get("action") == "backup.create"]
    assert len(created) == 2 and created[-1]["manifest_sha256"] == manifest["manifest_sha256"]
    assert all(r["outcome"] == 200 and r["decision"] == "allow" for r in created)


async def test_backup_needs_admin_on_sys_backup(settings: Settings, tmp_path: Path) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text('[policies.app-reader]\nrules = [\n  { path = "app/*", allow = ["read"] },\n'
                        '  { path = "sys/*", allow = ["read"] },\n]\n')
    settings = load_settings(None, data_dir=tmp_path / "d", policy_file=policies)
    async with running(settings) as api:
        token = await api.token("svc", "app-reader")
        resp = await api.client.get("/v1/sys/backup", headers=api.auth(token))
        assert resp.status == 403 and resp.content_type == "application/problem+json"
        env = {"SECRETSD_ADDR": addr(api), "SECRETSD_TOKEN": token}
        result = await asyncio.to_thread(cli, env, "backup", "create", "--out", str(tmp_path / "x.sdbk"))
        assert result.exit_code == Exit.DENIED, result.stderr
        assert not (tmp_path / "x.sdbk").exists() and not list(tmp_path.glob(".x.sdbk.partial-*"))
        resp = await api.client.get("/v1/sys/backup")
        assert resp.status == 401


async def test_a_cut_download_is_refused(settings: Settings, tmp_path: Path) -> None:
    async with running(settings) as api:
        await api.put("app/a", "1")
        body = await (await api.client.get("/v1/sys/backup", headers=api.auth())).read()
    cut = tmp_path / "cut.sdbk"
    cut.write_bytes(body[: len(body) - 40])
    from secretsd.backup.errors import BackupCorruptError

    try:
        with cut.open("rb") as fh:
            BackupReader(fh).read_all()
    except BackupCorruptError:
        pass
    else:
        raise AssertionError("a cut download was read as a backup")
