"""``secretsd login`` and ``secretsd whoami``: a token kept for the CLI, and who the CLI is.

``login`` stores a token in ``$XDG_CONFIG_HOME/secretsd/token`` (``~/.config/secretsd/token``),
0600 in a 0700 directory, after the daemon has accepted it; the CLI uses it when neither
``--token`` nor ``SECRETSD_TOKEN`` gives one (``stored_token``). ``--print`` prints it instead.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import click

from secretsd.cli.common import Ctx, emit_json, json_option, main, remote, write_private
from secretsd.errors import ConfigError, UnauthenticatedError

TOKEN_FILE_NAME = "token"  # noqa: S105 - a file name


def token_file() -> Path:
    """Where ``login`` keeps the CLI's token (XDG base directories)."""
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "secretsd" / TOKEN_FILE_NAME


def stored_token() -> str | None:
    """The token ``login`` stored, or None if there is none.

    The rule: it is used only if it is a regular file of this user that no one else may read or
    write (as ssh treats its keys); otherwise a ConfigError says how to fix it, rather than a token
    others could have read, or planted, being sent.
    """
    path = token_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the stored token {path}: {exc.strerror} (a symlink is refused)") from None
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigError(f"the stored token {path} must be a file of yours with mode 0600 "
                              f"(chmod 600 {path}, or run 'secretsd login' again)")
        token = f.read().strip()
    return token or None


def _read_token() -> str:
    # A terminal gets a prompt that does not echo; a pipe (a file, another command) is read as is.
    value = click.prompt("Token", hide_input=True, err=True) if sys.stdin.isatty() else sys.stdin.readline()
    token = str(value).strip()
    if not token:
        raise ConfigError("no token given (pipe it on stdin, or type it at the prompt)")
    return token


def _jwt_login(ctx: Ctx, jwt_file: Path | None) -> str:
    """A daemon token for the workload JWT in ``jwt_file`` (POST /v1/auth/jwt/login)."""
    if jwt_file is None:
        raise ConfigError("--method jwt needs --jwt-file FILE (a Kubernetes service-account token, say: "
                          "/var/run/secrets/tokens/secretsd)")
    try:
        jwt = jwt_file.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the JWT file {jwt_file}: {exc.__class__.__name__}") from None
    if not jwt:
        raise ConfigError(f"the JWT file {jwt_file} is empty")
    with ctx.client() as client:
        answer = client.jwt_login(jwt)
    return str(answer["token"])


@main.command()
@click.option("--method", type=click.Choice(["token", "jwt"]), default="token", show_default=True,
              help="How to log in (token: paste or pipe an existing token; jwt: exchange the workload "
                   "JWT in --jwt-file for a short-lived token).")
@click.option("--jwt-file", type=click.Path(dir_okay=False, path_type=Path),
              help="With --method jwt: the file holding the JWT (a projected service-account token).")
@click.option("--print", "print_only", is_flag=True, help="Print the token instead of storing it.")
@json_option
@remote
def login(ctx: Ctx, method: str, jwt_file: Path | None, print_only: bool, as_json: bool) -> None:
    """Keep a token for the CLI (0600, under ~/.config/secretsd), after the daemon accepts it.

    \b
    Examples:
      secretsd login                     # prompts for the token
      secretsd token create ... | secretsd login
      secretsd login --print < token.txt
      secretsd login --method jwt --jwt-file /var/run/secrets/tokens/secretsd --print
    """
    if method == "jwt":
        ctx.token = _jwt_login(ctx, jwt_file)
    elif jwt_file is not None:
        raise ConfigError("--jwt-file goes with --method jwt")
    else:
        ctx.token = _read_token()
    with ctx.client() as client:
        who = client.whoami()  # a refused token is never stored
    if who.get("method") != "token":
        raise UnauthenticatedError("the daemon did not take the token")
    if print_only:
        click.echo(ctx.token)
        return
    path = token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, ctx.token.encode() + b"\n")
    if as_json:
        emit_json({"client": who.get("client"), "expires_at": who.get("expires_at"), "token_file": str(path)})
    else:
        click.echo(f"Logged in as {who.get('client')} (expires {who.get('expires_at') or 'never'}); "
                   f"token stored in {path}", err=True)


@main.command()
@json_option
@remote
def whoami(ctx: Ctx, as_json: bool) -> None:
    """Who the daemon takes this CLI for: client, method, policies and expiry."""
    with ctx.client() as client:
        who = client.whoami()
    if as_json:
        emit_json(who)
        return
    click.echo(f"client:   {who.get('client')}")
    click.echo(f"method:   {who.get('method')}")
    click.echo(f"policies: {', '.join(who.get('policies') or [])}")
    click.echo(f"expires:  {who.get('expires_at') or 'never'}")
