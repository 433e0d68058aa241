"""Unix-socket peer credentials against bearer tokens on a GET, side by side in one run.

    python bench/auth_unix.py --duration 3 --concurrency 16 --rounds 3

One daemon (bench/load.py's) with ``listen_unix`` and a rule for this process's uid; each round runs,
for the same time at the same concurrency, GETs with a bearer token over TCP (the reference), GETs
over the Unix socket with no token (peer credentials, read once per connection), and GETs with the
bearer token over the socket. It prints the daemon's CPU per request and the requests per second of
each, then the medians and each method's ratio to the bearer token over TCP (issue 13: the overhead
of each method on a GET).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # bench/load.py: the daemon and the CPU meters


async def _cell(base: str, paths: list[str], token: str | None, sock: str | None, pid: int, concurrency: int,
                duration: float) -> tuple[float, float]:
    """(daemon CPU µs per request, requests per second) of ``duration`` seconds of closed-loop GETs."""
    connector: aiohttp.BaseConnector = (aiohttp.UnixConnector(path=sock, limit=concurrency) if sock
                                        else aiohttp.TCPConnector(limit=concurrency))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await load.closed_loop_gets([f"{base}/v1/secrets/{p}" for p in paths], headers, connector, pid,
                                       concurrency, duration)


async def _seed(url: str, token: str, count: int) -> list[str]:
    paths = [f"bench/u{i:05d}" for i in range(count)]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        items = [{"path": p, "value": "x" * 64} for p in paths]
        async with session.post(f"{url}/v1/secrets:batch", json={"items": items}) as resp:
            resp.raise_for_status()
    return paths


async def _run(args: argparse.Namespace, daemon: load.Daemon, sock: str) -> None:
    paths = await _seed(daemon.base_url, daemon.token, args.secrets)
    cells = {
        "bearer/tcp": (daemon.base_url, daemon.token, None),
        "unix peer": ("http://localhost", None, sock),
        "bearer/unix": ("http://localhost", daemon.token, sock),
    }
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in cells}
    for n in range(args.rounds):
        for name, (base, token, path) in cells.items():
            cpu, rps = await _cell(base, paths, token, path, daemon.pid, args.concurrency, args.duration)
            rows[name].append((cpu, rps))
            print(f"round {n + 1} {name:11s}: {cpu:6.0f} µs CPU/GET, {rps:6.0f} GET/s", flush=True)
    med = {name: (statistics.median(c for c, _ in r), statistics.median(s for _, s in r)) for name, r in rows.items()}
    ref_cpu, ref_rps = med["bearer/tcp"]
    for name, (cpu, rps) in med.items():
        print(f"median {name:11s}: {cpu:6.0f} µs CPU/GET ({cpu / ref_cpu:.2f}x), "
              f"{rps:6.0f} GET/s ({rps / ref_rps:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secrets", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="secretsd-bench-unix-") as tmp:
        sock = f"{tmp}/s.sock"
        config = Path(tmp) / "secretsd.toml"
        config.write_text(f'listen_unix = "{sock}"\nunix_socket_mode = "0600"\n[[auth.unix.rules]]\n'
                          f'uid = {os.getuid()}\nclient = "bench"\npolicies = ["root"]\n')
        with load.running_daemon(0, None, env={"SECRETSD_CONFIG": str(config)}) as daemon:
            asyncio.run(_run(args, daemon, sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
