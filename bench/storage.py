#!/usr/bin/env python3
"""The load benchmark (bench/load.py) on PostgreSQL beside SQLite, in one run.

Run by hand (not a pytest test; needs the PostgreSQL server binaries and asyncpg)::

    python bench/storage.py --duration 5
    python bench/storage.py --duration 3 --concurrency 1,16 --rounds 3 --json > storage.json

It starts a throwaway PostgreSQL server exactly as the tests do (``tests/postgres_fixture.py``:
initdb + pg_ctl on a free 127.0.0.1 port in a temporary directory, as the ``postgres`` user when run
as root, fsync off), and two ``secretsd serve`` daemons from ``bench/load.py``: one on SQLite (the
default) and one with ``[storage] backend = "postgres"`` (through ``SECRETSD_STORAGE__*``
variables, the DSN in an environment variable). Both are seeded identically and stay up; only one
is under load at a time. For each round, operation and concurrency it runs one ``load.py`` cell on
each, flipping the order every round, and reports medians over rounds plus the PostgreSQL/SQLite
ratio of each round's back-to-back pair (median over rounds). ``db CPU µs/req`` is the PostgreSQL
server's own CPU (postmaster and its backends, from /proc) per request: work the daemon's CPU
column does not show. Everything is stopped and removed at the end, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import load  # bench/load.py, next to this file

from tests.postgres_fixture import PostgresServer, find_bindir

DSN_ENV = "SECRETSD_BENCH_PG_DSN"
BACKENDS = ("sqlite", "postgres")


def tree_cpu_seconds(root_pid: int) -> float:
    """utime + stime of a process and its direct children (the postmaster and its backends)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = stat.read_text()
            rest = raw[raw.rindex(")") + 2 :].split()
            pid, ppid = int(stat.parent.name), int(rest[1])
            if pid == root_pid or ppid == root_pid:
                total += (int(rest[11]) + int(rest[12])) / load.CLK_TCK
    return total


@contextlib.contextmanager
def daemon_env_plus(extra: dict[str, str]) -> Iterator[None]:
    """load.Daemon builds its environment with load.daemon_env(); add ours while it does."""
    original = load.daemon_env
    load.daemon_env = lambda: original() | extra
    try:
        yield
    finally:
        load.daemon_env = original


class StorageDaemon(load.Daemon):
    """A load.py daemon with extra environment (the storage settings) at init and start."""

    def __init__(self, workdir: Path, port: int, extra_env: dict[str, str]) -> None:
        super().__init__(workdir, port)
        self.extra_env = extra_env

    def init(self) -> None:
        with daemon_env_plus(self.extra_env):
            super().init()

    def start(self) -> None:
        with daemon_env_plus(self.extra_env):
            super().start()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=load.parse_duration, default=5.0, help="seconds per cell (5)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured warm-up per cell (0.5)")
    parser.add_argument("--concurrency", type=load.parse_concurrency, default=[1, 16], help="levels (1,16)")
    parser.add_argument("--operations", type=lambda s: [p.strip().upper() for p in s.split(",")],
                        default=list(load.OPERATIONS), help="subset of GET,PUT (both)")
    parser.add_argument("--rounds", type=load.positive_int, default=3, help="rounds, order flipped each (3)")
    parser.add_argument("--secrets", type=load.positive_int, default=1000, help="secrets seeded (1000)")
    parser.add_argument("--value-bytes", type=load.positive_int, default=64, help="value size (64)")
    parser.add_argument("--max-requests", type=load.positive_int, default=1_000_000, help="cap per cell")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    bad = [op for op in args.operations if op not in load.OPERATIONS]
    if bad:
        parser.error(f"unknown operation(s): {', '.join(bad)}")
    return args


