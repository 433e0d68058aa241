#!/usr/bin/env python3
"""How many audit bytes one connection can make the daemon write with requests that fail authentication.

Run by hand::

    python bench/audit_flood.py --duration 10

It makes a temporary store (``secretsd init``), starts ``secretsd serve`` on a free loopback port,
and sends, over one keep-alive connection, as many ``GET /v1/secrets/<1,000-character path>`` with a
well-formed but unknown bearer token as it can for ``--duration`` seconds. Every answer must be 401.
``--remotes N`` spreads them over N source addresses (loopback 127.0.x.y, one connection each).
Printed: requests/s, the audit directory's growth in bytes/s, and the largest single record. The
daemon is stopped with SIGTERM (so pending summaries are flushed) before the bytes are counted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def audit_bytes(data: Path) -> tuple[int, int, int]:
    """(total bytes, records, largest record) of every audit file under ``data``."""
    total = records = largest = 0
    for path in (data / "audit").glob("*.jsonl*"):
        raw = path.read_bytes()
        total += len(raw)
        for line in raw.splitlines():
            records += 1
            largest = max(largest, len(line) + 1)
    return total, records, largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--path-chars", type=int, default=1000)
    parser.add_argument("--config", type=Path, help="a TOML config for the daemon")
    parser.add_argument("--remotes", type=int, default=1,
                        help="spread the requests over this many source addresses 127.0.0.2... (one "
                             "connection each, used in turn), as many attackers would")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d"
        subprocess.run([sys.executable, "-m", "secretsd", "init", "--data-dir", str(data), "--json"],
                       check=True, capture_output=True)
        port = free_port()
        extra = ["--config", str(args.config)] if args.config else []
        daemon = subprocess.Popen([sys.executable, "-m", "secretsd", "serve", "--data-dir", str(data),
                                   "--listen", f"127.0.0.1:{port}", *extra],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/readyz")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            before = audit_bytes(data)
            conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                                source_address=(f"127.0.{2 + i // 250}.{2 + i % 250}", 0))
                     for i in range(args.remotes)]
            path = "/v1/secrets/" + "a" * args.path_chars
            headers = {"Authorization": "Bearer sdt_0000000000000000_" + "A" * 43}
            sent = 0
            started = time.monotonic()
            while time.monotonic() - started < args.duration:
                conn = conns[sent % len(conns)]
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 401:
                    print(f"unexpected status {resp.status}", file=sys.stderr)
                    return 1
                sent += 1
            elapsed = time.monotonic() - started
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        after = audit_bytes(data)
        grown, recs = after[0] - before[0], after[1] - before[1]
        print(json.dumps({"remotes": args.remotes, "requests": sent, "seconds": round(elapsed, 2),
                          "requests_per_second": round(sent / elapsed), "audit_records": recs,
                          "audit_bytes": grown, "audit_bytes_per_second": round(grown / elapsed),
                          "largest_record_bytes": after[2], "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
