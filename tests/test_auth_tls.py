"""mTLS client certificates (issue 13 item 1): the rules, the handshake's checks, the clients' options,
and a real daemon requiring client certificates from a private CA made here."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import signal
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from secretsd_client import AsyncSecretsClient, SecretsClient
from secretsd_client.errors import ConfigError as ClientConfigError
from secretsd_client.errors import SecretsdError as ClientError
from secretsd_client.errors import UnauthenticatedError as ClientUnauthenticatedError
from secretsd_client.operations import client_certificate

from secretsd.auth import AuthenticatorContext, authenticator_factory
from secretsd.auth.testing import AuthenticatorConformance, AuthenticatorHarness, Issued
from secretsd.auth.tls import TlsAuthenticator, allows_client_auth, client_verification, parse_rules, read_certificate
from secretsd.cli import main
from secretsd.domain.identity import Credentials
from secretsd.errors import ConfigError, UnauthenticatedError
from secretsd.runtime.config import load_settings
from tests.helpers import DaemonProcess, init_store, run_cli

NOW = dt.datetime.now(dt.UTC)
SPIFFE = "spiffe://example.org/billing"


# -- a private CA, made here ----------------------------------------------------------------------
@dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(self, cn: str, *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              usage: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
                   .not_valid_after(not_after or NOW + dt.timedelta(days=1)))
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    def crl(self, *revoked: x509.Certificate) -> x509.CertificateRevocationList:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(NOW - dt.timedelta(minutes=5)).next_update(NOW + dt.timedelta(days=1)))
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(NOW - dt.timedelta(minutes=1)).build())
        return builder.sign(self.key, hashes.SHA256())


def _pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def _write_pair(where: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_file, key_file = where / f"{name}.pem", where / f"{name}.key"
    cert_file.write_bytes(_pem(cert))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -- the rules and the certificate's facts (in process) -------------------------------------------
CA = Ca.make("clients CA")


def _auth(*rules: dict[str, object]) -> TlsAuthenticator:
    return TlsAuthenticator(parse_rules(list(rules)))


def _creds(cert: x509.Certificate) -> Credentials:
    return Credentials(client_cert=read_certificate(_der(cert)))


async def test_certificates_map_by_the_first_matching_rule() -> None:
    cert, _ = CA.issue("billing-api", uris=(SPIFFE,), dns=("Billing.Example.org",))
    fingerprint = hashlib.sha256(_der(cert)).hexdigest()
    colons = ":".join(fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    cases: list[tuple[dict[str, object], str]] = [
        ({"uri_san": SPIFFE, "client": "by-uri", "policies": ["p"]}, "by-uri"),
        ({"dns_san": "billing.example.ORG", "client": "by-dns", "policies": ["p"]}, "by-dns"),
        ({"subject_cn": "billing-api", "client": "by-cn", "policies": ["p"]}, "by-cn"),
        ({"fingerprint_sha256": colons, "client": "by-fp", "policies": ["p"]}, "by-fp"),
    ]
    for rule, client in cases:
        auth = _auth({"subject_cn": "other", "client": "x", "policies": ["q"]}, rule,
                     {"uri_san": SPIFFE, "client": "shadowed", "policies": ["never"]})
        principal = await auth.authenticate(_creds(cert))
        assert principal is not None
        assert (principal.client, principal.policies, principal.method) == (client, ("p",), "tls")
        assert principal.token_id is None


async def test_uri_san_match_is_exact() -> None:
    cert, _ = CA.issue("x", uris=(SPIFFE + "-admin", SPIFFE.upper()))
    with pytest.raises(UnauthenticatedError):
        await _auth({"uri_san": SPIFFE, "client": "billing", "policies": ["p"]}).authenticate(_creds(cert))


async def test_no_rule_matched_is_one_bare_refusal() -> None:
    cert, _ = CA.issue("stranger")
    with pytest.raises(UnauthenticatedError) as caught:
        await _auth({"subject_cn": "billing", "client": "billing", "policies": ["billing"]}).authenticate(_creds(cert))
    assert type(caught.value) is UnauthenticatedError and str(caught.value) == str(UnauthenticatedError())
    assert caught.value.__cause__ is None and caught.value.__context__ is None


async def test_nothing_presented_is_not_mine() -> None:
    assert await _auth({"subject_cn": "a", "client": "a", "policies": ["p"]}).authenticate(Credentials()) is None


def test_rule_client_certificate_must_allow_client_auth() -> None:
    assert allows_client_auth(CA.issue("a")[0])
    assert allows_client_auth(CA.issue("no-eku", usage=None)[0])  # no extension: every usage (RFC 5280)
    assert allows_client_auth(CA.issue("any", usage=(ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,))[0])
    assert not allows_client_auth(CA.issue("server", usage=(ExtendedKeyUsageOID.SERVER_AUTH,))[0])


async def test_a_server_only_or_out_of_date_certificate_is_refused_even_when_a_rule_matches() -> None:
    auth = _auth({"subject_cn": "svc", "client": "svc", "policies": ["p"]})
    server_only, _ = CA.issue("svc", usage=(ExtendedKeyUsageOID.SERVER_AUTH,))
    expired, _ = CA.issue("svc", not_before=NOW - dt.timedelta(days=3), not_after=NOW - dt.timedelta(days=1))
    future, _ = CA.issue("svc", not_before=NOW + dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=3))
    for cert in (server_only, expired, future):
        with pytest.raises(UnauthenticatedError):
            await auth.authenticate(_creds(cert))


async def test_an_unparseable_certificate_matches_nothing() -> None:
    facts = read_certificate(b"\x30\x03garbage")
    assert facts.client_auth is False and facts.subject_cn is None
    fp = hashlib.sha256(b"\x30\x03garbage").hexdigest()
    with pytest.raises(UnauthenticatedError):
        await _auth({"fingerprint_sha256": fp, "client": "c", "policies": ["p"]}).authenticate(
            Credentials(client_cert=facts))


@pytest.mark.parametrize("rule", [
    {"client": "c", "policies": ["p"]},  # no matcher
    {"subject_cn": "a", "uri_san": SPIFFE, "client": "c", "policies": ["p"]},  # two matchers
    {"subject_cn": "a", "client": "admin", "policies": ["p"]},  # a reserved client name
    {"subject_cn": "a", "client": "c", "policies": []},
    {"fingerprint_sha256": "abcd", "client": "c", "policies": ["p"]},
    {"subject_cn": "a", "client": "c", "policies": ["p"], "issuer": "x"},
])
def test_bad_rules_are_refused_at_start(rule: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"auth\.tls\.rules"):
        parse_rules([rule])


def test_the_entry_point_builds_it_and_the_settings_add_it_after_the_token_method(tmp_path: Path) -> None:
    built = authenticator_factory("tls").from_config({"rules": [{"subject_cn": "a", "client": "c", "policies": ["p"]}]},
                                                     AuthenticatorContext(storage=None))  # type: ignore[arg-type]
    assert isinstance(built, TlsAuthenticator) and len(built.rules) == 1
    config = tmp_path / "c.toml"
    config.write_text('[auth.tls]\nclient_ca_file = "ca.pem"\n[[auth.tls.rules]]\nsubject_cn = "a"\n'
                      'client = "c"\npolicies = ["p"]\n')
    settings = load_settings(config)
    assert settings.auth.tls.client_ca_file == tmp_path / "ca.pem"  # relative to the file
    specs = settings.authenticator_specs()
    assert [s["method"] for s in specs] == ["token", "tls"] and specs[1]["rules"][0]["client"] == "c"
    assert [s["method"] for s in load_settings().authenticator_specs()] == ["token"]


def test_rule_handshake_trusts_only_the_client_ca(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(_pem(CA.cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client_verification(context, client_ca_file=ca_file, require=True, crl_file=None)
    assert context.verify_mode == ssl.CERT_REQUIRED and len(context.get_ca_certs()) == 1
    assert not context.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    # A context that already trusts another CA is refused: that CA's customers would log in too.
    other = tmp_path / "other.pem"
    other.write_bytes(_pem(Ca.make("other").cert))
    trusting = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trusting.load_verify_locations(cafile=str(other))
    with pytest.raises(ValueError, match="already trusts"):
        client_verification(trusting, client_ca_file=ca_file, require=False, crl_file=None)
    crl_file = tmp_path / "c.crl"
    crl_file.write_bytes(_pem(CA.crl()))
    optional = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client_verification(optional, client_ca_file=ca_file, require=False, crl_file=crl_file)
    assert optional.verify_mode == ssl.CERT_OPTIONAL and optional.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    for bad, what in ((tmp_path / "missing.pem", "client_ca_file"), (crl_file, "client_ca_file")):
        with pytest.raises(ConfigError, match=what):
            client_verification(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), client_ca_file=bad, require=True,
                                crl_file=None)
    with pytest.raises(ConfigError, match="crl_file"):
        client_verification(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), client_ca_file=ca_file, require=True,
                            crl_file=ca_file)  # a CA certificate, no CRL


# -- the clients' options -------------------------------------------------------------------------
def test_client_certificate_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECRETSD_CLIENT_CERT", raising=False)
    monkeypatch.delenv("SECRETSD_CLIENT_KEY", raising=False)
    assert client_certificate(None, None) is None
    assert client_certificate(("c.pem", "k.pem"), None) == ("c.pem", "k.pem")
    assert client_certificate(Path("c.pem"), "k.pem") == ("c.pem", "k.pem")
    with pytest.raises(ClientConfigError, match="both"):
        client_certificate("c.pem", None)
    with pytest.raises(ClientConfigError, match="not both"):
        client_certificate(("c.pem", "k.pem"), "k2.pem")
    monkeypatch.setenv("SECRETSD_CLIENT_CERT", "/e/c.pem")
    with pytest.raises(ClientConfigError, match="SECRETSD_CLIENT_KEY"):
        client_certificate(None, None)
    monkeypatch.setenv("SECRETSD_CLIENT_KEY", "/e/k.pem")
    assert client_certificate(None, None) == ("/e/c.pem", "/e/k.pem")


def test_a_client_key_that_does_not_load_is_a_config_error_naming_the_files(tmp_path: Path) -> None:
    cert, key = _write_pair(tmp_path, "c", *CA.issue("c"))
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot-a-key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ClientConfigError) as caught:
        SecretsClient("https://127.0.0.1:1", "t", client_cert=cert, client_key=key)
    assert str(key) in str(caught.value) and "not-a-key" not in str(caught.value)


def test_cli_client_certificate_options_are_checked(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--client-cert", "/nonexistent/c.pem", "get", "app/x"])
    assert result.exit_code == 2 and "/nonexistent/c.pem" in result.output and "Traceback" not in result.output
    cert, key = _write_pair(tmp_path, "c", *CA.issue("c"))
    alone = CliRunner().invoke(main, ["--addr", "https://127.0.0.1:1", "--client-cert", str(cert), "get", "app/x"])
    assert alone.exit_code == 2 and "needs both" in alone.output and alone.output.count("\n") == 1
    swapped = CliRunner().invoke(main, ["--addr", "https://127.0.0.1:1", "--client-cert", str(key),
                                        "--client-key", str(cert), "get", "app/x"])
    assert swapped.exit_code == 2 and "cannot load the client certificate" in swapped.output
    assert "PRIVATE KEY" not in swapped.output


# -- a real daemon requiring client certificates --------------------------------------------------
class MtlsDaemon(DaemonProcess):
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait_for(self, route: str, timeout: float = 20) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.logs()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    time.sleep(0.3)
                    return
            time.sleep(0.05)
        raise AssertionError(self.logs())


@dataclass
class Pki:
    server_ca: Path
    good: tuple[Path, Path]
    spiffe: tuple[Path, Path]
    expired: tuple[Path, Path]
    revoked: tuple[Path, Path]
    foreign: tuple[Path, Path]
    server_usage: tuple[Path, Path]
    unmapped: tuple[Path, Path]
    later_revoked: tuple[Path, Path]
    crl_file: Path
    ca: Ca
    later_revoked_cert: x509.Certificate
    revoked_cert: x509.Certificate


def _pki(where: Path) -> Pki:
    server_ca = Ca.make("server CA")
    server_cert, server_key = server_ca.issue("127.0.0.1", ips=("127.0.0.1",), usage=(ExtendedKeyUsageOID.SERVER_AUTH,))
    _write_pair(where, "server", server_cert, server_key)
    (where / "server-ca.pem").write_bytes(_pem(server_ca.cert))
    ca = Ca.make("clients CA")
    (where / "clients-ca.pem").write_bytes(_pem(ca.cert))
    revoked = ca.issue("billing-api")
    later = ca.issue("billing-api")
    crl_file = where / "clients.crl"
    crl_file.write_bytes(_pem(ca.crl(revoked[0])))
    return Pki(
        server_ca=where / "server-ca.pem",
        good=_write_pair(where, "good", *ca.issue("billing-api")),
        spiffe=_write_pair(where, "spiffe", *ca.issue("workload", uris=(SPIFFE,))),
        expired=_write_pair(where, "expired", *ca.issue("billing-api", not_before=NOW - dt.timedelta(days=1),
                                                          not_after=NOW - dt.timedelta(minutes=1))),
        revoked=_write_pair(where, "revoked", *revoked),
        foreign=_write_pair(where, "foreign", *Ca.make("clients CA").issue("billing-api")),  # same name, other key
        server_usage=_write_pair(where, "server-usage",
                                 *ca.issue("billing-api", usage=(ExtendedKeyUsageOID.SERVER_AUTH,))),
        unmapped=_write_pair(where, "unmapped", *ca.issue("nobody")),
        later_revoked=_write_pair(where, "later", *later),
        crl_file=crl_file, ca=ca, later_revoked_cert=later[0], revoked_cert=revoked[0],
    )


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[tuple[MtlsDaemon, str, Pki]]:
    pki = _pki(tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text('[policies.billing]\nrules = [{ path = "billing/*", allow = ["read"] }]\n'
                      '[policies.ops]\nrules = [{ path = "ops/*", allow = ["read"] }]\n')
    config = tmp_path / "secretsd.toml"
    config.write_text(
        f'policy_file = "{policy}"\ntls_cert_file = "server.pem"\ntls_key_file = "server.key"\n'
        '[auth.tls]\nclient_ca_file = "clients-ca.pem"\nrequire_client_cert = true\ncrl_file = "clients.crl"\n'
        f'[[auth.tls.rules]]\nuri_san = "{SPIFFE}"\nclient = "spiffe-billing"\npolicies = ["billing"]\n'
        '[[auth.tls.rules]]\nsubject_cn = "billing-api"\nclient = "billing"\npolicies = ["billing"]\n')
    data = tmp_path / "data"
    token = init_store(data)
    daemon = MtlsDaemon(data, extra_args=["--config", str(config)])
    daemon.start()
    try:
        with SecretsClient(daemon.url, token, ca_file=pki.server_ca, client_cert=pki.good) as admin:
            admin.put("billing/db", "b-value")
            admin.put("ops/db", "o-value")
        yield daemon, token, pki
    finally:
        daemon.stop()


def _attempt(daemon: MtlsDaemon, pki: Pki, pair: tuple[Path, Path] | None, path: str = "billing/db") -> str:
    try:
        with SecretsClient(daemon.url, "", ca_file=pki.server_ca, client_cert=pair, timeout=5,
                           retry=None) as client:
            return str(client.get(path)["value"])
    except ClientError as exc:
        return type(exc).__name__


@pytest.mark.e2e
def test_client_certificates_end_to_end(mtls: tuple[MtlsDaemon, str, Pki]) -> None:
    daemon, token, pki = mtls
    assert _attempt(daemon, pki, pki.good) == "b-value"
    with SecretsClient(daemon.url, "", ca_file=pki.server_ca, client_cert=pki.good) as c:
        me = c.whoami()
        assert (me["client"], me["method"]) == ("billing", "tls")
    assert _attempt(daemon, pki, pki.good, "ops/db") == "PermissionDeniedError"
    assert _attempt(daemon, pki, pki.spiffe) == "b-value"  # the SPIFFE URI SAN rule
    # Refused at the handshake: expired, revoked (CRL), another CA (same subject), server-only usage,
    # and no certificate at all (require_client_cert = true).
    for pair in (pki.expired, pki.revoked, pki.foreign, pki.server_usage, None):
        assert _attempt(daemon, pki, pair) == "UnreachableError", pair
    # A good certificate no rule names: one 401 that names no rule.
    with SecretsClient(daemon.url, "", ca_file=pki.server_ca, client_cert=pki.unmapped) as c:
        with pytest.raises(ClientUnauthenticatedError) as caught:
            c.get("billing/db")
        assert "billing" not in str(caught.value) and "rule" not in str(caught.value)
    # A bearer token wins over the certificate (the admin's token over billing's certificate).
    with SecretsClient(daemon.url, token, ca_file=pki.server_ca, client_cert=pki.good) as admin:
        me = admin.whoami()
        assert (me["client"], me["method"]) == ("admin", "token")
        assert admin.get("ops/db")["value"] == "o-value"
    # ... even a bad one: no falling back to the certificate.
    with (SecretsClient(daemon.url, "sdt_bogus", ca_file=pki.server_ca, client_cert=pki.good) as bogus,
          pytest.raises(ClientUnauthenticatedError)):
        bogus.get("billing/db")
    text = _metrics(daemon, pki, token)
    assert 'secretsd_auth_attempts_total{method="tls",outcome="success"}' in text
    assert 'secretsd_auth_attempts_total{method="tls",outcome="failure"} 1.0' in text
    logs = "\n".join(p.read_text() for p in (daemon.data_dir / "audit").glob("*.jsonl"))
    records = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert {r["client"] for r in records if r.get("auth") == "tls"} == {"billing", "spiffe-billing"}
    # The refusal names the certificate that was presented (fingerprint and CN), never a credential.
    unmapped = x509.load_pem_x509_certificate(pki.unmapped[0].read_bytes())
    presented = [r["presented"] for r in records if r.get("outcome") == 401 and r.get("presented")]
    assert {"cert_sha256": hashlib.sha256(_der(unmapped)).hexdigest(), "subject_cn": "nobody"} in presented


def _metrics(daemon: MtlsDaemon, pki: Pki, token: str) -> str:
    with SecretsClient(daemon.url, token, ca_file=pki.server_ca, client_cert=pki.good) as admin:
        endpoint = admin.endpoint
        assert endpoint.ssl_context is not None
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", daemon.port, context=endpoint.ssl_context, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    return conn.getresponse().read().decode()


@pytest.mark.e2e
def test_a_crl_is_reloaded_on_sighup(mtls: tuple[MtlsDaemon, str, Pki]) -> None:
    daemon, _, pki = mtls
    assert _attempt(daemon, pki, pki.later_revoked) == "b-value"
    pki.crl_file.write_bytes(_pem(pki.ca.crl(pki.revoked_cert, pki.later_revoked_cert)))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS context reloaded" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _attempt(daemon, pki, pki.later_revoked) == "UnreachableError"
    assert _attempt(daemon, pki, pki.good) == "b-value"
    # A CRL file that no longer loads keeps the one in force.
    pki.crl_file.write_text("not a CRL")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS files not reloaded" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "TLS files not reloaded" in daemon.logs()
    assert _attempt(daemon, pki, pki.later_revoked) == "UnreachableError"
    assert _attempt(daemon, pki, pki.good) == "b-value"


@pytest.mark.e2e
async def test_async_client_and_cli_present_a_certificate(mtls: tuple[MtlsDaemon, str, Pki]) -> None:
    daemon, _, pki = mtls
    cert, key = pki.good
    async with AsyncSecretsClient(daemon.url, "", ca_file=pki.server_ca, client_cert=cert, client_key=key) as c:
        assert (await c.get("billing/db"))["value"] == "b-value"
    env = {"SECRETSD_ADDR": daemon.url, "SECRETSD_CA_FILE": str(pki.server_ca), "SECRETSD_TOKEN": ""}
    flags = run_cli("--client-cert", str(cert), "--client-key", str(key), "get", "billing/db", env=env)
    assert flags.returncode == 0 and flags.stdout.strip() == "b-value", flags.stderr
    by_env = run_cli("get", "billing/db",
                     env=env | {"SECRETSD_CLIENT_CERT": str(cert), "SECRETSD_CLIENT_KEY": str(key)})
    assert by_env.returncode == 0 and by_env.stdout.strip() == "b-value", by_env.stderr
    after = run_cli("get", "billing/db", "--client-cert", str(cert), "--client-key", str(key), env=env)
    assert after.returncode == 0 and after.stdout.strip() == "b-value", after.stderr
    none = run_cli("get", "billing/db", env=env)
    assert none.returncode == 5 and none.stderr.count("\n") == 1  # no certificate: the handshake fails


def test_client_ca_without_tls_listener_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(_pem(CA.cert))
    config = tmp_path / "c.toml"
    config.write_text('[auth.tls]\nclient_ca_file = "ca.pem"\n')
    data = tmp_path / "d"
    init_store(data)
    result = run_cli("serve", "--data-dir", str(data), "--config", str(config), "--listen", "127.0.0.1:1")
    assert result.returncode != 0 and "client_ca_file needs the TLS listener" in result.stderr


# -- the conformance suite every authenticator passes ---------------------------------------------
class TlsHarness:
    """Certificates from the test CA, each pinned by a fingerprint rule (so a certificate with the
    same names and another key is "tampered"); revoking removes the rule, as an operator would."""

    compares_secrets = False  # the handshake verified the certificate; nothing secret is presented

    def __init__(self) -> None:
        self._now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        self.authenticator = authenticator_factory("tls").from_config(
            {"rules": []}, AuthenticatorContext(storage=None, clock=lambda: self._now))  # type: ignore[arg-type]
        self._rules: dict[str, dict[str, object]] = {}
        self._n = 0

    def advance(self, seconds: float) -> None:
        self._now += dt.timedelta(seconds=seconds)

    def _cert(self, name: str, ttl_seconds: float | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        end = self._now + dt.timedelta(seconds=ttl_seconds) if ttl_seconds is not None else None
        return CA.issue(name, uris=(f"spiffe://test/{name}",), not_before=self._now - dt.timedelta(hours=1),
                        not_after=end)

    async def issue(self, client: str, policies: tuple[str, ...], *, ttl_seconds: float | None = None) -> Issued:
        self._n += 1
        cert, key = self._cert(f"{client}-{self._n}", ttl_seconds)
        fp = hashlib.sha256(_der(cert)).hexdigest()
        self._rules[fp] = {"fingerprint_sha256": fp, "client": client, "policies": list(policies)}
        assert isinstance(self.authenticator, TlsAuthenticator)
        self.authenticator.replace_rules(parse_rules(list(self._rules.values())))
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        return Issued(Credentials(client_cert=read_certificate(_der(cert))), client, policies, (pem,))

    def unknown(self) -> Credentials:
        return Credentials(client_cert=read_certificate(_der(self._cert("never-issued", None)[0])))

    def malformed(self) -> Sequence[Credentials]:
        return [Credentials(client_cert=read_certificate(der)) for der in (b"", b"\x30\x00", b"not DER")]

    def tampered(self, issued: Issued) -> Credentials:
        # The same names from the same CA, another key: not the certificate the rule pins.
        cert = issued.credentials.client_cert
        assert cert is not None
        name = cert.uri_sans[0].rsplit("/", 1)[-1]
        return Credentials(client_cert=read_certificate(_der(self._cert(name, None)[0])))

    async def revoke(self, issued: Issued) -> None:
        cert = issued.credentials.client_cert
        assert cert is not None and isinstance(self.authenticator, TlsAuthenticator)
        del self._rules[cert.fingerprint_sha256]
        self.authenticator.replace_rules(parse_rules(list(self._rules.values())))


class TestTlsAuthenticatorConformance(AuthenticatorConformance):
    @pytest.fixture
    async def harness(self) -> AsyncIterator[AuthenticatorHarness]:
        yield TlsHarness()


def _wait_for_log(daemon: DaemonProcess, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while daemon.logs().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.logs().count(text) >= count, daemon.logs()


@pytest.mark.e2e
def test_sighup_reloads_the_tls_rules(mtls: tuple[MtlsDaemon, str, Pki]) -> None:
    daemon, _, pki = mtls
    config = Path(daemon.extra_args[1])
    assert _attempt(daemon, pki, pki.unmapped) == "UnauthenticatedError"
    original = config.read_text()
    config.write_text(original + '[[auth.tls.rules]]\nsubject_cn = "nobody"\nclient = "nobody-svc"\n'
                                 'policies = ["billing"]\n')
    daemon.signal(signal.SIGHUP)
    _wait_for_log(daemon, "tls rules reloaded (3 rules)")
    assert _attempt(daemon, pki, pki.unmapped) == "b-value"
    # Rules that no longer parse keep the ones in force, and the log says why.
    config.write_text(original + '[[auth.tls.rules]]\nsubject_cn = "x"\nuri_san = "spiffe://two"\n'
                                 'client = "two"\npolicies = ["billing"]\n')
    daemon.signal(signal.SIGHUP)
    _wait_for_log(daemon, "tls rules not reloaded")
    assert _attempt(daemon, pki, pki.unmapped) == "b-value"
    config.write_text(original)
    daemon.signal(signal.SIGHUP)
    _wait_for_log(daemon, "tls rules reloaded (2 rules)")
    assert _attempt(daemon, pki, pki.unmapped) == "UnauthenticatedError"
