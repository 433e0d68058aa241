"""Storage commands that work on the stores directly, offline: ``secretsd storage migrate``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.progress import Progress as RichProgress

from secretsd.cli.common import emit_json, friendly_errors, json_option, main, table
from secretsd.storage.transfer import MigrationReport, Progress


@main.group()
def storage() -> None:
    """Storage backends: copy a store from one to another."""


@contextmanager
def _progress_bar(quiet: bool) -> Iterator[Progress | None]:
    if quiet or not sys.stderr.isatty():
        yield None
        return
    with RichProgress(transient=True) as bar:
        tasks = {"copy": bar.add_task("copying rows", total=None),
                 "verify": bar.add_task("verifying", total=None, visible=False)}

        def update(done: int, total: int, phase: str) -> None:
            bar.update(tasks[phase], completed=done, total=total, visible=True)

        yield update


async def _migrate(from_config: Path, to_config: Path, progress: Progress | None) -> MigrationReport:
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.daemon import build_storage
    from secretsd.storage.transfer import copy_store

    source = build_storage(load_settings(from_config))
    target = build_storage(load_settings(to_config))
    await source.open()
    try:
        await target.open()
        try:
            return await copy_store(source, target, progress=progress)
        finally:
            await target.close()
    finally:
        await source.close()


@storage.command(name="migrate")
@click.option("--from", "from_config", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The configuration of the store to copy (e.g. SQLite).")
@click.option("--to", "to_config", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The configuration of the empty target store (e.g. PostgreSQL).")
@json_option
@friendly_errors
def storage_migrate(from_config: Path, to_config: Path, as_json: bool) -> None:
    """Copy a whole store to another backend, offline, and verify the copy.

    Everything is copied as stored, nothing re-encrypted: metadata (the audit signing key and the
    audit chain heads included), keyring terms with their wrappings, secrets, every kept version
    with its state, and tokens. No key provider is used. The target must be empty (it is loaded in
    one transaction: all or nothing); stop every daemon that serves the source first. Then both
    stores are read back: row counts and a SHA-256 of each table must match. Exits 1 otherwise.

    \b
    Example:
      systemctl stop secretsd
      SECRETSD_PG_DSN=postgresql://secretsd:...@db/secretsd \\
        secretsd storage migrate --from /etc/secretsd/sqlite.toml --to /etc/secretsd/postgres.toml
    """
    with _progress_bar(as_json) as progress:
        report = asyncio.run(_migrate(from_config, to_config, progress))
    if as_json:
        emit_json(report.to_dict())
    else:
        table(f"{report.source} -> {report.target}", ["table", "rows", "copied", "sha-256", "check"],
              [[t.table, t.source_rows, t.target_rows, t.source_sha256[:16], "ok" if t.ok else "MISMATCH"]
               for t in report.tables])
        click.echo(f"Copied {report.rows} rows; " + ("verified." if report.ok else "VERIFICATION FAILED."))
    if not report.ok:
        sys.exit(1)
