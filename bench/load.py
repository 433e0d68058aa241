#!/usr/bin/env python3
"""Load benchmark for jarvis-secretsd: GET and PUT at several concurrencies against a real daemon.

Run by hand (this is not a pytest test)::

    python bench/load.py --duration 5
    python bench/load.py --duration 3 --concurrency 1,16 --json > result.json
    python bench/load.py --audit off                      # the same cells with [audit] enabled = false
    python bench/load.py --audit-compare --rounds 5       # GET c=16, audit on vs off, alternated

What it does:

1. creates a temporary data dir and runs ``secretsd init --json`` in it;
2. starts ``secretsd serve`` on a free loopback port (127.0.0.1 only) and waits for ``/healthz``;
3. seeds ``--secrets`` secrets of ``--value-bytes`` bytes each;
4. for each operation (GET, PUT) and each concurrency runs one bounded cell: a short warm-up, then
   requests until ``--duration`` seconds have passed or ``--max-requests`` have been sent, whichever
   comes first, over keep-alive connections (one per concurrent worker);
5. prints one row per cell: throughput, latency percentiles, errors, and CPU time per request of
   the daemon (from ``/proc/PID/stat``) and of this client process (``time.process_time``);
6. stops the daemon (SIGTERM, then SIGKILL) and removes the temporary dir, also on Ctrl-C or error.

The client (this process) and the daemon are separate processes, but they share the machine's cores:
look at the CPU % columns to see which side was saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HOST = "127.0.0.1"  # never listen on anything but loopback
OPERATIONS = ("GET", "PUT")
PATH_PREFIX = "bench/s"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
SEED_CONCURRENCY = 16
SEED_TIMEOUT_S = 300.0
CELL_GRACE_S = 60.0  # a cell is abandoned this long after its time cap, whatever happens


class BenchError(Exception):
    """Something went wrong setting up or running the benchmark (not a request error)."""


# -- results ---------------------------------------------------------------------------------
@dataclass
class CellResult:
    operation: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    server_cpu_us_per_req: float
    server_cpu_pct: float
    server_sys_share_pct: float
    client_cpu_s: float
    client_cpu_us_per_req: float
    client_cpu_pct: float
    other_cpu_pct: float
    error_samples: list[str] = field(default_factory=list)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-pct * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


# -- the daemon process ----------------------------------------------------------------------
def proc_cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a whole process (all its threads) and its live children (``serve --workers``
    runs the workers as children of a supervisor), in seconds, from /proc."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces or parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK  # fields 14 and 15 of proc(5)
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in children.read_text().split():
                with contextlib.suppress(OSError, ValueError):
                    cu, cs = proc_cpu_times(int(child))
                    utime, stime = utime + cu, stime + cs
    return utime, stime


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq, steal), from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process, in seconds."""
    return sum(proc_cpu_times(pid))


async def closed_loop_gets(urls: list[str], headers: dict[str, str], connector: aiohttp.BaseConnector, pid: int,
                           concurrency: int, duration: float) -> tuple[float, float]:
    """(daemon CPU µs per request, requests per second) of ``duration`` seconds of closed-loop GETs
    over ``urls`` by ``concurrency`` workers, after an unmeasured 0.5 s warm-up (connections and
    handshakes made); any non-200 answer fails the run. The cell of the A/B scripts (auth_overhead,
    auth_unix, vault_get)."""
    done = errors = 0
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        async def worker(n: int) -> None:
            nonlocal done, errors
            i = n
            while time.monotonic() < stop:
                async with session.get(urls[i % len(urls)]) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1
                    else:
                        errors += 1
                i += concurrency

        stop = time.monotonic() + 0.5
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        done = 0
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        stop = t0 + duration
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        cpu, elapsed = proc_cpu_seconds(pid) - cpu0, time.monotonic() - t0
    if errors:
        raise BenchError(f"{errors} requests failed")
    return cpu / done * 1e6, done / elapsed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def secretsd_command() -> list[str]:
    """The ``secretsd`` console script next to this interpreter, else on PATH, else via ``-c``."""
    beside = Path(sys.executable).with_name("secretsd")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("secretsd")
    if found:
        return [found]
    return [sys.executable, "-c", "from secretsd.cli import main; main()"]


