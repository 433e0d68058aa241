"""Offline recovery of administration: ``secretsd token create-root``.

The API refuses to revoke the last root token, but every root token can still be lost (expired,
leaked and revoked, forgotten), and ``init`` refuses an initialised store. Vault answers this with
generate-root and its unseal or recovery keys; we answer it with custody of the key provider: this
command unseals the keyring with the configured provider (the HSM, the key file or a recovery
provider), which only someone who holds the master key can do, and only then mints a root token,
with a ``token.create-root`` record in the signed audit chain.

It may run while the daemon serves. The store takes concurrent writers (SQLite in WAL with
``BEGIN IMMEDIATE``; PostgreSQL), and the audit log has one writer per chain: when the daemon holds
the configured chain, the record goes to a chain of this command's own, ``<chain>-offline`` (the
one-chain-per-process rule of docs/audit.md), verified like any other chain. Without a configured
chain it claims one as a daemon does, so on a shared store it never writes another replica's chain.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keyproviders import KeyProvider
from keyproviders.shares import (
    RecoverySharesKeyProvider,
    check_split,
    public_key_document,
    split_new_secret,
)
from secretsd import tokens
from secretsd.audit.chains import ChainClaim, candidates, claim_chain
from secretsd.audit.keys import load_signer
from secretsd.audit.log import AuditLog
from secretsd.audit.mirrors import syslog_mirror
from secretsd.audit.verify import Head
from secretsd.clock import Clock, utcnow
from secretsd.custody.barrier import Barrier
from secretsd.custody.keyring import provider_errors
from secretsd.domain.policy import ROOT_POLICY
from secretsd.domain.token_service import RECOVERY_CREATOR
from secretsd.errors import ConfigError, NotInitializedError
from secretsd.errors import ProviderKeyMismatch as ProviderKeyMismatchError
from secretsd.records import TokenRecord
from secretsd.runtime.config import (
    RECOVERY_SHARES_KIND,
    RECOVERY_SHARES_PUBLIC_FILE,
    AuditSettings,
    KeyProviderSettings,
    Settings,
)
from secretsd.runtime.daemon import ADMIN_CLIENT, InitResult, build_storage, initialize_store, provider_set
from secretsd.storage import Storage

ACTION = "token.create-root"
OFFLINE_SUFFIX = "-offline"


@dataclass(frozen=True)
class RootToken:
    token: str  # shown once
    record: TokenRecord
    audit_chain: str
    audit_file: Path
    providers: tuple[str, ...]


def _chain_is_free(log_path: Path) -> bool:
    """Whether no process (a serving daemon) holds the chain's writer lock right now."""
    lock = log_path.with_name(log_path.name + ".lock")
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases the probe's lock: the audit log takes it for itself
    return True


def audit_chain_for(settings: Settings) -> AuditSettings:
    """The configured chain if no daemon writes it now, else ``<chain>-offline`` beside it."""
    conf = settings.audit
    data_dir = settings.require_data_dir()
    if _chain_is_free(conf.log_path(data_dir)):
        return conf
    chain = conf.chain[: 64 - len(OFFLINE_SUFFIX)] + OFFLINE_SUFFIX
    path = conf.log_path(data_dir).with_name(f"{chain}.jsonl")
    return conf.model_copy(update={"chain": chain, "path": path})


async def _claim_unconfigured(settings: Settings, storage: Storage) -> tuple[AuditSettings, ChainClaim]:
    """Without a configured chain, claim one as a daemon does (secretsd.audit.chains): this data
    directory's ``main`` if free, else ``main-offline`` (``main-offline-<host>``... when another
    replica's directory owns that one), so the record never lands in another replica's chain."""
    conf = settings.audit
    data_dir = settings.require_data_dir()
    node = platform.node()
    offline = conf.chain[: 64 - len(OFFLINE_SUFFIX)] + OFFLINE_SUFFIX
    claim = await claim_chain(storage, [conf.chain, *candidates(offline, node)],
                              lambda name: conf.log_path(data_dir, name), node=node)
    return conf.model_copy(update={"chain": claim.name, "path": claim.path}), claim


