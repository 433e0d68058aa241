"""Configuration of the PostgreSQL dialect: options, defaults, and the DSN rules.

A ``dsn`` in a configuration file must not carry a password; ``dsn_env`` names an environment
variable holding the complete URI. Messages describe the database, never the password.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from secretsd.errors import ConfigError

OPTIONS = frozenset({"dsn", "dsn_env", "pool_min", "pool_max", "statement_timeout_ms", "connect_timeout_ms"})
DEFAULT_POOL_MIN = 1
DEFAULT_POOL_MAX = 10
DEFAULT_STATEMENT_TIMEOUT_MS = 5_000
DEFAULT_CONNECT_TIMEOUT_MS = 10_000
SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class Target:
    """Where we connect: what messages may show (never the password) and what they must not."""

    dsn: str = field(repr=False)
    description: str
    password: str | None = field(default=None, repr=False)


def parse_dsn(dsn: str, source: str) -> tuple[str, str | None]:
    """(description, password) of a connection URI; ``ConfigError`` if it is not one."""
    if not dsn.startswith(SCHEMES):
        raise ConfigError(f"{source} must be a postgresql:// connection URI")
    parts = urlsplit(dsn)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, has_colon, raw_password = userinfo.partition(":")
    query = parse_qs(parts.query, keep_blank_values=True)
    password = unquote(raw_password) if has_colon else None
    if password is None and query.get("password"):
        password = query["password"][0]
    hosts = unquote(hostlist) or ",".join(query.get("host", [])) or "the default host"
    database = unquote(parts.path.lstrip("/")) or ",".join(query.get("dbname", [])) or "the default database"
    who = f"{unquote(user)}@" if user else ""
    return f"PostgreSQL database {database!r} at {who}{hosts}", password


def int_option(options: Mapping[str, Any], name: str, default: int, minimum: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"storage.{name} must be an integer >= {minimum}, not {value!r}")
    return value


def resolve_dsn(options: Mapping[str, Any]) -> str:
    """The connection URI the ``[storage]`` options (minus ``backend``) name; ``ConfigError`` if they
    carry an unknown option, a password in ``dsn``, both or neither of ``dsn`` and ``dsn_env``."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown storage option(s) for postgres: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(OPTIONS))})"
        )
    dsn_option, env_name = options.get("dsn"), options.get("dsn_env")
    if (dsn_option is None) == (env_name is None):
        raise ConfigError("set exactly one of storage.dsn (a URI without password) and storage.dsn_env "
                          "(the name of an environment variable holding the full URI)")
    if dsn_option is not None:
        if not isinstance(dsn_option, str):
            raise ConfigError("storage.dsn must be a string")
        _, password = parse_dsn(dsn_option, "storage.dsn")
        if password is not None:
            raise ConfigError(
                "storage.dsn must not contain a password: put the full URI in an environment "
                "variable and name it in storage.dsn_env, or keep the password in a libpq password "
                "file (~/.pgpass, PGPASSFILE) or service file (?service=NAME)"
            )
        dsn = dsn_option
    else:
        if not isinstance(env_name, str) or not env_name:
            raise ConfigError("storage.dsn_env must be the name of an environment variable")
        dsn = os.environ.get(env_name, "")
        if not dsn:
            raise ConfigError(f"storage.dsn_env names {env_name}, which is not set or empty")
        parse_dsn(dsn, f"the environment variable {env_name}")
    return dsn
