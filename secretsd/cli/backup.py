"""``secretsd backup create | verify | restore``: on the store directly, offline (docs/backup.md)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from secretsd.cli.common import Ctx, emit_json, fail, json_option, main
from secretsd.cli.exits import Exit
from secretsd.cli.recovery import collect_shares, shares_options
from secretsd.errors import (
    AlreadyInitializedError,
    ConfigError,
    ProviderUnavailable,
    SecretsdError,
    StorageUnavailableError,
)

F = TypeVar("F", bound=Callable[..., Any])


def backup_exit_code(exc: SecretsdError) -> Exit:
    """The rule: a refused backup's exit status names the check that refused it (docs/backup.md)."""
    from secretsd.backup.errors import BackupCorruptError, BackupForgedError, BackupKeyError

    if isinstance(exc, BackupCorruptError):
        return Exit.INTEGRITY
    if isinstance(exc, BackupForgedError):
        return Exit.AUTHENTICITY
    if isinstance(exc, BackupKeyError):
        return Exit.NO_KEY
    if isinstance(exc, AlreadyInitializedError):
        return Exit.CONFLICT  # a store that is not empty, an --out file that exists
    if isinstance(exc, (ProviderUnavailable, StorageUnavailableError)):
        return Exit.UNAVAILABLE
    if isinstance(exc, ConfigError):
        return Exit.USAGE
    return Exit.ERROR


def _backup_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Per-provider warnings (one per term a provider cannot open) would bury the one-line error.
        quiet = logging.StreamHandler()
        quiet.setLevel(logging.ERROR)
        logging.getLogger("secretsd").addHandler(quiet)
        try:
            return fn(*args, **kwargs)
        except SecretsdError as exc:
            fail(exc.message, int(backup_exit_code(exc)))
        except OSError as exc:
            fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        finally:
            logging.getLogger("secretsd").removeHandler(quiet)

    return cast(F, wrapper)


_STORE_OPTIONS = (
    click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives."),
    click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="TOML config file (storage and key providers)."),
)


def _store_options(fn: F) -> F:
    for option in reversed(_STORE_OPTIONS):
        fn = option(fn)
    return fn


def _settings(config_file: Path | None, data_dir: Path | None) -> Any:
    from secretsd.runtime.config import load_settings

    return load_settings(config_file, data_dir=data_dir)


@main.group()
def backup() -> None:
    """Back up a store to one authenticated file, verify it, restore it."""