async def _open_audit(settings: Settings, conf: AuditSettings, storage: Storage, barrier: Barrier,
                      claim: ChainClaim | None) -> AuditLog:
    signer = await load_signer(storage, barrier)
    head_key = f"audit_head:{conf.chain}"
    raw_head = await storage.get_meta(head_key)

    async def store_head(head: Head) -> None:
        await storage.put_meta(head_key, json.dumps({"seq": head.seq, "hash": head.hash}))

    # No stdout mirror: stdout carries the token (and --json); syslog gets its copy as configured.
    audit = AuditLog(
        conf.log_path(settings.require_data_dir()), signer, head_store=store_head,
        stored_head=Head(**json.loads(raw_head)) if raw_head else None,
        max_file_bytes=conf.max_file_bytes, write_timeout=conf.write_timeout_seconds,
        mirror=syslog_mirror() if conf.mirror == "syslog" else None,
        sign_every_record=True, head_interval=0, lock_fd=None if claim is None else claim.lock_fd,
    )
    try:
        await audit.open()
    except BaseException:
        await audit.close()  # lets go of a claimed chain's lock
        raise
    return audit


async def create_root_token(
    settings: Settings, *, clock: Clock = utcnow, recovery: RecoverySharesKeyProvider | None = None
) -> RootToken:
    """Prove custody of the master key by unsealing, then mint a root token and audit it.

    Nothing is written unless the keyring unseals. The record is durable before the token is
    returned; if it cannot be written the new token is revoked again (it was never shown).
    ``recovery``, built from K shares, unseals when the configured providers cannot (a lost HSM).
    """
    decorate = None
    configured = settings
    if recovery is not None:
        settings = shares_settings(settings, recovery)
        decorate = with_shares(settings, recovery)
    data_dir = settings.require_data_dir()
    if not data_dir.is_dir():
        raise NotInitializedError(f"the store in {data_dir} is not initialised (no such directory); "
                                  "nothing was changed")
    storage = build_storage(settings)
    await storage.open()
    try:
        if not await storage.is_initialized():
            raise NotInitializedError(f"the store in {data_dir} is not initialised; nothing was changed")
        # create=False: a missing key file or HSM key is an error here, never a new key.
        barrier = Barrier(storage, provider_set(settings, decorate=decorate),
                          max_encryptions_per_term=settings.max_encryptions_per_term, clock=clock)
        try:
            await barrier.unseal()  # the proof of custody: every keyring term must unwrap
            if recovery is not None:
                restore_public_file(configured, recovery)
            providers = tuple(s.kind for s in barrier.providers.states() if s.ok)
            conf, claim = settings.audit, None
            if settings.audit.enabled and not settings.audit.chain_configured:
                conf, claim = await _claim_unconfigured(settings, storage)
            elif settings.audit.enabled:
                conf = audit_chain_for(settings)
            audit = await _open_audit(settings, conf, storage, barrier, claim) if settings.audit.enabled else None
            try:
                new = tokens.generate_token()
                record = TokenRecord(
                    token_id=new.token_id, secret_hash=new.secret_hash, client=ADMIN_CLIENT,
                    policies=(ROOT_POLICY,), created_at=clock(), created_by=RECOVERY_CREATOR,
                )
                await storage.create_token(record)
                if audit is not None:
                    try:
                        await audit.append({
                            "action": ACTION, "client": RECOVERY_CREATOR, "decision": "allow", "outcome": "ok",
                            "subject_token": tokens.display_id(record.token_id), "subject_client": ADMIN_CLIENT,
                            "providers": ",".join(providers), "host": platform.node(),
                            "os_user": _os_user(),
                        })
                    except BaseException:
                        await storage.revoke_token(record.token_id, clock())
                        raise
            finally:
                if audit is not None:
                    await audit.close()
        finally:
            barrier.close()
    finally:
        await storage.close()
    return RootToken(new.token, record, conf.chain, conf.log_path(data_dir), providers)


def _os_user() -> str:
    # Who ran it, as the operating system knows them: the record's only trace of a person.
    with contextlib.suppress(KeyError, OSError):
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    return str(os.getuid())


