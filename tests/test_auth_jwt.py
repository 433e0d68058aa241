"""Workload JWT login (issue 13 item 3): verification (keys, algorithms, iss/aud/exp/nbf), claim rules,
the JWKS from a file and from a URL (a local aiohttp server), and a real daemon logging a workload in."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from secretsd.auth.jwt import (
    MAX_JWT_BYTES,
    JwksCache,
    JwtLogin,
    check_algorithm,
    check_jwt_size,
    claims_match,
    parse_jwks,
    parse_rules,
    presented_identity,
)
from secretsd.cli import main
from secretsd.errors import ConfigError, UnauthenticatedError
from secretsd.runtime.config import load_settings
from tests.helpers import DaemonProcess, free_port, http, init_store

ISSUER = "https://kubernetes.default.svc"
SUB = "system:serviceaccount:billing:api"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
FOREIGN_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(algorithm: Any, key: Any, kid: str, alg: str) -> dict[str, Any]:
    jwk: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)
    return jwk | {"kid": kid, "use": "sig", "alg": alg}


JWKS = {"keys": [_jwk(RSAAlgorithm, RSA_KEY, "rsa1", "RS256"), _jwk(ECAlgorithm, EC_KEY, "ec1", "ES256"),
                 _jwk(OKPAlgorithm, ED_KEY, "ed1", "EdDSA")]}
RULES = [
    {"claims": {"sub": SUB}, "client": "billing", "policies": ["billing"]},
    {"claims": {"kubernetes.io": {"namespace": "ops", "serviceaccount": {"name": "api"}}},
     "client": "ops", "policies": ["ops"]},
]


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": ["secretsd"], "sub": SUB, "iat": now, "nbf": now - 5, "exp": now + 600} | extra


def sign(payload: dict[str, Any], *, key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa1") -> str:
    return pyjwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWT made by hand (what an attacker sends): HMAC-signed with ``secret``, or unsigned."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    sig = _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()) if secret is not None else ""
    return f"{signing_input}.{sig}"


def _jwks_file(where: Path, document: dict[str, Any] = JWKS) -> Path:
    path = where / "jwks.json"
    path.write_text(json.dumps(document))
    return path


async def _login(where: Path, rules: list[dict[str, Any]] = RULES, **options: Any) -> JwtLogin:
    keys = JwksCache(file=_jwks_file(where), url=None)
    await keys.refresh()
    return JwtLogin(keys, issuer=ISSUER, audiences=["secretsd"], rules=parse_rules(rules), **options)


# -- verification ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "alg", "kid"), [(RSA_KEY, "RS256", "rsa1"), (EC_KEY, "ES256", "ec1"),
                                                  (ED_KEY, "EdDSA", "ed1")])
async def test_a_token_signed_by_a_jwks_key_logs_in(tmp_path: Path, key: Any, alg: str, kid: str) -> None:
    login = await _login(tmp_path)
    identity = login.verify(sign(claims(), key=key, alg=alg, kid=kid))
    assert (identity.client, identity.policies, identity.subject, identity.issuer) == (
        "billing", ("billing",), SUB, ISSUER)


async def test_every_bad_token_is_one_bare_refusal(tmp_path: Path) -> None:
    login = await _login(tmp_path)
    now = int(time.time())
    public_pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    bad = {
        "foreign key": sign(claims(), key=FOREIGN_KEY),
        "foreign key, no kid": sign(claims(), key=FOREIGN_KEY, kid=None),
        "unknown kid": sign(claims(), kid="rsa2"),
        "key of another type under the kid": sign(claims(), key=EC_KEY, alg="ES256", kid="rsa1"),
        "expired": sign(claims(exp=now - 120, iat=now - 700, nbf=now - 700)),
        "not yet valid": sign(claims(nbf=now + 300)),
        "no exp": sign({k: v for k, v in claims().items() if k != "exp"}),
        "wrong audience": sign(claims(aud=["vault"])),
        "no audience": sign({k: v for k, v in claims().items() if k != "aud"}),
        "wrong issuer": sign(claims(iss="https://evil.example")),
        "alg none": forge({"alg": "none", "kid": "rsa1"}, claims(), None),
        "HS256 with the public key as secret": forge({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}, claims(),
                                                     public_pem),
        "not a JWT": "not.a.jwt",
        "empty": "",
        "no rule matches": sign(claims(sub="system:serviceaccount:other:api")),
    }
    for what, token in bad.items():
        with pytest.raises(UnauthenticatedError) as caught:
            login.verify(token)
        assert str(caught.value) == str(UnauthenticatedError()), what
        assert caught.value.__cause__ is None and caught.value.__context__ is None, what


async def test_leeway_allows_a_little_clock_skew(tmp_path: Path) -> None:
    login = await _login(tmp_path, leeway_seconds=30)
    now = int(time.time())
    assert login.verify(sign(claims(exp=now - 10, iat=now - 600, nbf=now - 600))).client == "billing"
    assert login.verify(sign(claims(nbf=now + 10))).client == "billing"


def test_rule_jwt_size_is_bounded_before_parsing() -> None:
    check_jwt_size("a" * MAX_JWT_BYTES)
    with pytest.raises(UnauthenticatedError):
        check_jwt_size("a" * (MAX_JWT_BYTES + 1))


def test_rule_only_asymmetric_algorithms() -> None:
    for alg in ("RS256", "ES256", "EdDSA"):
        assert check_algorithm({"alg": alg}) == alg
    refused: tuple[object, ...] = ("none", "None", "HS256", "HS384", "HS512", "PS256", "RS512", "", None, 1)
    for bad in refused:
        with pytest.raises(UnauthenticatedError):
            check_algorithm({"alg": bad})


def test_rule_claims_match_nested_tables_and_exact_types() -> None:
    token = {"sub": SUB, "kubernetes.io": {"namespace": "ops", "serviceaccount": {"name": "api", "uid": "u"}},
             "admin": True, "n": 1}
    assert claims_match({"kubernetes.io": {"namespace": "ops"}}, token)
    assert claims_match({"kubernetes.io": {"serviceaccount": {"name": "api"}}, "sub": SUB}, token)
    assert not claims_match({"kubernetes.io": {"namespace": "billing"}}, token)
    assert not claims_match({"kubernetes.io.namespace": "ops"}, token)  # keys are never split on dots
    assert not claims_match({"sub": {"x": "y"}}, token)  # a table against a string
    assert not claims_match({"missing": "x"}, token)
    assert not claims_match({"admin": 1}, token) and not claims_match({"n": True}, token)  # JSON types agree
    assert claims_match({"admin": True, "n": 1}, token)


async def test_nested_claim_rules_map_a_kubernetes_token(tmp_path: Path) -> None:
    login = await _login(tmp_path)
    ops = claims(sub="system:serviceaccount:ops:api",
                 **{"kubernetes.io": {"namespace": "ops", "serviceaccount": {"name": "api", "uid": "1"}}})
    assert login.verify(sign(ops)).client == "ops"


@pytest.mark.parametrize("rule", [
    {"claims": {}, "client": "c", "policies": ["p"]},  # matches every token
    {"claims": {"sub": "x"}, "client": "admin", "policies": ["p"]},  # reserved name
    {"claims": {"sub": "x"}, "client": "c", "policies": []},
    {"claims": {"sub": ["a", "b"]}, "client": "c", "policies": ["p"]},
    {"claims": {"kubernetes.io": {}}, "client": "c", "policies": ["p"]},
    {"claims": {"sub": "x"}, "client": "c", "policies": ["p"], "extra": 1},
])
def test_bad_rules_are_refused_at_start(rule: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"auth\.jwt\.rules"):
        parse_rules([rule])


def test_issuer_and_audiences_are_required(tmp_path: Path) -> None:
    keys = JwksCache(file=_jwks_file(tmp_path), url=None)
    for issuer, audiences in (("", ["secretsd"]), (ISSUER, [])):
        with pytest.raises(ConfigError, match="issuer and audiences"):
            JwtLogin(keys, issuer=issuer, audiences=audiences, rules=())
    with pytest.raises(ConfigError, match="jwks_file or jwks_url"):
        JwksCache(file=None, url=None)


def test_settings_build_the_login(tmp_path: Path) -> None:
    _jwks_file(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text(f'[auth.jwt]\njwks_file = "jwks.json"\nissuer = "{ISSUER}"\naudiences = ["secretsd"]\n'
                      'token_ttl_seconds = 600\n[[auth.jwt.rules]]\n'
                      f'claims = {{ sub = "{SUB}", "kubernetes.io" = {{ namespace = "billing" }} }}\n'
                      'client = "billing"\npolicies = ["billing"]\n')
    login = JwtLogin.from_settings(load_settings(config).auth.jwt)
    assert login is not None and login.token_ttl_seconds == 600 and login.keys.source == str(tmp_path / "jwks.json")
    assert JwtLogin.from_settings(load_settings().auth.jwt) is None


def test_jwks_parsing_skips_keys_that_cannot_verify() -> None:
    secret = {"kty": "oct", "k": _b64(b"s" * 32), "kid": "hmac", "alg": "HS256"}
    encryption = _jwk(RSAAlgorithm, FOREIGN_KEY, "enc", "RSA-OAEP") | {"use": "enc"}
    keys = parse_jwks(json.dumps({"keys": [secret, encryption, *JWKS["keys"]]}).encode())
    assert set(keys) == {"rsa1", "ec1", "ed1"}
    for raw in (b"{}", b"[]", b"not json", json.dumps({"keys": [secret]}).encode()):
        with pytest.raises(ValueError):
            parse_jwks(raw)


def test_presented_identity_is_sub_and_iss_never_the_token() -> None:
    token = sign(claims(), key=FOREIGN_KEY)
    seen = presented_identity(token)
    assert seen == {"sub": SUB, "iss": ISSUER}
    assert presented_identity("garbage") == {}
    assert len(presented_identity(sign(claims(sub="x" * 5000)))["sub"]) == 256
    # A token pasted into a claim is not copied into the audit log: its public id stays, the secret goes.
    from secretsd import tokens

    pasted = tokens.generate_token().token
    redacted = presented_identity(sign(claims(sub=pasted)))["sub"]
    assert pasted not in redacted and pasted.split("_")[1] in redacted


# -- the JWKS from a URL --------------------------------------------------------------------------
class JwksServer:
    """A local aiohttp server for the JWKS: its document, status and delay can change between calls."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = JWKS
        self.status = 200
        self.delay = 0.0
        self.calls = 0
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/openid/v1/jwks"

    async def _serve(self, request: web.Request) -> web.Response:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return web.json_response(self.document, status=self.status)

    async def __aenter__(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/openid/v1/jwks", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_jwks_url_is_fetched_refreshed_and_kept_for_a_bounded_time() -> None:
    clock = [1000.0]
    async with JwksServer() as server:
        keys = JwksCache(file=None, url=server.url, timeout=2, refresh=60, max_stale=300,
                         monotonic=lambda: clock[0])
        login = JwtLogin(keys, issuer=ISSUER, audiences=["secretsd"], rules=parse_rules(RULES))
        await keys.start()
        try:
            assert server.calls == 1 and login.verify(sign(claims())).client == "billing"
            # The issuer rotates its key: the next refresh brings the new one.
            new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            server.document = {"keys": [_jwk(RSAAlgorithm, new_key, "rsa2", "RS256")]}
            await keys.refresh()
            assert login.verify(sign(claims(), key=new_key, kid="rsa2")).client == "billing"
            with pytest.raises(UnauthenticatedError):
                login.verify(sign(claims()))  # the old key is gone
            # The issuer fails: the last good keys stay in use...
            server.status = 500
            with pytest.raises(OSError):
                await keys.refresh()
            clock[0] += 300
            assert login.verify(sign(claims(), key=new_key, kid="rsa2")).client == "billing"
            # ... for max_stale (plus one refresh interval) at most.
            clock[0] += 61
            with pytest.raises(UnauthenticatedError):
                login.verify(sign(claims(), key=new_key, kid="rsa2"))
        finally:
            await keys.stop()


async def test_a_slow_jwks_url_is_bounded_and_never_blocks_the_event_loop() -> None:
    async with JwksServer() as server:
        server.delay = 5
        keys = JwksCache(file=None, url=server.url, timeout=0.5, refresh=60, max_stale=300)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.get_running_loop().create_task(tick())
        started = time.monotonic()
        await keys.start()  # a URL that fails at start is not fatal: logins wait for it
        elapsed = time.monotonic() - started
        ticker.cancel()
        await keys.stop()
        assert elapsed < 3 and ticks >= 5 and keys.failures == 1
        with pytest.raises(UnauthenticatedError):
            keys.key("rsa1")


async def test_a_jwks_file_that_does_not_load_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "jwks.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="jwks_file"):
        await JwksCache(file=bad, url=None).start()


# -- a real daemon --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jwt_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, str]]:
    where = tmp_path_factory.mktemp("jwt")
    _jwks_file(where)
    policy = where / "policy.toml"
    policy.write_text('[policies.billing]\nrules = [{ path = "billing/*", allow = ["read"] }]\n'
                      '[policies.ops]\nrules = [{ path = "ops/*", allow = ["read"] }]\n')
    config = where / "secretsd.toml"
    config.write_text(
        f'policy_file = "{policy}"\n[auth.jwt]\njwks_file = "jwks.json"\nissuer = "{ISSUER}"\n'
        'audiences = ["secretsd"]\ntoken_ttl_seconds = 300\n'
        f'[[auth.jwt.rules]]\nclaims = {{ sub = "{SUB}" }}\nclient = "billing"\npolicies = ["billing"]\n'
        '[[auth.jwt.rules]]\nclaims = { "kubernetes.io" = { namespace = "ops" } }\nclient = "ops"\n'
        'policies = ["ops"]\n')
    data = where / "data"
    token = init_store(data)
    daemon = DaemonProcess(data, extra_args=["--config", str(config)]).start()
    try:
        for path in ("billing/db", "ops/db"):
            put = http("PUT", f"{daemon.url}/v1/secrets/{path}", token=token, body={"value": path})
            assert put.status in (200, 201), put.body
        yield daemon, token
    finally:
        daemon.stop()


@pytest.mark.e2e
def test_login_then_read_a_secret_with_the_returned_token(jwt_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, admin = jwt_daemon
    jwt = sign(claims())
    answer = http("POST", f"{daemon.url}/v1/auth/jwt/login", body={"jwt": jwt})
    assert answer.status == 200, answer.body
    body = answer.body
    assert body["client"] == "billing" and body["token"].startswith("sdt_") and body["expires_at"]
    assert http("GET", f"{daemon.url}/v1/secrets/billing/db", token=body["token"]).body["value"] == "billing/db"
    assert http("GET", f"{daemon.url}/v1/secrets/ops/db", token=body["token"]).status == 403
    me = http("GET", f"{daemon.url}/v1/auth/whoami", token=body["token"]).body
    assert me["client"] == "billing" and me["method"] == "token"
    # A token from login lives token_ttl_seconds at most (300 here), never longer than the JWT.
    short = http("POST", f"{daemon.url}/v1/auth/jwt/login", body={"jwt": sign(claims(exp=int(time.time()) + 60))})
    assert short.status == 200
    from datetime import datetime
    left = (datetime.fromisoformat(short.body["expires_at"]) - datetime.fromisoformat(body["expires_at"]))
    assert left.total_seconds() < -200
    # A bearer token sent beside the JWT changes nothing: the JWT decides.
    beside = http("POST", f"{daemon.url}/v1/auth/jwt/login", token=admin, body={"jwt": sign(claims(aud="vault"))})
    assert beside.status == 401


@pytest.mark.e2e
def test_refusals_are_one_401_audited_with_the_presented_identity(jwt_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, admin = jwt_daemon
    now = int(time.time())
    refused = {
        "foreign": sign(claims(sub="system:serviceaccount:foreign:x"), key=FOREIGN_KEY),
        "expired": sign(claims(exp=now - 3600, iat=now - 7200, nbf=now - 7200)),
        "audience": sign(claims(aud="vault")),
        "none": forge({"alg": "none"}, claims(), None),
        "norule": sign(claims(sub="system:serviceaccount:nobody:x")),
    }
    details = set()
    for what, jwt in refused.items():
        answer = http("POST", f"{daemon.url}/v1/auth/jwt/login", body={"jwt": jwt})
        assert answer.status == 401 and answer.content_type == "application/problem+json", what
        details.add(answer.body["detail"])
        assert "rule" not in json.dumps(answer.body) and "billing" not in json.dumps(answer.body)
    assert len(details) == 1  # one refusal for every reason
    # Bad input is a 400, a JWT too large among it, before anything parses it.
    for body in ({"jwt": "x" * (MAX_JWT_BYTES + 1)}, {"jwt": 5}, {}, {"jwt": "a", "more": 1}):
        assert http("POST", f"{daemon.url}/v1/auth/jwt/login", body=body).status == 400, body
    ok = sign(claims(**{"kubernetes.io": {"namespace": "ops"}}, sub="system:serviceaccount:ops:api"))
    assert http("POST", f"{daemon.url}/v1/auth/jwt/login", body={"jwt": ok}).status == 200
    text = http("GET", f"{daemon.url}/metrics", token=admin).body
    assert 'secretsd_auth_attempts_total{method="jwt",outcome="failure"}' in text
    assert 'secretsd_auth_attempts_total{method="jwt",outcome="success"}' in text
    time.sleep(0.3)
    logs = "\n".join(p.read_text() for p in (daemon.data_dir / "audit").glob("*.jsonl"))
    records = [json.loads(line) for line in logs.splitlines() if line.strip()]
    logins = [r for r in records if r.get("action") == "auth.login"]
    presented = {(r["outcome"], r.get("client"), (r.get("presented") or {}).get("sub")) for r in logins}
    assert (401, None, "system:serviceaccount:foreign:x") in presented
    assert (200, "ops", "system:serviceaccount:ops:api") in presented
    assert all(r.get("auth") in (None, "jwt") for r in logins)
    for jwt in (*refused.values(), ok):  # never the JWT, in the audit log or the daemon's log
        signature = jwt.rsplit(".", 1)[-1]
        assert (signature and signature not in logs and signature not in daemon.logs()) or not signature


@pytest.mark.e2e
def test_cli_login_with_a_jwt_file(jwt_daemon: tuple[DaemonProcess, str], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, _ = jwt_daemon
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("SECRETSD_TOKEN", raising=False)
    jwt_file = tmp_path / "token"
    jwt_file.write_text(sign(claims()) + "\n")
    runner = CliRunner()
    printed = runner.invoke(main, ["--addr", daemon.url, "login", "--method", "jwt", "--jwt-file", str(jwt_file),
                                   "--print"])
    assert printed.exit_code == 0, printed.output
    token = printed.stdout.strip()
    assert token.startswith("sdt_")
    assert http("GET", f"{daemon.url}/v1/secrets/billing/db", token=token).status == 200
    stored = runner.invoke(main, ["--addr", daemon.url, "login", "--method", "jwt", "--jwt-file", str(jwt_file)])
    assert stored.exit_code == 0 and (tmp_path / "cfg" / "secretsd" / "token").exists(), stored.output
    who = runner.invoke(main, ["--addr", daemon.url, "whoami", "--json"])
    assert who.exit_code == 0 and json.loads(who.stdout)["client"] == "billing"
    jwt_file.write_text(sign(claims(aud="vault")))
    refused = runner.invoke(main, ["--addr", daemon.url, "login", "--method", "jwt", "--jwt-file", str(jwt_file)])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    missing = runner.invoke(main, ["--addr", daemon.url, "login", "--method", "jwt"])
    assert missing.exit_code == 2 and "--jwt-file" in missing.output


async def test_without_auth_jwt_the_login_route_refuses_every_jwt(api: Any) -> None:
    """In process (the conftest app, no [auth.jwt]): one 401, recorded like any refusal."""
    resp = await api.client.post("/v1/auth/jwt/login", json={"jwt": sign(claims())})
    assert resp.status == 401 and resp.content_type == "application/problem+json"
    # A token beside it does not make it succeed either: the route ignores the Authorization header.
    resp = await api.client.post("/v1/auth/jwt/login", json={"jwt": sign(claims())}, headers=api.auth())
    assert resp.status == 401


@pytest.mark.e2e
def test_sighup_reloads_the_jwt_rules(jwt_daemon: tuple[DaemonProcess, str]) -> None:
    import signal

    daemon, _ = jwt_daemon
    config = Path(daemon.extra_args[1])
    newcomer = sign(claims(sub="system:serviceaccount:billing:worker"))
    assert http("POST", f"{daemon.url}/v1/auth/jwt/login", body={"jwt": newcomer}).status == 401
    original = config.read_text()
    config.write_text(original + '[[auth.jwt.rules]]\nclaims = { sub = "system:serviceaccount:billing:worker" }\n'
                                 'client = "billing-worker"\npolicies = ["billing"]\n')
    try:
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "jwt rules reloaded (3 rules)" not in daemon.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = http("POST", f"{daemon.url}/v1/auth/jwt/login", body={"jwt": newcomer})
        assert answer.status == 200 and answer.body["client"] == "billing-worker", daemon.logs()
    finally:
        config.write_text(original)
        daemon.signal(signal.SIGHUP)
