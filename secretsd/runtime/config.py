"""Configuration: a TOML file, then ``SECRETSD_*`` environment variables, then command-line flags.

Later sources win. Nested tables map to environment variables with ``__``:
``SECRETSD_KEY_PROVIDER__KIND=file``. Secrets never belong here: a key provider's PIN or
passphrase is read from the environment variable or file the configuration *names*.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from secretsd.addresses import check_jwks_url
from secretsd.audit.failures import FailureBudget
from secretsd.defaults import DEFAULT_LISTEN
from secretsd.domain.rotation_settings import RotationSettings
from secretsd.errors import ConfigError
from secretsd.runtime.backup_settings import BackupSettings

CONFIG_ENV = "SECRETSD_CONFIG"


#: The recovery-shares provider (keyproviders.shares) and the file init writes its public key to.
RECOVERY_SHARES_KIND = "recovery-shares"
RECOVERY_SHARES_PUBLIC_FILE = "recovery-shares.pub"


class KeyProviderSettings(BaseModel):
    """``[key_provider]``: ``kind`` picks the provider, the other keys are its own options."""

    model_config = ConfigDict(extra="allow")
    kind: str = "file"

    def options(self) -> dict[str, Any]:
        return self.model_dump()


class AuthenticatorSettings(BaseModel):
    """One ``[[authenticators]]`` entry: ``method`` names an entry point in ``secretsd.authenticators``,
    the other keys are that method's own options. Asked in the order listed."""

    model_config = ConfigDict(extra="allow")
    method: str = Field(min_length=1)

    def options(self) -> dict[str, Any]:
        return self.model_dump()


def _default_authenticators() -> list[AuthenticatorSettings]:
    return [AuthenticatorSettings(method="token")]


class UnixAuthSettings(BaseModel):
    """``[auth.unix]``: ``[[auth.unix.rules]]`` map a Unix-socket peer's uid/gid to a client and
    policies (checked by secretsd.auth.unix.UnixRule when the daemon builds the authenticator)."""

    model_config = ConfigDict(extra="forbid")
    rules: list[dict[str, Any]] = Field(default_factory=list)


class TlsAuthSettings(BaseModel):
    """``[auth.tls]``: client certificates on the TLS listener (secretsd.auth.tls, docs/auth.md).
    Set ``client_ca_file`` to turn the method on; the rules are checked by secretsd.auth.tls.TlsRule."""

    model_config = ConfigDict(extra="forbid")
    client_ca_file: Path | None = None
    #: True: a handshake without a certificate fails; false: such a connection authenticates otherwise.
    require_client_cert: bool = False
    #: A PEM CRL of the client CA, read again on SIGHUP.
    crl_file: Path | None = None
    rules: list[dict[str, Any]] = Field(default_factory=list)


class JwtAuthSettings(BaseModel):
    """``[auth.jwt]``: workload JWT login (secretsd.auth.jwt, docs/auth.md). Set ``jwks_file`` or
    ``jwks_url`` to turn ``POST /v1/auth/jwt/login`` on; the rules are checked by secretsd.auth.jwt."""

    model_config = ConfigDict(extra="forbid")
    jwks_file: Path | None = None
    jwks_url: str | None = None
    #: The CA that signed the jwks_url server's certificate (the cluster CA, say); default: the system's.
    jwks_ca_file: Path | None = None
    issuer: str | None = None
    audiences: list[str] = Field(default_factory=list)
    #: The life of the daemon token a login returns.
    token_ttl_seconds: int = Field(default=900, ge=30, le=86400)
    #: How often the JWKS is read again (file or URL); a failed fetch keeps the last good keys.
    refresh_interval_seconds: float = Field(default=300.0, ge=1, le=86400)
    #: The bound on one JWKS fetch (connect, send, receive).
    fetch_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    #: How long the last good keys stay in use while every fetch fails; after that logins are refused.
    max_stale_seconds: float = Field(default=3600.0, ge=0, le=7 * 86400)
    #: Clock skew allowed on exp, nbf and iat.
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    rules: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        return check_jwks_url(value) if value is not None else None  # https, or http to loopback only


class AuthSettings(BaseModel):
    """``[auth]``: the options of the identity methods that are not bearer tokens (docs/auth.md)."""

    model_config = ConfigDict(extra="forbid")
    unix: UnixAuthSettings = Field(default_factory=UnixAuthSettings)
    tls: TlsAuthSettings = Field(default_factory=TlsAuthSettings)
    jwt: JwtAuthSettings = Field(default_factory=JwtAuthSettings)