# -- recovery shares (docs/recovery.md) -------------------------------------------------------------
@dataclass(frozen=True)
class SharesInit:
    """What ``init --recovery-shares`` hands back once: the admin token and the N shares."""

    init: InitResult
    shares: list[str]  # shown once, never stored
    threshold: int
    key_id: str


def _write_public_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


async def initialize_with_shares(settings: Settings, shares: int, threshold: int) -> SharesInit:
    """``init`` with a fresh recovery key split into ``shares`` SLIP-0039 shares, ``threshold`` of which recover it.

    Only the public half is kept (``recovery-shares.pub`` in the data directory, which the daemon
    picks up: see ``Settings.provider_specs``); term 1 is wrapped for it beside the configured
    providers. If init fails, the public file is removed again and nothing else is left behind.
    """
    check_split(shares, threshold)  # ValueError: the CLI refuses these before we get here
    if any(s.get("kind") == RECOVERY_SHARES_KIND for s in settings.provider_specs()):
        raise ConfigError("a recovery-shares provider is already configured for this store; nothing was changed")
    data_dir = settings.require_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret, words = split_new_secret(shares, threshold)
    provider = RecoverySharesKeyProvider.from_secret(secret)
    del secret
    public_file = data_dir / RECOVERY_SHARES_PUBLIC_FILE
    _write_public_file(public_file, public_key_document(provider.public_key))
    try:
        result = await initialize_store(settings)
    except BaseException:
        public_file.unlink(missing_ok=True)
        raise
    finally:
        provider.close()
    return SharesInit(result, words, threshold, provider.key_id())


def recovery_provider_from_shares(lines: list[str]) -> RecoverySharesKeyProvider:
    """The unwrapping recovery provider from K shares; a wrong or short set is ``ProviderAuthFailed``."""
    with provider_errors():
        return RecoverySharesKeyProvider.from_shares(lines)


def with_shares(settings: Settings, holder: RecoverySharesKeyProvider) -> Callable[[KeyProvider], KeyProvider]:
    """A ``provider_set`` decorator that hands the configured recovery-shares provider the key the shares gave.

    Only when the public keys match: shares of another store must not stand in for this one's.
    """
    del settings

    def decorate(provider: KeyProvider) -> KeyProvider:
        if provider.name != RECOVERY_SHARES_KIND:
            return provider
        if provider.key_id() != holder.key_id():
            raise ProviderKeyMismatchError(
                f"the recovery shares given recover key {holder.key_id()}, but this store's recovery key is "
                f"{provider.key_id()}: they are another store's shares, or shares from before a re-split")
        return holder

    return decorate


def shares_settings(settings: Settings, holder: RecoverySharesKeyProvider) -> Settings:
    """``settings`` with a recovery-shares provider for ``holder``'s key when none is configured
    (the data directory's public file lost with the server): the shares still unseal."""
    if any(s.get("kind") == RECOVERY_SHARES_KIND for s in settings.provider_specs()):
        return settings
    table = KeyProviderSettings.model_validate(
        {"kind": RECOVERY_SHARES_KIND, "public_key": base64.b64encode(holder.public_key).decode("ascii")})
    return settings.model_copy(update={"recovery_providers": [*settings.recovery_providers, table]})


def restore_public_file(settings: Settings, holder: RecoverySharesKeyProvider) -> bool:
    """Put ``recovery-shares.pub`` back from the shares' key when ``settings`` know no recovery key.

    Call only after the shares opened the store's keyring (so they are its shares): a data
    directory rebuilt or restored without the file would otherwise give a daemon that refuses to
    rekey, or a migration that drops the recovery wrappings. Returns whether it wrote the file.
    """
    if any(s.get("kind") == RECOVERY_SHARES_KIND for s in settings.provider_specs()):
        return False
    path = settings.require_data_dir() / RECOVERY_SHARES_PUBLIC_FILE
    try:
        _write_public_file(path, public_key_document(holder.public_key))
    except FileExistsError:
        return False
    return True


