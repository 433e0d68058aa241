"""``secretsd backup create | verify | restore`` (issue 14 items 1-3), in process (CliRunner, real SQLite,
real key files): the round trip, the new audit chain, and each attack refused before anything is written."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import shutil
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from secretsd.backup import format as fmt
from secretsd.backup.errors import BackupCorruptError, BackupForgedError
from secretsd.backup.format import BackupReader, BackupWriter, Manifest, canonical_json, manifest_mac
from secretsd.backup.restore import Verified, import_backup, verify_backup
from secretsd.cli import main
from secretsd.cli.exits import Exit
from secretsd.custody.crypto import derive_key, hmac_sha256, new_dek
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import build_storage, provider_set
from secretsd.storage import rows
from tests.conftest import running

VALUES = {f"app/s{n:02d}": f"value-{n}" for n in range(12)}


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def refused(result: Result, code: Exit) -> str:
    """The command failed with ``code`` and one line on stderr; that line."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


async def _populate(settings: Settings, extra: dict[str, str] | None = None) -> str:
    async with running(settings) as api:
        for path, value in VALUES.items():
            await api.put(path, "old-" + value)
            await api.put(path, value)
        resp = await api.client.post("/v1/sys/keyring/rotate", headers=api.auth())
        assert resp.status == 200, await resp.text()
        for path, value in (extra or {}).items():
            await api.put(path, value)
        await api.token("svc", "root")
        return api.admin


@dataclass
class Source:
    settings: Settings
    admin: str
    backup: Path
    manifest: dict[str, Any]


def _create(data_dir: Path, out: Path) -> dict[str, Any]:
    result = cli("backup", "create", "--out", str(out), "--data-dir", str(data_dir), "--json")
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    root = tmp_path_factory.mktemp("source")
    settings = load_settings(None, data_dir=root / "data")
    admin = asyncio.run(_populate(settings))
    out = root / "a.sdbk"
    return Source(settings, admin, out, _create(root / "data", out))


def fresh_target(tmp_path: Path, source: Source, name: str = "restored") -> Path:
    """An empty data directory holding the source's key file (the key provider, as after a lost disk)."""
    target = tmp_path / name
    target.mkdir(mode=0o700)
    shutil.copy2(source.settings.require_data_dir() / "master.key", target / "master.key")
    return target


def store_rows(data_dir: Path) -> int:
    async def count() -> int:
        storage = build_storage(load_settings(None, data_dir=data_dir))
        await storage.open()
        try:
            return sum([await storage.count_rows(t) for t in rows.TABLES])
        finally:
            await storage.close()

    return asyncio.run(count())


# -- the file, taken apart and put together again (as an attacker would) ----------------------------
def split(path: Path) -> tuple[list[bytes], bytes]:
    raw = path.read_bytes()
    assert raw.startswith(fmt.MAGIC)
    z = zlib.decompressobj()
    body = z.decompress(raw[len(fmt.MAGIC):])
    return body.splitlines(keepends=True), z.unused_data


def build(lines: list[bytes], trailer: bytes) -> bytes:
    return fmt.MAGIC + zlib.compress(b"".join(lines)) + trailer


