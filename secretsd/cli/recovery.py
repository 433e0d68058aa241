"""``secretsd token create-root``: recover administration offline, with custody of the key provider."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from secretsd.cli.common import emit_json, friendly_errors, json_option
from secretsd.cli.system import token


@token.command(name="create-root")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")
@json_option
@friendly_errors
def token_create_root(config_file: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Mint a root token offline, for when every root token is lost; printed once.

    Runs on the store directly and needs the key provider (HSM, key file or a recovery provider):
    it unseals the keyring first and refuses if it cannot. Writes a 'token.create-root' audit
    record. Safe while the daemon serves (the record then goes to the chain <chain>-offline).

    \b
    Example:
      secretsd token create-root --config /etc/secretsd/secretsd.toml --json
    """
    from secretsd import tokens
    from secretsd.runtime.config import load_settings
    from secretsd.runtime.recovery import create_root_token

    # Per-provider warnings (one per term that a provider could not open) would bury the one-line
    # error; what is worse than a warning still reaches stderr.
    stderr = logging.StreamHandler()
    stderr.setLevel(logging.ERROR)
    logging.getLogger("secretsd").addHandler(stderr)
    settings = load_settings(config_file, data_dir=data_dir)
    result = asyncio.run(create_root_token(settings))
    token_id = tokens.display_id(result.record.token_id)
    if as_json:
        emit_json({"token": result.token, "token_id": token_id, "client": result.record.client,
                   "policies": list(result.record.policies), "audit_chain": result.audit_chain,
                   "audit_file": str(result.audit_file), "providers": list(result.providers)})
        return
    click.echo(f"Created root token {token_id} for client {result.record.client!r} "
               f"(key provider {', '.join(result.providers)}).")
    click.echo(f"Audit record token.create-root written to chain {result.audit_chain!r} ({result.audit_file}).")
    click.echo("Root token (shown once; store it safely):")
    click.echo(f"  {result.token}")