async def run(args: argparse.Namespace, daemons: dict[str, StorageDaemon], pg: PostgresServer) -> list[dict[str, Any]]:
    for name, daemon in daemons.items():
        load.log(f"seeding {name}: {args.secrets} secrets of {args.value_bytes} bytes ...")
        await load.seed(daemon.base_url, daemon.token, args.secrets, args.value_bytes, random.Random(args.seed))
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    rng = random.Random(args.seed)
    cells: list[dict[str, Any]] = []
    for n in range(1, args.rounds + 1):
        order = BACKENDS if n % 2 else tuple(reversed(BACKENDS))
        for operation in args.operations:
            for concurrency in args.concurrency:
                for backend in order:
                    load.log(f"round {n}: {operation} c={concurrency} {backend}: {args.duration:g}s ...")
                    db_before = tree_cpu_seconds(postmaster)
                    result = await load.run_cell(
                        operation=operation, concurrency=concurrency, daemon=daemons[backend],
                        secrets=args.secrets, value_bytes=args.value_bytes, duration=args.duration,
                        warmup=args.warmup, max_requests=args.max_requests, rng=rng,
                    )
                    db_cpu = tree_cpu_seconds(postmaster) - db_before
                    for sample in result.error_samples:
                        load.log(f"  error: {sample}")
                    cells.append({"round": n, "backend": backend, **asdict(result),
                                  "db_cpu_us_per_req": round(1e6 * db_cpu / result.requests, 1)
                                  if result.requests else 0.0})
    return cells


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(c["operation"], c["concurrency"]) for c in cells}, key=lambda k: (k[0], k[1]))
    for operation, concurrency in keys:
        mine = [c for c in cells if c["operation"] == operation and c["concurrency"] == concurrency]
        row: dict[str, Any] = {"operation": operation, "concurrency": concurrency}
        for backend in BACKENDS:
            side = [c for c in mine if c["backend"] == backend]
            for field in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "db_cpu_us_per_req", "other_cpu_pct"):
                row[f"{backend}_{field}"] = round(load.median([c[field] for c in side]), 2)
            row[f"{backend}_errors"] = sum(c["errors"] for c in side)
        ratios = []
        for n in sorted({c["round"] for c in mine}):
            pair = {c["backend"]: c for c in mine if c["round"] == n}
            if pair["sqlite"]["rps"]:
                ratios.append(pair["postgres"]["rps"] / pair["sqlite"]["rps"])
        row["rps_ratio_pg_over_sqlite"] = round(load.median(ratios), 2)
        rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    headers = ["op", "conc", "SQLite req/s", "PG req/s", "PG/SQLite", "SQLite p50/p99 ms", "PG p50/p99 ms",
               "srv CPU µs/req SQLite / PG", "db CPU µs/req (PG)", "errors"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["operation"], str(r["concurrency"]), f"{r['sqlite_rps']:.0f}", f"{r['postgres_rps']:.0f}",
            f"{r['rps_ratio_pg_over_sqlite']:.2f}",
            f"{r['sqlite_p50_ms']:.2f} / {r['sqlite_p99_ms']:.2f}",
            f"{r['postgres_p50_ms']:.2f} / {r['postgres_p99_ms']:.2f}",
            f"{r['sqlite_server_cpu_us_per_req']:.0f} / {r['postgres_server_cpu_us_per_req']:.0f}",
            f"{r['postgres_db_cpu_us_per_req']:.0f}", str(r["sqlite_errors"] + r["postgres_errors"]),
        ]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load.install_signal_handlers()
    bindir = find_bindir()
    if bindir is None:
        load.log("PostgreSQL server binaries not found (apt-get install postgresql, or set SECRETSD_TEST_PG_BINDIR)")
        return 1
    command = "python bench/storage.py " + " ".join(sys.argv[1:] if argv is None else argv)
    pg = PostgresServer.start(bindir)
    daemons: dict[str, StorageDaemon] = {}
    try:
        load.log(f"throwaway PostgreSQL on 127.0.0.1:{pg.port} (started in {pg.startup_seconds:.1f}s)")
        extra = {
            "sqlite": {},
            "postgres": {"SECRETSD_STORAGE__BACKEND": "postgres", "SECRETSD_STORAGE__DSN_ENV": DSN_ENV,
                         DSN_ENV: pg.dsn("postgres")},
        }
        import tempfile

        for backend in BACKENDS:
            workdir = Path(tempfile.mkdtemp(prefix=f"secretsd-bench-{backend}-"))
            daemon = daemons[backend] = StorageDaemon(workdir, load.free_port(), extra[backend])
            daemon.init()
            daemon.start()
        cells = asyncio.run(run(args, daemons, pg))
    except KeyboardInterrupt:
        load.log("interrupted")
        return 130
    except load.BenchError as exc:
        load.log(f"error: {exc}")
        return 1
    finally:
        for daemon in daemons.values():
            daemon.stop()
            import shutil

            shutil.rmtree(daemon.workdir, ignore_errors=True)
        pg.stop()
    rows = summarise(cells)
    if args.json:
        print(json.dumps({"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "machine": load.machine_info(), "settings": vars(args) | {"concurrency": args.concurrency},
                          "summary": rows, "cells": cells}, indent=2, default=str))
    else:
        info = load.machine_info()
        print(f"# {command}")
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}; {info['nproc']} CPUs ({info['cpu_model']}); "
              f"Python {info['python']}; {args.rounds} round(s), medians; PostgreSQL from {bindir}")
        print(format_summary(rows))
    return 1 if any(c["errors"] for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