#: Settings for the daemon given on the command line (--daemon-env), the only SECRETSD_* it gets.
DAEMON_SETTINGS: dict[str, str] = {}


def daemon_env() -> dict[str, str]:
    """Our environment without SECRETSD_* settings, so a developer's shell cannot skew the run."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SECRETSD_")} | DAEMON_SETTINGS


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the daemon if this benchmark dies without cleaning up (even SIGKILL)."""
    os.setsid()  # own process group: a terminal Ctrl-C reaches us, and we stop the daemon in order
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Daemon:
    """A ``secretsd serve`` child process bound to 127.0.0.1, with its data dir and log file."""

    def __init__(self, workdir: Path, port: int, *, audit: bool = True, workers: int = 1,
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.audit = audit
        self.env = dict(env or {})  # this daemon's own SECRETSD_* settings, on top of --daemon-env
        self.workers = workers
        self.data_dir = workdir / "data"
        self.log_path = workdir / "secretsd.log"
        self.port = port
        self.base_url = f"http://{HOST}:{port}"
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the daemon is not running")
        return self.proc.pid

    def init(self) -> None:
        cmd = [*secretsd_command(), "init", "--data-dir", str(self.data_dir), "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=daemon_env(), check=False)
        if done.returncode != 0:
            raise BenchError(f"secretsd init failed ({done.returncode}): {done.stderr.strip()}")
        try:
            self.token = str(json.loads(done.stdout)["admin_token"])
        except (ValueError, KeyError) as exc:
            raise BenchError("secretsd init --json printed no admin_token") from exc

    def start(self) -> None:
        cmd = [*secretsd_command(), "serve", "--data-dir", str(self.data_dir), "--listen", f"{HOST}:{self.port}"]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        env = daemon_env()
        if not self.audit:
            # Everything else stays at its default; only the audit log is switched off.
            env["SECRETSD_AUDIT__ENABLED"] = "false"
        env.update(self.env)
        self._log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,  # single-threaded at this point; Linux-only helper
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"secretsd serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise BenchError(f"secretsd did not answer /healthz within {STARTUP_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL. Safe to call more than once."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def audit_records(self) -> int:
        """Lines in the daemon's audit log files (0 when audit is off): proves which mode ran."""
        total = 0
        for path in (self.data_dir / "audit").glob("*.jsonl*"):  # <chain>.jsonl and its rotations
            with contextlib.suppress(OSError), path.open("rb") as fh:
                total += sum(1 for _ in fh)
        return total

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])


# -- the load --------------------------------------------------------------------------------
def make_value(size: int, rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=size))


def put_bodies(value_bytes: int, count: int, rng: random.Random) -> list[bytes]:
    """Pre-encoded PUT bodies, so the client spends no CPU building values during a cell."""
    return [json.dumps({"value": make_value(value_bytes, rng)}).encode() for _ in range(count)]


def secret_urls(base_url: str, secrets: int) -> list[str]:
    return [f"{base_url}/v1/secrets/{PATH_PREFIX}{i:06d}" for i in range(secrets)]


def new_session(token: str, concurrency: int) -> aiohttp.ClientSession:
    # One keep-alive connection per worker; the pool never opens more than that.
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        auto_decompress=False,
    )


