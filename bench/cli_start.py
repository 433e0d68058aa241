#!/usr/bin/env python3
"""CLI start-up as a ratio to a bare interpreter, measured in one run (issue 16 item 1).

Times, as wall-clock medians over interleaved rounds: ``python3 -c pass`` run by the very
interpreter of the ``secretsd`` console script (its virtualenv and site-packages: so what is
measured is what the command itself adds), ``secretsd --version``, ``secretsd --help``, a full
``secretsd get`` against a real daemon this script starts (bench/load.py's helpers) and
``secretsd run --prefix P -- true``, each as a ratio to ``python3 -c pass``, so machines of
different speeds (and a busy machine, as the rounds are interleaved) compare. The base interpreter
the virtualenv was made from is timed too, for reference only: its own site-packages differ.

    python bench/cli_start.py                # 15 rounds, a table
    python bench/cli_start.py --rounds 31 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import machine_info, running_daemon, secretsd_command

BASELINE = "python3 -c pass"
#: Targets from issue 16 (ratio to `python -c pass`); None: measured, no target.
TARGETS: dict[str, float | None] = {"--version": 4.0, "--help": None, "get": 6.0, "run -- true": None}


def _time_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env, check=False, timeout=60)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return elapsed


def measure(rounds: int, warmup: int) -> dict[str, Any]:
    secretsd = secretsd_command()
    true = shutil.which("true") or "/bin/true"
    with running_daemon(0, None) as daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECRETSD_")}
        env |= {"SECRETSD_ADDR": daemon.base_url, "SECRETSD_TOKEN": daemon.token}
        subprocess.run([*secretsd, "set", "bench/KEY", "value"], env=env, check=True, capture_output=True)
        commands: dict[str, list[str]] = {
            BASELINE: [sys.executable, "-c", "pass"],
            "base python3 -c pass": [getattr(sys, "_base_executable", sys.executable), "-c", "pass"],
            "--version": [*secretsd, "--version"],
            "--help": [*secretsd, "--help"],
            "get": [*secretsd, "get", "bench/KEY"],
            "run -- true": [*secretsd, "run", "--prefix", "bench", "--", true],
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(warmup + rounds):
            # Interleaved, in a rotating order: a load spike hits every command alike.
            names = list(commands)
            names = names[i % len(names):] + names[:i % len(names)]
            for name in names:
                elapsed = _time_once(commands[name], env)
                if i >= warmup:
                    samples[name].append(elapsed)
    base = statistics.median(samples[BASELINE])
    results = []
    for name, values in samples.items():
        med = statistics.median(values)
        target = TARGETS.get(name)
        results.append({
            "command": name if "python" in name else f"secretsd {name}",
            "median_ms": round(med * 1000, 1),
            "min_ms": round(min(values) * 1000, 1),
            "ratio": round(med / base, 2),
            "target_ratio": target,
            "met": None if target is None else med / base < target,
        })
    return {"rounds": rounds, "interpreter": sys.executable, "machine": machine_info(), "results": results}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'command':<28} {'median ms':>10} {'min ms':>8} {'ratio':>7} {'target':>7}  met",
             "-" * 70]
    for r in report["results"]:
        target = "" if r["target_ratio"] is None else f"<{r['target_ratio']:g}x"
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['command']:<28} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {r['ratio']:>6.2f}x "
                     f"{target:>7}  {met}")
    lines.append(f"{report['rounds']} interleaved rounds, medians; ratio = median / median of python3 -c pass")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup not negative")
    report = measure(args.rounds, args.warmup)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if all(r["met"] is not False for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