class TokenSettings(BaseModel):
    """``[tokens]``: how long a revoked or expired token's row is kept before the leader purges it."""

    model_config = ConfigDict(extra="forbid")
    #: Days after a token's revocation or expiry before its row is deleted; 0 keeps every row forever.
    purge_after_days: int = Field(default=7, ge=0, le=36500)
    #: How often the leader sweeps (secretsd.runtime.token_purge).
    purge_interval_seconds: float = Field(default=3600.0, gt=0, le=86400)


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="allow")
    backend: str = "sqlite"

    def options(self) -> dict[str, Any]:
        return self.model_dump()


class AuditSettings(BaseModel):
    """``[audit]``: the tamper-evident audit log (see docs/audit.md)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    #: Default: audit/<chain>.jsonl under the data directory; relative paths are under it too.
    path: Path | None = None
    #: Refuse a request whose record cannot be written (the default, and what auditors expect).
    fail_closed: bool = True
    max_file_bytes: int = Field(default=100 * 1024 * 1024, ge=4096)
    write_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    mirror: Literal["none", "stdout", "syslog"] = "none"
    #: Each process that writes a log keeps its own chain (and file). Configured: this process's
    #: alone, a second process on it is refused. Not configured: each daemon derives a free name
    #: from "main" (main, main-<host>, main-<host>-2...; secretsd.audit.chains, docs/audit.md).
    chain: str = Field(default="main", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    #: "batch": sign the last record of each group commit (the chain covers the others);
    #: "record": sign every record, at about 60 µs of CPU each.
    sign: Literal["batch", "record"] = "batch"
    #: How often the chain head is copied to storage (0: after every batch).
    head_interval_seconds: float = Field(default=1.0, ge=0, le=60)
    #: Requests that fail authentication (401): each remote address gets this many records of its
    #: own, refilled at auth_failure_per_second, and all remotes together auth_failure_total_per_second;
    #: beyond that they are counted and written as one ``auth.failures`` summary per remote every
    #: auth_failure_summary_seconds (docs/audit.md).
    auth_failure_burst: int = Field(default=20, ge=0, le=100_000)
    auth_failure_per_second: float = Field(default=1.0, ge=0, le=100_000)
    auth_failure_total_per_second: float = Field(default=10.0, ge=0, le=100_000)
    auth_failure_summary_seconds: float = Field(default=10.0, gt=0, le=3600)
    #: Retention of rotated files (None: keep all). The oldest are removed first, after an
    #: ``audit.pruned`` record names them; ship them elsewhere before that (docs/audit.md).
    keep_rotated_files: int | None = Field(default=None, ge=1)
    keep_rotated_bytes: int | None = Field(default=None, ge=4096)

    @property
    def chain_configured(self) -> bool:
        """Whether ``chain`` was set (file, environment or code), rather than left to be derived."""
        return "chain" in self.model_fields_set

    def log_path(self, data_dir: Path, chain: str | None = None) -> Path:
        """The file of ``chain`` (default: this table's). Another chain's file lies beside a configured ``path``."""
        name = chain or self.chain
        if self.path is None:
            path = Path("audit") / f"{name}.jsonl"
        else:
            path = self.path if name == self.chain else self.path.with_name(f"{name}.jsonl")
        return path if path.is_absolute() else data_dir / path

    def failure_budget(self) -> FailureBudget:
        return FailureBudget(self.auth_failure_burst, self.auth_failure_per_second,
                             self.auth_failure_total_per_second, self.auth_failure_summary_seconds)


class MetricsSettings(BaseModel):
    """``[metrics]``: Prometheus. On the API listener ``/metrics`` needs ``read`` on ``sys/metrics``."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    #: Also serve ``/metrics``, without authentication, on this HOST:PORT (an internal interface).
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value


class HttpSettings(BaseModel):
    """``[http]``: what one peer may hold before it has said who it is (docs/operations.md).

    Every phase of a request has a deadline, and the number of connections is capped below the
    process's file-descriptor limit, so idle or trickling peers cannot starve real clients.
    """

    model_config = ConfigDict(extra="forbid")
    #: Open connections at most; at the cap the connection that has gone longest without sending a
    #: complete request head is closed to make room. Default: derived from RLIMIT_NOFILE, leaving
    #: headroom for the store, the audit log and the key provider.
    max_connections: int | None = Field(default=None, ge=1, le=1_000_000)
    #: From connection (or from the first byte of a later request) to a complete request head;
    #: also the TLS handshake deadline.
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    #: From a complete head to the last byte of its body.
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: A keep-alive connection waiting for its next request is closed after this long.
    idle_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Errors a peer can cause over and over (accept failures, malformed requests) are logged at
    #: most once per this many seconds each, with a count of what was not logged.
    error_log_interval_seconds: float = Field(default=10.0, gt=0, le=3600)


class VaultSettings(BaseModel):
    """``[vault]``: the Vault KV v2 façade (docs/vault-compat.md), over the same secrets and rules."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    #: Served as ``/v1/<kv_mount>/data/...``; one path segment, not a name of our own API under /v1.
    kv_mount: str = Field(default="secret", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")

    @field_validator("kv_mount")
    @classmethod
    def _not_ours(cls, value: str) -> str:
        # These segments under /v1 are the native API's (and Vault's own sys/ and auth/).
        if value in ("secrets", "metadata", "rotation", "sys", "auth", "openapi.json", "identity", "cubbyhole"):
            raise ValueError(f"kv_mount {value!r} is taken by another part of the API")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SECRETSD_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path | None = None
    #: HOST:PORT, or "none" for no TCP listener (then ``listen_unix`` must be set).
    listen: str = DEFAULT_LISTEN
    #: A Unix-domain socket to serve on as well (or instead, with listen = "none"): docs/auth.md.
    listen_unix: Path | None = None
    unix_socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    #: The group the socket file is given (a name or a number); None keeps the daemon's own.
    unix_socket_group: str | None = None
    auth: AuthSettings = Field(default_factory=AuthSettings)
    policy_file: Path | None = None
    key_provider: KeyProviderSettings = Field(default_factory=KeyProviderSettings)
    # Further providers every keyring term is also wrapped for (an offline recovery key, say): any
    # one configured provider can unseal the store.
    recovery_providers: list[KeyProviderSettings] = Field(default_factory=list)
    provider_check_seconds: float = Field(15.0, gt=0, le=3600)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    rotation: RotationSettings = Field(default_factory=RotationSettings)
    backup: BackupSettings = Field(default_factory=BackupSettings)
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
    #: How requests authenticate (secretsd.auth): without this setting, bearer tokens, as always.
    authenticators: list[AuthenticatorSettings] = Field(default_factory=_default_authenticators, min_length=1)

    max_versions: int = Field(10, ge=1, le=1000)
    max_value_bytes: int = Field(512 * 1024, ge=1, le=16 * 1024 * 1024)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Tokens verified in the last few seconds are not re-read from storage; revocation made through
    # another process (replica, worker) takes effect within this bound.
    token_cache_seconds: float = Field(5.0, ge=0, le=300)
    # Replicas (docs/ha.md): how often each re-reads the keyring whatever notifications say (the
    # staleness bound when LISTEN/NOTIFY is down or absent), and how often a non-leader tries to
    # take leadership of singleton work (the failover bound after a leader dies).
    change_poll_seconds: float = Field(10.0, gt=0, le=3600)
    leader_retry_seconds: float = Field(2.0, gt=0, le=600)
    # A keyring term is retired after this many encryptions, well before the 2^32 random-nonce
    # bound of NIST SP 800-38D.
    max_encryptions_per_term: int = Field(2**30, ge=1, le=2**31)
    unseal_retry_max_seconds: float = Field(30.0, gt=0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Bearer tokens cross the wire in every request: off loopback they need TLS, unless the operator
    # says in so many words that something else (a mesh sidecar, a TLS proxy) protects them.
    allow_plaintext: bool = False
    log_level: str = "INFO"
    log_format: str = Field("console", pattern="^(console|json)$")
    #: mlockall the daemon's memory so key material never reaches swap (secretsd.runtime.process_hardening).
    #: Needs CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK; off by default, a warning when it fails.
    lock_memory: bool = False

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value != NO_LISTEN:
            parse_listen(value)
        return value

    @property
    def tcp_listen(self) -> str | None:
        """The TCP HOST:PORT to serve on, or None (``listen = "none"``: the Unix socket only)."""
        return None if self.listen == NO_LISTEN else self.listen

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def provider_specs(self) -> list[dict[str, Any]]:
        specs = [self.key_provider.options(), *(p.options() for p in self.recovery_providers)]
        # A store initialised with recovery shares keeps the recovery key's *public* half in its data
        # directory (docs/recovery.md): the daemon wraps new terms for it without any configuration.
        if (self.data_dir is not None and all(s.get("kind") != RECOVERY_SHARES_KIND for s in specs)
                and (self.data_dir / RECOVERY_SHARES_PUBLIC_FILE).is_file()):
            specs.append({"kind": RECOVERY_SHARES_KIND, "public_key_file": RECOVERY_SHARES_PUBLIC_FILE})
        return specs

    def authenticator_specs(self) -> list[dict[str, Any]]:
        """The ``[[authenticators]]`` entries; with ``listen_unix`` the ``unix`` method joins them
        (after the others: a bearer token, when present, wins), its rules from ``[auth.unix]``."""
        specs = [a.options() for a in self.authenticators]
        if self.listen_unix is not None and all(s["method"] != "unix" for s in specs):
            specs.append({"method": "unix"})
        # Client certificates (docs/auth.md): after the others too, so a bearer token wins.
        if self.auth.tls.client_ca_file is not None and all(s["method"] != "tls" for s in specs):
            specs.append({"method": "tls"})
        for spec in specs:
            if spec["method"] == "unix" and "rules" not in spec:
                spec["rules"] = self.auth.unix.rules
            if spec["method"] == "tls" and "rules" not in spec:
                spec["rules"] = self.auth.tls.rules
        return specs

    def require_data_dir(self) -> Path:
        if self.data_dir is None:
            raise ConfigError("no data directory: pass --data-dir DIR or set SECRETSD_DATA_DIR")
        return self.data_dir


#: ``listen = "none"``: no TCP listener.
NO_LISTEN = "none"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen address must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from ``config_file`` (or ``$SECRETSD_CONFIG``), the environment and overrides.

    Overrides that are None are ignored, so CLI flags that were not given do not mask the file.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            tomllib.loads(config_file.read_text("utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from exc

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    given = {k: v for k, v in overrides.items() if v is not None}
    for name in ("data_dir", "policy_file", "tls_cert_file", "tls_key_file", "listen_unix"):
        if name in given:
            given[name] = Path(given[name]).resolve()  # flags are relative to where they were typed
    try:
        settings = _FileSettings(**given)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(config_file or "configuration"))) from None
    # Relative paths in a config file are relative to the file, not to wherever the daemon started.
    base = config_file.parent if config_file else Path.cwd()
    data = settings.model_dump()
    for name in ("data_dir", "policy_file", "tls_cert_file", "tls_key_file", "listen_unix"):
        value = data[name]
        if value is not None and not Path(value).is_absolute():
            data[name] = (base / value).resolve()
    if data["backup"]["directory"] is not None and not Path(data["backup"]["directory"]).is_absolute():
        data["backup"]["directory"] = (base / data["backup"]["directory"]).resolve()
    for table, name in (("tls", "client_ca_file"), ("tls", "crl_file"), ("jwt", "jwks_file"), ("jwt", "jwks_ca_file")):
        value = data["auth"][table][name]
        if value is not None and not Path(value).is_absolute():
            data["auth"][table][name] = (base / value).resolve()
    return Settings.model_construct(**data | {
        "key_provider": KeyProviderSettings(**data["key_provider"]),
        "recovery_providers": [KeyProviderSettings(**p) for p in data["recovery_providers"]],
        "storage": StorageSettings(**data["storage"]),
        # Only the keys that were given: an unset chain is derived (AuditSettings.chain_configured).
        "audit": AuditSettings(**settings.audit.model_dump(exclude_unset=True)),
        "rotation": RotationSettings(**data["rotation"]),
        "backup": BackupSettings(**data["backup"]),
        "tokens": TokenSettings(**data["tokens"]),
        "metrics": MetricsSettings(**data["metrics"]),
        "http": HttpSettings(**data["http"]),
        "vault": VaultSettings(**data["vault"]),
        "authenticators": [AuthenticatorSettings(**a) for a in data["authenticators"]],
        "auth": AuthSettings(**data["auth"]),
    })


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, naming the setting and never echoing its value (it may be secret)."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{where}: {msg}")
    return f"invalid {source}: " + "; ".join(problems)