async def run_workers(coros: Sequence[Coroutine[Any, Any, None]], timeout: float) -> None:
    """Run workers concurrently with a hard time cap; on any exit, cancel and reap every one of them."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # re-raise the first failure, if any
        if pending:
            raise BenchError(f"workers still running after the {timeout:.0f}s hard cap")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def seed(base_url: str, token: str, secrets: int, value_bytes: int, rng: random.Random) -> None:
    urls = secret_urls(base_url, secrets)
    bodies = put_bodies(value_bytes, min(secrets, 64), rng)
    queue = list(enumerate(urls))
    failures: list[str] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue and not failures:
            i, url = queue.pop()
            async with session.put(url, data=bodies[i % len(bodies)]) as resp:
                await resp.read()
                if resp.status != 200:
                    failures.append(f"seeding {url} -> HTTP {resp.status}")

    async with new_session(token, SEED_CONCURRENCY) as session:
        await run_workers([worker(session) for _ in range(SEED_CONCURRENCY)], SEED_TIMEOUT_S)
    if failures:
        raise BenchError(failures[0])


async def run_cell(
    *,
    operation: str,
    concurrency: int,
    daemon: Daemon,
    secrets: int,
    value_bytes: int,
    duration: float,
    warmup: float,
    max_requests: int,
    rng: random.Random,
) -> CellResult:
    urls = secret_urls(daemon.base_url, secrets)
    bodies = put_bodies(value_bytes, 64, rng) if operation == "PUT" else []
    latencies: list[float] = []
    errors = 0
    error_samples: list[str] = []
    measuring = False
    sent = 0
    stop_at = 0.0

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal errors
        url = urls[rng.randrange(len(urls))]
        started = time.perf_counter()
        try:
            if operation == "GET":
                async with session.get(url) as resp:
                    body = await resp.read()
                    status = resp.status
            else:
                async with session.put(url, data=bodies[n % len(bodies)]) as resp:
                    body = await resp.read()
                    status = resp.status
            ok = status == 200
            # Problem documents never echo secret values, so their detail is safe to show.
            problem = "" if ok else f"HTTP {status} {body[:200].decode(errors='replace')}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            problem = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        if not measuring:
            return
        if ok:
            latencies.append(elapsed)
        else:
            errors += 1
            if len(error_samples) < 5:
                error_samples.append(problem)

    async def worker(session: aiohttp.ClientSession, until: float, budget: int) -> None:
        nonlocal sent
        while time.perf_counter() < until and sent < budget:
            sent += 1
            await one(session, sent)

    async with new_session(daemon.token, concurrency) as session:
        # Warm-up: open the keep-alive connections and warm caches; not measured.
        if warmup > 0:
            until = time.perf_counter() + warmup
            await run_workers([worker(session, until, max_requests) for _ in range(concurrency)], warmup + CELL_GRACE_S)
        sent = 0
        measuring = True
        machine_before = machine_busy_seconds()
        server_before = proc_cpu_times(daemon.pid)
        client_before = time.process_time()
        started = time.perf_counter()
        stop_at = started + duration
        await run_workers([worker(session, stop_at, max_requests) for _ in range(concurrency)], duration + CELL_GRACE_S)
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - client_before
        server_after = proc_cpu_times(daemon.pid)
        server_user = server_after[0] - server_before[0]
        server_sys = server_after[1] - server_before[1]
        server_cpu = server_user + server_sys
        other_cpu = max(0.0, machine_busy_seconds() - machine_before - server_cpu - client_cpu)
        measuring = False

    latencies.sort()
    ok_count = len(latencies)
    done = ok_count + errors
    per_req = 1e6 / done if done else 0.0
    return CellResult(
        operation=operation,
        concurrency=concurrency,
        requests=done,
        errors=errors,
        seconds=round(seconds, 3),
        rps=round(ok_count / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(percentile(latencies, 50) * 1000, 3),
        p99_ms=round(percentile(latencies, 99) * 1000, 3),
        max_ms=round((latencies[-1] if latencies else 0.0) * 1000, 3),
        server_cpu_s=round(server_cpu, 3),
        server_cpu_us_per_req=round(server_cpu * per_req, 1),
        server_cpu_pct=round(100 * server_cpu / seconds, 1) if seconds > 0 else 0.0,
        server_sys_share_pct=round(100 * server_sys / server_cpu, 1) if server_cpu > 0 else 0.0,
        client_cpu_s=round(client_cpu, 3),
        client_cpu_us_per_req=round(client_cpu * per_req, 1),
        client_cpu_pct=round(100 * client_cpu / seconds, 1) if seconds > 0 else 0.0,
        other_cpu_pct=round(100 * other_cpu / seconds, 1) if seconds > 0 else 0.0,
        error_samples=error_samples,
    )


# -- reporting -------------------------------------------------------------------------------
COLUMNS: list[tuple[str, str, str]] = [
    # (header, CellResult attribute, format)
    ("op", "operation", "{}"),
    ("conc", "concurrency", "{}"),
    ("requests", "requests", "{}"),
    ("req/s", "rps", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.2f}"),
    ("p99 ms", "p99_ms", "{:.2f}"),
    ("errors", "errors", "{}"),
    ("srv CPU µs/req", "server_cpu_us_per_req", "{:.0f}"),
    ("srv CPU %", "server_cpu_pct", "{:.0f}"),
    ("srv sys %", "server_sys_share_pct", "{:.0f}"),
    ("cli CPU µs/req", "client_cpu_us_per_req", "{:.0f}"),
    ("cli CPU %", "client_cpu_pct", "{:.0f}"),
    ("other CPU %", "other_cpu_pct", "{:.0f}"),
]


def format_table(results: Sequence[CellResult]) -> str:
    rows = [[fmt.format(getattr(r, attr)) for _, attr, fmt in COLUMNS] for r in results]
    headers = [h for h, _, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- main ------------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    value = float(text.removesuffix("s"))
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers, e.g. 1,16,64") from None
    if not levels or any(c < 1 or c > 1024 for c in levels):
        raise argparse.ArgumentTypeError("each concurrency must be between 1 and 1024")
    return levels


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--duration", type=parse_duration, default=5.0, help="time cap per cell, seconds; '5' or '5s' (default 5)"
    )
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured warm-up per cell, seconds (0.5)")
    parser.add_argument(
        "--max-requests",
        type=positive_int,
        default=1_000_000,
        help="request cap per cell, reached first only on very fast runs (1000000)",
    )
    parser.add_argument(
        "--concurrency",
        type=parse_concurrency,
        default=[1, 16, 64],
        help="comma-separated concurrency levels (default 1,16,64)",
    )
    parser.add_argument(
        "--operations",
        type=lambda s: [p.strip().upper() for p in s.split(",")],
        default=list(OPERATIONS),
        help="comma-separated subset of GET,PUT (default both)",
    )
    parser.add_argument("--secrets", type=positive_int, default=1000, help="secrets seeded before the run (1000)")
    parser.add_argument("--value-bytes", type=positive_int, default=64, help="size of each secret value (64)")
    parser.add_argument("--port", type=int, default=0, help="daemon port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers N (CPU counts every worker)")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="SECRETSD_X=V",
                        help="a setting for the daemon, e.g. SECRETSD_EVENT_LOOP=asyncio (repeatable)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for paths and values (1)")
    parser.add_argument("--keep-log", type=Path, help="copy the daemon's log here before cleaning up")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.add_argument(
        "--audit",
        choices=("on", "off"),
        default="on",
        help="run the daemon with its audit log on (default) or off (SECRETSD_AUDIT__ENABLED=false)",
    )
    parser.add_argument(
        "--audit-compare",
        action="store_true",
        help="measure GET at --compare-concurrency with audit on and off in one run, alternating daemons "
        "for --rounds rounds; reports medians and the on/off ratio (ignores --operations/--concurrency)",
    )
    parser.add_argument("--rounds", type=positive_int, default=5, help="--audit-compare rounds (5)")
    parser.add_argument(
        "--compare-concurrency", type=positive_int, default=16, help="--audit-compare concurrency (16)"
    )
    args = parser.parse_args(argv)
    for item in args.daemon_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("SECRETSD_"):
            parser.error(f"--daemon-env takes SECRETSD_NAME=VALUE, not {item!r}")
        DAEMON_SETTINGS[name] = value
    bad = [op for op in args.operations if op not in OPERATIONS]
    if bad:
        parser.error(f"unknown operation(s): {', '.join(bad)}")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    if args.audit_compare and args.port:
        parser.error("--audit-compare starts two daemons on free ports: drop --port")
    return args


def _raise_interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Outside the event loop, SIGTERM/SIGHUP to the benchmark take the same clean-up path as Ctrl-C."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)


@contextlib.contextmanager
def running_daemon(port: int, keep_log: Path | None, *, audit: bool = True, workers: int = 1,
                   env: Mapping[str, str] | None = None) -> Iterator[Daemon]:
    workdir = Path(tempfile.mkdtemp(prefix="secretsd-bench-"))
    daemon = Daemon(workdir, port or free_port(), audit=audit, workers=workers, env=env)
    try:
        daemon.init()
        daemon.start()
        yield daemon
    finally:
        try:
            daemon.stop()
            if keep_log is not None:
                with contextlib.suppress(OSError):
                    shutil.copyfile(daemon.log_path, keep_log)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


async def run_all(args: argparse.Namespace, daemon: Daemon) -> list[CellResult]:
    # Inside the event loop, SIGTERM/SIGHUP cancel the run like Ctrl-C does (asyncio.run handles SIGINT).
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    if main_task is not None:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, main_task.cancel)
    rng = random.Random(args.seed)
    log(f"seeding {args.secrets} secrets of {args.value_bytes} bytes ...")
    await seed(daemon.base_url, daemon.token, args.secrets, args.value_bytes, rng)
    results: list[CellResult] = []
    for operation in args.operations:
        for concurrency in args.concurrency:
            log(f"{operation} c={concurrency}: {args.duration:g}s ...")
            result = await run_cell(
                operation=operation,
                concurrency=concurrency,
                daemon=daemon,
                secrets=args.secrets,
                value_bytes=args.value_bytes,
                duration=args.duration,
                warmup=args.warmup,
                max_requests=args.max_requests,
                rng=rng,
            )
            log(
                f"  {result.rps:.0f} req/s, p99 {result.p99_ms:.2f} ms, "
                f"daemon {result.server_cpu_us_per_req:.0f} µs CPU/req, errors {result.errors}"
            )
            for sample in result.error_samples:
                log(f"  error: {sample}")
            results.append(result)
    return results


# -- audit on vs off --------------------------------------------------------------------------
@dataclass
class CompareRound:
    round: int
    order: str  # "on,off" or "off,on": which daemon was measured first this round
    on: CellResult
    off: CellResult


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return 0.0
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


async def run_compare(args: argparse.Namespace, daemons: dict[str, Daemon]) -> list[CompareRound]:
    """GET cells alternating between the audited and the unaudited daemon, round by round.

    Both daemons are seeded identically and stay up for the whole run; only one is under load at a
    time. The order flips every round, so a drift in machine load hits both sides alike.
    """
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    if main_task is not None:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, main_task.cancel)
    for mode, daemon in daemons.items():
        log(f"seeding audit-{mode} daemon with {args.secrets} secrets of {args.value_bytes} bytes ...")
        await seed(daemon.base_url, daemon.token, args.secrets, args.value_bytes, random.Random(args.seed))
    rng = random.Random(args.seed)
    rounds: list[CompareRound] = []
    for n in range(1, args.rounds + 1):
        order = ("on", "off") if n % 2 else ("off", "on")
        cells: dict[str, CellResult] = {}
        for mode in order:
            log(f"round {n}/{args.rounds}: GET c={args.compare_concurrency} audit {mode}: {args.duration:g}s ...")
            cells[mode] = result = await run_cell(
                operation="GET",
                concurrency=args.compare_concurrency,
                daemon=daemons[mode],
                secrets=args.secrets,
                value_bytes=args.value_bytes,
                duration=args.duration,
                warmup=args.warmup,
                max_requests=args.max_requests,
                rng=rng,
            )
            log(
                f"  {result.rps:.0f} req/s, p99 {result.p99_ms:.2f} ms, daemon "
                f"{result.server_cpu_us_per_req:.0f} µs CPU/req, other CPU {result.other_cpu_pct:.0f} %, "
                f"errors {result.errors}"
            )
            for sample in result.error_samples:
                log(f"  error: {sample}")
        rounds.append(CompareRound(n, ",".join(order), cells["on"], cells["off"]))
    return rounds


def compare_summary(rounds: Sequence[CompareRound]) -> dict[str, Any]:
    """Medians per side, and the throughput ratio two ways: of the medians, and the median of the
    per-round ratios (each round's two cells ran back to back, so that one resists drift better)."""
    out: dict[str, Any] = {}
    for mode in ("on", "off"):
        cells = [getattr(r, mode) for r in rounds]
        out[mode] = {
            "rps": round(median([c.rps for c in cells]), 1),
            "p50_ms": round(median([c.p50_ms for c in cells]), 3),
            "p99_ms": round(median([c.p99_ms for c in cells]), 3),
            "server_cpu_us_per_req": round(median([c.server_cpu_us_per_req for c in cells]), 1),
            "server_cpu_pct": round(median([c.server_cpu_pct for c in cells]), 1),
            "other_cpu_pct": round(median([c.other_cpu_pct for c in cells]), 1),
            "errors": sum(c.errors for c in cells),
        }
    on, off = out["on"], out["off"]
    ratio = on["rps"] / off["rps"] if off["rps"] else 0.0
    paired = median([r.on.rps / r.off.rps for r in rounds if r.off.rps])
    out["throughput_ratio_on_off"] = round(ratio, 3)
    out["throughput_ratio_on_off_paired"] = round(paired, 3)
    out["throughput_cost_pct"] = round(100 * (1 - ratio), 1)
    out["throughput_cost_pct_paired"] = round(100 * (1 - paired), 1)
    out["cpu_us_per_get_added"] = round(on["server_cpu_us_per_req"] - off["server_cpu_us_per_req"], 1)
    out["target"] = "audit on costs under 15% of GET throughput"
    out["target_met"] = bool(paired >= 0.85 and ratio >= 0.85)
    return out


def format_compare(rounds: Sequence[CompareRound], summary: dict[str, Any]) -> str:
    rows = []
    for r in rounds:
        for mode in r.order.split(","):
            cell = getattr(r, mode)
            rows.append((f"{r.round}", mode, cell))
    headers = ["round", "audit", *[h for h, _, _ in COLUMNS[2:]]]
    body = [[rnd, mode, *[fmt.format(getattr(c, attr)) for _, attr, fmt in COLUMNS[2:]]] for rnd, mode, c in rows]
    for mode in ("on", "off"):
        m = summary[mode]
        body.append([
            "median", mode, "", f"{m['rps']:.0f}", f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}", f"{m['errors']}",
            f"{m['server_cpu_us_per_req']:.0f}", f"{m['server_cpu_pct']:.0f}", "", "", "", f"{m['other_cpu_pct']:.0f}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in body]
    lines.append("")
    lines.append(
        f"throughput on/off: {summary['throughput_ratio_on_off']:.3f} of medians "
        f"(cost {summary['throughput_cost_pct']:.1f} %), {summary['throughput_ratio_on_off_paired']:.3f} "
        f"median of per-round ratios (cost {summary['throughput_cost_pct_paired']:.1f} %); "
        f"target: cost under 15 % -> {'met' if summary['target_met'] else 'NOT met'}"
    )
    lines.append(
        f"daemon CPU per GET: {summary['on']['server_cpu_us_per_req']:.0f} µs audited, "
        f"{summary['off']['server_cpu_us_per_req']:.0f} µs unaudited "
        f"(+{summary['cpu_us_per_get_added']:.0f} µs for the audit record)"
    )
    return "\n".join(lines)


def main_compare(args: argparse.Namespace, command: str) -> int:
    try:
        with contextlib.ExitStack() as stack:
            daemons = {
                mode: stack.enter_context(
                    running_daemon(0, args.keep_log.with_name(f"{args.keep_log.name}.audit-{mode}")
                                   if args.keep_log else None, audit=(mode == "on"))
                )
                for mode in ("on", "off")
            }
            for mode, daemon in daemons.items():
                log(f"audit-{mode} daemon pid {daemon.pid} on {daemon.base_url} (data in {daemon.workdir})")
            try:
                rounds = asyncio.run(run_compare(args, daemons))
            finally:
                install_signal_handlers()
            audit_lines = {mode: d.audit_records() for mode, d in daemons.items()}
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: daemons stopped, temporary data removed")
        return 130
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    if audit_lines["off"] or not audit_lines["on"]:
        log(f"error: audit records written: {audit_lines} (expected some with audit on and none with it off)")
        return 1
    summary = compare_summary(rounds)
    if args.json:
        print(json.dumps({
            "command": command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
                         "concurrency": args.compare_concurrency, "secrets": args.secrets,
                         "value_bytes": args.value_bytes},
            "audit_records_written": audit_lines,
            "rounds": [{"round": r.round, "order": r.order, "on": asdict(r.on), "off": asdict(r.off)}
                       for r in rounds],
            "summary": summary,
        }, indent=2))
    else:
        info = machine_info()
        print(f"# {command}")
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}; {info['nproc']} CPUs ({info['cpu_model']}); "
            f"Python {info['python']}; aiohttp {info['aiohttp']}"
        )
        print(
            f"# GET c={args.compare_concurrency}, {args.rounds} rounds alternating audit on/off; "
            f"{args.secrets} secrets of {args.value_bytes} bytes; {args.duration:g}s per cell after "
            f"{args.warmup:g}s warm-up; audit records written: {audit_lines['on']} (on), {audit_lines['off']} (off)"
        )
        print(format_compare(rounds, summary))
    return 1 if any(r.on.errors or r.off.errors for r in rounds) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    command = " ".join(["python", *sys.argv]) if argv is None else "load.main(" + repr(list(argv)) + ")"
    if args.audit_compare:
        return main_compare(args, command)
    try:
        with running_daemon(args.port, args.keep_log, audit=args.audit == "on", workers=args.workers) as daemon:
            log(f"daemon pid {daemon.pid} on {daemon.base_url} (data in {daemon.workdir})")
            try:
                results = asyncio.run(run_all(args, daemon))
            finally:
                install_signal_handlers()  # the event loop reset them to the defaults when it closed
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: daemon stopped, temporary data removed")
        return 130
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    settings = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "max_requests": args.max_requests,
        "concurrency": args.concurrency,
        "operations": args.operations,
        "secrets": args.secrets,
        "value_bytes": args.value_bytes,
        "audit": args.audit,
    }
    if args.json:
        report = {
            "command": command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "settings": settings,
            "results": [asdict(r) for r in results],
        }
        print(json.dumps(report, indent=2))
    else:
        info = machine_info()
        print(f"# {command}")
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}; {info['nproc']} CPUs ({info['cpu_model']}); "
            f"Python {info['python']}; aiohttp {info['aiohttp']}"
        )
        print(
            f"# {args.secrets} secrets of {args.value_bytes} bytes; {args.duration:g}s per cell "
            f"after {args.warmup:g}s warm-up; audit {args.audit}; client and daemon share the same cores"
        )
        print(format_table(results))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
