#!/usr/bin/env python3
"""Connection flood against a real daemon: does a legitimate client still get served?

Run by hand (this is not a pytest test; loopback only, bounded in time and connections)::

    python bench/flood.py                                  # 1,100 attackers on a 1,024-descriptor daemon
    python bench/flood.py --nofile 1024 --attackers 1100 --duration 10 --json

What it does:

1. creates a temporary data dir, runs ``secretsd init``, starts ``secretsd serve`` on a free
   127.0.0.1 port with RLIMIT_NOFILE set to ``--nofile`` in the child (and long timeouts unless
   ``--default-timeouts``, so the attackers are cut by the connection cap, not by a deadline);
2. opens ``--attackers`` connections (at most 5,000) as fast as it can and keeps them open, a
   third silent, a third with a partial request head, a third with a request head whose body never
   comes; attackers the daemon closes are reopened, for ``--duration`` seconds (at most 60);
3. meanwhile a legitimate client sends an authenticated ``GET /v1/auth/whoami`` on a fresh
   connection every 50 ms and records its latency and status;
4. prints: attacker connections the daemon held at the end (its ``secretsd_http_connections``), the
   cap, connections it closed by reason, the legitimate client's latency (p50, p99, max) and
   failures, and the number and size of log lines the daemon wrote;
5. stops the daemon and removes the temporary dir, also on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

MAX_ATTACKERS = 5000
REQUEST_LINE = re.compile(rb"secretsd\.http: [A-Z]+ /")
MAX_DURATION = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    # Only ever http://127.0.0.1:<port> built by this script.
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def attack(port: int, index: int) -> socket.socket | None:
    sock = socket.socket()
    sock.settimeout(0.5)
    try:
        sock.connect(("127.0.0.1", port))
        if index % 3 == 1:
            sock.sendall(b"GET /v1/secrets/app/x HTTP/1.1\r\nHost: ")
        elif index % 3 == 2:
            sock.sendall(b"PUT /v1/secrets/app/x HTTP/1.1\r\nHost: l\r\nContent-Length: 1000\r\n\r\n{")
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        return None


def alive(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nofile", type=int, default=1024, help="the daemon's RLIMIT_NOFILE")
    parser.add_argument("--attackers", type=int, default=1100)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--default-timeouts", action="store_true",
                        help="keep the daemon's default header/body/idle timeouts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    attackers = min(args.attackers, MAX_ATTACKERS)
    duration = min(args.duration, MAX_DURATION)
    # The attackers' sockets are this process's descriptors too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, attackers + 256)), hard))

    tmp = Path(tempfile.mkdtemp(prefix="secretsd-flood-"))
    proc = None
    held: list[socket.socket] = []
    try:
        data = tmp / "data"
        init = subprocess.run([sys.executable, "-m", "secretsd", "init", "--data-dir", str(data), "--json"],
                              capture_output=True, text=True, check=True)
        token = json.loads(init.stdout)["admin_token"]
        port = free_port()
        env = dict(os.environ)
        if not args.default_timeouts:
            env |= {"SECRETSD_HTTP__HEADER_TIMEOUT_SECONDS": "600", "SECRETSD_HTTP__BODY_TIMEOUT_SECONDS": "600",
                    "SECRETSD_HTTP__IDLE_TIMEOUT_SECONDS": "600"}
        log_path = tmp / "daemon.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "secretsd", "serve", "--data-dir", str(data),
                 "--listen", f"127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile)),
            )
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            with contextlib.suppress(OSError):
                if get(url + "/readyz", timeout=1)[0] == 200:
                    break
            time.sleep(0.05)
        log_lines_before = len(log_path.read_bytes().splitlines())

        latencies: list[float] = []
        failures = 0
        next_index = 0
        started = time.monotonic()
        next_probe = started
        opened = 0
        while time.monotonic() - started < duration:
            # Keep the attacker sockets the daemon has not closed; close the rest on our side too.
            still_open: list[socket.socket] = []
            for s in held:
                if alive(s):
                    still_open.append(s)
                else:
                    s.close()
            held = still_open
            while len(held) < attackers and time.monotonic() < next_probe:
                sock = attack(port, next_index)
                next_index += 1
                if sock is not None:
                    held.append(sock)
                    opened += 1
            if time.monotonic() >= next_probe:
                probe = time.monotonic()
                try:
                    status, _ = get(url + "/v1/auth/whoami", token)
                except OSError:
                    status = 0
                latencies.append(time.monotonic() - probe)
                failures += status != 200
                next_probe = probe + 0.05
            else:
                time.sleep(0.005)
        status, metrics = get(url + "/metrics", token)
        figures: dict[str, object] = {"nofile": args.nofile, "attackers": attackers, "duration_s": duration,
                                      "attacker_connections_opened": opened,
                                      "attacker_sockets_open_client_side": len(held)}
        for line in metrics.decode().splitlines():
            if line.startswith(("secretsd_http_connections ", "secretsd_http_connections_max ",
                                "secretsd_http_connections_closed_total", "secretsd_http_accept")):
                name, value = line.rsplit(" ", 1)
                figures[name] = float(value)
        log_bytes = log_path.read_bytes()
        figures |= {
            "legit_requests": len(latencies), "legit_failures": failures,
            "legit_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
            "legit_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            "legit_max_ms": round(max(latencies) * 1000, 1) if latencies else None,
            # Besides the one line per answered request (the attackers' PUTs get their 401).
            "daemon_other_log_lines_during_flood": sum(
                1 for line in log_bytes.splitlines()[log_lines_before:] if not REQUEST_LINE.search(line)),
            "daemon_log_bytes": len(log_bytes),
            "daemon_other_log_line_kinds": dict(Counter(
                line.decode(errors="replace")[24:90] for line in log_bytes.splitlines()[log_lines_before:]
                if not REQUEST_LINE.search(line) and not line.startswith(b" ")).most_common(5)),
        }
        if args.json:
            print(json.dumps(figures, indent=2))
        else:
            for key, figure in figures.items():
                print(f"{key:60} {figure}")
        return 0
    finally:
        for sock in held:
            sock.close()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
