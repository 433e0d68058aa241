"""The ``secretsd`` command. Online commands go through the HTTP client; ``init`` and ``serve`` are local.

Errors print one line to stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from rich.console import Console
from rich.table import Table

from secretsd import __version__
from secretsd.client import SecretsClient
from secretsd.errors import SecretsdError

F = TypeVar("F", bound=Callable[..., Any])
DEV_TOKEN_FILE = "dev-admin-token"  # noqa: S105 - a file name
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def friendly_errors(fn: F) -> F:
    """Turn any secretsd error into one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SecretsdError as exc:
            fail(exc.message)
        except OSError as exc:
            fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))

    return cast(F, wrapper)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, show_lines=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    Console().print(t)


def parse_duration(text: str) -> int:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 3600, 90m, 12h or 30d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_versions(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        versions = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of version numbers") from None
    if not versions:
        raise click.BadParameter("name at least one version")
    return versions


class Ctx:
    def __init__(self, addr: str | None, token: str | None) -> None:
        self.addr = addr
        self.token = token

    def client(self) -> SecretsClient:
        return SecretsClient(self.addr, self.token)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="secretsd")
@click.option("--addr", envvar="SECRETSD_ADDR", help="Daemon address [env SECRETSD_ADDR].")
@click.option("--token", envvar="SECRETSD_TOKEN", help="Bearer token [env SECRETSD_TOKEN].")
@click.pass_context
def main(ctx: click.Context, addr: str | None, token: str | None) -> None:
    """jarvis-secretsd: secrets over HTTP, master key in a file or an HSM.

    \b
    Quick start:
      secretsd serve --dev                  # local store, prints an admin token
      export SECRETSD_TOKEN=sdt_...
      secretsd set app/db-password --stdin < password.txt
      secretsd get app/db-password
    """
    ctx.obj = Ctx(addr, token)


# -- local commands ---------------------------------------------------------------------------
@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@json_option
@friendly_errors
def init(data_dir: Path | None, config_file: Path | None, as_json: bool) -> None:
    """Create a store and print its admin token, once.

    \b
    Example:
      secretsd init --data-dir /var/lib/secretsd --json
    """
    from secretsd.config import load_settings
    from secretsd.daemon import initialize_store

    settings = load_settings(config_file, data_dir=data_dir)
    result = asyncio.run(initialize_store(settings))
    if as_json:
        emit_json({"admin_token": result.admin_token, "data_dir": str(result.data_dir),
                   "provider": result.provider, "key_id": result.key_id})
        return
    click.echo(f"Initialised {result.data_dir} (key provider {result.provider}, key {result.key_id}).")
    click.echo("Admin token (shown once; store it safely):")
    click.echo(f"  {result.admin_token}")


def _dev_store(data_dir: Path, settings_kwargs: dict[str, Any], config_file: Path | None) -> str:
    """Initialise the dev store on first run; return its admin token (kept 0600 for dev only)."""
    from secretsd.config import load_settings
    from secretsd.daemon import initialize_store

    token_file = data_dir / DEV_TOKEN_FILE
    if token_file.exists():
        return token_file.read_text("utf-8").strip()
    settings = load_settings(config_file, **settings_kwargs)
    result = asyncio.run(initialize_store(settings))
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(result.admin_token + "\n")
    return result.admin_token


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the store lives.")
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8750).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--dev", is_flag=True,
              help="Development mode: initialise a local store on first run and print its admin token.")
@friendly_errors
def serve(data_dir: Path | None, listen: str | None, config_file: Path | None, dev: bool) -> None:
    """Run the daemon.

    \b
    Examples:
      secretsd serve --dev
      secretsd serve --data-dir /var/lib/secretsd --listen 127.0.0.1:8750
      secretsd serve --config /etc/secretsd/secretsd.toml
    """
    from secretsd.config import load_settings
    from secretsd.logs import configure_logging
    from secretsd.server import serve as run_server

    if dev and data_dir is None and not os.environ.get("SECRETSD_DATA_DIR"):
        data_dir = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "secretsd-dev"
    kwargs: dict[str, Any] = {"data_dir": data_dir, "listen": listen}
    settings = load_settings(config_file, **kwargs)
    configure_logging(settings.log_level, settings.log_format)
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
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_server(settings, on_ready=banner))


# -- secrets ----------------------------------------------------------------------------------
@main.command()
@click.argument("path")
@click.option("--version", "version", type=click.IntRange(min=1), help="A specific version.")
@json_option
@click.pass_obj
@friendly_errors
def get(ctx: Ctx, path: str, version: int | None, as_json: bool) -> None:
    """Print a secret's value.

    \b
    Example:
      secretsd get app/db-password
      secretsd get app/db-password --version 2 --json
    """
    with ctx.client() as client:
        data = client.get(path, version)
    if as_json:
        emit_json(data)
    else:
        click.echo(data["value"])


@main.command(name="set")
@click.argument("path")
@click.argument("value", required=False)
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the value from standard input.")
@click.option("--file", "from_file", type=click.File("r"), help="Read the value from a file.")
@click.option("--cas", type=click.IntRange(min=0),
              help="Write only if the current version is this (0: only if it does not exist).")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Metadata (stored in clear).")
@json_option
@click.pass_obj
@friendly_errors
def set_(ctx: Ctx, path: str, value: str | None, from_stdin: bool, from_file: Any,
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
    if from_stdin:
        value = sys.stdin.read()
    elif from_file is not None:
        value = from_file.read()
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
@click.pass_obj
@friendly_errors
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
@click.pass_obj
@friendly_errors
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
    @click.pass_obj
    @friendly_errors
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


# -- system -----------------------------------------------------------------------------------
@main.command()
@json_option
@click.pass_obj
@friendly_errors
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
@click.pass_obj
@friendly_errors
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
@click.pass_obj
@friendly_errors
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
@click.pass_obj
@friendly_errors
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
@click.pass_obj
@friendly_errors
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
@click.pass_obj
@friendly_errors
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
@click.pass_obj
@friendly_errors
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
