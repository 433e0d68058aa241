#!/usr/bin/env python3
"""Where does the daemon spend its CPU? Sample a real ``secretsd serve`` under load with py-spy.

Run by hand (needs ``pip install py-spy`` and permission to ptrace the child, e.g. root)::

    python bench/hotspots.py --operation GET --concurrency 16 --duration 10
    python bench/hotspots.py --operation PUT --svg /tmp/put.svg

It reuses ``bench/load.py`` to start a throw-away daemon on 127.0.0.1 and to drive the load, records the
daemon with ``py-spy record --nonblocking`` (only samples where a thread is on CPU), and prints the
functions with the largest share of samples: "self" (the frame at the top of the stack) and
"inclusive" (anywhere on the stack). The daemon is stopped and its temp dir removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import load  # bench/load.py: this script's directory is first on sys.path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short_frame(frame: str) -> str:
    """'get (secretsd/domain/secret_service.py:130)' -> 'secretsd/domain/secret_service.py:get'.

    Site-packages prefixes are trimmed.
    """
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{match['func']}"


def summarise(collapsed: Path, top: int) -> str:
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            incl_counts[name] += count
    if total == 0:
        return "no samples (was the daemon busy? can py-spy ptrace it?)"
    out = [f"{total} on-CPU samples", "", "self %  function (top of stack)"]
    out += [f"{100 * n / total:5.1f}  {name}" for name, n in self_counts.most_common(top)]
    out += ["", "incl %  function (anywhere on stack), project code only"]
    ours = [(name, n) for name, n in incl_counts.most_common() if name.startswith(("secretsd/", "keyproviders/"))]
    out += [f"{100 * n / total:5.1f}  {name}" for name, n in ours[:top]]
    out += ["", "incl %  function (anywhere on stack), libraries"]
    theirs = [(name, n) for name, n in incl_counts.most_common() if not name.startswith(("secretsd/", "keyproviders/"))]
    out += [f"{100 * n / total:5.1f}  {name}" for name, n in theirs[: top * 2]]
    return "\n".join(out)


async def drive(daemon: load.Daemon, args: argparse.Namespace, rng: random.Random) -> load.CellResult:
    return await load.run_cell(
        operation=args.operation,
        concurrency=args.concurrency,
        daemon=daemon,
        secrets=args.secrets,
        value_bytes=args.value_bytes,
        duration=args.duration,
        warmup=0.5,
        max_requests=10_000_000,
        rng=rng,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sample the daemon's CPU with py-spy under a GET or PUT load.")
    parser.add_argument("--operation", choices=load.OPERATIONS, default="GET")
    parser.add_argument("--concurrency", type=load.positive_int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load and sampling (10)")
    parser.add_argument("--secrets", type=load.positive_int, default=1000)
    parser.add_argument("--value-bytes", type=load.positive_int, default=64)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (200)")
    parser.add_argument("--top", type=int, default=20, help="rows per section (20)")
    parser.add_argument("--svg", type=Path, help="also write a flame graph here")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 1
    load.install_signal_handlers()
    with tempfile.TemporaryDirectory(prefix="secretsd-hotspots-") as tmp:
        collapsed = Path(tmp) / "stacks.txt"
        try:
            with load.running_daemon(0, None) as daemon:
                rng = random.Random(1)
                asyncio.run(load.seed(daemon.base_url, daemon.token, args.secrets, args.value_bytes, rng))
                record = [
                    py_spy,
                    "record",
                    "--nonblocking",
                    "--rate",
                    str(args.rate),
                    "--pid",
                    str(daemon.pid),
                    "--duration",
                    str(int(args.duration + 1)),
                ]
                spy = subprocess.Popen(
                    [*record, "--format", "raw", "-o", str(collapsed)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                svg: subprocess.Popen[bytes] | None = None
                if args.svg is not None:
                    svg = subprocess.Popen([*record, "-o", str(args.svg)], stdout=subprocess.DEVNULL)
                try:
                    result = asyncio.run(drive(daemon, args, rng))
                finally:
                    for proc in (spy, svg):
                        if proc is None:
                            continue
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(timeout=args.duration + 120)
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted", file=sys.stderr)
            return 130
        except load.BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"{args.operation} c={args.concurrency}: {result.requests} requests, {result.rps:.0f} req/s, "
            f"daemon {result.server_cpu_us_per_req:.0f} µs CPU/req (sampling adds overhead)"
        )
        if not collapsed.exists():
            print("py-spy wrote nothing (can it ptrace the daemon? try as root)", file=sys.stderr)
            return 1
        print(summarise(collapsed, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
