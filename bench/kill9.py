#!/usr/bin/env python3
"""kill -9 cycles against a real daemon: every write it acknowledged must be there after a restart.

Run by hand (this is not a pytest test)::

    python bench/kill9.py                      # 30 cycles, 3-5 minutes on a busy 2-core VM
    python bench/kill9.py --cycles 60 --writers 8 --json > kill9.json

What it does, with ``bench/load.py``'s daemon helpers (127.0.0.1 only, temporary data dir):

1. ``secretsd init`` once; then, for each cycle, ``secretsd serve`` on the same data dir;
2. ``--writers`` concurrent clients PUT new versions with recognisable values (cycle, writer, write
   number, a random tag) and record every write answered 200, with the version it got; each path
   gets at most 8 versions, below the default ``max_versions`` of 10, so no acknowledged version is
   pruned;
3. at a random moment ``--kill-after`` seconds into the writes, SIGKILL to the daemon;
4. ``secretsd audit verify --data-dir`` on what the kill left. Its verdict is reported per cycle as
   ``ok``, ``cut`` (a torn last line or an unsigned tail: the kill stopped a batch's write, which
   docs/audit.md allows, and the next daemon repairs) or ``tamper`` (anything else: a failure);
5. restart, wait for ``/readyz``, and read every write acknowledged in that cycle at its version:
   a missing version or another value is a **lost acknowledged write**. The write each client had
   in flight at the kill is looked up too: found committed, or not (both are allowed);
6. at the end the last daemon reads *every* acknowledged write of every cycle, is stopped with
   SIGTERM, and ``audit verify --data-dir`` must pass.

Exit status: 0 when nothing was lost, every answer before the kills was 200, no ``audit verify``
said ``tamper`` and the last one passed; 1 otherwise (or on a setup failure); 130 when interrupted.
``--max-seconds`` caps the whole run: no new cycle starts after it, and the summary says how many ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import load  # bench/load.py: this script's directory is first on sys.path

VERSIONS_PER_PATH = 8  # below the default max_versions (10): every acknowledged version is kept
READ_CONCURRENCY = 16
READY_TIMEOUT_S = 30.0
VERIFY_TIMEOUT_S = 120.0
WRITE_CAP_S = 60.0  # a cycle's writers are abandoned this long after the kill was due, whatever happens

Write = tuple[str, int, str]  # path, version, value


@dataclass
class CycleResult:
    cycle: int
    kill_after_s: float
    acknowledged: int
    lost: int
    in_flight: int
    in_flight_committed: int
    errors: int
    verify_kind: str  # ok, cut or tamper (see verdict)
    verify: str
    critical_log_lines: int
    error_samples: list[str] = field(default_factory=list)


# -- writing until the kill ------------------------------------------------------------------
async def write_until_killed(daemon: load.Daemon, cycle: int, writers: int, kill_after: float
                             ) -> tuple[list[Write], list[tuple[str, str]], list[str]]:
    """Run the writers, SIGKILL the daemon after ``kill_after`` s; return (acknowledged, in flight, errors)."""
    acknowledged: list[Write] = []
    in_flight: dict[int, tuple[str, str]] = {}
    errors: list[str] = []

    async def writer(session: aiohttp.ClientSession, w: int) -> None:
        i = 0
        while True:
            path = f"kill9/c{cycle:03d}/w{w:02d}/k{i // VERSIONS_PER_PATH:05d}"
            value = f"kill9 cycle={cycle} writer={w} write={i} tag={secrets.token_hex(6)}"
            in_flight[w] = (path, value)
            try:
                async with session.put(f"{daemon.base_url}/v1/secrets/{path}",
                                       data=json.dumps({"value": value}).encode()) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                return  # the daemon died under this request: it was never acknowledged
            if status == 200:
                acknowledged.append((path, int(json.loads(body)["version"]), value))
                del in_flight[w]
                i += 1
            else:  # problem documents never carry secret values
                errors.append(f"PUT {path} -> HTTP {status} {body[:200].decode(errors='replace')}")

    async def killer() -> None:
        await asyncio.sleep(kill_after)
        assert daemon.proc is not None
        daemon.proc.kill()

    async with load.new_session(daemon.token, writers) as session:
        await load.run_workers([killer(), *(writer(session, w) for w in range(writers))], kill_after + WRITE_CAP_S)
    return acknowledged, list(in_flight.values()), errors


# -- checking after the restart --------------------------------------------------------------
async def read_back(daemon: load.Daemon, writes: Sequence[Write], in_flight: Sequence[tuple[str, str]]
                    ) -> tuple[list[str], int]:
    """(a description of each lost acknowledged write, how many in-flight writes were committed)."""
    lost: list[str] = []
    committed = 0
    queue: list[tuple[str, int | None, str]] = [*writes, *((p, None, v) for p, v in in_flight)]

    async def reader(session: aiohttp.ClientSession) -> None:
        nonlocal committed
        while queue:
            path, version, value = queue.pop()
            query = f"?version={version}" if version is not None else ""
            async with session.get(f"{daemon.base_url}/v1/secrets/{path}{query}") as resp:
                body = await resp.read()
                found = json.loads(body).get("value") if resp.status == 200 else None
            if version is None:
                committed += found == value
            elif found != value:
                lost.append(f"{path} v{version}: HTTP {resp.status}" + (", another value" if found else ""))

    async with load.new_session(daemon.token, READ_CONCURRENCY) as session:
        await load.run_workers([reader(session) for _ in range(READ_CONCURRENCY)], 300.0)
    return lost, committed


def wait_ready(daemon: load.Daemon) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with (contextlib.suppress(urllib.error.URLError, OSError),
              urllib.request.urlopen(f"{daemon.base_url}/readyz", timeout=2) as resp):  # noqa: S310 - loopback
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise load.BenchError(f"the restarted daemon was not ready within {READY_TIMEOUT_S:.0f}s:\n{daemon.log_tail()}")


# What ``audit verify`` says of a log that a kill -9 stopped in the middle of a batch's write: the
# records affected were never acknowledged (docs/audit.md), so this is not tampering.
CUT_BY_THE_KILL = ("the last record is incomplete", "carry no signature: the log was cut inside a batch")


def verdict(ok: bool, said: str) -> str:
    if ok:
        return "ok"
    return "cut" if any(phrase in said for phrase in CUT_BY_THE_KILL) else "tamper"


def audit_verify(data_dir: Path) -> tuple[bool, str]:
    cmd = [*load.secretsd_command(), "audit", "verify", "--data-dir", str(data_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S, env=load.daemon_env(),
                          check=False)
    said = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return done.returncode == 0, (said[0] if said else f"exit {done.returncode}")


def critical_lines(daemon: load.Daemon) -> int:
    """Log lines at CRITICAL or with a traceback: the daemon reporting removed records, or a crash."""
    with contextlib.suppress(OSError):
        return sum(1 for line in daemon.log_path.read_text(errors="replace").splitlines()
                   if " CRITICAL " in line or line.startswith("Traceback"))
    return 0


def started(workdir: Path, token: str) -> load.Daemon:
    daemon = load.Daemon(workdir, load.free_port())  # a fresh port: nothing waits on the old one
    daemon.token = token
    try:
        daemon.start()
        wait_ready(daemon)
    except BaseException:
        daemon.stop()
        raise
    return daemon


# -- the run ---------------------------------------------------------------------------------
def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    rng = random.Random(args.seed)
    first = load.Daemon(workdir, load.free_port())
    first.init()
    token = first.token
    results: list[CycleResult] = []
    every: list[Write] = []
    began = time.monotonic()
    # One daemon per cycle: it reads back what the previous kill may have lost, then is killed itself.
    daemon = started(workdir, token)
    try:
        for cycle in range(1, args.cycles + 1):
            if time.monotonic() - began > args.max_seconds:
                load.log(f"--max-seconds {args.max_seconds:g} reached: no more cycles")
                break
            kill_after = rng.uniform(*args.kill_after)
            acked, in_flight, errors = asyncio.run(write_until_killed(daemon, cycle, args.writers, kill_after))
            assert daemon.proc is not None
            daemon.proc.wait(timeout=10)
            daemon.stop()  # closes its log (and SIGTERMs it, were it somehow still alive)
            criticals = critical_lines(daemon)
            verify = audit_verify(daemon.data_dir)  # the log exactly as the kill left it
            daemon = started(workdir, token)
            lost, committed = asyncio.run(read_back(daemon, acked, in_flight))
            every += acked
            result = CycleResult(cycle, round(kill_after, 3), len(acked), len(lost), len(in_flight), committed,
                                 len(errors), verdict(*verify), verify[1], criticals, (lost + errors)[:5])
            results.append(result)
            load.log(f"cycle {cycle}: killed after {kill_after:.2f}s, {len(acked)} acknowledged, {len(lost)} lost, "
                     f"{committed}/{len(in_flight)} in flight committed, {len(errors)} errors, verify: {verify[1]}")
        # Last: every acknowledged write of every cycle, then a clean stop, and the log must verify.
        final_lost, _ = asyncio.run(read_back(daemon, every, []))
    finally:
        daemon.stop()
    final_criticals = critical_lines(daemon)
    final_ok, final_verify = audit_verify(first.data_dir)
    return {
        "machine": load.machine_info(),
        "settings": {"cycles": args.cycles, "writers": args.writers, "kill_after": args.kill_after,
                     "seed": args.seed},
        "cycles_run": len(results),
        "acknowledged": len(every),
        "lost": sum(r.lost for r in results),
        "lost_at_the_end": len(final_lost),
        "in_flight": sum(r.in_flight for r in results),
        "in_flight_committed": sum(r.in_flight_committed for r in results),
        "errors": sum(r.errors for r in results),
        "verify_after_kill": {kind: sum(r.verify_kind == kind for r in results) for kind in ("ok", "cut", "tamper")},
        "critical_log_lines": sum(r.critical_log_lines for r in results) + final_criticals,
        "final_verify_ok": final_ok,
        "final_verify": final_verify,
        "seconds": round(time.monotonic() - began, 1),
        "cycles": [asdict(r) for r in results],
        "lost_samples": final_lost[:5],
    }


def passed(summary: dict[str, object]) -> bool:
    after_kill = summary["verify_after_kill"]
    assert isinstance(after_kill, dict)
    return (summary["lost"] == 0 and summary["lost_at_the_end"] == 0 and summary["errors"] == 0
            and after_kill["tamper"] == 0 and summary["final_verify_ok"] is True)


def format_summary(summary: dict[str, object]) -> str:
    lines = [f"{'cycle':>5} {'kill s':>6} {'acked':>6} {'lost':>4} {'in flight':>9} {'errors':>6}  "
             "audit verify after the kill"]
    cycles = summary["cycles"]
    assert isinstance(cycles, list)
    for c in cycles:
        lines.append(f"{c['cycle']:>5} {c['kill_after_s']:>6.2f} {c['acknowledged']:>6} {c['lost']:>4} "
                     f"{c['in_flight_committed']:>3}/{c['in_flight']:<5} {c['errors']:>6}  {c['verify']}")
    lines += [
        "",
        f"cycles: {summary['cycles_run']}   acknowledged writes: {summary['acknowledged']}   "
        f"lost: {summary['lost']} (re-read at the end: {summary['lost_at_the_end']})",
        f"in flight at the kills: {summary['in_flight']}, of which committed: {summary['in_flight_committed']}   "
        f"non-200 answers before the kills: {summary['errors']}",
        f"audit verify after each kill: {summary['verify_after_kill']}   "
        f"CRITICAL or traceback log lines: {summary['critical_log_lines']}",
        f"audit verify at the end: {summary['final_verify']}   ({summary['seconds']} s)",
        "PASS" if passed(summary) else "FAIL",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=load.positive_int, default=30, help="kill -9 cycles (default 30)")
    parser.add_argument("--writers", type=load.positive_int, default=4, help="concurrent writer clients (default 4)")
    parser.add_argument("--kill-after", type=float, nargs=2, default=(0.1, 1.5), metavar=("MIN", "MAX"),
                        help="the kill comes this many seconds into the writes, uniformly at random "
                             "(default 0.1 1.5)")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="start no new cycle after this many seconds (default 900)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the kill moments")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and print its path")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    low, high = args.kill_after
    if not 0 < low <= high <= 60:
        parser.error("--kill-after needs 0 < MIN <= MAX <= 60")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load.install_signal_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="secretsd-kill9-"))
    try:
        summary = run(args, workdir)
    except KeyboardInterrupt:
        load.log("interrupted")
        return 130
    except (load.BenchError, OSError, subprocess.SubprocessError) as exc:
        load.log(f"error: {exc}")
        return 1
    finally:
        if args.keep:
            load.log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0 if passed(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