def sections(lines: list[bytes]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    current = ""
    for line in lines[1:]:
        if line.startswith(fmt.SECTION_PREFIX):
            current = line[len(fmt.SECTION_PREFIX):-1].decode()
            out[current] = []
        else:
            out[current].append(line)
    return out


def join(header: bytes, parts: dict[str, list[bytes]]) -> list[bytes]:
    lines = [header]
    for name in fmt.SECTIONS:
        lines += [fmt.SECTION_PREFIX + name.encode() + b"\n", *parts[name]]
    return lines


def resign(trailer: bytes, key: bytes, **changes: Any) -> bytes:
    doc = json.loads(trailer)
    manifest = Manifest.from_dict({**doc["manifest"], **changes})
    return canonical_json({"mac": manifest_mac(key, manifest), "manifest": manifest.to_dict()}) + b"\n"


def source_manifest_key(source: Source) -> bytes:
    """What only the keyring yields: the tests hold the key file, so they can play the insider."""
    from secretsd.backup.keys import manifest_key, term_from_row

    async def derive() -> bytes:
        with source.backup.open("rb") as fh:
            result = BackupReader(fh).read_all()
        term = next(term_from_row(r) for r in result.keyring if r["term"] == result.manifest.mac_term)
        group = provider_set(source.settings)
        try:
            return await manifest_key(await group.ready_any(), term)
        finally:
            group.close()

    return asyncio.run(derive())


def verify(path: Path, source: Source) -> Result:
    return cli("backup", "verify", str(path), "--data-dir", str(source.settings.require_data_dir()))


def restore_refused(path: Path, source: Source, tmp_path: Path, code: Exit) -> str:
    """``restore`` refuses the file with ``code`` and writes nothing into the empty target."""
    target = fresh_target(tmp_path, source, "refused-" + hashlib.sha256(path.read_bytes()).hexdigest()[:8])
    line = refused(cli("backup", "restore", str(path), "--data-dir", str(target)), code)
    assert store_rows(target) == 0
    assert not (target / "audit" / "main.jsonl").exists()
    return line


# -- the round trip -----------------------------------------------------------------------------------
def test_backup_holds_every_section_and_never_a_value(source: Source) -> None:
    counts = {s["name"]: s["rows"] for s in source.manifest["sections"]}
    assert counts["secrets"] == len(VALUES)
    assert counts["secret_versions"] == 2 * len(VALUES)
    assert counts["keyring_terms"] == 2 and counts["tokens"] == 2
    lines, _ = split(source.backup)
    body = b"".join(lines)
    for value in VALUES.values():
        assert value.encode() not in body
    # The secret part whole (it may hold "_" itself, so its last "_" piece could be one character).
    assert source.admin.encode() not in body and source.admin.split("_", 2)[2].encode() not in body
    key_file = (source.settings.require_data_dir() / "master.key").read_bytes()
    assert key_file not in body and key_file.strip() not in source.backup.read_bytes()
    assert b"audit_head:main" in body  # the source's chain head travels (and is named on restore)


def test_verify_passes_and_writes_nothing(source: Source) -> None:
    data = source.settings.require_data_dir()
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    result = cli("backup", "verify", str(source.backup), "--data-dir", str(data), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["terms"] == 2 and report["terms_unwrapped"] == 2
    assert report["manifest_sha256"] == source.manifest["manifest_sha256"]
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_restore_serves_every_value_and_starts_a_new_audit_chain(source: Source, tmp_path: Path) -> None:
    target = fresh_target(tmp_path, source)
    result = cli("backup", "restore", str(source.backup), "--data-dir", str(target), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["audit_chain"] == "main"

    records = [json.loads(line) for line in (target / "audit" / "main.jsonl").read_text().splitlines()]
    first = records[0]
    assert first["seq"] == 1 and first["action"] == "backup.restore"
    assert first["manifest_sha256"] == source.manifest["manifest_sha256"]
    assert first["backup_id"] == source.manifest["backup_id"]
    assert "main" in first["previous_chain_heads"]
    assert cli("audit", "verify", "--data-dir", str(target)).exit_code == 0

    async def read_back() -> None:
        async with running(load_settings(None, data_dir=target), source.admin) as api:
            for path, value in VALUES.items():
                assert (await api.get(path))["value"] == value
                assert (await api.get(path, version=1))["value"] == "old-" + value

    asyncio.run(read_back())
    # The restored daemon wrote its records after the restore's, on the same new chain.
    assert cli("audit", "verify", "--data-dir", str(target)).exit_code == 0


def test_restore_refuses_a_non_empty_store(source: Source) -> None:
    data = source.settings.require_data_dir()
    before = store_rows(data)
    line = refused(cli("backup", "restore", str(source.backup), "--data-dir", str(data)), Exit.CONFLICT)
    assert "not empty" in line
    assert store_rows(data) == before


def test_create_refuses_to_overwrite_a_file(source: Source) -> None:
    before = source.backup.read_bytes()
    line = refused(cli("backup", "create", "--out", str(source.backup), "--data-dir",
                       str(source.settings.require_data_dir())), Exit.CONFLICT)
    assert "exists" in line and source.backup.read_bytes() == before


# -- attacks: each refused, with its exit status, before anything is written ---------------------------
def test_flipped_byte_anywhere_is_refused(source: Source, tmp_path: Path) -> None:
    raw = source.backup.read_bytes()
    group = provider_set(source.settings)
    providers = asyncio.run(group.ready_any())
    tampered = tmp_path / "flipped.sdbk"
    outcomes: dict[str, int] = {}
    try:
        start, end = len(fmt.MAGIC), raw.rindex(b'{"mac":')
        # Every byte of the magic and of the stream's first and last 32, every 5th of the manifest and
        # its MAC, every 37th of the stream between (bytes there are alike to the decompressor and digests).
        positions = sorted({*range(start + 32), *range(start + 32, end - 32, 37), *range(end - 32, end),
                            *range(end, len(raw), 5), len(raw) - 1})
        for position in positions:
            tampered.write_bytes(raw[:position] + bytes([raw[position] ^ 0xFF]) + raw[position + 1:])
            with pytest.raises((BackupCorruptError, BackupForgedError)) as caught:
                asyncio.run(verify_backup(tampered, providers))
            outcomes[type(caught.value).__name__] = outcomes.get(type(caught.value).__name__, 0) + 1
    finally:
        group.close()
    assert sum(outcomes.values()) == len(positions), outcomes
    # And through the commands: a flipped byte in the stream, then in the manifest.
    middle = len(fmt.MAGIC) + 40
    tampered.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1:])
    refused(verify(tampered, source), Exit.INTEGRITY)
    restore_refused(tampered, source, tmp_path, Exit.INTEGRITY)
    at = raw.rindex(b'"created_at":"') + len(b'"created_at":"') + 1
    tampered.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:])
    refused(verify(tampered, source), Exit.AUTHENTICITY)
    restore_refused(tampered, source, tmp_path, Exit.AUTHENTICITY)


def test_truncated_file_is_refused(source: Source, tmp_path: Path) -> None:
    raw = source.backup.read_bytes()
    truncated = tmp_path / "truncated.sdbk"
    for length in sorted({0, 5, len(fmt.MAGIC), len(fmt.MAGIC) + 10, len(raw) // 2, len(raw) - 200,
                          len(raw) - 1, *range(len(raw) - 400, len(raw), 37)}):
        truncated.write_bytes(raw[:length])
        line = refused(verify(truncated, source), Exit.INTEGRITY)
        assert "truncated" in line or "not a secretsd backup" in line or "malformed" in line, line
    truncated.write_bytes(raw[: len(raw) // 2])
    restore_refused(truncated, source, tmp_path, Exit.INTEGRITY)


def test_backup_of_another_store_is_refused_by_its_keyring(source: Source, tmp_path: Path) -> None:
    other = tmp_path / "other"
    asyncio.run(_populate(load_settings(None, data_dir=other)))
    line = refused(cli("backup", "verify", str(source.backup), "--data-dir", str(other)), Exit.NO_KEY)
    assert "unwraps" in line
    assert refused(cli("backup", "restore", str(source.backup), "--data-dir", str(other)), Exit.CONFLICT)


def test_manifest_from_another_keyring_is_refused(source: Source, tmp_path: Path) -> None:
    lines, trailer = split(source.backup)
    forged = tmp_path / "forged.sdbk"
    # A manifest MACed under a key no keyring of this store yields (another store's), claiming fewer tokens.
    other_key = derive_key(new_dek(), "secretsd backup manifest v1")
    doc = json.loads(trailer)["manifest"]
    doc["sections"][4]["rows"] = 1
    forged.write_bytes(build(lines, resign(trailer, other_key, sections=doc["sections"])))
    line = refused(verify(forged, source), Exit.AUTHENTICITY)
    assert "another store" in line
    restore_refused(forged, source, tmp_path, Exit.AUTHENTICITY)


def test_section_swapped_between_two_backups_is_refused(source: Source, tmp_path: Path) -> None:
    later = tmp_path / "later"
    shutil.copytree(source.settings.require_data_dir(), later)

    async def more() -> None:
        async with running(load_settings(None, data_dir=later), source.admin) as api:
            await api.put("app/added-later", "x")

    asyncio.run(more())
    b = tmp_path / "b.sdbk"
    _create(later, b)
    a_lines, a_trailer = split(source.backup)
    b_lines, _ = split(b)
    parts = sections(a_lines)
    parts["secrets"] = sections(b_lines)["secrets"]
    swapped = tmp_path / "swapped.sdbk"
    swapped.write_bytes(build(join(a_lines[0], parts), a_trailer))
    line = refused(verify(swapped, source), Exit.INTEGRITY)
    assert "section secrets" in line
    restore_refused(swapped, source, tmp_path, Exit.INTEGRITY)


def test_replayed_old_manifest_is_refused(source: Source, tmp_path: Path) -> None:
    later = tmp_path / "later"
    shutil.copytree(source.settings.require_data_dir(), later)
    b = tmp_path / "b.sdbk"
    _create(later, b)  # same store, same keyring: its manifest is authentic, but for another file
    b_lines, _ = split(b)
    _, a_trailer = split(source.backup)
    replayed = tmp_path / "replayed.sdbk"
    replayed.write_bytes(build(b_lines, a_trailer))
    line = refused(verify(replayed, source), Exit.INTEGRITY)
    assert "another backup" in line
    restore_refused(replayed, source, tmp_path, Exit.INTEGRITY)


def test_huge_declared_count_is_refused(source: Source, tmp_path: Path) -> None:
    lines, trailer = split(source.backup)
    key = source_manifest_key(source)
    doc = json.loads(trailer)["manifest"]
    huge = tmp_path / "huge.sdbk"
    # Beyond any store: malformed, refused before the MAC is even computed.
    doc["sections"][2]["rows"] = 2**62
    mac = hmac_sha256(key, canonical_json(doc)).hex()  # Manifest itself would not hold such a count
    huge.write_bytes(build(lines, canonical_json({"mac": mac, "manifest": doc}) + b"\n"))
    assert "not a count" in refused(verify(huge, source), Exit.INTEGRITY)
    # Within bounds and correctly MACed (an insider with the key): the rows present are counted, not trusted.
    doc["sections"][2]["rows"] = 10**12
    huge.write_bytes(build(lines, resign(trailer, key, sections=doc["sections"])))
    assert "its manifest says 1000000000000" in refused(verify(huge, source), Exit.INTEGRITY)
    restore_refused(huge, source, tmp_path, Exit.INTEGRITY)


def test_overlong_line_is_refused_without_buffering_it(source: Source, tmp_path: Path) -> None:
    lines, trailer = split(source.backup)
    bomb = tmp_path / "bomb.sdbk"
    bomb.write_bytes(build([lines[0], b"#section meta\n", b"{" + b"a" * (fmt.MAX_LINE + 10)], trailer))
    tracemalloc.start()
    try:
        line = refused(verify(bomb, source), Exit.INTEGRITY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "longer than" in line
    assert peak < fmt.MAX_LINE + (8 << 20), peak


def test_a_file_changed_after_verification_is_rolled_back(source: Source, tmp_path: Path) -> None:
    lines, trailer = split(source.backup)
    parts = sections(lines)
    parts["tokens"] = parts["tokens"][:1]
    changed = tmp_path / "changed.sdbk"
    changed.write_bytes(build(join(lines[0], parts), trailer))
    target = fresh_target(tmp_path, source)

    async def attempt() -> None:
        group = provider_set(load_settings(None, data_dir=target))
        verified: Verified = await verify_backup(source.backup, await group.ready_any())
        group.close()
        swapped = Verified(changed, verified.manifest, verified.mac, verified.terms, verified.unwrapped)
        storage = build_storage(load_settings(None, data_dir=target))
        await storage.open()
        try:
            with pytest.raises(BackupCorruptError, match="section tokens"):
                await import_backup(swapped, storage)
        finally:
            await storage.close()

    asyncio.run(attempt())
    assert store_rows(target) == 0


def test_wrong_exit_for_a_missing_file_is_usage(source: Source, tmp_path: Path) -> None:
    result = cli("backup", "verify", str(tmp_path / "nope.sdbk"), "--data-dir", str(source.settings.require_data_dir()))
    assert result.exit_code == Exit.USAGE


# -- the format itself ------------------------------------------------------------------------------
def _synthetic(path: Path, n: int) -> None:
    with path.open("wb") as fh:
        writer = BackupWriter(fh, backup_id="0" * 32, created_at="2026-01-01T00:00:00+00:00", source="test")
        for name in fmt.SECTIONS:
            writer.section(name)
            if name == "secret_versions":
                for start in range(0, n, 500):
                    writer.rows([{"path": f"p/{i:08d}", "version": 1, "term": 1, "nonce": bytes(12),
                                  "ciphertext": i.to_bytes(8, "big") * 8} for i in range(start, min(n, start + 500))])
        writer.finish(key=b"k" * 32, mac_term=1, secretsd_version="test")


def test_a_backup_of_many_chunks_reads_back_intact(tmp_path: Path) -> None:
    """Incompressible rows over many 64 KiB reads: the reader's stream digest is the writer's (the
    stream's end falls inside a read, where zlib reports the rest both as unconsumed and unused)."""
    path = tmp_path / "big.sdbk"
    with path.open("wb") as fh:
        writer = BackupWriter(fh, backup_id="1" * 32, created_at="2026-01-01T00:00:00+00:00", source="test")
        for name in fmt.SECTIONS:
            writer.section(name)
            if name == "meta":
                writer.rows([{"key": f"k{i:05d}", "value": secrets.token_hex(100)} for i in range(3_000)])
        manifest = writer.finish(key=b"k" * 32, mac_term=1, secretsd_version="test")
    assert path.stat().st_size > 4 * fmt.CHUNK
    with path.open("rb") as fh:
        result = BackupReader(fh).read_all()
    assert result.stream_sha256 == manifest.stream_sha256
    result.check_integrity()


def _reading_peak(path: Path) -> int:
    tracemalloc.start()
    try:
        with path.open("rb") as fh:
            result = BackupReader(fh).read_all()
        result.check_integrity()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_memory_is_flat_in_the_number_of_rows(tmp_path: Path) -> None:
    small, large = tmp_path / "small.sdbk", tmp_path / "large.sdbk"
    _synthetic(small, 1_000)
    _synthetic(large, 10_000)
    peak_small, peak_large = _reading_peak(small), _reading_peak(large)
    assert peak_large < 2 * peak_small + (1 << 20), (peak_small, peak_large)


def test_section_digests_are_the_storage_table_digests(source: Source) -> None:
    """The manifest's digest of a section is ``rows.TableDigest`` of the table: what the restore reads back."""
    async def digests() -> dict[str, str]:
        storage = build_storage(source.settings)
        await storage.open()
        try:
            out = {}
            async with storage.snapshot() as snap:
                for table in rows.TABLES:
                    d = rows.TableDigest(table)
                    async for batch in snap.export_rows(table):
                        d.add(batch)
                    out[table] = d.sha256
            return out
        finally:
            await storage.close()

    declared = {s["name"]: s["sha256"] for s in source.manifest["sections"]}
    found = asyncio.run(digests())
    assert found == declared

