"""Audit trail commands: verify a log, export the public key. Both read the store without unsealing."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import click

from secretsd.cli.common import emit_json, friendly_errors, json_option, main
from secretsd.errors import ConfigError, NotInitializedError

config_option = click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
data_dir_option = click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")


@main.group()
def audit() -> None:
    """Verify the tamper-evident audit trail."""


async def _store_facts(config_file: Path | None, data_dir: Path | None,
                       chain: str | None = None) -> tuple[str, object, Path]:
    from secretsd.audit.keys import public_key_pem
    from secretsd.audit.verify import Head
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.daemon import build_storage

    settings = load_settings(config_file, data_dir=data_dir)
    storage = build_storage(settings)
    _refuse_missing_store(settings.require_data_dir(), storage)
    await storage.open()
    try:
        if not await storage.is_initialized():
            raise NotInitializedError(f"the store in {settings.data_dir} is not initialised")
        pem = await public_key_pem(storage)
        if pem is None:
            raise ConfigError("this store has no audit key yet (it is made when the daemon first unseals)")
        name = chain or settings.audit.chain
        raw = await storage.get_meta(f"audit_head:{name}")
        head = Head(**json.loads(raw)) if raw else Head(0, "")
        return pem, head, settings.audit.log_path(settings.require_data_dir(), name)
    finally:
        await storage.close()


def _refuse_missing_store(data_dir: Path, storage: object) -> None:
    """These commands only read: opening a store that is not there would create an empty one (a
    database file, its directory) where an operator mistyped a path."""
    if not data_dir.is_dir():
        raise ConfigError(f"{data_dir} does not exist or is not a directory: there is no store to read")
    database = getattr(storage, "path", None)  # SQLite's file; other backends have no local file
    if isinstance(database, Path) and not database.exists():
        raise NotInitializedError(f"the store in {data_dir} is not initialised (no {database.name})")


def _chain_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # The [audit] chain pattern: a name is also a file name, never a path.
    if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise click.BadParameter("a chain name is 1 to 64 of A-Z a-z 0-9 . _ -")
    return value


@audit.command(name="verify")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--pubkey", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM public key kept apart from the store (from 'audit pubkey'): needed for copies, "
                   "and with --data-dir it pins the key so a swapped key in the store is caught.")
@click.option("--from-start", is_flag=True, help="The FILEs are the whole log: it must begin at record 1.")
@click.option("--chain", callback=_chain_name,
              help="With --data-dir: this chain (e.g. a derived main-<host>, shown by 'secretsd status') "
                   "instead of the configured one.")
@config_option
@data_dir_option
@json_option
@friendly_errors
def audit_verify(files: tuple[Path, ...], pubkey: Path | None, from_start: bool, chain: str | None,
                 config_file: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Check every record's signature, order and hash chain; exit 0 only if all verify.

    With --data-dir (or --config) it checks the daemon's own log against the key and the chain head
    kept in the store, so a cut-off tail is detected too. With FILE... --pubkey it checks copies.

    \b
    Examples:
      secretsd audit verify --data-dir /var/lib/secretsd
      secretsd audit verify --data-dir /var/lib/secretsd --chain main-host-b
      secretsd audit verify audit.jsonl.000001 audit.jsonl --pubkey audit.pub
    """
    from secretsd.audit.record import load_public_pem, public_pem
    from secretsd.audit.verify import Head, log_files, verify

    pinned = None
    if pubkey is not None:
        try:
            pinned = load_public_pem(pubkey.read_text())
        except ValueError as exc:
            raise ConfigError(f"{pubkey}: {exc}") from exc
    if files:
        if pinned is None:
            raise click.UsageError("verifying FILE... needs --pubkey PUBFILE")
        if chain is not None:
            raise click.UsageError("--chain picks a chain of the store's own log (--data-dir), not FILE...")
        result = verify(sorted(files, key=_log_order), pinned, from_start=from_start)
    else:
        pem, head, log_path = asyncio.run(_store_facts(config_file, data_dir, chain))
        assert isinstance(head, Head)
        stored = load_public_pem(pem)
        if pinned is not None and public_pem(pinned) != public_pem(stored):
            click.echo("FAILED: the store's audit public key is not the pinned one: the key was replaced")
            sys.exit(1)
        result = verify(log_files(log_path), stored, head=head, from_start=True)
    if as_json:
        emit_json({"ok": result.ok, "records": result.records, "problem": result.problem,
                   "file": result.file, "line": result.line, "seq": result.seq,
                   "pruned_through": result.pruned_through})
    else:
        click.echo(result.describe())
    if not result.ok:
        sys.exit(1)


def _log_order(path: Path) -> tuple[int, str]:
    """Rotated files (NAME.000001, ...) before the active one, whatever order a shell glob gave."""
    suffix = path.name.rsplit(".", 1)[-1]
    return (int(suffix), path.name) if suffix.isdigit() else (10**9, path.name)


@audit.command(name="pubkey")
@config_option
@data_dir_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file.")
@friendly_errors
def audit_pubkey(config_file: Path | None, data_dir: Path | None, output: Path | None) -> None:
    """Print the audit log's Ed25519 public key (PEM), for verifying exported copies elsewhere.

    \b
    Example:
      secretsd audit pubkey --data-dir /var/lib/secretsd -o audit.pub
    """
    pem, _head, _path = asyncio.run(_store_facts(config_file, data_dir))
    if output:
        output.write_text(pem)
    else:
        click.echo(pem, nl=False)
