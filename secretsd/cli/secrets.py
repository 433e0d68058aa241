"""Commands on secrets: get, set, list, versions, delete, undelete, destroy."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from secretsd.cli.common import Ctx, emit_json, fail, json_option, main, parse_versions, remote, table, write_private
from secretsd.errors import SecretsdError


@main.command()
@click.argument("path")
@click.option("--version", "version", type=click.IntRange(min=1), help="A specific version.")
@click.option("--label", type=click.Choice(["current", "previous", "pending"]),
              help="A staging label instead (see docs/rotation.md).")
@click.option("--newline", is_flag=True, help="Add a newline after the value (for reading it on a terminal).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the value to this file (mode 0600, replaced atomically) instead of standard output.")
@click.option("--field", metavar="KEY",
              help="Print one field of a JSON-object value (as the Vault façade reads it: docs/vault-compat.md).")
@json_option
@remote
def get(ctx: Ctx, path: str, version: int | None, label: str | None, newline: bool, output: Path | None,
        field: str | None, as_json: bool) -> None:
    """Print a secret's value: its stored bytes and nothing else.

    No newline is added (so 'get > key.pem' is the stored file); --newline adds one.

    \b
    Example:
      secretsd get app/db-password
      secretsd get app/tls-key -o key.pem
      secretsd get app/db-password --version 2 --json
      secretsd get app/db-password --label previous
      secretsd get app/db --field user
    """
    from secretsd.client.calls import value_of

    with ctx.client() as client:
        data = client.get(path, version, label=label)
    stored = value_of(data)
    if field is not None:
        stored = _field(stored, field)
        data = {k: v for k, v in data.items() if k not in ("value", "value_base64")} | {"field": field,
                                                                                       "value": stored}
    value = (stored if isinstance(stored, bytes) else stored.encode("utf-8")) + (b"\n" if newline else b"")
    if output is not None:
        write_private(output, value)
        if as_json:
            emit_json({k: v for k, v in data.items() if k not in ("value", "value_base64")} | {"file": str(output)})
    elif as_json:
        emit_json(data)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()


def _field(stored: str | bytes, key: str) -> str:
    """``key`` of a JSON-object value, by the façade's one mapping (secretsd.domain.kv_map)."""
    from secretsd.domain.kv_map import field_of

    if isinstance(stored, bytes):
        fail("the value is binary, not a JSON object: read it without --field")
    assert isinstance(stored, str)
    try:
        return field_of(stored, key)
    except SecretsdError as exc:
        fail(exc.message)
        raise  # fail() exits; this line is for the type checker


@main.command(name="set")
@click.argument("path")
@click.argument("value", required=False)
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the value from standard input.")
@click.option("--file", "from_file", type=click.File("rb"),
              help="Read the value from a file (any bytes: one that is not UTF-8 text is stored as binary).")
@click.option("--cas", type=click.IntRange(min=0),
              help="Write only if the current version is this (0: only if it does not exist).")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Metadata (stored in clear).")
@json_option
@remote
def set_(ctx: Ctx, path: str, value: str | bytes | None, from_stdin: bool, from_file: Any,
         cas: int | None, meta: tuple[str, ...], as_json: bool) -> None:
    """Store a new version of a secret.

    A value given as an argument lands in your shell history: prefer --stdin or --file.

    \b
    Examples:
      echo -n 's3cret' | secretsd set app/db-password --stdin
      secretsd set app/tls-key --file key.pem --cas 0
    """
    sources = sum([value is not None, from_stdin, from_file is not None])
    if sources != 1:
        raise click.UsageError("give the value exactly one way: as an argument, --stdin or --file")
    if from_stdin or from_file is not None:
        # Bytes exactly as given: text (UTF-8) is sent as text, anything else as a binary value.
        raw = sys.stdin.buffer.read() if from_stdin else from_file.read()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw
    metadata = None
    if meta:
        metadata = {}
        for item in meta:
            key, sep, val = item.partition("=")
            if not sep:
                raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
            metadata[key] = val
    assert value is not None
    with ctx.client() as client:
        data = client.put(path, value, cas=cas, metadata=metadata)
    if as_json:
        emit_json(data)
    else:
        click.echo(f"{data['path']}: version {data['version']}")


@main.command(name="list")
@click.argument("prefix", default="")
@json_option
@remote
def list_(ctx: Ctx, prefix: str, as_json: bool) -> None:
    """List secret paths below PREFIX (never values).

    \b
    Example:
      secretsd list app
    """
    found: list[dict[str, Any]] = []
    with ctx.client() as client:
        after = ""
        while True:
            page = client.list_secrets(prefix, after=after)
            found.extend(page["secrets"])
            after = page.get("next_after") or ""
            if not after:
                break
    if as_json:
        emit_json({"prefix": prefix, "secrets": found})
    else:
        table(None, ["path", "version", "updated"],
              [[s["path"], s["current_version"], s["updated_at"]] for s in found])


@main.command()
@click.argument("path")
@json_option
@remote
def versions(ctx: Ctx, path: str, as_json: bool) -> None:
    """Show a secret's versions: when, by whom, and their state.

    \b
    Example:
      secretsd versions app/db-password
    """
    with ctx.client() as client:
        data = client.metadata(path)
    if as_json:
        emit_json(data)
        return
    table(f"{data['path']} (current: {data['current_version']})",
          ["version", "created", "by", "state"],
          [[v["version"], v["created_at"], v["created_by"], v["state"]] for v in data["versions"]])


def _version_command(name: str, help_text: str, needs_versions: bool) -> None:
    @main.command(name=name, help=help_text)
    @click.argument("path")
    @click.option("--versions", "versions_text", required=needs_versions,
                  help="Comma-separated version numbers" + ("" if needs_versions else " (default: current)."))
    @json_option
    @remote
    def command(ctx: Ctx, path: str, versions_text: str | None, as_json: bool) -> None:
        wanted = parse_versions(versions_text)
        with ctx.client() as client:
            if name == "delete":
                data = client.delete(path, wanted)
            elif name == "undelete":
                data = client.undelete(path, wanted or [])
            else:
                data = client.destroy(path, wanted or [])
        if as_json:
            emit_json(data)
        else:
            changed = next(v for k, v in data.items() if k != "path")
            click.echo(f"{path}: {name}d version(s) {', '.join(map(str, changed)) or 'none'}")


_version_command("delete", "Soft-delete the current version (or --versions); undelete can restore it.\n\n"
                 "\b\nExample:\n  secretsd delete app/db-password", False)
_version_command("undelete", "Restore soft-deleted versions.\n\n"
                 "\b\nExample:\n  secretsd undelete app/db-password --versions 3", True)
_version_command("destroy", "Erase versions for good (their metadata stays).\n\n"
                 "\b\nExample:\n  secretsd destroy app/db-password --versions 1,2", True)