def file_recovery_on_daemon_host(settings: Settings) -> list[str]:
    """The rule: a ``file`` recovery provider is on the daemon's host, so it is warned about.

    The daemon can open a key file only if the file is on (or mounted into) its host, where a
    stolen or imaged disk, or a wrong HSM PIN, lets it stand in for the HSM: that defeats HSM
    custody, whatever disk the file is on. The warning says when it even shares the data
    directory's filesystem. Returned as lines (``init`` and ``hsm doctor`` print them); never raises.
    """
    warnings = []
    base = settings.data_dir or Path.cwd()
    for table in settings.recovery_providers:
        options = table.options()
        if options.get("kind") != "file":
            continue
        raw = Path(str(options.get("path") or "master.key"))
        path = raw if raw.is_absolute() else base / raw
        where = "on this host"
        with contextlib.suppress(OSError):
            if _nearest(path).stat().st_dev == _nearest(base).stat().st_dev:
                where = "on this host, on the same filesystem as the data directory"
        warnings.append(
            f"recovery key file {path} is {where}: whoever can read this server's disk can unseal without the "
            "HSM. Keep recovery off the server: 'secretsd init --recovery-shares N --recovery-threshold K' "
            "(docs/recovery.md)")
    return warnings


def _nearest(path: Path) -> Path:
    """``path`` or its nearest existing parent: at ``init`` neither the key file nor the data directory exists yet."""
    return next((p for p in (path, *path.parents) if p.exists()), path)


@dataclass(frozen=True)
class Split:
    """What ``recovery split`` did: the new key's id, its shares (shown once), the key it replaced."""

    key_id: str
    shares: list[str]
    threshold: int
    replaced: str | None
    terms: int


async def split_recovery_key(
    settings: Settings, shares: int, threshold: int, show: Callable[[Split], None]
) -> Split:
    """Give an existing store a new recovery key split into shares (adding one, or replacing the old one).

    The store is opened with its configured providers (custody proven as in ``keyring migrate``).
    Order, so that an interruption at any point leaves every term open to the old shares or the new
    ones: (1) every term gains a wrapping for the new key beside the old ones; (2) ``show`` is called,
    the only time the shares exist outside this process; (3) ``recovery-shares.pub`` is replaced;
    (4) the old recovery key's wrappings are removed. Running daemons must be restarted after (3):
    until then they wrap new terms for the old key and refuse rekeys once (4) removed it.
    """
    from secretsd.runtime.masterkey import migrate

    check_split(shares, threshold)
    configured = [t for t in settings.recovery_providers if t.options().get("kind") == RECOVERY_SHARES_KIND]
    if configured:
        raise ConfigError("the recovery key is named by a [[recovery_providers]] table in the configuration; "
                          "'recovery split' manages DATA_DIR/recovery-shares.pub only: put the public key file "
                          "in the data directory and remove the table first; nothing was changed")
    public_file = settings.require_data_dir() / RECOVERY_SHARES_PUBLIC_FILE
    old_id = None
    if public_file.exists():
        with provider_errors():
            old_id = RecoverySharesKeyProvider.from_config({}, base_dir=public_file.parent).key_id()
    secret, words = split_new_secret(shares, threshold)
    fresh = RecoverySharesKeyProvider.from_secret(secret)
    del secret
    table = KeyProviderSettings.model_validate(
        {"kind": RECOVERY_SHARES_KIND, "public_key": base64.b64encode(fresh.public_key).decode("ascii")})
    kept = [KeyProviderSettings.model_validate({"kind": RECOVERY_SHARES_KIND,
                                                "public_key_file": RECOVERY_SHARES_PUBLIC_FILE})] if old_id else []
    both = settings.model_copy(update={"recovery_providers": [*settings.recovery_providers, *kept, table]})
    await migrate(settings, both)  # (1): the old key's wrappings stay
    split = Split(fresh.key_id(), words, threshold, old_id, 0)
    show(split)  # (2)
    tmp = public_file.with_name(f".{public_file.name}.tmp")
    tmp.unlink(missing_ok=True)
    _write_public_file(tmp, public_key_document(fresh.public_key))
    os.replace(tmp, public_file)  # (3)
    report = await migrate(settings, settings)  # (4): the data directory's key is now the new one
    fresh.close()
    return Split(split.key_id, words, threshold, old_id, report.terms)
