"""Attacks on mTLS client certificates (issue 13 item 1, the holes an attacker found): a leaf of a revoked
intermediate CA, a revoked certificate on a connection opened before the CRL, a CA certificate used as a
client certificate, a certificate with several URI SANs."""

from __future__ import annotations

import datetime as dt
import http.client
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secretsd.auth.tls import check_crl_coverage, client_verification, read_certificate
from secretsd.errors import ConfigError
from tests.test_auth_tls import (
    NOW,
    SPIFFE,
    Ca,
    MtlsDaemon,
    Pki,
    _auth,
    _creds,
    _der,
    _pem,
    _write_pair,
    mtls,  # noqa: F401  (the fixture: a daemon requiring client certificates)
)


def sub_ca(name: str, parent: Ca, *, client_auth: bool = False) -> Ca:
    """An intermediate CA issued by ``parent`` (with a clientAuth usage when asked: a CA posing as a client)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(parent.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if client_auth:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return Ca(key, builder.sign(parent.key, hashes.SHA256()))


# -- H2: the whole chain is checked against the CRLs -----------------------------------------------
class Handshake:
    """A server context built by client_verification, and real handshakes against it over a socket pair."""

    def __init__(self, where: Path, root: Ca, crls: list[x509.CertificateRevocationList]) -> None:
        self.where = where
        server_ca = Ca.make("server CA")
        self.server_ca_file = where / "server-ca.pem"
        self.server_ca_file.write_bytes(_pem(server_ca.cert))
        self.server_pair = _write_pair(where, "server", *server_ca.issue(
            "127.0.0.1", ips=("127.0.0.1",), usage=(ExtendedKeyUsageOID.SERVER_AUTH,)))
        (where / "clients-ca.pem").write_bytes(_pem(root.cert))
        (where / "clients.crl").write_bytes(b"".join(_pem(c) for c in crls))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client_verification(self.context, client_ca_file=where / "clients-ca.pem", require=True,
                            crl_file=where / "clients.crl")
        self.context.load_cert_chain(*self.server_pair)

    def accepts(self, name: str, leaf: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                *chain: x509.Certificate) -> bool:
        cert_file, key_file = _write_pair(self.where, name, leaf, key)
        cert_file.write_bytes(_pem(leaf) + b"".join(_pem(c) for c in chain))
        client = ssl.create_default_context(cafile=str(self.server_ca_file))
        client.load_cert_chain(cert_file, key_file)
        ours, theirs = socket.socketpair()
        outcome: list[bool] = []

        def serve() -> None:
            try:
                with self.context.wrap_socket(theirs, server_side=True) as tls:
                    tls.sendall(b"ok")
                    outcome.append(True)
            except (ssl.SSLError, OSError):
                outcome.append(False)

        server = threading.Thread(target=serve)
        server.start()
        try:
            with client.wrap_socket(ours, server_hostname="127.0.0.1") as tls:
                tls.settimeout(5)
                tls.recv(2)  # TLS 1.3: the server's verdict on our certificate arrives after the handshake
        except (ssl.SSLError, OSError):
            pass
        server.join(5)
        return outcome == [True]


def test_rule_every_ca_of_the_chain_is_checked_against_its_crl(tmp_path: Path) -> None:
    root = Ca.make("clients root")
    revoked_inter, good_inter, no_crl_inter = (sub_ca(n, root) for n in ("revoked team", "good team", "no-CRL team"))
    shake = Handshake(tmp_path, root, [root.crl(revoked_inter.cert), revoked_inter.crl(), good_inter.crl()])
    assert shake.accepts("direct", *root.issue("billing-api"))
    assert shake.accepts("via-good", *good_inter.issue("billing-api"), good_inter.cert)
    # The intermediate is revoked by the root's CRL: everything it issued is refused.
    assert not shake.accepts("via-revoked", *revoked_inter.issue("billing-api"), revoked_inter.cert)
    # An intermediate whose CRL is not in crl_file: refused (documented), never waved through.
    assert not shake.accepts("via-no-crl", *no_crl_inter.issue("billing-api"), no_crl_inter.cert)
    # A leaf revoked by its intermediate's CRL, as before.
    leaf = good_inter.issue("billing-api")
    (tmp_path / "2").mkdir()
    shake2 = Handshake(tmp_path / "2", root, [root.crl(), good_inter.crl(leaf[0])])
    assert not shake2.accepts("revoked-leaf", *leaf, good_inter.cert)


def test_rule_crl_file_covers_every_ca_of_client_ca_file(tmp_path: Path) -> None:
    one, two = Ca.make("clients CA one"), Ca.make("clients CA two")
    ca_file, crl_file = tmp_path / "cas.pem", tmp_path / "crl.pem"
    ca_file.write_bytes(_pem(one.cert) + _pem(two.cert))
    crl_file.write_bytes(_pem(one.crl()))
    with pytest.raises(ConfigError, match="clients CA two"):
        check_crl_coverage(ca_file, crl_file)
    # A CRL naming CA two but signed by another key does not count.
    forged = Ca(Ca.make("x").key, two.cert)
    crl_file.write_bytes(_pem(one.crl()) + _pem(forged.crl()))
    with pytest.raises(ConfigError, match="clients CA two"):
        client_verification(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), client_ca_file=ca_file, require=True,
                            crl_file=crl_file)
    crl_file.write_bytes(_pem(one.crl()) + _pem(two.crl()))
    check_crl_coverage(ca_file, crl_file)


# -- the minor ones: a CA as client, several URI SANs ---------------------------------------------
async def test_rule_a_ca_certificate_is_never_a_client_certificate() -> None:
    root = Ca.make("clients root")
    posing = sub_ca("billing-api", root, client_auth=True)
    assert not read_certificate(_der(posing.cert)).client_auth
    assert _auth({"subject_cn": "billing-api", "client": "b", "policies": ["p"]}).decide(
        read_certificate(_der(posing.cert)), dt.datetime.now(dt.UTC)) is None


async def test_rule_uri_san_matches_only_a_certificate_with_exactly_one_uri() -> None:
    rules = _auth({"uri_san": SPIFFE, "client": "b", "policies": ["p"]})
    two, _ = Ca.make("c").issue("x", uris=("spiffe://evil.example/x", SPIFFE))
    one, _ = Ca.make("c").issue("x", uris=(SPIFFE,))
    now = dt.datetime.now(dt.UTC)
    assert rules.decide(read_certificate(_der(two)), now) is None
    principal = await rules.authenticate(_creds(one))
    assert principal is not None and principal.client == "b"


# -- H3: a revoked certificate on a connection opened before the CRL -------------------------------
def _get(conn: http.client.HTTPSConnection) -> int:
    conn.request("GET", "/v1/secrets/billing/db")
    response = conn.getresponse()
    response.read()
    return response.status


@pytest.mark.e2e
def test_a_tls_reload_closes_the_connections_of_client_certificates(
        mtls: tuple[MtlsDaemon, str, Pki]) -> None:  # noqa: F811
    daemon, _, pki = mtls
    context = ssl.create_default_context(cafile=str(pki.server_ca))
    context.load_cert_chain(*pki.later_revoked)
    kept = http.client.HTTPSConnection("127.0.0.1", daemon.port, context=context, timeout=5)
    assert _get(kept) == 200 and _get(kept) == 200  # one keep-alive connection
    pki.crl_file.write_bytes(_pem(pki.ca.crl(pki.revoked_cert, pki.later_revoked_cert)))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS context reloaded" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    # The open connection is gone (http.client does not reconnect on its own for a closed socket
    # it was reading); a new one meets the new CRL at the handshake.
    with pytest.raises((http.client.HTTPException, OSError)):
        _get(kept)
    fresh = http.client.HTTPSConnection("127.0.0.1", daemon.port, context=context, timeout=5)
    with pytest.raises((ssl.SSLError, OSError)):
        _get(fresh)
