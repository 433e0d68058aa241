"""Retention of rotated audit files (issue 12 item 4): the oldest beyond [audit] keep_rotated_files /
keep_rotated_bytes are removed after an audit.pruned record names them, and `audit verify` tells that
from files deleted by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from secretsd.audit.log import AuditLog
from secretsd.audit.record import Signer, load_public_pem
from secretsd.audit.verify import Head, log_files, verify
from tests.helpers import DaemonProcess, http, init_store, run_cli


def records(files: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


async def write_log(path: Path, signer: Signer, n: int, **options: Any) -> None:
    async def store(head: Head) -> None:
        pass

    log = AuditLog(path, signer, head_store=store, stored_head=None, max_file_bytes=4096, write_timeout=5,
                   **options)
    await log.open()
    for i in range(n):
        await log.append({"action": "test", "client": "test", "n": i, "pad": "x" * 200})
    await log.close()


async def test_the_oldest_rotated_files_are_pruned_only_after_a_record_names_them(tmp_path: Path) -> None:
    signer = Signer.generate()
    key = load_public_pem(signer.public_pem())
    active = tmp_path / "a.jsonl"
    await write_log(active, signer, 200, keep_rotated_files=2)
    files = log_files(active)
    assert len(files) <= 4 and not (tmp_path / "a.jsonl.000001").exists(), files
    recs = records(files)
    pruned = [r for r in recs if r["action"] == "audit.pruned"]
    # Earlier audit.pruned records went with the files they were in; the newest names the file
    # that held the records just before the first one present.
    first = recs[0]
    anchor = [p for p in pruned if p["last_seq"] == first["seq"] - 1]
    assert first["seq"] > 1 and len(anchor) == 1 and not (tmp_path / anchor[0]["file"]).exists()
    result = verify(files, key, from_start=True)
    assert result.ok and result.pruned_through == first["seq"] - 1, result.describe()
    assert "pruned by retention" in result.describe()
    # Every request was answered: 200 test records plus the pruning records, none missing.
    assert [r["n"] for r in recs if r["action"] == "test"][-1] == 199


async def test_retention_by_total_bytes(tmp_path: Path) -> None:
    signer = Signer.generate()
    active = tmp_path / "a.jsonl"
    await write_log(active, signer, 200, keep_rotated_bytes=3 * 4096)
    rotated = [p for p in log_files(active) if p != active]
    # Checked after each rotation: at most one more file than the bytes allow, until the next pass.
    assert sum(p.stat().st_size for p in rotated) <= 4 * 4096 + 4096
    assert verify(log_files(active), load_public_pem(signer.public_pem()), from_start=True).ok


@pytest.mark.parametrize("hand_deleted", ["oldest-kept", "also-the-next"])
async def test_a_log_may_start_after_record_1_only_where_retention_says_it_pruned(
    tmp_path: Path, hand_deleted: str
) -> None:
    signer = Signer.generate()
    key = load_public_pem(signer.public_pem())
    active = tmp_path / "a.jsonl"
    await write_log(active, signer, 200, keep_rotated_files=3)
    files = log_files(active)
    assert verify(files, key, from_start=True).ok
    # Someone removes files by hand: no audit.pruned record accounts for the records they held.
    gone = files[:1] if hand_deleted == "oldest-kept" else files[:2]
    for path in gone:
        path.unlink()
    result = verify(log_files(active), key, from_start=True)
    assert not result.ok and "records were removed" in (result.problem or ""), result.describe()
    assert result.file == str(log_files(active)[0]) and result.line == 1


async def test_without_retention_nothing_is_removed(tmp_path: Path) -> None:
    signer = Signer.generate()
    active = tmp_path / "a.jsonl"
    await write_log(active, signer, 100)
    files = log_files(active)
    assert (tmp_path / "a.jsonl.000001").exists() and records(files)[0]["seq"] == 1
    files[0].unlink()
    result = verify(log_files(active), load_public_pem(signer.public_pem()), from_start=True)
    assert not result.ok and "starts at record" in (result.problem or "")


@pytest.mark.e2e
def test_a_daemon_with_retention_keeps_a_verifiable_log(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = init_store(data)
    config = tmp_path / "c.toml"
    config.write_text("[audit]\nmax_file_bytes = 4096\nkeep_rotated_files = 2\n")
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    try:
        for i in range(60):
            assert http("PUT", f"{daemon.url}/v1/secrets/app/k{i}", token=token, body={"value": "v"}).status == 200
    finally:
        assert daemon.stop() == 0
    files = log_files(data / "audit" / "main.jsonl")
    assert not (data / "audit" / "main.jsonl.000001").exists()
    result = run_cli("audit", "verify", "--data-dir", str(data), "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 0 and doc["ok"] and doc["pruned_through"] == records(files)[0]["seq"] - 1, doc
    files[0].unlink()  # by hand
    result = run_cli("audit", "verify", "--data-dir", str(data))
    assert result.returncode == 1 and "records were removed" in result.stdout, result.stdout
