"""Security rules that live in one function each, tested under the rule's name."""

from __future__ import annotations

import pytest

from secretsd import tokens
from secretsd.domain.identity import Principal
from secretsd.domain.policy import Capability, PolicySet, compile_glob
from secretsd.domain.token_service import check_delegation
from secretsd.errors import ConfigError, InvalidPathError, PermissionDeniedError
from secretsd.paths import MAX_DEPTH, MAX_PATH_LENGTH, validate_path, validate_prefix


# -- paths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["app/db", "a", "A-b_c.d/e", "x/" * 15 + "y", "a" * 128])
def test_valid_paths(path: str) -> None:
    assert validate_path(path) == path


@pytest.mark.parametrize("path", [
    "", "/a", "a/", "a//b", "a/./b", "a/../b", "..", ".", "a b", "a/b%", "a/ü", "a\\b", "a\0b",
    "sys/status", "sys", "x/" * MAX_DEPTH + "y", "a" * 129, ("ab/" * 200)[: MAX_PATH_LENGTH + 1],
])
def test_path_rule_rejects_anything_a_proxy_or_filesystem_could_reinterpret(path: str) -> None:
    with pytest.raises(InvalidPathError):
        validate_path(path)


def test_prefix_may_be_empty_or_a_path() -> None:
    assert validate_prefix("") == ""
    assert validate_prefix("/") == ""
    assert validate_prefix("app/") == "app"
    with pytest.raises(InvalidPathError):
        validate_prefix("app//")
    with pytest.raises(InvalidPathError):
        validate_prefix("../x")


# -- globs and policies -------------------------------------------------------------------------
@pytest.mark.parametrize(("glob", "yes", "no"), [
    ("app/*", ["app/x", "app/db-1"], ["app", "app/x/y", "apple/x"]),
    ("app/**", ["app", "app/x", "app/x/y/z"], ["apple", "other/app/x"]),
    ("**/db", ["db", "a/db", "a/b/db"], ["a/db/x", "adb"]),
    ("a/**/z", ["a/z", "a/b/z", "a/b/c/z"], ["a/b", "z"]),
    ("db-*", ["db-1", "db-"], ["db", "x/db-1"]),
    ("**", ["", "a", "a/b"], []),
])
def test_glob_matches_whole_segments(glob: str, yes: list[str], no: list[str]) -> None:
    pattern = compile_glob(glob)
    assert all(pattern.fullmatch(p) for p in yes), glob
    assert not any(pattern.fullmatch(p) for p in no), glob


@pytest.mark.parametrize("glob", ["", "a//b", "a/**x", "a/b c", "/a"])
def test_bad_globs_are_config_errors(glob: str) -> None:
    with pytest.raises(ConfigError):
        compile_glob(glob)


POLICIES = PolicySet.from_mapping({"policies": {
    "reader": {"rules": [{"path": "app/**", "allow": ["read", "list"]},
                         {"path": "app/secret/*", "deny": ["read"]}]},
    "writer": {"rules": [{"path": "app/**", "allow": ["write", "read"]}]},
}})


def test_deny_by_default() -> None:
    decision = POLICIES.decide(["reader"], Capability.WRITE, "app/x")
    assert not decision.allowed and decision.rule is None
    assert "default" in decision.explain()
    assert not POLICIES.decide([], Capability.READ, "app/x").allowed
    assert not POLICIES.decide(["no-such-policy"], Capability.READ, "app/x").allowed


def test_explicit_deny_wins_over_any_allow() -> None:
    decision = POLICIES.decide(["writer", "reader"], Capability.READ, "app/secret/k")
    assert not decision.allowed
    assert decision.rule is not None and decision.rule.policy == "reader" and decision.rule.index == 1
    assert POLICIES.decide(["writer", "reader"], Capability.READ, "app/other").allowed


def test_root_policy_allows_everything_and_cannot_be_redefined() -> None:
    for cap in Capability:
        assert POLICIES.decide(["root"], cap, "any/where").allowed
    with pytest.raises(ConfigError, match="built in"):
        PolicySet.from_mapping({"policies": {"root": {"rules": []}}})


@pytest.mark.parametrize("doc", [
    {"policies": {"p": {"rules": [{"path": "a", "allow": ["fly"]}]}}},
    {"policies": {"p": {"rules": [{"path": "a"}]}}},
    {"policies": {"p": {"rules": [{"path": "a", "allow": ["read"], "extra": 1}]}}},
    {"policies": {"bad name!": {"rules": []}}},
    {"polices": {}},
])
def test_invalid_policy_files_are_config_errors(doc: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PolicySet.from_mapping(doc)


# -- tokens -------------------------------------------------------------------------------------
def test_token_format_prefix_id_and_256_bit_secret() -> None:
    new = tokens.generate_token()
    assert new.token.startswith("sdt_")
    parsed = tokens.parse_token(new.token)
    assert parsed is not None
    token_id, secret = parsed
    assert token_id == new.token_id and len(secret) == 32
    assert tokens.secret_matches(secret, new.secret_hash)
    assert new.secret_hash != secret and len(new.secret_hash) == 32
    assert tokens.generate_token().token != new.token


@pytest.mark.parametrize("bad", ["", "sdt_", "Bearer x", "sdt_zz_" + "a" * 43, "sdt_0123456789abcdef_short"])
def test_malformed_tokens_do_not_parse(bad: str) -> None:
    assert tokens.parse_token(bad) is None


def test_token_comparison_is_constant_time() -> None:
    # The rule is that comparison goes through hmac.compare_digest: check it is what is called.
    import inspect

    source = inspect.getsource(tokens.secret_matches)
    assert "hmac.compare_digest" in source


def test_token_cannot_grant_policies_it_does_not_hold() -> None:
    ops = Principal("ops", ("ops",), "token", "x")
    check_delegation(ops, ("ops",))
    with pytest.raises(PermissionDeniedError, match="root"):
        check_delegation(ops, ("ops", "root"))
    check_delegation(Principal("admin", ("root",), "token", "y"), ("anything",))


def test_a_token_is_active_until_revoked_or_expired() -> None:
    """``TokenRecord.is_active``: the one rule authentication, policy check, metrics and guards ask."""
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from secretsd.storage import TokenRecord

    now = datetime(2026, 1, 1, tzinfo=UTC)
    token = TokenRecord("00000000000000aa", b"h" * 32, "svc", ("p",), now - timedelta(days=1), "admin")
    assert token.is_active(now)
    assert replace(token, expires_at=now + timedelta(microseconds=1)).is_active(now)
    # The expiry instant itself is already past it.
    assert not replace(token, expires_at=now).is_active(now)
    assert not replace(token, expires_at=now - timedelta(seconds=1)).is_active(now)
    # Revoked is revoked, whatever its expiry, even a revocation stamped in the future.
    assert not replace(token, revoked_at=now + timedelta(days=1)).is_active(now)
    assert not replace(token, revoked_at=now, expires_at=now + timedelta(days=1)).is_active(now)
