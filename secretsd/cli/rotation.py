"""Commands for the secret lifecycle: rotate, rotation status, rotation set (docs/rotation.md)."""

from __future__ import annotations

import sys
from typing import Any

import click

from secretsd.cli.common import Ctx, emit_json, json_option, main, parse_duration, remote, table


@main.command()
@click.argument("path")
@click.option("--value-stdin", "value_stdin", is_flag=True,
              help="Read the new value from standard input (for a 'supplied' generator).")
@json_option
@remote
def rotate(ctx: Ctx, path: str, value_stdin: bool, as_json: bool) -> None:
    """Rotate a secret now: a new value becomes current, the old one previous.

    Without --value-stdin the secret's generator makes the value (never printed). The old value
    stays readable as ``--label previous`` until its grace period ends.

    \b
    Examples:
      secretsd rotate app/api-key
      generate-password | secretsd rotate app/db-password --value-stdin
    """
    value = sys.stdin.read() if value_stdin else None
    with ctx.client() as client:
        data = client.rotate(path, value)
    if as_json:
        emit_json(data)
    else:
        click.echo(f"{data['path']}: version {data['version']} is current; version {data['previous_version']} "
                   f"is previous until {data['grace_until']}")


@main.group()
def rotation() -> None:
    """Rotation policies and the scheduler's view of them.

    \b
    Example:
      secretsd rotation status app
    """


@rotation.command(name="status")
@click.argument("prefix", default="")
@json_option
@remote
def rotation_status(ctx: Ctx, prefix: str, as_json: bool) -> None:
    """Show, per secret with a rotation policy: next due and last result.

    \b
    Example:
      secretsd rotation status app --json
    """
    with ctx.client() as client:
        data = client.rotation_status(prefix)
    if as_json:
        emit_json(data)
        return

    def scheduled(s: dict[str, Any]) -> str:
        policy = s.get("policy") or {}
        return "on" if policy.get("enabled") else "off"

    table(None, ["path", "version", "scheduled", "next due", "last result", "failures", "reason"],
          [[s["path"], s["current_version"], scheduled(s), s.get("next_due") or "-", s.get("last_result") or "-",
            s.get("failures") or 0, s.get("last_reason") or ""] for s in data["secrets"]])


@rotation.command(name="set")
@click.argument("path")
@click.option("--enable/--disable", "enabled", default=True, show_default=True, help="Scheduled rotation.")
@click.option("--period", default="90d", show_default=True, help="Rotate this often (3600, 12h, 90d).")
@click.option("--grace", default="14d", show_default=True, help="How long the previous value stays readable.")
@click.option("--generator", type=click.Choice(["bytes", "password", "supplied"]), default="bytes",
              show_default=True)
@click.option("--length", type=click.IntRange(min=1), help="Bytes (bytes) or characters (password).")
@click.option("--encoding", type=click.Choice(["hex", "base64", "urlsafe"]), help="For --generator bytes.")
@click.option("--classes", help="For --generator password: comma-separated lower,upper,digits,symbols.")
@click.option("--hook", help="A hook named in the daemon's [rotation.hooks] configuration.")
@click.option("--max-age", help="Never serve a version older than this (e.g. 180d).")
@click.option("--remove", is_flag=True, help="Remove the policy instead.")
@json_option
@remote
def rotation_set(ctx: Ctx, path: str, enabled: bool, period: str, grace: str, generator: str, length: int | None,
                 encoding: str | None, classes: str | None, hook: str | None, max_age: str | None, remove: bool,
                 as_json: bool) -> None:
    """Set a secret's rotation policy (needs the `rotate` capability on it).

    \b
    Examples:
      secretsd rotation set app/api-key --period 30d --grace 7d --generator bytes --length 32
      secretsd rotation set app/db-password --generator password --length 24 \\
          --classes lower,upper,digits --hook postgres-users
      secretsd rotation set app/api-key --remove
    """
    policy: dict[str, Any] | None = None
    if not remove:
        spec: dict[str, Any] = {"kind": generator}
        if length is not None:
            spec["length"] = length
        if encoding is not None:
            spec["encoding"] = encoding
        if classes is not None:
            spec["classes"] = [c.strip() for c in classes.split(",") if c.strip()]
        policy = {"enabled": enabled, "period_seconds": parse_duration(period),
                  "grace_seconds": parse_duration(grace), "generator": spec, "hook": hook,
                  "max_age_seconds": parse_duration(max_age) if max_age else None}
    with ctx.client() as client:
        data = client.set_rotation(path, policy)
    if as_json:
        emit_json(data)
    else:
        r = data["rotation"]
        click.echo(f"{data['path']}: " + ("no rotation policy" if r["policy"] is None else
                                         f"scheduled rotation {'on' if r['policy']['enabled'] else 'off'}, "
                                         f"next due {r['next_due'] or '-'}"))
