"""The audit trail: what is recorded, that tampering is caught, and that it fails closed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from secretsd.audit.record import Signer, canonical, load_public_pem, record_hash
from secretsd.audit.verify import Head, log_files, verify
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import initialize_store
from tests.conftest import Api, running
from tests.helpers import DaemonProcess, http, init_store, run_cli


@pytest.fixture
async def audited(tmp_path: Path) -> AsyncIterator[Api]:
    settings = load_settings(None, data_dir=tmp_path / "d")
    async with running(settings) as api:
        yield api


def records(settings: Settings) -> list[dict[str, Any]]:
    out = []
    for path in log_files(settings.audit.log_path(settings.require_data_dir())):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def pubkey(settings: Settings) -> Any:
    doc = json.loads(
        __import__("sqlite3").connect(settings.require_data_dir() / "secretsd.db")
        .execute("SELECT value FROM meta WHERE key = 'audit_key'").fetchone()[0]
    )
    return load_public_pem(doc["public_key"])


# -- what is recorded -----------------------------------------------------------------------------
async def test_one_record_per_request_with_every_field_and_never_a_value(audited: Api) -> None:
    marker = "VALUE-MARKER-41c2"
    await audited.put("app/k", marker)
    await audited.get("app/k")
    await audited.client.get("/v1/secrets/app/k", headers=audited.auth("sdt_0000000000000000_" + "A" * 43))
    reader = await audited.token("svc", "root")
    await audited.client.get("/v1/secrets/app/none", headers=audited.auth(reader))
    await audited.client.get("/healthz")  # public: not audited
    recs = records(audited.daemon.settings)
    assert [r["action"] for r in recs] == ["daemon.unsealed", "secret.write", "secret.read", "secret.read",
                                           "token.create", "secret.read"]
    write, read, denied, created, missing = recs[1:]
    for r in recs[1:]:
        assert {"seq", "time", "request_id", "client", "auth", "action", "path", "decision", "outcome",
                "remote", "prev_hash", "sig"} <= set(r)
    assert write["client"] == "admin" and write["auth"] == "token" and write["version"] == 1
    assert write["value_hmac"].startswith("hmac-sha256-v2:") and write["decision"] == "allow"
    assert read["outcome"] == 200 and read["path"] == "app/k" and read["version"] == 1
    assert denied["decision"] == "deny" and denied["outcome"] == 401 and denied["client"] is None
    assert created["subject_client"] == "svc"
    assert missing["outcome"] == 404 and missing["client"] == "svc"
    text = audited.daemon.settings.audit.log_path(audited.daemon.settings.require_data_dir()).read_text()
    assert marker not in text
    assert audited.admin.split("_", 2)[2] not in text and reader.split("_", 2)[2] not in text
    assert [r["seq"] for r in recs] == list(range(1, 7))


async def test_request_id_is_shared_by_response_record_and_log(audited: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="secretsd.http")
    resp = await audited.client.put("/v1/secrets/app/k", json={"value": "v"},
                                    headers=audited.auth() | {"X-Request-Id": "trace-123"})
    assert resp.headers["X-Request-Id"] == "trace-123"
    assert records(audited.daemon.settings)[-1]["request_id"] == "trace-123"
    assert any(getattr(r, "request_id", None) == "trace-123" for r in caplog.records)


async def test_value_hmac_correlates_without_revealing(audited: Api) -> None:
    await audited.put("app/a", "same")
    await audited.put("app/b", "same")
    await audited.put("app/c", "other")
    writes = [r for r in records(audited.daemon.settings) if r["action"] == "secret.write"]
    assert writes[0]["value_hmac"] == writes[1]["value_hmac"] != writes[2]["value_hmac"]
    assert audited.daemon.value_hasher is not None
    assert audited.daemon.value_hasher("same") == writes[0]["value_hmac"]


async def test_internal_events_are_recorded(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "d", max_encryptions_per_term=2)
    async with running(settings) as api:
        await api.put("app/a", "1")
        await api.put("app/a", "2")  # the term reaches its limit: the daemon rotates by itself
        for _ in range(250):
            if any(r["action"] == "keyring.rotate" for r in records(settings)):
                break
            await asyncio.sleep(0.02)
    rotation = next(r for r in records(settings) if r["action"] == "keyring.rotate")
    assert rotation["client"] == "system" and rotation["reason"] == "encryption limit"


# -- tamper evidence ------------------------------------------------------------------------------
@pytest.fixture
async def log_copy(audited: Api, tmp_path: Path) -> tuple[list[str], Any, Head]:
    for i in range(8):
        await audited.put(f"app/{i}", f"v{i}")
    settings = audited.daemon.settings
    lines = settings.audit.log_path(settings.require_data_dir()).read_text().splitlines()
    last = json.loads(lines[-1])
    return lines, pubkey(settings), Head(last["seq"], record_hash(last))


def check(tmp_path: Path, lines: list[str], key: Any, head: Head) -> Any:
    path = tmp_path / "copy.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return verify([path], key, head=head, from_start=True)


def edit(line: str, **changes: Any) -> str:
    return canonical(json.loads(line) | changes).decode()


# name -> (the tampering, the sequence number the verifier must name, words its problem must contain)
TAMPERS: dict[str, tuple[Callable[[list[str]], list[str]], int | None, str]] = {
    "edit": (lambda ls: [*ls[:4], edit(ls[4], client="mallory"), *ls[5:]], 5, "edited"),
    "delete": (lambda ls: ls[:4] + ls[5:], 6, "missing"),
    "reorder": (lambda ls: [*ls[:3], ls[4], ls[3], *ls[5:]], 5, "missing"),
    "insert-duplicate": (lambda ls: [*ls[:5], ls[3], *ls[5:]], 4, "reordered or duplicated"),
    "insert-forged": (lambda ls: [*ls[:5], edit(ls[5], client="mallory"), *ls[5:]], 6, "edited"),
    "truncate": (lambda ls: ls[:-2], 7, "truncated"),
    "torn-tail": (lambda ls: [*ls[:-1], ls[-1][:40]], None, "not a JSON record"),
    "remove-first": (lambda ls: ls[1:], 2, "starts at record 2"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
async def test_tampering_is_detected_and_the_record_named(
    log_copy: tuple[list[str], Any, Head], tmp_path: Path, name: str
) -> None:
    lines, key, head = log_copy
    assert check(tmp_path, lines, key, head).ok
    tamper, seq, reason = TAMPERS[name]
    result = check(tmp_path, tamper(list(lines)), key, head)
    assert not result.ok
    assert result.problem is not None and reason in result.problem, result.describe()
    if seq is not None:
        assert result.seq == seq, result.describe()


def _reordered(line: str) -> str:
    record = json.loads(line)
    return json.dumps(dict(reversed(record.items())), separators=(",", ":"), ensure_ascii=False)


# Lines that parse to the very record that was signed, but are not its exact bytes. A reader that
# keeps the first of two equal keys sees a forged client, so the bytes must be the canonical form.
NON_CANONICAL: dict[str, tuple[Callable[[str], str], str]] = {
    "duplicate-key-before-the-real-one": (lambda line: '{"client":"mallory",' + line[1:], "duplicate key"),
    "duplicate-key-after-the-real-one": (lambda line: line[:-1] + ',"client":"mallory"}', "duplicate key"),
    "whitespace": (lambda line: line.replace(",", ", ", 1), "canonical"),
    "key-order": (_reordered, "canonical"),
    "unicode-escape": (lambda line: line.replace('"secret.write"', '"secret.writ\\u0065"'), "canonical"),
    "solidus-escape": (lambda line: line.replace('"app/3"', '"app\\/3"'), "canonical"),
    "escaped-digit": (lambda line: line.replace('"app/3"', '"app/\\u0033"'), "canonical"),
}


def test_a_line_must_be_exactly_the_canonical_bytes_of_its_record_also_for_non_ascii() -> None:
    from secretsd.audit.record import parse_line

    line = canonical({"path": "caf\u00e9/\u2028", "seq": 1}) + b"\n"
    assert parse_line(line) == ({"path": "caf\u00e9/\u2028", "seq": 1}, None)
    for other in (b'{"path":"caf\\u00e9/\xe2\x80\xa8","seq":1}\n', b'{"path":"caf\xc3\xa9/\\u2028","seq":1}\n',
                  b'{"path":"\\ud800","seq":1}\n'):
        _record, problem = parse_line(other)
        assert problem is not None and "canonical" in problem, other


@pytest.mark.parametrize("name", sorted(NON_CANONICAL))
async def test_a_line_must_be_exactly_the_canonical_bytes_of_its_record(
    log_copy: tuple[list[str], Any, Head], tmp_path: Path, name: str
) -> None:
    lines, key, head = log_copy
    change, reason = NON_CANONICAL[name]
    changed = change(lines[4])
    assert changed != lines[4]
    result = check(tmp_path, [*lines[:4], changed, *lines[5:]], key, head)
    assert not result.ok and reason in (result.problem or ""), result.describe()
    assert result.seq == 5 and result.line == 5, result.describe()


async def test_resigning_with_another_key_is_detected(log_copy: tuple[list[str], Any, Head], tmp_path: Path) -> None:
    lines, key, head = log_copy
    forger = Signer.generate()
    forged = []
    prev = None
    for line in lines:  # a whole, self-consistent chain under the wrong key
        rec = {k: v for k, v in json.loads(line).items() if k != "sig"}
        if prev is not None:
            rec["prev_hash"] = prev
        signed = forger.sign(rec)
        prev = record_hash(signed)
        forged.append(canonical(signed).decode())
    result = check(tmp_path, forged, key, head)
    assert not result.ok and result.seq == 1 and "another key" in result.problem


# -- across rotation and restarts, through the CLI ------------------------------------------------------
@pytest.mark.e2e
def test_rotated_files_and_restarts_verify_and_cli_names_tampering(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = init_store(data)
    config = tmp_path / "c.toml"
    config.write_text("[audit]\nmax_file_bytes = 4096\n")
    for round_ in range(2):
        daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
        try:
            for i in range(20):
                http("PUT", f"{daemon.url}/v1/secrets/app/r{round_}-{i}", token=token, body={"value": "v"})
        finally:
            daemon.stop()
    files = log_files(data / "audit" / "main.jsonl")
    assert len(files) >= 4
    ok = run_cli("audit", "verify", "--data-dir", str(data))
    # Two unseals (one per start) and forty writes.
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 42 record(s)"), ok.stdout + ok.stderr
    pub = tmp_path / "audit.pub"
    assert run_cli("audit", "pubkey", "--data-dir", str(data), "-o", str(pub)).returncode == 0
    copies = run_cli("audit", "verify", *map(str, files), "--pubkey", str(pub))
    assert copies.returncode == 0, copies.stdout

    # Cut the tail off the active file: only the store's head can tell.
    active = files[-1]
    lines = active.read_text().splitlines(keepends=True)
    active.write_text("".join(lines[:-1]))
    cut = run_cli("audit", "verify", "--data-dir", str(data))
    assert cut.returncode == 1 and "truncated" in cut.stdout
    assert run_cli("audit", "verify", *map(str, files), "--pubkey", str(pub)).returncode == 0

    # Edit a record in a rotated file.
    active.write_text("".join(lines))
    old = files[1].read_text().splitlines(keepends=True)
    rec = json.loads(old[2])
    files[1].write_text("".join([*old[:2], canonical(rec | {"path": "app/other"}).decode() + "\n", *old[3:]]))
    bad = run_cli("audit", "verify", "--data-dir", str(data), "--json")
    doc = json.loads(bad.stdout)
    assert bad.returncode == 1 and doc["seq"] == rec["seq"] and "edited" in doc["problem"]
    assert doc["file"] == str(files[1]) and doc["line"] == 3


@pytest.mark.e2e
def test_policy_reload_is_audited_and_mirror_to_stdout(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = init_store(data)
    policy = tmp_path / "p.toml"
    policy.write_text("[policies.a]\nrules = [{ path = \"a/*\", allow = [\"read\"] }]\n")
    config = tmp_path / "c.toml"
    config.write_text(f'policy_file = "{policy}"\n[audit]\nmirror = "stdout"\n')
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    try:
        http("GET", f"{daemon.url}/v1/sys/status", token=token)
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while '"policy.reload"' not in daemon.logs():
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.05)
    finally:
        daemon.stop()
    recs = records(load_settings(None, data_dir=data))
    reload_ = next(r for r in recs if r["action"] == "policy.reload")
    assert reload_["policies"] == ["a", "root"]
    assert '"action":"sys.status"' in daemon.logs()


# -- fail closed ----------------------------------------------------------------------------------
async def test_unwritable_audit_log_refuses_requests_then_recovers(audited: Api) -> None:
    await audited.put("app/k", "v1")
    settings = audited.daemon.settings
    path = settings.audit.log_path(settings.require_data_dir())
    parked = path.with_name("parked")
    os.replace(path, parked)
    os.symlink("/dev/full", path)  # the log is now a device: every batch fails (a short write: test_audit_writer)
    try:
        resp = await audited.client.get("/v1/secrets/app/k", headers=audited.auth())
        assert resp.status == 503
        doc = await resp.json()
        assert doc["type"].endswith(":audit-failed") and "v1" not in json.dumps(doc)
        resp = await audited.client.put("/v1/secrets/app/k", json={"value": "v2"}, headers=audited.auth())
        assert resp.status == 503
    finally:
        path.unlink()
        os.replace(parked, path)
    assert (await audited.get("app/k"))["value"] == "v1"  # the refused write changed nothing
    await audited.put("app/k", "v3")
    recs = records(settings)
    assert [r["action"] for r in recs][-3:] == ["audit.probe", "secret.read", "secret.write"]
    assert verify(log_files(path), pubkey(settings), from_start=True).ok


async def test_stuck_audit_disk_times_out_instead_of_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(write_toml(tmp_path, "[audit]\nwrite_timeout_seconds = 0.3\n"), data_dir=tmp_path / "d")
    async with running(settings) as api:
        await api.put("app/k", "v")
        assert api.daemon.audit is not None
        real = api.daemon.audit._write

        def stuck(data: bytes) -> None:  # a hung fsync cannot be provoked on demand: inject it
            time.sleep(3.0)
            real(data)

        monkeypatch.setattr(api.daemon.audit, "_write", stuck)
        started = time.monotonic()
        resp = await api.client.get("/v1/secrets/app/k", headers=api.auth())
        assert resp.status == 503 and time.monotonic() - started < 2.5  # the 0.3 s timeout, not the 3 s hang
        refused = resp.headers["X-Request-Id"]
        monkeypatch.undo()
        for _ in range(100):  # the stuck write finishes; then requests go through again
            resp = await api.client.get("/v1/secrets/app/k", headers=api.auth())
            if resp.status == 200:
                break
            await asyncio.sleep(0.1)
        assert resp.status == 200 and (await resp.json())["value"] == "v"
    # The refused read's record was already being written: it lands with the handler's outcome, and
    # a later record says its client was refused. Probes refused while the disk hung are marked late.
    recs = records(settings)
    late = next(r for r in recs if r.get("request_id") == refused)
    assert late["outcome"] == 200
    assert any(r["action"] == "audit.late" and late["seq"] in r["records"] for r in recs)
    assert any(r["action"] == "audit.probe" and r.get("late") for r in recs)
    path = settings.audit.log_path(settings.require_data_dir())
    assert verify(log_files(path), pubkey(settings), from_start=True).ok


async def test_a_removed_log_file_is_recreated_not_written_into_the_void(audited: Api) -> None:
    # The writer keeps its file open; it must notice when the name no longer leads to that file.
    await audited.put("app/k", "v")
    settings = audited.daemon.settings
    path = settings.audit.log_path(settings.require_data_dir())
    path.unlink()
    await audited.get("app/k")
    assert [r["action"] for r in records(settings)] == ["secret.read"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_fail_open_when_configured(tmp_path: Path) -> None:
    settings = load_settings(write_toml(tmp_path, "[audit]\nfail_closed = false\n"), data_dir=tmp_path / "d")
    path = settings.audit.log_path(settings.require_data_dir())
    async with running(settings) as api:
        try:
            shutil.move(path, path.with_name("parked"))
            os.symlink("/dev/full", path)
            await api.put("app/k", "v")
            assert (await api.get("app/k"))["value"] == "v"
        finally:
            path.unlink()


async def test_audit_can_be_disabled(tmp_path: Path) -> None:
    settings = load_settings(write_toml(tmp_path, "[audit]\nenabled = false\n"), data_dir=tmp_path / "d")
    async with running(settings) as api:
        await api.put("app/k", "v")
        assert not settings.audit.log_path(settings.require_data_dir()).exists()


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


async def test_restart_continues_the_chain_and_a_lost_tail_is_visible(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "d")
    admin = (await initialize_store(settings)).admin_token
    async with running(settings, admin) as api:
        await api.put("app/a", "1")
    async with running(settings, admin) as api:
        await api.put("app/b", "2")
    path = settings.audit.log_path(settings.require_data_dir())
    assert verify([path], pubkey(settings), from_start=True).ok
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # someone removes the newest record while it is down
    async with running(settings, admin) as api:
        await api.put("app/c", "3")
    result = verify([path], pubkey(settings), from_start=True)
    assert not result.ok and result.problem is not None and "missing" in result.problem
    assert result.seq == len(lines) + 1


# -- batch signatures, key pinning, one writer per chain ----------------------------------------------
async def concurrent_log(api: Api, n: int = 40) -> list[str]:
    # Records queued in one event-loop round share a batch: deterministic, unlike racing requests.
    await asyncio.gather(*[api.daemon.record({"action": "test.burst", "client": "test", "n": i}) for i in range(n)])
    settings = api.daemon.settings
    return settings.audit.log_path(settings.require_data_dir()).read_text().splitlines()


async def test_batches_are_signed_once_and_every_cut_or_edit_is_still_caught(
    audited: Api, tmp_path: Path
) -> None:
    lines = await concurrent_log(audited)
    recs = [json.loads(line) for line in lines]
    unsigned = [r["seq"] for r in recs if "sig" not in r]
    assert unsigned, "concurrent requests should have shared a batch"
    assert "sig" in recs[-1]
    key = pubkey(audited.daemon.settings)
    last = recs[-1]
    head = Head(last["seq"], record_hash(last))
    assert check(tmp_path, lines, key, head).ok
    middle = unsigned[len(unsigned) // 2]
    edited = [edit(line, client="mallory") if json.loads(line)["seq"] == middle else line for line in lines]
    result = check(tmp_path, edited, key, head)
    assert not result.ok and result.seq == middle and "edited" in result.problem
    # Cut inside a batch (after an unsigned record): what is left has an unsigned tail.
    first_unsigned = next(i for i, r in enumerate(recs) if "sig" not in r)
    result = check(tmp_path, lines[: first_unsigned + 1], key, Head(0, ""))
    assert not result.ok and "carry no signature" in result.problem
    assert result.seq == recs[first_unsigned]["seq"]


async def test_sign_every_record_when_configured(tmp_path: Path) -> None:
    settings = load_settings(write_toml(tmp_path, '[audit]\nsign = "record"\n'), data_dir=tmp_path / "d")
    async with running(settings) as api:
        lines = await concurrent_log(api, 20)
    assert all("sig" in json.loads(line) for line in lines)


@pytest.mark.e2e
def test_a_pinned_key_catches_a_swapped_store_key(tmp_path: Path) -> None:
    import sqlite3

    data = tmp_path / "d"
    token = init_store(data)
    daemon = DaemonProcess(data).start()
    try:
        http("PUT", f"{daemon.url}/v1/secrets/app/k", token=token, body={"value": "v"})
    finally:
        daemon.stop()
    pub = tmp_path / "audit.pub"
    run_cli("audit", "pubkey", "--data-dir", str(data), "-o", str(pub), check=True)
    assert run_cli("audit", "verify", "--data-dir", str(data), "--pubkey", str(pub)).returncode == 0
    # Someone with write access re-signs everything with their own key and swaps the stored key.
    forger = Signer.generate()
    conn = sqlite3.connect(data / "secretsd.db")
    doc = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'audit_key'").fetchone()[0])
    conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_key'",
                 (json.dumps(doc | {"public_key": forger.public_pem()}),))
    conn.commit()
    conn.close()
    result = run_cli("audit", "verify", "--data-dir", str(data), "--pubkey", str(pub))
    assert result.returncode == 1 and "key was replaced" in result.stdout


async def test_two_processes_cannot_write_one_chain(audited: Api) -> None:
    from secretsd.audit.log import AuditLog
    from secretsd.errors import AuditError

    settings = audited.daemon.settings
    second = AuditLog(settings.audit.log_path(settings.require_data_dir()), Signer.generate(),
                      head_store=lambda head: asyncio.sleep(0), stored_head=None, max_file_bytes=10**6,
                      write_timeout=1)
    with pytest.raises(AuditError, match="its own \\[audit\\] chain"):
        await second.open()


async def test_readyz_reports_a_failing_audit_log(audited: Api) -> None:
    settings = audited.daemon.settings
    path = settings.audit.log_path(settings.require_data_dir())
    parked = path.with_name("parked")
    os.replace(path, parked)
    os.symlink("/dev/full", path)
    try:
        assert (await audited.client.get("/v1/secrets/app/x", headers=audited.auth())).status == 503
        resp = await audited.client.get("/readyz")
        body = await resp.json()
        assert resp.status == 503 and body["checks"]["audit"] == "failing"
    finally:
        path.unlink()
        os.replace(parked, path)


async def test_the_stored_head_catches_up_after_a_burst_then_silence(tmp_path: Path) -> None:
    import sqlite3

    settings = load_settings(write_toml(tmp_path, "[audit]\nhead_interval_seconds = 0.3\n"), data_dir=tmp_path / "d")
    async with running(settings) as api:
        for i in range(5):
            await api.put(f"app/{i}", "v")
        last = records(settings)[-1]["seq"]
        stored = None
        for _ in range(50):  # no more traffic: the delayed store must still happen, ~0.3 s later
            await asyncio.sleep(0.1)
            row = sqlite3.connect(settings.require_data_dir() / "secretsd.db").execute(
                "SELECT value FROM meta WHERE key = 'audit_head:main'").fetchone()
            stored = json.loads(row[0])["seq"] if row else None
            if stored == last:
                break
        assert stored == last


async def test_close_writes_what_requests_are_waiting_for_and_stores_the_head(tmp_path: Path) -> None:
    from secretsd.audit.log import AuditLog

    stored: list[Head] = []

    async def store(head: Head) -> None:
        stored.append(head)

    signer = Signer.generate()
    log = AuditLog(tmp_path / "a.jsonl", signer, head_store=store, stored_head=None, max_file_bytes=10**6,
                   write_timeout=5, head_interval=3600)
    await log.open()
    waiting = [asyncio.create_task(log.append({"action": "test", "n": i})) for i in range(50)]
    await asyncio.sleep(0)  # all queued; most not yet written
    await log.close()
    assert all(t.done() and t.exception() is None for t in waiting)
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(50))
    assert stored[-1] == Head(50, record_hash(json.loads(lines[-1])))
    assert verify([tmp_path / "a.jsonl"], load_public_pem(signer.public_pem()), from_start=True).ok


def test_canonical_form_is_the_documented_json_spelling() -> None:
    # docs/audit.md defines it as json.dumps(sort_keys, compact separators, ensure_ascii=False) in
    # UTF-8: verifiers in other languages rely on exactly these bytes.
    record = {"z": 1, "a": "é\u2028\"x\"", "n": None, "t": True, "f": 1.5, "seq": 3}
    expected = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical(record) == expected == '{"a":"é\u2028\\"x\\"","f":1.5,"n":null,"seq":3,"t":true,"z":1}'.encode()


def test_a_daemon_whose_audit_log_cannot_be_written_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "d"
    init_store(data)
    (data / "audit").mkdir(exist_ok=True)
    (data / "audit" / "main.jsonl").symlink_to("/dev/null")  # would swallow every record
    result = run_cli("serve", "--data-dir", str(data), "--listen", "127.0.0.1:1", timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write the audit log")
    assert "not a regular file" in result.stderr


@pytest.mark.parametrize("command", ["verify", "pubkey"])
def test_audit_commands_never_create_a_store_where_there_is_none(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "no-such-dir"
    result = run_cli("audit", command, "--data-dir", str(missing))
    assert result.returncode == 1 and not missing.exists()
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert "does not exist" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("audit", command, "--data-dir", str(empty))
    assert result.returncode == 1 and list(empty.iterdir()) == [], result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "not initialised" in result.stderr


def test_a_store_that_has_recorded_nothing_yet_verifies(tmp_path: Path) -> None:
    """`init` writes no audit record: an empty log with the store's head at 0 is intact, not a replaced tail."""
    data = tmp_path / "d"
    run_cli("init", "--data-dir", str(data), "--json", check=True)
    result = run_cli("audit", "verify", "--data-dir", str(data))
    assert result.returncode == 0, result.stdout + result.stderr
