"""The ``tls`` authenticator: a client certificate the TLS handshake verified, mapped by the operator's rules.

Two steps, each in one place:

- **the handshake** (``client_verification``): OpenSSL verifies the chain to ``client_ca_file`` and
  nothing else (no system CAs), the validity period, the purpose (a server-side handshake checks the
  ``ssl_client`` purpose: an extended key usage without clientAuth fails), and with ``crl_file`` the
  revocation of every certificate of the chain (``VERIFY_CRL_CHECK_CHAIN``: a revoked intermediate
  revokes its leaves; every CA needs its CRL in ``crl_file``, ``check_crl_coverage``). A TLS reload
  closes the open connections of client certificates (secretsd.runtime.edge_listener), so a new CRL
  reaches kept-alive connections too. ``require_client_cert = true``: no certificate, no
  connection; false: a connection without one is served, and authenticates some other way.
- **the mapping** (``TlsAuthenticator``): the verified certificate, read once per connection
  (``read_certificate``, by secretsd.runtime.edge), is matched against ``[[auth.tls.rules]]``, first
  match wins; each rule names exactly one of ``subject_cn``, ``dns_san``, ``uri_san`` (a SPIFFE ID,
  say; the certificate must carry exactly one URI SAN) or ``fingerprint_sha256``. Rules do not pin an
  issuer: every CA of ``client_ca_file`` may issue any name. No match, a CA certificate, a certificate
  whose usage excludes clientAuth, or one outside its validity period (a keep-alive connection can
  outlive its certificate) is one bare 401.

Registered under the entry point ``secretsd.authenticators: tls``; the daemon adds it after the
token method when ``[auth.tls] client_ca_file`` is set, so a bearer token, when present, wins.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import Field, ValidationError, field_validator, model_validator

from secretsd.auth import AuthenticatorContext
from secretsd.auth.rules import IdentityRule
from secretsd.clock import Clock, utcnow
from secretsd.domain.identity import ClientCertificate, Credentials, Principal
from secretsd.errors import ConfigError, UnauthenticatedError

_MATCHERS = ("subject_cn", "dns_san", "uri_san", "fingerprint_sha256")


class TlsRule(IdentityRule):
    """One ``[[auth.tls.rules]]`` entry: exactly one matcher, the client and its policies."""

    subject_cn: str | None = Field(default=None, min_length=1)
    dns_san: str | None = Field(default=None, min_length=1)
    uri_san: str | None = Field(default=None, min_length=1)
    fingerprint_sha256: str | None = None

    @field_validator("dns_san")
    @classmethod
    def _dns_lower(cls, value: str | None) -> str | None:
        return value.lower().rstrip(".") if value is not None else None  # DNS names are case-insensitive

    @field_validator("fingerprint_sha256")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # As `openssl x509 -fingerprint -sha256` prints it (AB:CD:...) or as plain hex.
        text = value.replace(":", "").lower()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise ValueError("fingerprint_sha256 is 64 hex digits (colons allowed), the SHA-256 of the DER")
        return text

    @model_validator(mode="after")
    def _one_matcher(self) -> TlsRule:
        given = [m for m in _MATCHERS if getattr(self, m) is not None]
        if len(given) != 1:
            raise ValueError(f"a tls rule names exactly one of {', '.join(_MATCHERS)} "
                             f"(given: {', '.join(given) or 'none'})")
        return self

    def matches(self, cert: ClientCertificate) -> bool:
        if self.subject_cn is not None:
            return cert.subject_cn == self.subject_cn
        if self.dns_san is not None:
            return self.dns_san in cert.dns_sans
        if self.uri_san is not None:
            return uri_san_matches(self.uri_san, cert.uri_sans)
        return cert.fingerprint_sha256 == self.fingerprint_sha256


def uri_san_matches(expected: str, uri_sans: Sequence[str]) -> bool:
    """The rule "a uri_san rule matches a certificate with exactly that one URI SAN": exact (SPIFFE
    IDs and URIs are case-sensitive), and a certificate with several URI SANs matches none (an X.509
    SVID carries exactly one; a second one is a name the holder was not meant to choose among)."""
    return len(uri_sans) == 1 and uri_sans[0] == expected


def parse_rules(raw: Sequence[Mapping[str, Any]]) -> tuple[TlsRule, ...]:
    try:
        return tuple(TlsRule.model_validate(dict(r)) for r in raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'rule'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid [[auth.tls.rules]]: {problems}") from None


# -- the certificate ------------------------------------------------------------------------------
def allows_client_auth(cert: x509.Certificate) -> bool:
    """The rule "a client certificate must allow clientAuth": an extended key usage extension, when
    present, must list clientAuth (or anyExtendedKeyUsage); no extension allows every usage (RFC 5280)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """The rule "a CA certificate is never a client certificate": basicConstraints CA:TRUE names an
    issuer, not a workload (a leaf of the client CA's hierarchy holding a CA key could mint others)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def read_certificate(der: bytes) -> ClientCertificate:
    """The facts the rules match on, from the DER the handshake verified. Never raises: a certificate
    that does not parse (OpenSSL accepted it, cryptography does not) is one no rule may match."""
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        cert = x509.load_der_x509_certificate(der)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = names[0].value if len(names) == 1 else None  # two CNs: ambiguous, matches no subject_cn rule
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            dns, uris = (), ()
        return ClientCertificate(
            fingerprint_sha256=fingerprint, subject_cn=cn if isinstance(cn, str) else None,
            dns_sans=dns, uri_sans=uris, not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            client_auth=allows_client_auth(cert) and not is_ca_certificate(cert),
        )
    except ValueError:
        never = datetime.min.replace(tzinfo=UTC)
        return ClientCertificate(fingerprint_sha256=fingerprint, subject_cn=None, dns_sans=(), uri_sans=(),
                                 not_before=never, not_after=never, client_auth=False)


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> ClientCertificate | None:
    """The verified client certificate of a TLS connection, or None when the client sent none."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return read_certificate(der) if der else None


