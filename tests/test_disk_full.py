"""End-to-end: the data directory's file system fills up under a real daemon, then frees again.

The data directory is a 4 MiB tmpfs of its own (needs root and ``mount``; skipped otherwise), so the
disk that fills is the one SQLite and the audit log write to, and nothing else on the machine. A filler
file takes the free space at once; then the daemon must answer every request with a 503 problem
document (never a 500, never a crash), lose no write it acknowledged, stay idle when nobody calls,
and, once the filler is gone, become ready and serve again by itself: no restart, and no client
request needed to wake it, since a load balancer that probes ``/readyz`` sends none to an unready
replica.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, Response, http, init_store, run_cli

pytestmark = pytest.mark.e2e

TMPFS_SIZE = "4m"
FULL_PROBLEMS = {"urn:jarvis-secretsd:problem:storage-unavailable", "urn:jarvis-secretsd:problem:audit-failed"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A data directory that is its own 4 MiB tmpfs, unmounted at the end whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the data directory needs root")
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        # A daemon left running by a failed test keeps the mount busy: detach it lazily then.
        if subprocess.run(["umount", str(mount_point)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, check=False)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system says it is full."""
    chunk = b"\0" * (256 * 1024)
    with path.open("wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    with contextlib.suppress(OSError), path.open("ab", buffering=0) as fh:  # the last partial chunk's room
        while fh.write(b"\0" * 512):
            pass


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def assert_full_disk_problem(resp: Response) -> None:
    assert resp.status == 503, (resp.status, resp.body)
    assert resp.content_type == "application/problem+json", resp.headers
    assert resp.body["type"] in FULL_PROBLEMS, resp.body


def test_a_full_disk_is_a_503_loses_no_acknowledged_write_and_recovers_without_restart(small_disk: Path) -> None:
    data = small_disk
    token = init_store(data)
    daemon = DaemonProcess(data)  # its log is beside the mount point, not on the small disk
    try:
        daemon.start()
        url = daemon.url + "/v1/secrets/"
        acknowledged: dict[tuple[str, int], str] = {}

        def put(path: str, value: str) -> Response:
            resp = http("PUT", url + path, token=token, body={"value": value})
            if resp.status == 200:
                acknowledged[(path, resp.body["version"])] = value
            return resp

        for i in range(20):
            assert put(f"before/k{i}", f"before-value-{i}").status == 200

        fill(data / "filler")
        # Keep writing and reading until the audit log, too, has no room left: SQLite usually
        # fails first, and the audit file's last page still takes a few records.
        requests = 0
        seen: set[str] = set()
        refused: Counter[str] = Counter()
        for i in range(400):
            resp = put(f"full/k{i}", f"full-value-{i}-" + "x" * 1000)
            requests += 1
            if resp.status != 200:
                assert_full_disk_problem(resp)
                seen.add(resp.body["type"])
                refused["PUT " + resp.body["type"].rsplit(":", 1)[1]] += 1
            (path, version), value = next(iter(acknowledged.items()))
            read = http("GET", f"{url}{path}?version={version}", token=token)
            requests += 1
            if read.status == 200:
                assert read.body["value"] == value
            else:
                assert_full_disk_problem(read)
                seen.add(read.body["type"])
                refused["GET " + read.body["type"].rsplit(":", 1)[1]] += 1
            if "urn:jarvis-secretsd:problem:audit-failed" in seen:
                break
        assert "urn:jarvis-secretsd:problem:audit-failed" in seen, "the disk never filled up"

        # Alive, honest about it, and idle: no retry loop spinning on the full disk.
        assert http("GET", daemon.url + "/healthz").status == 200
        ready = http("GET", daemon.url + "/readyz")
        assert ready.status == 503 and ready.body["checks"]["audit"] == "failing", ready.body
        assert daemon.proc is not None
        before = cpu_seconds(daemon.proc.pid)
        time.sleep(1.0)
        idle_cpu = cpu_seconds(daemon.proc.pid) - before
        assert idle_cpu < 0.25
        log_lines = daemon.logs().splitlines()
        assert len(log_lines) < 3 * requests + 100  # about two lines per refused request, no flood
        assert not [line for line in log_lines if "Traceback" in line or " 500 " in line]

        # The disk frees up. Nobody sends an API request: /readyz alone must see the recovery.
        (data / "filler").unlink()
        freed = time.monotonic()
        deadline = freed + 12
        while (ready := http("GET", daemon.url + "/readyz")).status != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.status == 200, ready.body
        ready_after = time.monotonic() - freed
        assert put("after/k", "after-value").status == 200
        for (path, version), value in acknowledged.items():
            read = http("GET", f"{url}{path}?version={version}", token=token)
            assert read.status == 200 and read.body["value"] == value, (path, version, read.body)
        assert daemon.proc.poll() is None
        # The figures docs/reliability.md quotes (shown with pytest -s).
        print(json.dumps({"requests_while_full": requests, "refused": dict(sorted(refused.items())),
                          "acknowledged": len(acknowledged), "idle_cpu_seconds_per_second": round(idle_cpu, 3),
                          "log_lines": len(log_lines), "seconds_to_ready_after_freeing": round(ready_after, 2)}))
    finally:
        stopped = daemon.stop()
    assert stopped == 0, daemon.logs()[-3000:]
    verified = run_cli("audit", "verify", "--data-dir", str(data))
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr
