"""A read through the Vault façade against the native read of the same secrets, side by side.

    python bench/vault_get.py --duration 3 --concurrency 16 --rounds 3

One daemon (bench/load.py's), secrets seeded natively; each round runs the native GET
(`/v1/secrets/{path}`, `Authorization: Bearer`) and then the façade's (`/v1/secret/data/{path}`,
`X-Vault-Token`) for the same time at the same concurrency, and reports the daemon's CPU per request
and the requests per second of each, then the medians. Issue 18's target: the façade's GET within
10% of the native one.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # bench/load.py: the daemon and the CPU meters


async def _seed(url: str, token: str, count: int, value_bytes: int, as_map: bool) -> list[str]:
    paths = [f"bench/v{i:05d}" for i in range(count)]
    rng = random.Random(1)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for start in range(0, count, 1000):
            items = []
            for path in paths[start:start + 1000]:
                value = load.make_value(value_bytes, rng)
                items.append({"path": path, "value": f'{{"user":"app","password":"{value}"}}' if as_map else value})
            async with session.post(f"{url}/v1/secrets:batch", json={"items": items}) as resp:
                resp.raise_for_status()
    return paths


async def _cell(urls: list[str], headers: dict[str, str], pid: int, concurrency: int,
                duration: float) -> tuple[float, float]:
    """(daemon CPU µs per request, requests per second) of ``duration`` seconds of closed-loop GETs."""
    return await load.closed_loop_gets(urls, headers, aiohttp.TCPConnector(limit=concurrency), pid, concurrency,
                                       duration)


async def _run(args: argparse.Namespace, daemon: load.Daemon) -> None:
    paths = await _seed(daemon.base_url, daemon.token, args.secrets, args.value_bytes, args.maps)
    native = ([f"{daemon.base_url}/v1/secrets/{p}" for p in paths], {"Authorization": f"Bearer {daemon.token}"})
    vault = ([f"{daemon.base_url}/v1/secret/data/{p}" for p in paths], {"X-Vault-Token": daemon.token})
    rows: dict[str, list[tuple[float, float]]] = {"native": [], "vault": []}
    for n in range(args.rounds):
        for name, (urls, headers) in (("native", native), ("vault", vault)):
            cpu, rps = await _cell(urls, headers, daemon.pid, args.concurrency, args.duration)
            rows[name].append((cpu, rps))
            print(f"round {n + 1} {name:6s}: {cpu:6.0f} µs CPU/GET, {rps:6.0f} GET/s", flush=True)
    med = {name: (statistics.median(c for c, _ in r), statistics.median(s for _, s in r)) for name, r in rows.items()}
    for name, (cpu, rps) in med.items():
        print(f"median {name:6s}: {cpu:6.0f} µs CPU/GET, {rps:6.0f} GET/s")
    print(f"façade / native CPU per GET: {med['vault'][0] / med['native'][0]:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secrets", type=int, default=1000)
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--maps", action="store_true", help="seed JSON-object values (read as maps by the façade)")
    args = parser.parse_args()
    with load.running_daemon(0, None) as daemon:
        asyncio.run(_run(args, daemon))
    return 0


if __name__ == "__main__":
    sys.exit(main())
