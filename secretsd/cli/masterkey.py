"""Master-key and HSM commands that work on the store and the key providers directly.

They run where the key providers are reachable (the daemon's host, usually) and may run while the
daemon serves; see ``secretsd.runtime.masterkey``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress as RichProgress

from secretsd.cli.common import emit_json, friendly_errors, json_option, main, table
from secretsd.cli.recovery import collect_shares, shares_options
from secretsd.cli.system import keyring
from secretsd.errors import ConfigError
from secretsd.runtime.masterkey import Progress, Report

config_option = click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
data_dir_option = click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")


@contextmanager
def progress_bar(label: str, quiet: bool) -> Iterator[Progress | None]:
    if quiet or not sys.stderr.isatty():
        yield None
        return
    with RichProgress(transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _report(report: Report, verb: str, as_json: bool) -> None:
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(f"{verb} {report.terms} keyring term(s) for {', '.join(report.providers)}.")
    click.echo(f"Current key(s): {', '.join(report.key_ids)}")
    if report.retired_key_ids:
        click.echo(f"No longer used by this store: {', '.join(report.retired_key_ids)}. Daemons pick up the "
                   "new version at their next keyring change; destroy the old one only after "
                   "'secretsd audit verify' and a check that no term still uses it "
                   "('secretsd keyring rewrap --no-rotate' reports any).")


@keyring.command(name="rewrap")
@config_option
@data_dir_option
@click.option("--no-rotate", is_flag=True,
              help="Keep the current KEK versions; only wrap every term for the configured providers.")
@json_option
@friendly_errors
def keyring_rewrap(config_file: Path | None, data_dir: Path | None, no_rotate: bool, as_json: bool) -> None:
    """Create a new KEK version in each key provider and re-wrap the keyring with it.

    Secrets are not re-encrypted. Safe to run while the daemon serves; an interrupted run leaves a
    store that still opens, and can simply be run again. With --no-rotate it adds wrappings for
    providers newly configured (a recovery key) and drops those no longer configured.

    \b
    Example:
      secretsd keyring rewrap --config /etc/secretsd/secretsd.toml
    """
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.masterkey import rewrap

    settings = load_settings(config_file, data_dir=data_dir)
    with progress_bar("re-wrapping keyring", as_json) as progress:
        report = asyncio.run(rewrap(settings, rotate=not no_rotate, progress=progress))
    _report(report, "Re-wrapped", as_json)


@keyring.command(name="migrate")
@click.option("--to", "--to-config", "to_config", type=click.Path(path_type=Path), required=True,
              help="The configuration naming the new key provider(s).")
@config_option
@data_dir_option
@shares_options
@json_option
@friendly_errors
def keyring_migrate(to_config: Path, config_file: Path | None, data_dir: Path | None, shares_prompt: bool,
                    shares_stdin: bool, share_files: tuple[Path, ...], as_json: bool) -> None:
    """Move the keyring to the key provider(s) of another configuration (e.g. file -> pkcs11).

    Secrets are not re-encrypted. New wrappings are added to every term before any old one is
    removed, so an interrupted run leaves a store that opens with the old or the new configuration.
    Restart the daemon with the new configuration afterwards. With K recovery shares the keyring
    opens without the old provider: the way from a lost HSM to a new one (docs/recovery.md).

    \b
    Examples:
      secretsd keyring migrate --config old.toml --to hsm.toml
      secretsd keyring migrate --config old.toml --to-config new-hsm.toml --recovery-shares
    """
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.masterkey import migrate
    from secretsd.runtime.recovery import recovery_provider_from_shares

    old = load_settings(config_file, data_dir=data_dir)
    new = load_settings(to_config, data_dir=old.require_data_dir())
    lines = collect_shares(shares_prompt, shares_stdin, share_files)
    recovery = None if lines is None else recovery_provider_from_shares(lines)
    with progress_bar("migrating keyring", as_json) as progress:
        report = asyncio.run(migrate(old, new, progress=progress, recovery=recovery))
    _report(report, "Migrated", as_json)


@main.group()
def hsm() -> None:
    """Provision and check the HSM (PKCS#11) key provider."""


@contextmanager
def pkcs11_binding() -> Iterator[None]:
    """Import the pkcs11 provider inside this block: a broken python-pkcs11 install is one line, not a traceback.

    python-pkcs11 is a base dependency, so this only fires on a damaged environment (a wheel built for
    another Python, a removed package).
    """
    try:
        yield
    except ImportError as exc:
        raise ConfigError(
            f"the PKCS#11 binding python-pkcs11 cannot be imported ({exc}); reinstall it in this "
            f"environment: {sys.executable} -m pip install --force-reinstall python-pkcs11"
        ) from exc


def _pkcs11_options(config_file: Path | None) -> tuple[dict[str, Any], Path]:
    from secretsd.runtime.config import load_settings

    settings = load_settings(config_file)
    options = settings.key_provider.options()
    if options.get("kind") != "pkcs11":
        raise ConfigError(
            f"the configured key provider is {options.get('kind')!r}; 'hsm' commands need "
            f"[key_provider] kind = \"pkcs11\" (pass --config FILE)"
        )
    # The daemon resolves relative provider paths (a pin_file) against the data directory: so do we.
    base = settings.data_dir or (config_file.resolve().parent if config_file else Path.cwd())
    return {k: v for k, v in options.items() if k != "kind"}, base


@hsm.command(name="create-key")
@config_option
@json_option
@friendly_errors
def hsm_create_key(config_file: Path | None, as_json: bool) -> None:
    """Create the KEK in the token: AES-256, sensitive, never extractable. Refuses if the label exists.

    \b
    Example:
      SECRETSD_PKCS11_PIN=... secretsd hsm create-key --config /etc/secretsd/secretsd.toml
    """
    from keyproviders import KeyProviderError
    from secretsd.custody.keyring import convert_provider_error

    with pkcs11_binding():
        from keyproviders.pkcs11 import create_key
    options, base = _pkcs11_options(config_file)
    try:
        key_id = create_key(options, base_dir=base)
    except KeyProviderError as exc:
        raise convert_provider_error(exc) from exc
    if as_json:
        emit_json({"key_id": key_id})
    else:
        click.echo(f"created {key_id} in token {options.get('token_label')!r}")


@hsm.command(name="doctor")
@config_option
@json_option
@friendly_errors
def hsm_doctor(config_file: Path | None, as_json: bool) -> None:
    """Check module, token, login, key attributes, mechanisms (by trial) and latency.

    Exits non-zero if any check fails. This is what to run when provisioning a token.

    \b
    Example:
      secretsd hsm doctor --config /etc/secretsd/secretsd.toml
    """
    with pkcs11_binding():
        from keyproviders.pkcs11 import doctor
    from keyproviders.pkcs11.tools import CheckResult
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.recovery import file_recovery_on_daemon_host

    options, base = _pkcs11_options(config_file)
    results = doctor(options, base_dir=base)
    # Custody is only as strong as its weakest way in: a key file beside the daemon is one (a warning).
    results += [CheckResult("recovery provider", "warn", line)
                for line in file_recovery_on_daemon_host(load_settings(config_file))]
    if as_json:
        emit_json([{"check": r.name, "status": r.status, "detail": r.detail} for r in results])
    else:
        table(None, ["check", "status", "detail"], [[r.name, r.status, r.detail] for r in results])
    if any(r.status == "fail" for r in results):
        sys.exit(1)
