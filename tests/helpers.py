"""Test helpers: a real daemon process, free ports, JSON over HTTP with the standard library."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None, input_text: str | None = None,
            check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = os.environ.copy() | (env or {})
    result = subprocess.run(
        [sys.executable, "-m", "secretsd", *args], capture_output=True, text=True,
        env=full_env, input=input_text, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"secretsd {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def init_store(data_dir: Path, *extra: str) -> str:
    result = run_cli("init", "--data-dir", str(data_dir), "--json", *extra, check=True)
    return str(json.loads(result.stdout)["admin_token"])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0]


def http(method: str, url: str, *, token: str | None = None, body: Any = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10) -> Response:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, payload = exc.code, dict(exc.headers), exc.read()
    lower = {k.lower(): v for k, v in hdrs.items()}
    try:
        parsed = json.loads(payload) if payload else None
    except ValueError:
        parsed = payload.decode(errors="replace")
    return Response(status, lower, parsed)


@dataclass
class DaemonProcess:
    """A real ``secretsd serve`` process on a free loopback port."""

    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True) -> DaemonProcess:
        self.log_path = self.data_dir.parent / f"daemon-{self.port}-{time.monotonic_ns()}.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "secretsd", "serve", "--data-dir", str(self.data_dir),
             "--listen", f"127.0.0.1:{self.port}", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy() | self.env,
        )
        log.close()
        self.wait_for("/healthz" if not wait_ready else "/readyz")
        return self

    def wait_for(self, route: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                if http("GET", self.url + route, timeout=1).status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"daemon not answering {route} after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)
