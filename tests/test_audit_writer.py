"""The audit writer on its own (``AuditLog``, real files): the faults that must neither fork the chain
nor acknowledge a record that is not durable."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from secretsd.audit.files import last_record
from secretsd.audit.log import AuditLog
from secretsd.audit.record import Signer, canonical, load_public_pem
from secretsd.audit.verify import Head, log_files, verify
from secretsd.errors import AuditError


def make_log(path: Path, signer: Signer, **options: Any) -> AuditLog:
    async def store(head: Head) -> None:
        pass

    settings: dict[str, Any] = {"head_store": store, "stored_head": None, "max_file_bytes": 10**6,
                                "write_timeout": 2.0} | options
    return AuditLog(path, signer, **settings)


def verified(path: Path, signer: Signer) -> bool:
    return verify(log_files(path), load_public_pem(signer.public_pem()), from_start=True).ok


def actions(path: Path) -> list[str]:
    return [json.loads(line)["action"] for line in path.read_text().splitlines()]


async def test_a_failing_mirror_neither_fails_the_batch_nor_forks_the_chain(tmp_path: Path) -> None:
    def broken(line: str) -> None:
        raise BrokenPipeError("the SIEM shipper went away")

    signer = Signer.generate()
    log = make_log(tmp_path / "a.jsonl", signer, mirror=broken)
    await log.open()
    for action in ("one", "two", "three"):
        await log.append({"action": action})  # durable, so acknowledged despite the mirror
    await log.close()
    assert actions(tmp_path / "a.jsonl") == ["one", "two", "three"]
    assert verified(tmp_path / "a.jsonl", signer)


async def test_a_device_in_the_logs_place_is_refused_not_written_into(tmp_path: Path) -> None:
    signer = Signer.generate()
    path = tmp_path / "a.jsonl"
    log = make_log(path, signer)
    await log.open()
    await log.append({"action": "before"})
    path.rename(tmp_path / "parked")
    path.symlink_to("/dev/null")  # would swallow every record and report success
    with pytest.raises(AuditError):
        await log.append({"action": "swallowed?"})
    assert not log.healthy
    path.unlink()
    (tmp_path / "parked").rename(path)
    await log.append({"action": "after"})
    await log.close()
    assert actions(path) == ["before", "after"] and verified(path, signer)


async def test_a_record_that_cannot_be_encoded_fails_only_its_own_request(tmp_path: Path) -> None:
    signer = Signer.generate()
    log = make_log(tmp_path / "a.jsonl", signer)
    await log.open()
    results = await asyncio.gather(log.append({"action": "a"}), log.append({"action": "bad", "x": object()}),
                                   log.append({"action": "c"}), return_exceptions=True)
    await log.close()
    assert results[0] is None and isinstance(results[1], AuditError) and results[2] is None
    assert actions(tmp_path / "a.jsonl") == ["a", "c"] and verified(tmp_path / "a.jsonl", signer)


async def test_the_stored_head_catches_up_with_a_batch_that_landed_during_a_store(tmp_path: Path) -> None:
    stored: list[int] = []

    async def slow_store(head: Head) -> None:
        await asyncio.sleep(0.3)
        stored.append(head.seq)

    log = make_log(tmp_path / "a.jsonl", Signer.generate(), head_store=slow_store, head_interval=0.0)
    await log.open()
    await log.append({"action": "one"})
    await asyncio.sleep(0.1)  # the store of head 1 is in flight
    await log.append({"action": "two"})
    for _ in range(40):  # no more traffic; head 2 must still reach the store
        if stored[-1:] == [2]:
            break
        await asyncio.sleep(0.05)
    assert stored[-1:] == [2]
    await log.close()


async def test_a_write_that_finishes_after_close_changes_nothing(tmp_path: Path) -> None:
    stored: list[int] = []
    closed = False

    async def store(head: Head) -> None:
        assert not closed, "the head was stored after the log was closed"
        stored.append(head.seq)

    class Stuck(AuditLog):
        def _write(self, data: bytes) -> None:
            if b"stuck" in data:
                time.sleep(1.6)  # a hung disk cannot be provoked on demand
            super()._write(data)

    log = Stuck(tmp_path / "a.jsonl", Signer.generate(), head_store=store, stored_head=None,
                max_file_bytes=10**6, write_timeout=0.3, head_interval=0.0)
    await log.open()
    request = asyncio.create_task(log.append({"action": "stuck"}))
    await asyncio.sleep(0.01)
    await log.close()
    closed = True
    assert isinstance(request.exception(), AuditError)
    await asyncio.sleep(1.2)  # the write lands now; its report must be ignored
    assert log._writing == [] and log._waiting == []


def test_a_torn_last_line_is_never_taken_as_the_chain_head(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    first = canonical({"action": "x", "seq": 1, "prev_hash": "0" * 64}).decode()
    torn = canonical({"action": "y", "seq": 2, "prev_hash": "1" * 64}).decode()  # parses, but no newline
    path.write_text(first + "\n" + torn)
    assert last_record(path) == json.loads(first)
    big = {"action": "x", "seq": 7, "prev_hash": "0" * 64, "detail": "z" * 200_000}  # longer than one read
    path.write_text(canonical(big).decode() + "\n" + "not json\n")
    assert last_record(path) == big


def test_a_short_write_is_cut_back_so_the_chain_does_not_fork(tmp_path: Path) -> None:
    # A full disk stops an append part-way. RLIMIT_FSIZE does the same on demand (EFBIG at a byte
    # limit); it runs in a child process so that nothing else here is limited.
    script = textwrap.dedent("""
        import asyncio, json, resource, signal, sys
        from pathlib import Path
        from secretsd.audit.log import AuditLog
        from secretsd.audit.record import Signer
        from secretsd.errors import AuditError

        async def main(path):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            async def store(head): pass
            signer = Signer.generate()
            Path(sys.argv[2]).write_text(signer.public_pem())
            log = AuditLog(path, signer, head_store=store, stored_head=None, max_file_bytes=10**6,
                           write_timeout=2)
            await log.open()
            await log.append({"action": "first"})
            size = path.stat().st_size
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            # Room for one unsigned record of the next batch and a little more: it lands whole,
            # the rest of the batch does not.
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 200, hard))
            batch = await asyncio.gather(*(log.append({"action": "refused"}) for _ in range(3)),
                                         return_exceptions=True)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            await log.append({"action": "after"})
            await log.close()
            print(json.dumps([type(r).__name__ for r in batch]))

        asyncio.run(main(Path(sys.argv[1])))
    """)
    path, pub = tmp_path / "a.jsonl", tmp_path / "pub.pem"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script, str(path), str(pub)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["AuditError"] * 3
    assert actions(path) == ["first", "after"]
    assert verify(log_files(path), load_public_pem(pub.read_text()), from_start=True).ok


async def test_append_many_writes_a_batchs_records_in_order_and_fails_closed(tmp_path: Path) -> None:
    # A batch request's items (POST /v1/secrets:batch): all durable before the answer, in order, and
    # one record that cannot be written fails the whole call (the answer becomes a 503).
    signer = Signer.generate()
    path = tmp_path / "a.jsonl"
    log = make_log(path, signer)
    await log.open()
    await log.append_many([{"action": f"item{n}"} for n in range(300)])  # more than one writer batch
    assert actions(path) == [f"item{n}" for n in range(300)]
    path.rename(tmp_path / "parked")
    path.symlink_to("/dev/null")
    with pytest.raises(AuditError):
        await log.append_many([{"action": "lost1"}, {"action": "lost2"}])
    path.unlink()
    (tmp_path / "parked").rename(path)
    await log.close()
    with pytest.raises(AuditError, match="not open"):
        await log.append_many([{"action": "closed"}])
    assert "lost1" not in actions(path) and verified(path, signer)


@pytest.mark.parametrize("failing", [1, 2])
async def test_append_many_fails_when_any_of_its_writer_batches_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int) -> None:
    # A batch's records share one future that only the last record's durability settles: the first
    # writer batch landing must not answer the call (failing=2), and its failing must stand even
    # though the records after it are written fine (failing=1).
    signer = Signer.generate()
    path = tmp_path / "a.jsonl"
    log = make_log(path, signer)
    await log.open()
    real_write, calls = log._write, []

    def first_write_fails(data: bytes) -> None:
        calls.append(len(data))
        if len(calls) == failing:
            raise OSError(28, "No space left on device")
        real_write(data)

    monkeypatch.setattr(log, "_write", first_write_fails)
    with pytest.raises(AuditError):
        await log.append_many([{"action": f"item{n}"} for n in range(700)])  # two writer batches
    await asyncio.sleep(0.2)  # let any writer batch after the failure land
    assert len(calls) >= failing
    monkeypatch.setattr(log, "_write", real_write)
    await log.append_many([{"action": "after"}])
    await log.close()
    assert actions(path)[-1] == "after" and verified(path, signer)
