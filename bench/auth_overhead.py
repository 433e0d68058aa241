"""The cost of each authentication method on a GET, side by side in one run (issue 13).

    python bench/auth_overhead.py --duration 3 --concurrency 16 --rounds 3

One daemon with a TLS listener that accepts client certificates (``[auth.tls]``, a private CA made
here, ``require_client_cert = false``) and a Unix socket (``listen_unix``, a rule for this uid). Each
round runs, for the same time at the same concurrency and in the same order, closed-loop GETs:

- ``bearer/tls``: a bearer token over TLS (the reference);
- ``cert/tls``: no token, a client certificate mapped by a ``uri_san`` rule (read once per connection);
- ``unix peer``: no token, the Unix socket's peer credentials (read once per connection);
- ``bearer/unix``: the bearer token over the socket.

It prints the daemon's CPU µs per GET and GET/s of each cell, then the medians and each method's
ratio to ``bearer/tls``. A JWT login is not a GET method: what it returns is a bearer token.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # bench/load.py: init, the CPU meter, the daemon's environment

SPIFFE = "spiffe://bench.example/client"


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], names: list[x509.GeneralName],
          usage: x509.ObjectIdentifier, where: Path, stem: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
            .issuer_name(ca[1].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca[0], hashes.SHA256()))
    cert_file, key_file = where / f"{stem}.pem", where / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def _pki(where: Path) -> dict[str, Path]:
    server_ca, client_ca = _ca("bench server CA"), _ca("bench client CA")
    for name, ca in (("server-ca", server_ca), ("client-ca", client_ca)):
        (where / f"{name}.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    server = _leaf(server_ca, [x509.IPAddress(ipaddress.ip_address(load.HOST))], ExtendedKeyUsageOID.SERVER_AUTH,
                   where, "server")
    client = _leaf(client_ca, [x509.UniformResourceIdentifier(SPIFFE)], ExtendedKeyUsageOID.CLIENT_AUTH,
                   where, "client")
    return {"server_ca": where / "server-ca.pem", "client_ca": where / "client-ca.pem", "server": server[0],
            "server_key": server[1], "client": client[0], "client_key": client[1]}


async def _cell(base: str, paths: list[str], token: str | None, connector: aiohttp.BaseConnector, pid: int,
                concurrency: int, duration: float) -> tuple[float, float]:
    """(daemon CPU µs per request, requests per second) of ``duration`` seconds of closed-loop GETs."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await load.closed_loop_gets([f"{base}/v1/secrets/{p}" for p in paths], headers, connector, pid,
                                       concurrency, duration)


async def _run(args: argparse.Namespace, pid: int, port: int, token: str, sock: str, pki: dict[str, Path]) -> None:
    base = f"https://{load.HOST}:{port}"
    server_trust = ssl.create_default_context(cafile=str(pki["server_ca"]))
    with_cert = ssl.create_default_context(cafile=str(pki["server_ca"]))
    with_cert.load_cert_chain(pki["client"], pki["client_key"])
    paths = [f"bench/a{i:05d}" for i in range(args.secrets)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=server_trust),
                                     headers={"Authorization": f"Bearer {token}"}) as session:
        items = [{"path": p, "value": "x" * 64} for p in paths]
        async with session.post(f"{base}/v1/secrets:batch", json={"items": items}) as resp:
            resp.raise_for_status()
    # (name, base URL, bearer token or None, the Unix socket or None, the TLS context for TCP cells)
    cells: list[tuple[str, str, str | None, str | None, ssl.SSLContext]] = [
        ("bearer/tls", base, token, None, server_trust),
        ("cert/tls", base, None, None, with_cert),
        ("unix peer", "http://localhost", None, sock, server_trust),
        ("bearer/unix", "http://localhost", token, sock, server_trust),
    ]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in cells}
    for n in range(args.rounds):
        for name, url, bearer, path, context in cells:
            connector: aiohttp.BaseConnector = (aiohttp.UnixConnector(path=path, limit=args.concurrency) if path
                                                else aiohttp.TCPConnector(ssl=context, limit=args.concurrency))
            cpu, rps = await _cell(url, paths, bearer, connector, pid, args.concurrency, args.duration)
            rows[name].append((cpu, rps))
            print(f"round {n + 1} {name:11s}: {cpu:6.0f} µs CPU/GET, {rps:6.0f} GET/s", flush=True)
    med = {name: (statistics.median(c for c, _ in r), statistics.median(s for _, s in r)) for name, r in rows.items()}
    ref_cpu, ref_rps = med["bearer/tls"]
    for name, (cpu, rps) in med.items():
        print(f"median {name:11s}: {cpu:6.0f} µs CPU/GET ({cpu / ref_cpu:.2f}x), "
              f"{rps:6.0f} GET/s ({rps / ref_rps:.2f}x)")


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + load.STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise load.BenchError(f"secretsd serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with socket.socket() as probe:
            if probe.connect_ex((load.HOST, port)) == 0:
                return
        time.sleep(0.1)
    raise load.BenchError("secretsd did not listen in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secrets", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="secretsd-bench-auth-") as tmp:
        where = Path(tmp)  # 0700, ours: a directory the Unix socket may live in
        pki = _pki(where)
        sock = str(where / "s.sock")
        config = where / "secretsd.toml"
        config.write_text(
            f'tls_cert_file = "{pki["server"]}"\ntls_key_file = "{pki["server_key"]}"\n'
            f'listen_unix = "{sock}"\nunix_socket_mode = "0600"\n'
            f'[[auth.unix.rules]]\nuid = {os.getuid()}\nclient = "bench"\npolicies = ["root"]\n'
            f'[auth.tls]\nclient_ca_file = "{pki["client_ca"]}"\n'
            f'[[auth.tls.rules]]\nuri_san = "{SPIFFE}"\nclient = "bench-cert"\npolicies = ["root"]\n')
        daemon = load.Daemon(where, load.free_port())
        daemon.init()
        log = where / "secretsd.log"
        env = load.daemon_env() | {"SECRETSD_CONFIG": str(config)}
        with log.open("wb") as out:
            proc = subprocess.Popen([*load.secretsd_command(), "serve", "--data-dir", str(daemon.data_dir),
                                     "--listen", f"{load.HOST}:{daemon.port}"], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        try:
            _wait_for_port(proc, daemon.port, log)
            asyncio.run(_run(args, proc.pid, daemon.port, daemon.token, sock, pki))
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
