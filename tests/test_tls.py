"""TLS end to end: a real daemon listening with a certificate, both client faces trusting a private CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secretsd.client import AsyncSecretsClient, SecretsClient
from secretsd.errors import UnreachableError
from tests.helpers import DaemonProcess, init_store, run_cli

pytestmark = pytest.mark.e2e


def make_pki(where: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secretsd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = where / "ca.pem", where / "server.pem", where / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


class TlsDaemon(DaemonProcess):
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait_for(self, route: str, timeout: float = 20) -> None:
        # The plain-HTTP readiness probe of the base class cannot speak TLS: wait for the port.
        import socket
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.logs()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    time.sleep(0.3)
                    return
            time.sleep(0.05)
        raise AssertionError(self.logs())


@pytest.fixture
def tls_daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    ca_file, cert_file, key_file = make_pki(tmp_path)
    config = tmp_path / "tls.toml"
    config.write_text(f'tls_cert_file = "{cert_file}"\ntls_key_file = "{key_file}"\n')
    data = tmp_path / "d"
    token = init_store(data)
    daemon = TlsDaemon(data, extra_args=["--config", str(config)]).start()
    try:
        yield daemon, token, ca_file
    finally:
        daemon.stop()


def test_sync_client_over_tls_with_a_private_ca(tls_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon, token, ca_file = tls_daemon
    with SecretsClient(daemon.url, token, ca_file=ca_file) as client:
        client.put("app/k", "over-tls")
        assert client.get("app/k")["value"] == "over-tls"
    # Without the CA the certificate is not trusted: no silent fallback to an unverified channel.
    with SecretsClient(daemon.url, token, timeout=3) as untrusting, pytest.raises(UnreachableError):
        untrusting.get("app/k")


async def test_async_client_over_tls_with_a_private_ca(tls_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon, token, ca_file = tls_daemon
    async with AsyncSecretsClient(daemon.url, token, ca_file=ca_file) as client:
        await client.put("app/a", "async-tls")
        assert (await client.get("app/a"))["value"] == "async-tls"
    async with AsyncSecretsClient(daemon.url, token, timeout=3) as untrusting:
        with pytest.raises(UnreachableError, match="SECRETSD_CA_FILE"):  # the error says what to do
            await untrusting.get("app/a")


def test_cli_trusts_a_private_ca_by_flag_or_environment(tls_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon, token, ca_file = tls_daemon
    env = {"SECRETSD_ADDR": daemon.url, "SECRETSD_TOKEN": token}
    run_cli("--ca-file", str(ca_file), "set", "app/cli", "--stdin", env=env, input_text="v1", check=True)
    got = run_cli("get", "app/cli", env=env | {"SECRETSD_CA_FILE": str(ca_file)}, check=True)
    assert got.stdout.strip() == "v1"
    refused = run_cli("get", "app/cli", env=env)
    assert refused.returncode == 5 and refused.stdout == ""  # unreachable: the TLS handshake failed
    assert refused.stderr.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    assert "--ca-file" in refused.stderr
    missing = run_cli("--ca-file", str(ca_file.with_name("nope.pem")), "get", "app/cli", env=env)
    assert missing.returncode == 2 and "nope.pem" in missing.stderr and "does not exist" in missing.stderr


def test_tls_settings_must_come_in_pairs(tmp_path: Path) -> None:
    _ca, cert_file, _key = make_pki(tmp_path)
    config = tmp_path / "half.toml"
    config.write_text(f'tls_cert_file = "{cert_file}"\n')
    data = tmp_path / "d"
    init_store(data)
    result = run_cli("serve", "--data-dir", str(data), "--config", str(config), "--listen", "127.0.0.1:1")
    assert result.returncode == 1 and "both tls_cert_file and tls_key_file" in result.stderr
