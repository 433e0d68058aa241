"""Operator commands over HTTP: status, health, keyring, policy and tokens."""

from __future__ import annotations

import sys

import click

from secretsd.cli.common import Ctx, emit_json, json_option, main, parse_duration, remote, table


@main.command()
@json_option
@remote
def status(ctx: Ctx, as_json: bool) -> None:
    """Seal state, key provider, keyring term and version.

    \b
    Example:
      secretsd status --json
    """
    with ctx.client() as client:
        data = client.status()
    if as_json:
        emit_json(data)
    else:
        table(None, ["", ""], [[k, v] for k, v in data.items()])


@main.command()
@json_option
@remote
def health(ctx: Ctx, as_json: bool) -> None:
    """Is the daemon ready? Exit 0 if so, 1 if not.

    \b
    Example:
      secretsd health && echo ready
    """
    with ctx.client() as client:
        data = client.health()
    if as_json:
        emit_json(data)
    else:
        checks = ", ".join(f"{k}: {v}" for k, v in data.get("checks", {}).items())
        click.echo(("ready" if data.get("ready") else "not ready") + (f" ({checks})" if checks else ""))
    if not data.get("ready"):
        sys.exit(1)


@main.group()
def keyring() -> None:
    """Keyring (data-key) operations."""


@keyring.command(name="rotate")
@json_option
@remote
def keyring_rotate(ctx: Ctx, as_json: bool) -> None:
    """Add a keyring term; new writes use it, old terms stay readable.

    \b
    Example:
      secretsd keyring rotate
    """
    with ctx.client() as client:
        data = client.rotate_keyring()
    if as_json:
        emit_json(data)
    else:
        click.echo(f"active keyring term: {data['active_term']}")


@main.group()
def policy() -> None:
    """Policy tools."""


@policy.command(name="check")
@click.argument("client_name", metavar="CLIENT")
@click.argument("capability")
@click.argument("path")
@json_option
@remote
def policy_check(ctx: Ctx, client_name: str, capability: str, path: str, as_json: bool) -> None:
    """Say whether CLIENT may use CAPABILITY on PATH, and which rule decides.

    Exit 0 when allowed, 1 when denied.

    \b
    Example:
      secretsd policy check billing read billing/stripe-key
    """
    with ctx.client() as client:
        data = client.policy_check(client_name, capability, path)
    if as_json:
        emit_json(data)
    else:
        click.echo(f"{'ALLOW' if data['allowed'] else 'DENY'}: {data['explanation']}")
    if not data["allowed"]:
        sys.exit(1)


@main.group()
def token() -> None:
    """Create, list and revoke tokens."""


@token.command(name="create")
@click.option("--client", "client_name", required=True, help="Name of the client (service) it is for.")
@click.option("--policy", "policies", multiple=True, required=True, help="A policy to attach (repeatable).")
@click.option("--ttl", help="Lifetime: seconds, or 90m, 12h, 30d. Default: no expiry.")
@json_option
@remote
def token_create(ctx: Ctx, client_name: str, policies: tuple[str, ...], ttl: str | None,
                 as_json: bool) -> None:
    """Create a token; it is printed once and stored only as a hash.

    \b
    Example:
      secretsd token create --client billing --policy billing --ttl 30d
    """
    ttl_seconds = parse_duration(ttl) if ttl else None
    with ctx.client() as client:
        data = client.create_token(client_name, list(policies), ttl_seconds)
    if as_json:
        emit_json(data)
    else:
        click.echo(data["token"])


@token.command(name="list")
@json_option
@remote
def token_list(ctx: Ctx, as_json: bool) -> None:
    """List tokens (ids, clients, policies; never the tokens).

    \b
    Example:
      secretsd token list
    """
    with ctx.client() as client:
        data = client.list_tokens()
    if as_json:
        emit_json(data)
    else:
        table(None, ["id", "client", "policies", "created", "expires", "revoked"],
              [[t["token_id"], t["client"], ",".join(t["policies"]), t["created_at"],
                t["expires_at"], t["revoked_at"]] for t in data["tokens"]])


@token.command(name="revoke")
@click.argument("token_id")
@json_option
@remote
def token_revoke(ctx: Ctx, token_id: str, as_json: bool) -> None:
    """Revoke a token by its id (sdt_...).

    \b
    Example:
      secretsd token revoke sdt_0123456789abcdef
    """
    with ctx.client() as client:
        data = client.revoke_token(token_id)
    if as_json:
        emit_json(data)
    else:
        click.echo(f"revoked {data['revoked']}")
