"""Commands that work on the local store, not over HTTP: ``init`` and ``serve``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from secretsd import __version__
from secretsd.cli.common import emit_json, fail, friendly_errors, json_option, main

DEV_TOKEN_FILE = "dev-admin-token"  # noqa: S105 - a file name


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--recovery-shares", "recovery_shares", type=int,
              help="Split a new recovery key into N shares for N operators, printed once (N <= 16).")
@click.option("--recovery-threshold", "recovery_threshold", type=int,
              help="How many of the shares recover the store (1 < K <= N).")
@json_option
@friendly_errors
def init(data_dir: Path | None, config_file: Path | None, recovery_shares: int | None,
         recovery_threshold: int | None, as_json: bool) -> None:
    """Create a store and print its admin token, once.

    With --recovery-shares N --recovery-threshold K a recovery key is made and split among N
    operators: any K of the shares unseal the store when the HSM is lost (docs/recovery.md).

    \b
    Examples:
      secretsd init --data-dir /var/lib/secretsd --json
      secretsd init --config /etc/secretsd/secretsd.toml --recovery-shares 5 --recovery-threshold 3
    """
    from keyproviders.shares import check_split
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.daemon import initialize_store
    from secretsd.runtime.recovery import SharesInit, file_recovery_on_daemon_host, initialize_with_shares

    # Bad values are one line and exit 2, before anything is created.
    if (recovery_shares is None) != (recovery_threshold is None):
        fail("--recovery-shares N and --recovery-threshold K go together", 2)
    if recovery_shares is not None and recovery_threshold is not None:
        try:
            check_split(recovery_shares, recovery_threshold)
        except ValueError as exc:
            fail(f"--recovery-shares {recovery_shares} --recovery-threshold {recovery_threshold}: {exc}", 2)
    settings = load_settings(config_file, data_dir=data_dir)
    for warning in file_recovery_on_daemon_host(settings):
        click.echo(f"warning: {warning}", err=True)
    split: SharesInit | None = None
    if recovery_shares is not None and recovery_threshold is not None:
        split = asyncio.run(initialize_with_shares(settings, recovery_shares, recovery_threshold))
        result = split.init
    else:
        result = asyncio.run(initialize_store(settings))
    if as_json:
        doc: dict[str, Any] = {"admin_token": result.admin_token, "data_dir": str(result.data_dir),
                               "provider": result.provider, "key_id": result.key_id}
        if split is not None:
            doc.update({"recovery_shares": split.shares, "recovery_threshold": split.threshold,
                        "recovery_key_id": split.key_id})
        emit_json(doc)
        return
    click.echo(f"Initialised {result.data_dir} (key provider {result.provider}, key {result.key_id}).")
    click.echo("Admin token (shown once; store it safely):")
    click.echo(f"  {result.admin_token}")
    if split is not None:
        click.echo(f"Recovery key {split.key_id}: {len(split.shares)} shares, any {split.threshold} of which "
                   "recover the store. Shown once: give each share to a different operator, then clear "
                   "this screen.")
        for number, share in enumerate(split.shares, start=1):
            click.echo(f"  share {number}: {share}")


def _dev_store(data_dir: Path, settings_kwargs: dict[str, Any], config_file: Path | None) -> str:
    """Initialise the dev store on first run; return its admin token (kept 0600 for dev only)."""
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.daemon import initialize_store

    token_file = data_dir / DEV_TOKEN_FILE
    if token_file.exists():
        return token_file.read_text("utf-8").strip()
    settings = load_settings(config_file, **settings_kwargs)
    result = asyncio.run(initialize_store(settings))
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(result.admin_token + "\n")
    return result.admin_token


class WorkerCount(click.ParamType[int]):
    """1..64, or ``auto``: the CPUs this process may run on (its affinity mask, as taskset or a
    container's cpuset leaves it, and its cgroup CPU quota), at most 64."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from secretsd.runtime.workers import MAX_WORKERS, auto_workers

        if isinstance(value, int):
            count = value
        elif str(value).strip().lower() == "auto":
            count = auto_workers()
        else:
            try:
                count = int(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a number of workers (1 to {MAX_WORKERS}) or 'auto'", param, ctx)
        if not 1 <= count <= MAX_WORKERS:
            self.fail(f"{count} is not from 1 to {MAX_WORKERS}", param, ctx)
        return count


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8750).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--dev", is_flag=True,
              help="Development mode: initialise a local store on first run and print its admin token.")
@click.option("--workers", type=WorkerCount(), default="1", show_default=True,
              help="Processes sharing the listening port (each with its own audit chain <chain>-wN); "
                   "'auto': one per CPU this process may run on.")
@click.option("--worker", "worker_index", type=int, hidden=True)
@friendly_errors
def serve(data_dir: Path | None, listen: str | None, config_file: Path | None, dev: bool, workers: int,
          worker_index: int | None) -> None:
    """Run the daemon.

    \b
    Examples:
      secretsd serve --dev
      secretsd serve --data-dir /var/lib/secretsd --listen 127.0.0.1:8750
      secretsd serve --config /etc/secretsd/secretsd.toml --workers 2
    """
    from secretsd.errors import ConfigError, SecretsdError
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.logs import configure_logging, drain_logs
    from secretsd.runtime.process_hardening import harden_process

    # SIGHUP means "reload policies"; until the daemon's handler is installed it must not mean
    # "terminate" (secretsd.cli ignores it even earlier, when the command line says serve).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    if dev and data_dir is None and not os.environ.get("SECRETSD_DATA_DIR"):
        data_dir = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "secretsd-dev"
    kwargs: dict[str, Any] = {"data_dir": data_dir, "listen": listen}
    settings = load_settings(config_file, **kwargs)
    configure_logging(settings.log_level, settings.log_format)
    # Before any key is unwrapped (each --workers process comes through here too).
    harden_process(lock=settings.lock_memory)
    banner = None
    if dev:
        root = settings.require_data_dir()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = _dev_store(root, kwargs, config_file)
        addr = f"http://{settings.listen}"
        banner = (
            f"secretsd {__version__} (dev mode; store in {root})\n"
            f"Admin token: {token}\n\n"
            f"  export SECRETSD_ADDR={addr}\n"
            f"  export SECRETSD_TOKEN={token}\n"
            f"  echo -n s3cret | secretsd set app/db-password --stdin\n"
            f"  secretsd get app/db-password\n"
        )
    if workers > 1 and settings.listen_unix is not None:
        # One socket path cannot be bound by N processes, and handing one descriptor to N workers
        # is not built: refused rather than served by one worker only (docs/auth.md).
        raise ConfigError("listen_unix cannot be combined with --workers N (one socket path, one process): "
                          "serve the socket with one process, or use TCP for the workers")
    if workers > 1 and worker_index is None:
        from secretsd.runtime.workers import supervise

        args = ["--data-dir", str(settings.require_data_dir()), "--listen", settings.listen]
        if config_file is not None:
            args += ["--config", str(config_file)]
        if banner:
            click.echo(banner)
        sys.exit(supervise(args, workers, settings.audit.chain if settings.audit.chain_configured else None))
    # Only a serving process imports the server (aiohttp and the rest): the --workers supervisor
    # stays small, and its children start sooner.
    from secretsd.runtime.server import serve as run_server

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_server(settings, on_ready=banner if worker_index is None else None, worker=worker_index,
                                   reload_settings=functools.partial(load_settings, config_file, **kwargs)))
    except (SecretsdError, OSError):
        # The daemon's lines leave through their own thread (runtime/logs.py): let them out first, so
        # the one-line error friendly_errors prints is the last line, as scripts and operators read it.
        drain_logs()
        raise
