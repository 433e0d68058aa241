"""Operator commands over HTTP: status, health, keyring, policy and tokens."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from secretsd.cli.common import Ctx, emit_json, fail, json_option, main, parse_duration, remote, table


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
        table(None, ["", ""], _rows(data))


def _rows(data: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    """A nested object as dotted rows (``policy.digest``), one value per line."""
    rows: list[list[Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.extend(_rows(value, f"{prefix}{key}."))
        else:
            rows.append([prefix + key, value])
    return rows


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
@click.argument("subject", nargs=-1, required=True, metavar="[CLIENT] CAPABILITY PATH")
@click.option("--policy", "policies", multiple=True,
              help="Check this policy (repeatable: a token holding them all) instead of a CLIENT.")
@json_option
@remote
def policy_check(ctx: Ctx, subject: tuple[str, ...], policies: tuple[str, ...], as_json: bool) -> None:
    """Say whether CLIENT (the union of its active tokens' policies), or a token holding the
    --policy policies, may use CAPABILITY on PATH, and which rule decides.

    Exit 0 when allowed, 1 when denied.

    \b
    Examples:
      secretsd policy check billing read billing/stripe-key
      secretsd policy check --policy billing read billing/stripe-key
    """
    if len(subject) != (2 if policies else 3):
        raise click.UsageError("give CAPABILITY PATH with --policy, or CLIENT CAPABILITY PATH without it")
    client_name = None if policies else subject[0]
    capability, path = subject[-2:]
    with ctx.client() as client:
        data = client.policy_check(client_name, capability, path, list(policies) if policies else None)
    if as_json:
        emit_json(data)
    else:
        click.echo(f"{'ALLOW' if data['allowed'] else 'DENY'}: {data['explanation']}")
    if not data["allowed"]:
        sys.exit(1)


@policy.command(name="list")
@json_option
@remote
def policy_list(ctx: Ctx, as_json: bool) -> None:
    """The policies the daemon has loaded, with their rule and path counts.

    \b
    Example:
      secretsd policy list
    """
    with ctx.client() as client:
        data = client.policy_list()
    if as_json:
        emit_json(data)
    else:
        table(None, ["name", "rules", "paths", "capabilities", "description"],
              [[p["name"], p["rules"], p["paths"], ",".join(p["capabilities"]), p["description"]]
               for p in data["policies"]])


@policy.command(name="show")
@click.argument("name")
@json_option
@remote
def policy_show(ctx: Ctx, name: str, as_json: bool) -> None:
    """A loaded policy's rules, in order (exit 3 if the daemon has no such policy).

    \b
    Example:
      secretsd policy show billing
    """
    with ctx.client() as client:
        data = client.policy_show(name)
    if as_json:
        emit_json(data)
    else:
        title = data["name"] + (f": {data['description']}" if data["description"] else "")
        table(title, ["rule", "path", "allow", "deny"],
              [[r["index"], r["path"], ",".join(r["allow"]), ",".join(r["deny"])] for r in data["rules"]])


@policy.command(name="reload")
@json_option
@remote
def policy_reload(ctx: Ctx, as_json: bool) -> None:
    """Make the daemon re-read its policy file (as SIGHUP does). An invalid file is refused with
    its reason (exit 1) and the policies in force stay.

    \b
    Example:
      secretsd policy reload
    """
    with ctx.client() as client:
        data = client.policy_reload()
    if as_json:
        emit_json(data)
    else:
        source = data["file"] or "(no policy_file: root only)"
        click.echo(f"reloaded {source}: {', '.join(data['policies'])} ({data['digest'] or 'no digest'})")


@policy.command(name="validate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def policy_validate(file: Path, as_json: bool) -> None:
    """Check a policy file offline, with exactly the daemon's parser and rules (no daemon needed).

    Exit 0 and a one-line summary when valid; 1 and a one-line error naming the file and the line
    (TOML syntax) or the policy and rule (anything else) when not; 2 when FILE does not exist.

    \b
    Example:
      secretsd policy validate /etc/secretsd/policies.toml && systemctl reload secretsd
    """
    from secretsd.domain.policy import PolicySet  # no server, storage or crypto stack
    from secretsd.errors import PolicyFileError

    try:
        loaded = PolicySet.load(file)
    except PolicyFileError as exc:
        if as_json:  # the shape every --json failure has (docs/cli.md); offline, so no HTTP status
            emit_json({"error": {"type": "invalid-policy-file", "status": None, "detail": exc.message,
                                 "exit_code": 1}})
        fail(exc.message, 1)
        return
    if as_json:
        emit_json({"valid": True, "file": str(file), "digest": loaded.digest, "policies": loaded.names()})
    else:
        click.echo(f"{file}: valid, {len(loaded.policies)} policies ({', '.join(loaded.names())}), {loaded.digest}")


@main.group()
def token() -> None:
    """Create, list and revoke tokens."""


@token.command(name="create")
@click.option("--client", "client_name", required=True, help="Name of the client (service) it is for.")
@click.option("--policy", "policies", multiple=True, required=True, help="A policy to attach (repeatable).")
@click.option("--ttl", help="Lifetime: seconds, or 90m, 12h, 30d. Default: no expiry.")
@click.option("--max-ttl", help="Renewable (renew-self) up to this long after creation; needs --ttl.")
@json_option
@remote
def token_create(ctx: Ctx, client_name: str, policies: tuple[str, ...], ttl: str | None, max_ttl: str | None,
                 as_json: bool) -> None:
    """Create a token; it is printed once and stored only as a hash.

    \b
    Example:
      secretsd token create --client billing --policy billing --ttl 30d
      secretsd token create --client billing --policy billing --ttl 1h --max-ttl 30d
    """
    ttl_seconds = parse_duration(ttl) if ttl else None
    max_ttl_seconds = parse_duration(max_ttl) if max_ttl else None
    with ctx.client() as client:
        data = client.create_token(client_name, list(policies), ttl_seconds, max_ttl_seconds)
    if as_json:
        emit_json(data)
    else:
        click.echo(data["token"])


@token.command(name="list")
@click.option("--include-expired", is_flag=True, help="List expired tokens too (until purged).")
@json_option
@remote
def token_list(ctx: Ctx, include_expired: bool, as_json: bool) -> None:
    """List tokens (ids, clients, policies; never the tokens), every page.

    \b
    Example:
      secretsd token list
    """
    with ctx.client() as client:
        data = {"tokens": client.list_all_tokens(include_expired=include_expired)}
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
