#!/usr/bin/env python3
"""The bulk paths of two source trees side by side: wall time and the daemon's CPU per command.

Run by hand (each tree a checkout or ``git archive REV | tar -x -C DIR``)::

    python bench/bulk_ab.py --trees /tmp/old,/tmp/new --entries 10000 --rounds 3

For each round and each tree in turn (interleaved, so a busy machine weighs on both alike), a fresh
daemon of that tree (``PYTHONPATH`` = the tree, and its ``client/`` when it has one), then
``import-env`` of ``--entries`` new keys, the same import again (no change), ``run --prefix P --
true`` and ``export-env P``, each through that tree's CLI. Printed per tree: the median wall time of
each command and the daemon's CPU time during it (user + system, from ``/proc/PID/stat``). The
daemon's CPU is the figure to compare: the CLI's own start-up is in the wall time only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import load  # bench/load.py: this script's directory is first on sys.path

COMMANDS = ("import", "re-import", "run", "export-env")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _python_path(tree: Path) -> str:
    return os.pathsep.join(str(p) for p in (tree, tree / "client") if p.is_dir())


def _one_round(tree: Path, dotenv: Path, out: Path) -> dict[str, tuple[float, float]]:
    os.environ["PYTHONPATH"] = _python_path(tree)  # the daemon's init and serve, and the CLI below
    cli = load.secretsd_command()
    found: dict[str, tuple[float, float]] = {}
    with load.running_daemon(0, None, env=dict(os.environ)) as daemon:
        env = load.daemon_env() | {"SECRETSD_ADDR": daemon.base_url, "SECRETSD_TOKEN": daemon.token}
        commands = {
            "import": ["import-env", str(dotenv), "--prefix", "p"],
            "re-import": ["import-env", str(dotenv), "--prefix", "p"],
            "run": ["run", "--prefix", "p", "--", "true"],
            "export-env": ["export-env", "p", "-o", str(out)],
        }
        for name in COMMANDS:
            cpu, began = _cpu_seconds(daemon.pid), time.perf_counter()
            done = subprocess.run([*cli, *commands[name]], env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise load.BenchError(f"{tree}: {name} failed ({done.returncode}): {done.stderr.strip()}")
            found[name] = (time.perf_counter() - began, _cpu_seconds(daemon.pid) - cpu)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", required=True, help="source trees to compare, separated by commas")
    parser.add_argument("--entries", type=load.positive_int, default=10_000)
    parser.add_argument("--rounds", type=load.positive_int, default=3)
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    results: dict[Path, dict[str, list[tuple[float, float]]]] = {t: {c: [] for c in COMMANDS} for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        dotenv = Path(tmp) / "big.env"
        dotenv.write_text("".join(f"KEY_{i:05d}={secrets.token_hex(20)}\n" for i in range(args.entries)))
        for n in range(args.rounds):
            for tree in trees:
                for name, figures in _one_round(tree, dotenv, Path(tmp) / "out.env").items():
                    results[tree][name].append(figures)
            print(f"round {n + 1} of {args.rounds} done", flush=True)
    print(f"# python bench/bulk_ab.py --trees {args.trees} --entries {args.entries} --rounds {args.rounds}")
    for tree in trees:
        cells = "  ".join(f"{name}: wall {statistics.median(w for w, _ in runs):.2f} s, daemon CPU "
                          f"{statistics.median(c for _, c in runs):.2f} s" for name, runs in results[tree].items())
        print(f"{tree}\n  {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
