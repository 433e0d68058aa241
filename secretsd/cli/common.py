"""What every command shares: the root group, one-line errors, JSON and table output, parsing."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click
from rich.console import Console
from rich.table import Table

from secretsd import __version__
from secretsd.client import SecretsClient
from secretsd.errors import SecretsdError

F = TypeVar("F", bound=Callable[..., Any])
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
    def __init__(self, addr: str | None, token: str | None, ca_file: str | None = None) -> None:
        self.addr = addr
        self.token = token
        self.ca_file = ca_file

    def client(self) -> SecretsClient:
        return SecretsClient(self.addr, self.token, ca_file=self.ca_file)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="secretsd")
@click.option("--addr", envvar="SECRETSD_ADDR", help="Daemon address [env SECRETSD_ADDR].")
@click.option("--token", envvar="SECRETSD_TOKEN", help="Bearer token [env SECRETSD_TOKEN].")
@click.option("--ca-file", envvar="SECRETSD_CA_FILE", type=click.Path(exists=True, dir_okay=False),
              help="PEM file of the CA that signed the daemon's certificate, for https:// addresses "
                   "[env SECRETSD_CA_FILE]. Default: the system's trusted CAs.")
@click.pass_context
def main(ctx: click.Context, addr: str | None, token: str | None, ca_file: str | None) -> None:
    """jarvis-secretsd: secrets over HTTP, master key in a file or an HSM.

    \b
    Quick start:
      secretsd serve --dev                  # local store, prints an admin token
      export SECRETSD_TOKEN=sdt_...
      secretsd set app/db-password --stdin < password.txt
      secretsd get app/db-password
    """
    ctx.obj = Ctx(addr, token, ca_file)
