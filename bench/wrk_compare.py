#!/usr/bin/env python3
"""Audit on vs off (or any setting A/B), GET throughput, driven by ``wrk`` instead of a Python client.

Run by hand (``apt-get install wrk``)::

    python bench/wrk_compare.py --rounds 8 --duration 5
    python bench/wrk_compare.py --b-env SECRETSD_STORAGE__READ_CACHE_ENTRIES=0   # defaults vs that

With ``--b-env`` the two daemons both keep their audit on and differ only in the settings given
(daemon "a": the defaults; daemon "b": the defaults plus ``--b-env``).

Why a second tool beside ``load.py --audit-compare``: on a small machine the load generator shares
the daemon's cores. ``load.py``'s aiohttp client needs about 200 µs of CPU per request, so it
competes with the audit writer thread and the kernel's journal work for the same two cores, and the
audit's share of throughput comes out larger than the daemon alone would make it. ``wrk`` (C,
epoll) needs a few µs per request. Report both.

It starts two daemons with ``load.py``'s helpers (one with ``SECRETSD_AUDIT__ENABLED=false``),
seeds both with the same secrets, then alternates wrk cells between them round by round (the order
flips each round). Each request reads a random seeded secret. Any non-2xx response or socket error
fails the run. Printed per cell: requests/s, p50 and p99 latency, and the daemon's CPU per request
(from /proc). Summary: the throughput ratio on/off of the medians and the median of the per-round
ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import load  # bench/load.py: this script's directory is first on sys.path

LUA = """
local paths = {%(paths)s}
local reqs = {}
init = function(args)
  for i, p in ipairs(paths) do
    reqs[i] = wrk.format("GET", p, {["Authorization"] = "Bearer %(token)s"})
  end
end
request = function()
  return reqs[math.random(#reqs)]
end
"""


def wrk_cell(daemon: load.Daemon, concurrency: int, duration: float, secrets: int, workdir: Path) -> dict[str, float]:
    paths = [url.removeprefix(daemon.base_url) for url in load.secret_urls(daemon.base_url, secrets)]
    script = workdir / f"get-{daemon.port}.lua"
    script.write_text(LUA % {"paths": ",".join(f'"{p}"' for p in paths), "token": daemon.token})
    assert daemon.proc is not None
    cpu0, t0 = load.proc_cpu_seconds(daemon.proc.pid), time.monotonic()
    done = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--latency", "-s", str(script), daemon.base_url],
        capture_output=True, text=True, timeout=duration + 60, check=False,
    )
    cpu1, t1 = load.proc_cpu_seconds(daemon.proc.pid), time.monotonic()
    out = done.stdout
    if done.returncode != 0 or "Requests/sec" not in out:
        raise load.BenchError(f"wrk failed ({done.returncode}): {done.stderr or out}")
    if "Non-2xx" in out or "Socket errors" in out:
        raise load.BenchError(f"wrk saw failed requests:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {
        "rps": rps,
        "p50_ms": _ms(re.search(r"\n\s+50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"\n\s+99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "cpu_us": (cpu1 - cpu0) / max(rps * (t1 - t0), 1) * 1e6,
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def seed_all(daemons: dict[str, load.Daemon], secrets: int) -> None:
    for daemon in daemons.values():
        await load.seed(daemon.base_url, daemon.token, secrets, 64, random.Random(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=load.positive_int, default=6)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell (5)")
    parser.add_argument("--concurrency", type=load.positive_int, default=16, help="connections (16)")
    parser.add_argument("--secrets", type=load.positive_int, default=1000)
    parser.add_argument("--b-env", action="append", default=[], metavar="SECRETSD_X=V",
                        help="compare the defaults (a) with these settings (b) instead of audit on/off")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="SECRETSD_X=V",
                        help="a setting for both daemons")
    args = parser.parse_args()
    b_env: dict[str, str] = {}
    for items, into in ((args.b_env, b_env), (args.daemon_env, load.DAEMON_SETTINGS)):
        for item in items:
            name, eq, value = item.partition("=")
            if not eq or not name.startswith("SECRETSD_"):
                parser.error(f"--b-env and --daemon-env take SECRETSD_NAME=VALUE, not {item!r}")
            into[name] = value
    first, second = ("a", "b") if b_env else ("on", "off")
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    rows: list[tuple[int, str, dict[str, float]]] = []
    what = "setting" if b_env else "audit"
    with tempfile.TemporaryDirectory() as tmp, load.running_daemon(0, None, audit=True) as one, \
            load.running_daemon(0, None, audit=bool(b_env), env=b_env) as two:
        daemons = {first: one, second: two}
        asyncio.run(seed_all(daemons, args.secrets))
        for n in range(1, args.rounds + 1):
            for mode in ((first, second) if n % 2 else (second, first)):
                cell = wrk_cell(daemons[mode], args.concurrency, args.duration, args.secrets, Path(tmp))
                rows.append((n, mode, cell))
                print(f"round {n} {what} {mode:3}: {cell['rps']:7.0f} req/s  p50 {cell['p50_ms']:.2f} ms  "
                      f"p99 {cell['p99_ms']:.2f} ms  daemon {cell['cpu_us']:.0f} µs CPU/GET", flush=True)
    a_rps = [c["rps"] for _, m, c in rows if m == first]
    b_rps = [c["rps"] for _, m, c in rows if m == second]
    paired = [a / b for a, b in zip(a_rps, b_rps, strict=True)]
    a_cpu = load.median([c["cpu_us"] for _, m, c in rows if m == first])
    b_cpu = load.median([c["cpu_us"] for _, m, c in rows if m == second])
    ratio = load.median(a_rps) / load.median(b_rps)
    extra = "".join(f" --daemon-env {item}" for item in args.daemon_env)
    extra += "".join(f" --b-env {item}" for item in args.b_env)
    print(f"# python bench/wrk_compare.py --rounds {args.rounds} --duration {args.duration:g} "
          f"--concurrency {args.concurrency}{extra}")
    print(f"median GET/s: {what} {first} {load.median(a_rps):.0f}, {second} {load.median(b_rps):.0f}; "
          f"{first}/{second} {ratio:.3f} of medians, {load.median(paired):.3f} median of per-round ratios; "
          f"daemon CPU per GET {a_cpu:.0f} / {b_cpu:.0f} µs ({a_cpu - b_cpu:+.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
