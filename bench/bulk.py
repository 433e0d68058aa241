#!/usr/bin/env python3
"""Bulk paths of the CLI against a real daemon: import-env, a no-change re-import, export-env, run.

Run by hand::

    python bench/bulk.py --entries 10000 --rounds 3

It starts a throw-away daemon (``bench/load.py``'s helpers: audit on, SQLite, 127.0.0.1), writes a
.env file of ``--entries`` keys with 40-byte values, then times, as wall-clock medians over the
rounds (each round under a fresh prefix, so every "import" is a first import):

- ``secretsd import-env FILE --prefix P``         (every key new)
- the same command again                          (nothing changed: no write)
- ``secretsd export-env P -o OUT``
- ``secretsd run --prefix P -- true``

Issue 16's targets for 10,000 entries: import ≤ 3 s, no-change re-import ≤ 1 s, run and
export-env ≤ 1 s. Each command's output is checked (counts, the exported names), so a fast
wrong answer fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import load  # bench/load.py: this script's directory is first on sys.path


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise load.BenchError(f"{' '.join(cmd[-4:])} failed ({done.returncode}): {done.stderr.strip()}")
    return took, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=load.positive_int, default=10_000)
    parser.add_argument("--rounds", type=load.positive_int, default=3)
    args = parser.parse_args()
    cli = load.secretsd_command()
    times: dict[str, list[float]] = {"import": [], "re-import": [], "export-env": [], "run": []}
    with tempfile.TemporaryDirectory() as tmp, load.running_daemon(0, None) as daemon:
        env = load.daemon_env() | {"SECRETSD_ADDR": daemon.base_url, "SECRETSD_TOKEN": daemon.token}
        dotenv = Path(tmp) / "big.env"
        dotenv.write_text("".join(f"KEY_{i:05d}={secrets.token_hex(20)}\n" for i in range(args.entries)))
        for n in range(args.rounds):
            prefix = f"bulk/r{n}"
            took, out = _run([*cli, "import-env", str(dotenv), "--prefix", prefix, "--json"], env)
            summary = json.loads(out)["summary"]
            if summary["written"] != args.entries:
                raise load.BenchError(f"import wrote {summary['written']}, not {args.entries}")
            times["import"].append(took)
            took, out = _run([*cli, "import-env", str(dotenv), "--prefix", prefix, "--json"], env)
            if json.loads(out)["summary"]["unchanged"] != args.entries:
                raise load.BenchError("the re-import found changes")
            times["re-import"].append(took)
            exported = Path(tmp) / f"out{n}.env"
            took, _ = _run([*cli, "export-env", prefix, "-o", str(exported)], env)
            if exported.read_text().count("KEY_") != args.entries:
                raise load.BenchError("export-env left names out")
            times["export-env"].append(took)
            took, _ = _run([*cli, "run", "--prefix", prefix, "--", "true"], env)
            times["run"].append(took)
            print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    print(f"# python bench/bulk.py --entries {args.entries} --rounds {args.rounds}  ({os.cpu_count()} CPUs)")
    for name, values in times.items():
        print(f"{name:11} median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
