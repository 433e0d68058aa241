"""The attacker's holes in backup/restore (issue 14, attack run A: H2, H6, H7 and the restore's order),
each with the defence's rule in its name. In process (CliRunner, real SQLite, real key files), except
the memory bound, which is measured in a subprocess of its own."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from secretsd.audit.log import AuditLog
from secretsd.backup import format as fmt
from secretsd.backup.restore import RESTORED_META
from secretsd.cli.exits import Exit
from secretsd.errors import NotInitializedError
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import build_storage
from tests.conftest import running
from tests.test_backup import VALUES, Source, build, cli, fresh_target, refused, sections, source, split, store_rows

__all__ = ["source"]  # the module-scoped fixture of tests/test_backup.py: one populated store and its backup


def _config(tmp_path: Path, source: Source, data_dir: Path, audit_path: Path | None = None) -> Path:
    """A config whose key file lies outside the (maybe not yet existing) target directory."""
    key = source.settings.require_data_dir() / "master.key"
    text = f'data_dir = "{data_dir}"\n[key_provider]\nkind = "file"\npath = "{key}"\n'
    if audit_path is not None:
        text += f'[audit]\npath = "{audit_path}"\n'
    path = tmp_path / f"{data_dir.name}.toml"
    path.write_text(text)
    return path


def _meta(data_dir: Path, key: str) -> str | None:
    async def read() -> str | None:
        storage = build_storage(load_settings(None, data_dir=data_dir))
        await storage.open()
        try:
            return await storage.get_meta(key)
        finally:
            await storage.close()

    return asyncio.run(read())


# -- H2: the restore's audit record is durable before the restored store is ever served --------------
def test_restore_with_an_unwritable_audit_log_touches_nothing(source: Source, tmp_path: Path) -> None:
    """The attacker's r/auditfail.toml: the audit log's parent is a regular file. Refused before the
    target is touched (it used to commit every row, then fail at the record)."""
    (tmp_path / "notadir").write_text("a file, not a directory\n")
    target = tmp_path / "target"
    config = _config(tmp_path, source, target, audit_path=tmp_path / "notadir" / "main.jsonl")
    line = refused(cli("backup", "restore", str(source.backup), "--config", str(config)), Exit.USAGE)
    assert "audit log" in line and "nothing was changed" in line
    assert not target.exists()


def test_restore_audited_before_served(source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule ``require_restore_audited``: a restore whose record cannot be written (a full disk at
    the append: provoked with a mock, the only fault here we cannot make for real) leaves a store no
    daemon serves; the same restore run again writes the record, and then the store is served."""
    target = fresh_target(tmp_path, source)

    async def full_disk(self: AuditLog, record: dict[str, Any]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(AuditLog, "append", full_disk)
        result = cli("backup", "restore", str(source.backup), "--data-dir", str(target))
    assert result.exit_code != 0
    assert json.loads(_meta(target, RESTORED_META) or "{}")["audited"] is False

    async def serve() -> None:
        async with running(load_settings(None, data_dir=target), source.admin):
            pass

    with pytest.raises(NotInitializedError, match="audit record was never written"):
        asyncio.run(serve())

    again = cli("backup", "restore", str(source.backup), "--data-dir", str(target), "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["resumed"] is True
    first = json.loads((target / "audit" / "main.jsonl").read_text().splitlines()[0])
    assert first["action"] == "backup.restore" and first["manifest_sha256"] == source.manifest["manifest_sha256"]
    assert json.loads(_meta(target, RESTORED_META) or "{}")["audited"] is True

    async def read_back() -> None:
        async with running(load_settings(None, data_dir=target), source.admin) as api:
            for path, value in VALUES.items():
                assert (await api.get(path))["value"] == value

    asyncio.run(read_back())


def test_restore_of_a_restored_store_backup_writes_its_own_marker(source: Source, tmp_path: Path) -> None:
    """A backup of a restored store carries its ``restored_from`` row; a restore of it keeps its own."""
    first = fresh_target(tmp_path, source, "first")
    assert cli("backup", "restore", str(source.backup), "--data-dir", str(first)).exit_code == 0
    second_backup = tmp_path / "second.sdbk"
    assert cli("backup", "create", "--out", str(second_backup), "--data-dir", str(first)).exit_code == 0
    second = fresh_target(tmp_path, source, "second")
    result = cli("backup", "restore", str(second_backup), "--data-dir", str(second), "--json")
    assert result.exit_code == 0, result.stderr
    marker = json.loads(_meta(second, RESTORED_META) or "{}")
    assert marker["audited"] is True and marker["manifest_sha256"] == json.loads(result.stdout)["manifest_sha256"]


# -- the restore's order: every check on the file before the target is touched -------------------------
def test_restore_checks_the_file_before_creating_the_target(source: Source, tmp_path: Path) -> None:
    lines, trailer = split(source.backup)
    parts = sections(lines)
    parts["secrets"][0] = parts["secrets"][0].replace(b'"app/', b'"evil/', 1)
    tampered = tmp_path / "tampered.sdbk"
    tampered.write_bytes(build([lines[0], *_joined(parts)], trailer))
    target = tmp_path / "never"
    config = _config(tmp_path, source, target)
    refused(cli("backup", "restore", str(tampered), "--config", str(config)), Exit.INTEGRITY)
    assert not target.exists()


def _joined(parts: dict[str, list[bytes]]) -> list[bytes]:
    out: list[bytes] = []
    for name in fmt.SECTIONS:
        out += [fmt.SECTION_PREFIX + name.encode() + b"\n", *parts[name]]
    return out


# -- H6: a forged file cannot exhaust memory before its MAC is checked ----------------------------------
_RSS = textwrap.dedent("""
    import re, sys
    from click.testing import CliRunner
    from secretsd.cli import main
    result = CliRunner().invoke(main, sys.argv[1:])
    # VmHWM is this image's own peak (ru_maxrss keeps the forking parent's across exec).
    status = open("/proc/self/status").read()
    print(result.exit_code, re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
    print(result.stderr.strip())
""")


def _verify_rss(path: Path, source: Source) -> tuple[int, int, str]:
    """``backup verify`` in a fresh interpreter: exit code, peak RSS (KiB), the error line."""
    data_dir = str(source.settings.require_data_dir())
    out = subprocess.run(
        [sys.executable, "-c", _RSS, "backup", "verify", str(path), "--data-dir", data_dir],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.splitlines()
    code, rss = out[0].split()
    return int(code), int(rss), out[1] if len(out) > 1 else ""


def _keyring_bomb(source: Source, path: Path, rows: int, row_bytes: int) -> None:
    """The attacker's bomb.py: keyring rows whose wrappings are a long list of empty lists (a few KB
    compressed, a hundred times its size in Python objects once parsed)."""
    lines, trailer = split(source.backup)
    parts = sections(lines)
    wrappings = b"[" + b"[]," * (row_bytes // 3) + b"[]]"
    parts["keyring_terms"] = [b'{"created_at":"2026-11-29T22:10:13.520491+00:00","encryptions":0,"term":%d,'
                              b'"wrappings":%s}\n' % (n + 1, wrappings) for n in range(rows)]
    path.write_bytes(build([lines[0], *_joined(parts)], trailer))


@pytest.mark.parametrize(("rows", "row_bytes"), [(1, 24 << 20), (3, 8 << 20), (400, 60 << 10)],
                         ids=["one-24MiB-row", "three-8MiB-rows", "many-rows-under-the-row-cap"])
def test_a_backup_bomb_is_refused_before_the_mac_check(source: Source, tmp_path: Path, rows: int,
                                                        row_bytes: int) -> None:
    bomb = tmp_path / "bomb.sdbk"
    _keyring_bomb(source, bomb, rows, row_bytes)
    assert bomb.stat().st_size < 200 << 10
    code, rss_kib, line = _verify_rss(bomb, source)
    assert code == Exit.INTEGRITY, line
    assert "keyring" in line or "longer than" in line, line
    assert rss_kib < 200 << 10, f"peak RSS {rss_kib} KiB"


# -- H7: a restore says which tokens it brings back, and can revoke them all ----------------------------
def test_restore_reports_the_tokens_it_brings_back(source: Source, tmp_path: Path) -> None:
    target = fresh_target(tmp_path, source)
    result = cli("backup", "restore", str(source.backup), "--data-dir", str(target), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["tokens_restored"], report["root_tokens_restored"], report["tokens_revoked"]) == (2, 2, 0)
    assert "revoked after the backup was taken" in result.stderr and "--revoke-tokens" in result.stderr
    first = json.loads((target / "audit" / "main.jsonl").read_text().splitlines()[0])
    assert (first["tokens_restored"], first["root_tokens_restored"], first["tokens_revoked"]) == (2, 2, 0)


def test_restore_revoke_tokens_revokes_every_restored_token(source: Source, tmp_path: Path) -> None:
    target = fresh_target(tmp_path, source)
    result = cli("backup", "restore", str(source.backup), "--data-dir", str(target), "--revoke-tokens", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["tokens_restored"], report["tokens_revoked"]) == (2, 2)
    assert "valid again" not in result.stderr
    first = json.loads((target / "audit" / "main.jsonl").read_text().splitlines()[0])
    assert first["tokens_revoked"] == 2
    minted = cli("token", "create-root", "--data-dir", str(target), "--json")
    assert minted.exit_code == 0, minted.stderr
    new_root = json.loads(minted.stdout)["admin_token"]

    async def check() -> None:
        async with running(load_settings(None, data_dir=target), new_root) as api:
            old = await api.client.get("/v1/secrets/app/s00", headers=api.auth(source.admin))
            assert old.status == 401
            assert (await api.get("app/s00"))["value"] == VALUES["app/s00"]

    asyncio.run(check())
    assert store_rows(target) > 0
