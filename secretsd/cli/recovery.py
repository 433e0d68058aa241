"""``secretsd token create-root``: recover administration offline, with custody of the key provider."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from secretsd.cli.common import emit_json, fail, friendly_errors, json_option, main
from secretsd.cli.system import token

F = TypeVar("F", bound=Callable[..., Any])


def shares_options(fn: F) -> F:
    """The ways to give recovery shares: never on the command line, where ``ps`` would show them."""
    fn = click.option("--share-file", "share_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
                      help="A file holding one recovery share; repeat for each share.")(fn)
    fn = click.option("--recovery-shares-stdin", "shares_stdin", is_flag=True,
                      help="Read recovery shares from standard input, one per line.")(fn)
    fn = click.option("--recovery-shares", "shares_prompt", is_flag=True,
                      help="Ask for recovery shares on the terminal (not echoed), as many as needed.")(fn)
    return fn


def collect_shares(shares_prompt: bool, shares_stdin: bool, share_files: tuple[Path, ...]) -> list[str] | None:
    """The shares given by whichever of the three ways was chosen (one only), or None if none was."""
    from keyproviders.shares import share_threshold
    from secretsd.custody.keyring import provider_errors

    if sum((shares_prompt, shares_stdin, bool(share_files))) > 1:
        raise click.UsageError("give recovery shares one way: --recovery-shares, --recovery-shares-stdin "
                               "or --share-file")
    if shares_stdin:
        return [line for line in sys.stdin.read().splitlines() if line.strip()]
    if share_files:
        return [" ".join(path.read_text("utf-8").split()) for path in share_files]
    if not shares_prompt:
        return None
    first = str(click.prompt("Recovery share 1", hide_input=True, err=True))
    with provider_errors():
        needed = share_threshold(first)
    shares = [first]
    for number in range(2, needed + 1):
        shares.append(str(click.prompt(f"Recovery share {number} of {needed}", hide_input=True, err=True)))
    return shares


@token.command(name="create-root")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")
@shares_options
@json_option
@friendly_errors
def token_create_root(config_file: Path | None, data_dir: Path | None, shares_prompt: bool, shares_stdin: bool,
                      share_files: tuple[Path, ...], as_json: bool) -> None:
    """Mint a root token offline, for when every root token is lost; printed once.

    Runs on the store directly and needs the key provider (HSM, key file or a recovery provider):
    it unseals the keyring first and refuses if it cannot. Writes a 'token.create-root' audit
    record. Safe while the daemon serves (the record then goes to the chain <chain>-offline).
    With K recovery shares it unseals without the HSM (docs/recovery.md).

    \b
    Examples:
      secretsd token create-root --config /etc/secretsd/secretsd.toml --json
      secretsd token create-root --config /etc/secretsd/secretsd.toml --recovery-shares
    """
    from secretsd import tokens
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.recovery import create_root_token, recovery_provider_from_shares

    # Per-provider warnings (one per term that a provider could not open) would bury the one-line
    # error; what is worse than a warning still reaches stderr.
    stderr = logging.StreamHandler()
    stderr.setLevel(logging.ERROR)
    logging.getLogger("secretsd").addHandler(stderr)
    settings = load_settings(config_file, data_dir=data_dir)
    lines = collect_shares(shares_prompt, shares_stdin, share_files)
    recovery = None if lines is None else recovery_provider_from_shares(lines)
    result = asyncio.run(create_root_token(settings, recovery=recovery))
    token_id = tokens.display_id(result.record.token_id)
    if as_json:
        # "admin_token" as init prints it (issue 14's contract); "token" as before.
        emit_json({"admin_token": result.token, "token": result.token, "token_id": token_id,
                   "client": result.record.client, "policies": list(result.record.policies),
                   "audit_chain": result.audit_chain, "audit_file": str(result.audit_file),
                   "providers": list(result.providers)})
        return
    click.echo(f"Created root token {token_id} for client {result.record.client!r} "
               f"(key provider {', '.join(result.providers)}).")
    click.echo(f"Audit record token.create-root written to chain {result.audit_chain!r} ({result.audit_file}).")
    click.echo("Root token (shown once; store it safely):")
    click.echo(f"  {result.token}")


@main.group()
def recovery() -> None:
    """Recovery shares: a recovery key split among operators (docs/recovery.md)."""


@recovery.command(name="split")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")
@click.option("--recovery-shares", "count", type=int, required=True, help="N: how many shares (at most 16).")
@click.option("--recovery-threshold", "threshold", type=int, required=True,
              help="K: how many of them recover the store (1 < K <= N).")
@json_option
@friendly_errors
def recovery_split(config_file: Path | None, data_dir: Path | None, count: int, threshold: int,
                   as_json: bool) -> None:
    """Give an initialised store a new recovery key split into N shares (adds one, or replaces the old one).

    Needs the configured key provider (it unseals the keyring). Prints the shares once; the old
    shares stop working when it finishes. Restart running daemons afterwards.

    \b
    Example:
      secretsd recovery split --config /etc/secretsd/secretsd.toml --recovery-shares 5 --recovery-threshold 3
    """
    from keyproviders.shares import check_split
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.recovery import Split, split_recovery_key

    try:
        check_split(count, threshold)
    except ValueError as exc:
        fail(f"--recovery-shares {count} --recovery-threshold {threshold}: {exc}", 2)
    settings = load_settings(config_file, data_dir=data_dir)

    def show(split: Split) -> None:
        if as_json:
            emit_json({"recovery_key_id": split.key_id, "recovery_shares": split.shares,
                       "recovery_threshold": split.threshold, "replaced_key_id": split.replaced})
            return
        click.echo(f"Recovery key {split.key_id}: {len(split.shares)} shares, any {split.threshold} of which "
                   "recover the store. Shown once: give each share to a different operator, then clear "
                   "this screen.")
        for number, share in enumerate(split.shares, start=1):
            click.echo(f"  share {number}: {share}")

    done = asyncio.run(split_recovery_key(settings, count, threshold, show))
    if not as_json:
        old = f"; recovery key {done.replaced} no longer opens it" if done.replaced else ""
        click.echo(f"Every keyring term is wrapped for {done.key_id}{old}. Restart running daemons.")