# -- the handshake --------------------------------------------------------------------------------
_CRL_BEGIN = b"-----BEGIN X509 CRL-----"


def check_crl_coverage(client_ca_file: Path, crl_file: Path) -> None:
    """The rule "with crl_file, every CA of client_ca_file has its CRL there" (signed by that CA):
    the handshake checks the whole chain, and a CA without a CRL would refuse every client under it
    with an obscure handshake error; said at start (and on SIGHUP, keeping the files in force) instead."""
    try:
        cas = x509.load_pem_x509_certificates(client_ca_file.read_bytes())
        text = crl_file.read_bytes()
        crls = [x509.load_pem_x509_crl(_CRL_BEGIN + block) for block in text.split(_CRL_BEGIN)[1:]]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read [auth.tls] client_ca_file {client_ca_file} / crl_file {crl_file}: "
                          f"{exc}") from exc
    for ca in cas:
        public_key = ca.public_key()
        if not any(crl.issuer == ca.subject and _signed_by(crl, public_key) for crl in crls):
            raise ConfigError(f"[auth.tls] crl_file {crl_file} holds no CRL signed by the CA "
                              f"{ca.subject.rfc4514_string()!r} of client_ca_file: with crl_file set, every "
                              "CA of the chain (intermediates too) needs its current CRL there")


def _signed_by(crl: x509.CertificateRevocationList, public_key: Any) -> bool:
    try:
        return crl.is_signature_valid(public_key)
    except (TypeError, ValueError):
        return False  # a key type that cannot sign CRLs


def client_verification(context: ssl.SSLContext, *, client_ca_file: Path, require: bool,
                        crl_file: Path | None) -> None:
    """The rule for which client certificates a handshake accepts: chained to ``client_ca_file``
    only, valid now, usable for clientAuth, not revoked by ``crl_file`` (when given).

    ``context`` must trust nothing yet: a server context made by ``ssl.SSLContext(PROTOCOL_TLS_SERVER)``
    (``create_default_context`` would add the system's CAs, and any public CA's customer could log in;
    a CA directory it loads lazily is not visible here, so the caller's construction is the guard).
    """
    if context.get_ca_certs() or context.cert_store_stats()["x509_ca"]:
        raise ValueError("the context already trusts CAs; build it with ssl.SSLContext(PROTOCOL_TLS_SERVER)")
    try:
        context.load_verify_locations(cafile=str(client_ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load [auth.tls] client_ca_file {client_ca_file}: {exc}") from exc
    if not context.get_ca_certs():
        raise ConfigError(f"[auth.tls] client_ca_file {client_ca_file} holds no CA certificate")
    if crl_file is not None:
        try:
            context.load_verify_locations(cafile=str(crl_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load [auth.tls] crl_file {crl_file}: {exc}") from exc
        if not context.cert_store_stats()["crl"]:
            raise ConfigError(f"[auth.tls] crl_file {crl_file} holds no CRL (PEM, -----BEGIN X509 CRL-----)")
        check_crl_coverage(client_ca_file, crl_file)
        # Every certificate of the chain, not only the leaf: a revoked intermediate CA revokes
        # everything it issued. OpenSSL then needs a CRL from every CA in the chain (an intermediate
        # the client sends too): a chain through a CA without one fails the handshake.
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    context.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL


# -- the authenticator ----------------------------------------------------------------------------
class TlsAuthenticator:
    """A verified client certificate mapped by the operator's rules; the rules are the only source of identity."""

    method = "tls"

    def __init__(self, rules: Sequence[TlsRule], *, clock: Clock = utcnow) -> None:
        self._rules = tuple(rules)
        self._clock = clock

    @classmethod
    def from_config(cls, options: Mapping[str, Any], context: AuthenticatorContext) -> TlsAuthenticator:
        unknown = set(options) - {"rules"}
        if unknown:
            raise ConfigError(f"authenticator 'tls' takes only rules (given: {', '.join(sorted(unknown))})")
        rules = options.get("rules", [])
        if not isinstance(rules, list | tuple):
            raise ConfigError("authenticator 'tls': rules must be a list of tables ([[auth.tls.rules]])")
        return cls(parse_rules(rules), clock=context.clock)

    def __repr__(self) -> str:
        return f"TlsAuthenticator(rules={len(self._rules)})"

    @property
    def rules(self) -> tuple[TlsRule, ...]:
        return self._rules

    def replace_rules(self, rules: Sequence[TlsRule]) -> None:
        """New rules (a reload); requests already authenticated keep their principal."""
        self._rules = tuple(rules)

    def decide(self, cert: ClientCertificate, now: datetime) -> Principal | None:
        """The rule "a certificate maps by the first matching rule, if usable now": None otherwise."""
        # The notAfter instant itself is already too late (as a token's expiry is).
        if not cert.client_auth or not cert.not_before <= now < cert.not_after:
            return None
        for rule in self._rules:
            if rule.matches(cert):
                return Principal(rule.client, rule.policies, self.method)
        return None

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        cert = credentials.client_cert
        if cert is None:
            return None
        principal = self.decide(cert, self._clock())
        if principal is None:
            # One refusal whatever the reason: which rules exist is not the caller's business.
            raise UnauthenticatedError()
        return principal
