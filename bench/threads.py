#!/usr/bin/env python3
"""Which of the daemon's threads spends the CPU of a request, and how often is it switched out?

Run by hand (Linux only; reads ``/proc``)::

    python bench/threads.py --audit on --audit off --audit on --audit off --duration 4

For each ``--audit`` mode in the order given, it starts a throw-away daemon with ``bench/load.py``'s
helpers, seeds it, runs one GET cell at ``--concurrency`` and prints, per daemon thread that did
anything: user and system CPU per request, and voluntary / involuntary context switches per
request (from ``/proc/PID/task/TID/{stat,status}``). With audit on it also prints the mean audit
batch size from the daemon's own ``secretsd_audit_batch_records`` histogram. The event loop is the
thread whose TID is the process id; with audit on, the writer thread is the one with the most
voluntary switches. Alternate the modes: this machine drifts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import load  # bench/load.py: this script's directory is first on sys.path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ThreadSample:
    user: int  # clock ticks
    system: int
    voluntary: int
    involuntary: int


def sample(pid: int) -> dict[int, ThreadSample]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = ThreadSample(int(stat[11]), int(stat[12]), int(status["voluntary_ctxt_switches"]),
                                           int(status["nonvoluntary_ctxt_switches"]))
    return out


def mean_batch(daemon: load.Daemon) -> float | None:
    url = f"{daemon.base_url}/metrics"  # always http://127.0.0.1:PORT (load.Daemon)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {daemon.token}"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback only
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("secretsd_audit_batch_records_sum", "secretsd_audit_batch_records_count"):
            values[name] = float(value)
    count = values.get("secretsd_audit_batch_records_count", 0.0)
    return values["secretsd_audit_batch_records_sum"] / count if count else None


async def one_run(audit: bool, args: argparse.Namespace) -> dict[str, object]:
    with load.running_daemon(0, None, audit=audit) as daemon:
        assert daemon.proc is not None
        await load.seed(daemon.base_url, daemon.token, args.secrets, 64, random.Random(1))
        pid = daemon.proc.pid
        before = sample(pid)  # no warm-up: the samples must cover exactly the requests counted
        cell = await load.run_cell(operation="GET", concurrency=args.concurrency, daemon=daemon,
                                   secrets=args.secrets, value_bytes=64, duration=args.duration, warmup=0.0,
                                   max_requests=10**7, rng=random.Random(1))
        after = sample(pid)
        n = max(cell.requests, 1)
        threads = []
        for tid, end in sorted(after.items()):
            start = before.get(tid, ThreadSample(0, 0, 0, 0))
            row = {
                "tid": tid, "loop": tid == pid,
                "user_us": (end.user - start.user) / TICKS / n * 1e6,
                "sys_us": (end.system - start.system) / TICKS / n * 1e6,
                "vcsw": (end.voluntary - start.voluntary) / n,
                "icsw": (end.involuntary - start.involuntary) / n,
            }
            if row["user_us"] + row["sys_us"] >= 1 or row["vcsw"] >= 0.01:
                threads.append(row)
        return {"audit": "on" if audit else "off", "rps": cell.rps, "cpu_us": cell.server_cpu_us_per_req,
                "errors": cell.errors, "batch": mean_batch(daemon) if audit else None, "threads": threads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audit", action="append", choices=("on", "off"),
                        help="one run per use, in order (default: on off on off)")
    parser.add_argument("--concurrency", type=load.positive_int, default=16)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--secrets", type=load.positive_int, default=1000)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args()
    results = [asyncio.run(one_run(mode == "on", args)) for mode in (args.audit or ["on", "off", "on", "off"])]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        batch = f", mean audit batch {r['batch']:.1f} records" if r["batch"] else ""
        print(f"audit {r['audit']}: {r['rps']:.0f} req/s, daemon {r['cpu_us']:.0f} µs CPU/GET, "
              f"errors {r['errors']}{batch}")
        for t in r["threads"]:  # type: ignore[attr-defined]
            name = "event loop" if t["loop"] else f"thread {t['tid']}"
            print(f"  {name:>14}: user {t['user_us']:4.0f} µs, sys {t['sys_us']:3.0f} µs, "
                  f"switches voluntary {t['vcsw']:.2f}, involuntary {t['icsw']:.2f} per GET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
