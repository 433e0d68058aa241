#!/usr/bin/env python3
"""Does a read cost more in a bigger store? GET through the domain service at several store sizes.

Run by hand (not a pytest test)::

    python bench/scale.py --sizes 1000,100000,1000000
    python bench/scale.py --sizes 1000,100000 --reads 20000 --json

For each size it grows one SQLite store (in-process daemon on the file key provider, values sealed
as usual, written with concurrency through the group commit), then reads random paths through
``SecretsService.get`` (authorisation aside, the whole read: storage lookup, record, AES-GCM
open, the serving rule) and reports process CPU per read, p50/p99 wall time per read, the
database file size and the process RSS. The HTTP layer's cost does not depend on the number of
secrets, so it is left out: this isolates what could grow with the store. Sizes are reached by
growing the same store, smallest first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secretsd.domain.identity import Principal
from secretsd.runtime.config import load_settings
from secretsd.runtime.daemon import Daemon, initialize_store

ADMIN = Principal(client="bench", policies=("root",), method="token", token_id=None)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


async def _grow(daemon: Daemon, start: int, stop: int, value: str, concurrency: int = 64) -> float:
    began = time.perf_counter()
    queue = iter(range(start, stop))

    async def writer() -> None:
        for i in queue:
            await daemon.secrets.put(ADMIN, f"scale/{i % 1000:03d}/k{i}", value)

    await asyncio.gather(*[writer() for _ in range(concurrency)])
    return time.perf_counter() - began


async def _read(daemon: Daemon, size: int, reads: int, rng: random.Random) -> dict[str, float]:
    paths = [f"scale/{(i := rng.randrange(size)) % 1000:03d}/k{i}" for _ in range(reads)]
    for path in paths[:1000]:  # warm the page cache and the code paths
        await daemon.secrets.get(ADMIN, path)
    times: list[float] = []
    cpu = time.process_time()
    for path in paths:
        t = time.perf_counter()
        await daemon.secrets.get(ADMIN, path)
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    times.sort()
    return {"cpu_us_per_read": 1e6 * cpu / reads, "p50_us": 1e6 * statistics.median(times),
            "p99_us": 1e6 * times[int(0.99 * (len(times) - 1))]}


async def run(sizes: list[int], reads: int, value_bytes: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="secretsd-scale-") as tmp:
        settings = load_settings(None, data_dir=Path(tmp) / "data", audit={"enabled": False},
                                 max_versions=1)
        await initialize_store(settings)
        daemon = Daemon(settings)
        await daemon.start()
        value = "v" * value_bytes
        rows: list[dict[str, Any]] = []
        have = 0
        try:
            for size in sizes:
                grew = await _grow(daemon, have, size, value)
                have = size
                row = {"secrets": size, "grow_s": round(grew, 1)}
                row.update({k: round(v, 1) for k, v in (await _read(daemon, size, reads, rng)).items()})
                db = settings.require_data_dir() / "secretsd.db"
                row["db_mb"] = round(db.stat().st_size / 2**20, 1)
                row["rss_mb"] = round(_rss_mb(), 1)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            await daemon.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000", help="comma-separated store sizes, ascending")
    parser.add_argument("--reads", type=int, default=20000, help="random reads measured per size")
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows = asyncio.run(run(sizes, args.reads, args.value_bytes, args.seed))
    if args.json:
        print(json.dumps({"command": " ".join(["python", *sys.argv]), "nproc": os.cpu_count(), "rows": rows}))
        return 0
    print(f"{'secrets':>10} {'CPU us/read':>12} {'p50 us':>8} {'p99 us':>8} {'db MB':>7} {'RSS MB':>7} {'grow s':>7}")
    for r in rows:
        print(f"{r['secrets']:>10} {r['cpu_us_per_read']:>12} {r['p50_us']:>8} {r['p99_us']:>8} {r['db_mb']:>7} "
              f"{r['rss_mb']:>7} {r['grow_s']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
