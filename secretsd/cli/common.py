"""What every command shares: the root group, one-line errors, JSON and table output, parsing."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from secretsd import __version__
from secretsd.cli.lazy import LazyGroup
from secretsd.errors import ConfigError, SecretsdError

if TYPE_CHECKING:
    from secretsd.client import SecretsClient

F = TypeVar("F", bound=Callable[..., Any])
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _os_error(exc: OSError) -> str:
    return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")


def friendly_errors(fn: F) -> F:
    """Offline commands: turn any secretsd error into one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SecretsdError as exc:
            fail(exc.message)
        except OSError as exc:
            fail(_os_error(exc))

    return cast(F, wrapper)


def _override(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Given after the command name, the option replaces what the root group (or its
    # environment variable) set.
    obj = ctx.find_object(Ctx)
    if value is not None and obj is not None:
        setattr(obj, str(param.name), value)
        if param.name == "addr":
            obj.addr_from_env = False


_CONNECTION_OPTIONS = (
    click.option("--addr", callback=_override, expose_value=False, help="Daemon address [env SECRETSD_ADDR]."),
    click.option("--token", callback=_override, expose_value=False, help="Bearer token [env SECRETSD_TOKEN]."),
    click.option("--ca-file", callback=_override, expose_value=False,
                 type=click.Path(exists=True, dir_okay=False),
                 help="PEM file of the CA for https:// addresses [env SECRETSD_CA_FILE]."),
    click.option("--client-cert", callback=_override, expose_value=False,
                 type=click.Path(exists=True, dir_okay=False),
                 help="PEM client certificate for mTLS [env SECRETSD_CLIENT_CERT]."),
    click.option("--client-key", callback=_override, expose_value=False,
                 type=click.Path(exists=True, dir_okay=False),
                 help="PEM key of --client-cert [env SECRETSD_CLIENT_KEY]."),
)


def remote(fn: F) -> F:
    """A command that talks to the daemon: it takes the ``Ctx`` first, accepts ``--addr``,
    ``--token`` and ``--ca-file`` after its name too, and exits with ``exits.exit_code`` of its error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SecretsdError as exc:
            from secretsd.cli.exits import error_document, exit_code  # only on the error path

            code = exit_code(exc)
            if kwargs.get("as_json"):
                # --json covers failures too: a script reads one document on stdout either way.
                emit_json(error_document(exc, code))
            fail(exc.message, code)
        except OSError as exc:
            fail(_os_error(exc))

    command: Any = click.pass_obj(wrapper)
    for option in reversed(_CONNECTION_OPTIONS):
        command = option(command)
    return cast(F, command)


def write_private(target: Path, data: bytes) -> None:
    """Write ``data`` to a new 0600 file next to ``target``, then rename it over ``target``: a
    secret never sits in a file others can read, not even for a moment, nor in a half-written one."""
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)  # created 0600
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _cell(value: Any) -> str:
    # One row per line whatever a value holds: a tab or a line break in it is written escaped.
    return "" if value is None else str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    """A table for a person at a terminal; for a pipe or a file, plain lines that tools can cut.

    Piped, stdout gets the title as a ``# `` line, a header line (unless every column is unnamed)
    and one tab-separated line per row, never wrapped or folded, so an id is never split.
    """
    if not sys.stdout.isatty():
        if title:
            click.echo(f"# {_cell(title)}")
        if any(columns):
            click.echo("\t".join(columns))
        for row in rows:
            click.echo("\t".join(_cell(v) for v in row))
        return
    # rich costs ~40 ms to import: only commands that print a table pay it.
    from rich.console import Console
    from rich.table import Table

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
    def __init__(self, addr: str | None, token: str | None, ca_file: str | None = None, *,
                 addr_from_env: bool = False, client_cert: str | None = None,
                 client_key: str | None = None) -> None:
        self.addr = addr
        self.token = token
        self.ca_file = ca_file
        self.addr_from_env = addr_from_env
        #: mTLS (docs/auth.md): None for both leaves SECRETSD_CLIENT_CERT / SECRETSD_CLIENT_KEY to the client.
        self.client_cert = client_cert
        self.client_key = client_key

    def client(self) -> SecretsClient:
        from secretsd.client import SecretsClient
        if self.token is None:  # no --token, no SECRETSD_TOKEN: the one 'secretsd login' kept, if any
            from secretsd.cli.login import stored_token

            self.token = stored_token()

        return SecretsClient(require_address(self.addr, self.addr_from_env), self.token, ca_file=self.ca_file,
                             client_cert=self.client_cert, client_key=self.client_key)


def require_address(addr: str | None, from_env: bool) -> str | None:
    """The daemon address to use (None: the client's default). An empty one, given or from an
    empty SECRETSD_ADDR, is an error (ConfigError: exit 2), never a silent fallback to the default."""
    if addr is None and os.environ.get("SECRETSD_ADDR", "unset").strip() == "":
        addr, from_env = "", True  # a click that reads an empty variable as unset
    if addr is not None and not addr.strip():
        raise ConfigError("SECRETSD_ADDR is set but empty: unset it or give http(s)://HOST:PORT" if from_env
                          else "--addr is empty: give http(s)://HOST:PORT")
    return addr


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="secretsd")
@click.option("--addr", envvar="SECRETSD_ADDR", help="Daemon address [env SECRETSD_ADDR].")
@click.option("--token", envvar="SECRETSD_TOKEN", help="Bearer token [env SECRETSD_TOKEN].")
@click.option("--ca-file", envvar="SECRETSD_CA_FILE", type=click.Path(exists=True, dir_okay=False),
              help="PEM file of the CA that signed the daemon's certificate, for https:// addresses "
                   "[env SECRETSD_CA_FILE]. Default: the system's trusted CAs.")
@click.option("--client-cert", envvar="SECRETSD_CLIENT_CERT", type=click.Path(exists=True, dir_okay=False),
              help="PEM client certificate for mTLS, with --client-key [env SECRETSD_CLIENT_CERT].")
@click.option("--client-key", envvar="SECRETSD_CLIENT_KEY", type=click.Path(exists=True, dir_okay=False),
              help="PEM private key of --client-cert [env SECRETSD_CLIENT_KEY].")
@click.pass_context
def main(ctx: click.Context, addr: str | None, token: str | None, ca_file: str | None,
         client_cert: str | None, client_key: str | None) -> None:
    """jarvis-secretsd: secrets over HTTP, master key in a file or an HSM.

    \b
    Quick start:
      secretsd serve --dev                  # local store, prints an admin token
      export SECRETSD_TOKEN=sdt_...
      secretsd set app/db-password --stdin < password.txt
      secretsd get app/db-password
    """
    from_env = ctx.get_parameter_source("addr") is click.core.ParameterSource.ENVIRONMENT
    ctx.obj = Ctx(addr, token, ca_file, addr_from_env=from_env, client_cert=client_cert, client_key=client_key)