def _download(obj: Ctx, out: Path) -> Any:
    """Online ``backup create``: ``GET /v1/sys/backup`` streamed into ``out`` (via a partial file, as
    offline); the manifest read back from the file's last line."""
    import http.client
    import os

    from secretsd.backup.format import MAX_TRAILER, read_trailer
    from secretsd.client import calls
    from secretsd.client.sync import UnixHTTPConnection

    if out.exists():
        raise AlreadyInitializedError(f"{out} exists; refusing to overwrite it (choose another --out)")
    endpoint = obj.client().endpoint
    call = calls.Call("GET", "/v1/sys/backup")
    conn: http.client.HTTPConnection
    if endpoint.unix_path is not None:
        conn = UnixHTTPConnection(endpoint.unix_path, timeout=endpoint.timeout)
    elif endpoint.https:
        conn = http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=endpoint.timeout,
                                           context=endpoint.ssl_context)
    else:
        conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=endpoint.timeout)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        try:
            conn.request("GET", call.target(), headers=endpoint.headers(call))
            response = conn.getresponse()
            if response.status != 200:
                calls.decode(call, response.status, response.getheader("Content-Type", ""), response.read())
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                while chunk := response.read(1 << 16):
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except (OSError, http.client.HTTPException) as exc:
            raise endpoint.unreachable(exc) from exc
        finally:
            conn.close()
        with partial.open("rb") as fh:
            fh.seek(max(0, partial.stat().st_size - MAX_TRAILER))
            manifest, _mac = read_trailer(fh.read())  # a cut stream has no manifest: refused here
        os.link(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return manifest


@backup.command(name="create")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The backup file to write (must not exist).")
@_store_options
@json_option
@click.pass_obj
def backup_create(obj: Ctx, out: Path, data_dir: Path | None, config_file: Path | None, as_json: bool) -> None:
    """Write one consistent snapshot of the store to a compressed, authenticated file.

    Everything travels as stored: ciphertext, keyring terms wrapped by every provider, token hashes,
    metadata, rotation state, audit chain heads; never a value or a key. Offline (--data-dir or
    --config): the key provider must unwrap the newest keyring term (the manifest's MAC key is
    derived from it); safe while a daemon serves, the snapshot is one read transaction. Online
    (neither option, SECRETSD_ADDR and a token with admin on sys/backup): the daemon streams it.

    \b
    Examples:
      secretsd backup create --out /backups/secretsd-$(date +%F).sdbk --config /etc/secretsd/secretsd.toml
      SECRETSD_ADDR=http://127.0.0.1:8750 SECRETSD_TOKEN=sdt_... secretsd backup create --out b.sdbk
    """
    online = data_dir is None and config_file is None and bool(obj.addr)
    if online:
        try:
            manifest = _download(obj, out)
        except SecretsdError as exc:
            from secretsd.backup.errors import BackupError
            from secretsd.cli.exits import exit_code

            # Our own refusals (an --out that exists, a cut download) as offline; the daemon's as remote commands.
            local = isinstance(exc, (AlreadyInitializedError, BackupError))
            fail(exc.message, int(backup_exit_code(exc) if local else exit_code(exc)))
    else:
        manifest = _offline_create(out, data_dir, config_file)
    if as_json:
        emit_json({"file": str(out), "backup_id": manifest.backup_id, "created_at": manifest.created_at,
                   "source": manifest.source, "manifest_sha256": manifest.sha256, "rows": manifest.total_rows,
                   "sections": [s.to_dict() for s in manifest.sections]})
        return
    counts = ", ".join(f"{s.name} {s.rows}" for s in manifest.sections)
    click.echo(f"Wrote {out}: {manifest.total_rows} rows ({counts}); manifest sha256 {manifest.sha256}.")


@_backup_errors
def _offline_create(out: Path, data_dir: Path | None, config_file: Path | None) -> Any:
    from secretsd.runtime.backup import create_backup

    return asyncio.run(create_backup(_settings(config_file, data_dir), out))


@backup.command(name="verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_store_options
@json_option
@_backup_errors
def backup_verify(file: Path, data_dir: Path | None, config_file: Path | None, as_json: bool) -> None:
    """Check a backup file without a daemon, writing nothing; exit 0 only if every check holds.

    Exit 7: damaged, truncated or altered (integrity); 8: the manifest does not verify under the
    keyring (authenticity: altered, or another store's); 9: no configured key provider unwraps the
    backup's keyring.
    """
    from secretsd.runtime.backup import verify_backup_file

    verified = asyncio.run(verify_backup_file(_settings(config_file, data_dir), file))
    if as_json:
        emit_json(verified.to_dict())
        return
    m = verified.manifest
    click.echo(f"{file}: ok. Backup {m.backup_id} of {m.created_at} ({m.source}), {m.total_rows} rows; "
               f"{len(verified.unwrapped)} of {verified.terms} keyring terms unwrap; manifest sha256 {m.sha256}.")


@backup.command(name="restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_store_options
@click.option("--revoke-tokens", is_flag=True,
              help="Revoke every token the backup brings back (then mint a new root: 'secretsd token create-root').")
@shares_options
@json_option
@_backup_errors
def backup_restore(file: Path, data_dir: Path | None, config_file: Path | None, revoke_tokens: bool,
                   shares_prompt: bool, shares_stdin: bool, share_files: tuple[Path, ...], as_json: bool) -> None:
    """Restore a backup into an empty store (SQLite or PostgreSQL); nothing is written unless every
    check holds.

    The file is verified first (as by 'backup verify'), the configured providers must unwrap every
    keyring term, then it is imported in one transaction and read back. The first record of a new
    audit chain names the backup's manifest digest; a daemon serves the store only once it is written.

    Every token active in the backup is valid again, including any revoked after the backup was
    taken: the restore says how many (and how many are root tokens). --revoke-tokens revokes them
    all; then mint a new root token with 'secretsd token create-root' (docs/backup.md).

    With the HSM lost as well, K operators give their recovery shares (--recovery-shares,
    --recovery-shares-stdin or --share-file), then 'keyring migrate' moves the keyring to a new HSM.

    \b
    Examples:
      secretsd backup restore /backups/secretsd-2026-11-29.sdbk --data-dir /var/lib/secretsd
      secretsd backup restore /backups/secretsd-2026-11-29.sdbk --config old.toml --recovery-shares
    """
    from secretsd.runtime.backup import restore_backup

    # K recovery shares unwrap when the HSM was lost too (docs/recovery.md, docs/operations.md drill b).
    lines = collect_shares(shares_prompt, shares_stdin, share_files)
    restored = asyncio.run(restore_backup(_settings(config_file, data_dir), file, revoke_tokens=revoke_tokens,
                                          recovery_shares=lines))
    m = restored.verified.manifest
    tokens = restored.tokens
    if tokens.active and not tokens.revoked:
        click.echo(f"warning: {len(tokens.active)} tokens ({tokens.root} root) from the backup are valid again, "
                   f"including any revoked after the backup was taken ({m.created_at}): those revocations are "
                   "undone; re-revoke them, or restore with --revoke-tokens and run 'secretsd token create-root'",
                   err=True)
    if as_json:
        emit_json({**restored.verified.to_dict(), "restored_rows": restored.imported.rows,
                   "audit_chain": restored.audit_chain,
                   "audit_file": None if restored.audit_file is None else str(restored.audit_file),
                   "tokens_restored": len(tokens.active), "root_tokens_restored": tokens.root,
                   "tokens_revoked": tokens.revoked, "resumed": restored.resumed})
        return
    click.echo(f"Restored backup {m.backup_id} of {m.created_at}: {restored.imported.rows} rows, verified"
               + (" (its import was already done; the audit record is now written)." if restored.resumed else "."))
    click.echo(f"Tokens active again: {len(tokens.active)} ({tokens.root} root); revoked now: {tokens.revoked}.")
    if tokens.revoked:
        click.echo("Mint a new root token: secretsd token create-root (with the store's key provider).")
    if restored.audit_chain is not None:
        click.echo(f"Audit record backup.restore starts chain {restored.audit_chain!r} ({restored.audit_file}).")
