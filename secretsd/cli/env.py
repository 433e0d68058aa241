"""Moving from ``.env`` files: ``import-env``, ``export-env`` and ``run``.

The contract: ``import-env FILE --prefix P`` stores each ``KEY`` as the secret ``P/KEY``;
``export-env P`` and ``run --prefix P`` use each secret directly under ``P`` by its last path
segment, made an environment variable name by ``environment_name`` (docs/cli.md). Values are
never printed, except by ``export-env`` whose output is the values.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import click

from secretsd.cli.common import Ctx, emit_json, fail, json_option, main, remote, table, write_private
from secretsd.client import SecretsClient
from secretsd.client.calls import value_of
from secretsd.client.operations import children
from secretsd.errors import ConflictError, NotFoundError, RequestError, SecretsdError
from secretsd.paths import validate_path
from secretsd.problems import error_from_problem

#: Plan rows shown in a table; --json lists them all.
PLAN_ROWS = 50
#: Writes per POST /v1/secrets:batch (the API's limit).
BATCH_ITEMS = 1000

#: What ``run`` passes on to the command, as tini and dumb-init do: every signal someone sends to
#: ask a program for something (reload, stop, reopen logs, resize, resume), and the real-time
#: ones. Not KILL and STOP (they cannot be caught); not TSTP/TTIN/TTOU (job control: the wrapper
#: must stop itself so the shell sees a stopped job, and a terminal sends them to the command too);
#: not CHLD (about our own child); not PIPE, XCPU, XFSZ, VTALRM, PROF (about this process's own
#: writes, limits and timers: passing them on would kill a command that did nothing); not the
#: faults SEGV, BUS, FPE, ILL, TRAP, SYS, ABRT; not URG (out-of-band data on our own sockets).
FORWARDED_SIGNALS: tuple[signal.Signals | int, ...] = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGWINCH, signal.SIGCONT, signal.SIGALRM,
    *((signal.SIGPWR,) if hasattr(signal, "SIGPWR") else ()),
    *(range(signal.SIGRTMIN, signal.SIGRTMAX + 1) if hasattr(signal, "SIGRTMIN") else ()),
)

#: A name every shell, compose and python-dotenv accept (POSIX "Name").
_POSIX_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def environment_name(key: str) -> str | None:
    """The environment variable a secret ``PREFIX/KEY`` becomes: ``KEY`` with each ``-`` and ``.``
    made ``_``, case kept (a name that is already valid is used as it is); ``None`` when even that
    is not a POSIX name (a key starting with a digit)."""
    name = key.replace("-", "_").replace(".", "_")
    return name if _POSIX_NAME.fullmatch(name) else None


def environment_names(keys: Iterable[str], *, prefix: str, skip_invalid: bool) -> dict[str, str]:
    """``name -> key`` for the secrets ``prefix/KEY``; rule: never inject a name silently.

    A key without a valid name, or two keys that become the same name (``a-b`` and ``a_b``), are
    a one-line ``RequestError`` naming them -- or, with ``skip_invalid``, left out with a warning on
    stderr each. Values are never in these messages.
    """
    by_name: dict[str, list[str]] = {}
    problems: list[str] = []
    for key in keys:
        name = environment_name(key)
        if name is None:
            problems.append(f"{prefix}/{key} has no valid environment variable name ('-' and '.' become '_'; "
                            "a name may not start with a digit)")
        else:
            by_name.setdefault(name, []).append(key)
    for name, clashing in by_name.items():
        if len(clashing) > 1:
            problems.append(f"{' and '.join(f'{prefix}/{k}' for k in clashing)} would all be the variable {name}")
    if problems and not skip_invalid:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RequestError(f"{problems[0]}{more}; rename the secret, name it with --map NAME=PATH, "
                           "or leave such secrets out with --skip-invalid")
    for problem in problems:
        click.echo(f"warning: {problem}; left out (--skip-invalid)", err=True)
    return {name: ks[0] for name, ks in by_name.items() if len(ks) == 1}


def _read_under(client: SecretsClient, prefix: str) -> tuple[dict[str, str], list[str]]:
    """``key -> current value`` of each secret directly under ``prefix``, and the paths left out
    because their current version cannot be served (deleted, destroyed, expired). One
    ``GET /v1/secrets:read`` per 1,000 secrets below the prefix, not a request per secret."""
    found, skipped = client.read_all(prefix, children=True)
    values = {item["path"].rsplit("/", 1)[-1]: _env_value(item) for item in children(found, prefix)}
    return values, [item["path"] for item in children(skipped, prefix)]


def _env_value(read: dict[str, Any]) -> str:
    """A read's value as an environment variable holds it: text; a binary value is an error."""
    value = value_of(read)
    if isinstance(value, bytes):
        raise RequestError(f"{read['path']} holds a binary value, which cannot be an environment variable; "
                           "read it with 'secretsd get'")
    return value


def _prefix(text: str) -> str:
    prefix = text.strip("/")
    try:
        return validate_path(prefix)
    except SecretsdError as exc:
        raise click.BadParameter(exc.message, param_hint="--prefix") from None


@contextlib.contextmanager
def _progress(description: str, total: int) -> Iterator[Any]:
    """A rich progress bar on stderr when it is a terminal; otherwise a no-op."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def _current_values(client: SecretsClient, prefix: str, keys: set[str]) -> dict[str, tuple[int, str | None]]:
    """path -> (current version, current value or None if unreadable) for the paths that exist.

    One ``POST /v1/secrets:read`` per 1,000 secrets below the prefix; only a secret that cannot
    be served (its current version deleted or expired) costs a listing to learn its version.
    """
    wanted = {f"{prefix}/{k}" for k in keys}
    found, skipped = client.read_all(prefix, children=True)
    current: dict[str, tuple[int, str | None]] = {
        s["path"]: (int(s["version"]), _text_or_none(value_of(s))) for s in found if s["path"] in wanted}
    if any(s["path"] in wanted for s in skipped):
        for s in client.list_all(prefix):
            if s["path"] in wanted and s["path"] not in current:
                current[s["path"]] = (int(s["current_version"]), None)
    return current


@main.command(name="import-env")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prefix", required=True, help="Store each KEY as the secret PREFIX/KEY.")
@click.option("--dry-run", is_flag=True, help="Show the plan; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace existing secrets whose value differs (default: skip them).")
@click.option("--interpolate", is_flag=True,
              help="Expand ${VAR} and ${VAR:-default} as python-dotenv does (default: values are literal).")
@json_option
@remote
def import_env(ctx: Ctx, file: Path, prefix: str, dry_run: bool, overwrite: bool, interpolate: bool,
               as_json: bool) -> None:
    """Import a .env file: each KEY becomes the secret PREFIX/KEY.

    The whole file is parsed first: a malformed line or a KEY that cannot be a path segment
    (letters, digits, '.', '_', '-') is an error with its line number, and nothing is written.
    The plan compares each value with the current one -- new, changed or unchanged -- without
    printing values. Unchanged values are not rewritten (no new version), so a re-run is a no-op;
    changed ones are skipped unless --overwrite. A key given twice: the last one wins.

    \b
    Examples:
      secretsd import-env .env --prefix billing --dry-run
      secretsd import-env .env --prefix billing
      secretsd import-env .env.production --prefix billing/prod --overwrite --json
    """
    from secretsd.cli import envfile

    prefix = _prefix(prefix)
    parsed = envfile.parse(envfile.read_text(file), prefix=prefix, source=str(file), interpolate=interpolate)
    with ctx.client() as client:
        current = _current_values(client, prefix, set(parsed.entries))
        items = envfile.plan(prefix, parsed.entries.values(), current, overwrite=overwrite)
        to_write = [i for i in items if i.write]
        counts = {a: sum(1 for i in items if i.action == a) for a in (envfile.NEW, envfile.CHANGED, envfile.UNCHANGED)}
        skipped = sum(1 for i in items if i.action == envfile.CHANGED and not i.write)
        if not as_json:
            _show_plan(items, parsed)
        written = 0 if dry_run else _write(client, parsed, to_write)
    summary = {"new": counts[envfile.NEW], "changed": counts[envfile.CHANGED],
               "unchanged": counts[envfile.UNCHANGED], "skipped": skipped, "written": written}
    if as_json:
        emit_json({
            "file": str(file), "prefix": prefix, "dry_run": dry_run,
            "plan": [{"key": i.key, "path": i.path, "line": i.line, "action": i.action, "write": i.write}
                     for i in items],
            "duplicates": parsed.duplicates,
            "without_value": [{"key": k, "line": n} for k, n in parsed.without_value],
            "summary": summary,
        })
        return
    head = "dry run, nothing written" if dry_run else f"wrote {written}"
    click.echo(f"{head}: {summary['new']} new, {summary['changed']} changed"
               f"{f' ({skipped} skipped, use --overwrite)' if skipped else ''}, {summary['unchanged']} unchanged.")


def _show_plan(items: list[Any], parsed: Any) -> None:
    rows = [[i.line, i.key, i.path, i.describe()] for i in items]
    title = f"plan ({len(rows)} keys)" + (f", first {PLAN_ROWS}" if len(rows) > PLAN_ROWS else "")
    table(title, ["line", "key", "path", "action"], rows[:PLAN_ROWS])
    if len(rows) > PLAN_ROWS:
        click.echo(f"... and {len(rows) - PLAN_ROWS} more (--json lists all)")
    for key, lines in parsed.duplicates.items():
        click.echo(f"note: {key} is set on lines {', '.join(map(str, lines))}; the last one (line {lines[-1]}) wins")
    for key, line in parsed.without_value:
        click.echo(f"note: line {line}: {key} has no '=' and no value; not imported")


def _write(client: SecretsClient, parsed: Any, to_write: list[Any]) -> int:
    """Write the plan's items with check-and-set, 1,000 per ``POST /v1/secrets:batch``."""
    written = 0
    with _progress("importing", len(to_write)) as advance:
        for start in range(0, len(to_write), BATCH_ITEMS):
            chunk = to_write[start:start + BATCH_ITEMS]
            # Check-and-set: nothing changed since the plan, and a retried batch cannot create a
            # second version of anything.
            try:
                results = client.write_batch([
                    {"path": i.path, "value": parsed.entries[i.key].value, "cas": i.cas} for i in chunk])["results"]
            except SecretsdError as exc:
                raise type(exc)(f"{exc.message} (after writing {written} of {len(to_write)}; "
                                "running import-env again continues where it stopped)") from exc
            for item, result in zip(chunk, results, strict=True):
                if result["status"] == 409:
                    _check_unchanged(client, item.path, parsed.entries[item.key].value, written, len(to_write))
                elif result["status"] != 200:
                    error = error_from_problem(result["error"], result["status"])
                    raise type(error)(f"{item.path}: {error.message} (after writing {written} of "
                                      f"{len(to_write)}; running import-env again continues where it stopped)")
                written += 1
            advance(len(chunk))
    return written


def _text_or_none(value: str | bytes) -> str | None:
    """A current value as the plan compares it: a binary one matches no line of a .env file."""
    return value if isinstance(value, str) else None


def _check_unchanged(client: SecretsClient, path: str, value: str, written: int, total: int) -> None:
    """A check-and-set refused: fine if the secret already holds our value (a retried batch)."""
    try:
        now: str | bytes | None = value_of(client.get(path))
    except NotFoundError:
        now = None
    if now != value:
        raise ConflictError(f"{path} changed while importing (after writing {written} of {total}); "
                            "run import-env again to see the new plan")


@main.command(name="export-env")
@click.argument("prefix")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (mode 0600, replaced atomically); default: standard output.")
@click.option("--format", "style", type=click.Choice(["portable", "sh", "dotenv"]), default="portable",
              show_default=True,
              help="portable: read alike by sh/bash, docker compose and python-dotenv; sh: shells only "
                   "(any value, line breaks too); dotenv: for import-env (names as stored).")
@click.option("--skip-invalid", is_flag=True,
              help="Leave out (with a warning) secrets without a valid variable name instead of failing.")
@json_option
@remote
def export_env(ctx: Ctx, prefix: str, output: Path | None, style: str, skip_invalid: bool, as_json: bool) -> None:
    """Write the secrets directly under PREFIX as a dotenv file (NAME=value).

    NAME is the secret's last path segment with '-' and '.' made '_' (as 'run' names them); a
    segment that gives no valid name, or two that give the same, is an error unless
    --skip-invalid. The default format reads the same through 'set -a; . FILE' in sh or bash,
    docker compose's env_file and python-dotenv ('$' is never expanded); a value that no single
    form can carry to all three (a line break, say) is an error naming the secret, and nothing is
    written: use --format sh for shells, or --format dotenv, which keeps the stored names and
    reads back unchanged through 'secretsd import-env' (not through a shell). Secrets whose
    current version is deleted are left out.

    \b
    Examples:
      secretsd export-env billing -o billing.env
      secretsd export-env billing > /dev/shm/billing.env
      secretsd export-env billing --format dotenv -o backup.env   # for import-env
    """
    from secretsd.cli import envfile

    prefix = _prefix(prefix)
    with ctx.client() as client:
        values, missing = _read_under(client, prefix)
    header = f"exported by secretsd export-env {prefix}" + (f" --format {style}" if style != envfile.PORTABLE else "")
    if style == envfile.DOTENV:
        text = envfile.format_dotenv(values, header=header)
        names = list(values)
    else:
        by_name = environment_names(values, prefix=prefix, skip_invalid=skip_invalid)
        text = envfile.format_env({name: values[key] for name, key in by_name.items()}, style=style, header=header,
                                  sources={name: f"{prefix}/{key}" for name, key in by_name.items()})
        names = list(by_name)
    if output is None:
        click.echo(text, nl=False)
    else:
        write_private(output, text.encode("utf-8"))
    summary = {"prefix": prefix, "file": None if output is None else str(output), "format": style,
               "names": names, "left_out_deleted": missing}
    if as_json and output is not None:
        emit_json(summary)
    elif output is not None:
        click.echo(f"wrote {len(names)} secret(s) to {output} (mode 0600)")
    for path in missing:
        click.echo(f"note: {path} left out: its current version is deleted", err=True)


def _mapping(items: tuple[str, ...]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=path", param_hint="--map")
        if not _POSIX_NAME.fullmatch(name):
            raise click.BadParameter(f"{name!r} is not a valid environment variable name "
                                     "(letters, digits and '_', not starting with a digit)", param_hint="--map")
        try:
            result[name] = validate_path(path.strip("/"))
        except SecretsdError as exc:
            raise click.BadParameter(f"{item!r}: {exc.message}", param_hint="--map") from None
    return result


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--prefix", help="Expose each secret directly under PREFIX as NAME (its last path segment, "
                               "'-' and '.' made '_').")
@click.option("--map", "maps", multiple=True, metavar="NAME=PATH",
              help="Expose the secret PATH as NAME (repeatable; wins over --prefix).")
@click.option("--allow-empty", is_flag=True,
              help="Run the command even when nothing is under --prefix (by default that is an error, exit 3).")
@click.option("--skip-invalid", is_flag=True,
              help="Leave out (with a warning) secrets without a valid variable name instead of failing.")
@click.option("--pass-token", is_flag=True,
              help="Let the command see SECRETSD_TOKEN too (by default it is removed from its environment).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@remote
def run(ctx: Ctx, prefix: str | None, maps: tuple[str, ...], allow_empty: bool, skip_invalid: bool,
        pass_token: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND with secrets in its environment; exit with its exit code.

    Secrets are added to the current environment (a secret wins over a variable of the same
    name) and written nowhere. A secret PREFIX/KEY becomes the variable KEY with '-' and '.'
    made '_'; a key that gives no valid name, or two keys that give the same, stop the command
    from starting (unless --skip-invalid). Nothing under PREFIX (a typo, say) is an error, exit 3,
    unless --allow-empty. Like tini, every signal meant for the program (HUP, INT, QUIT, TERM,
    USR1, USR2, WINCH, CONT, ALRM, PWR, real-time) is passed on to it; if it is killed by a
    signal, the exit code is 128 + the signal number, as in a shell.

    \b
    Examples:
      secretsd run --prefix billing -- python -m billing.server
      secretsd run --prefix billing --map DATABASE_URL=shared/db/url -- ./start.sh --port 8000
    """
    if not prefix and not maps:
        raise click.UsageError("name the secrets with --prefix and/or --map")
    mapping = _mapping(maps)
    secrets: dict[str, str] = {}
    with ctx.client() as client:
        if prefix:
            base = _prefix(prefix)
            values, _ = _read_under(client, base)
            if not values and not allow_empty:
                raise NotFoundError(f"nothing under the prefix {base!r} (no secret directly under it with a current "
                                    f"value); {command[0]} was not started (--allow-empty runs it anyway)")
            by_name = environment_names(values, prefix=base, skip_invalid=skip_invalid)
            secrets = {name: values[key] for name, key in by_name.items()}
        for name, path in mapping.items():
            secrets[name] = _env_value(client.get(path))
    env = dict(os.environ)
    if not pass_token:
        env.pop("SECRETSD_TOKEN", None)
    env.update(secrets)
    sys.exit(run_child(list(command), env))


def run_child(argv: list[str], env: dict[str, str]) -> int:
    """Run ``argv``, passing on every signal in ``FORWARDED_SIGNALS``; its exit code, or 128+N if
    signal N killed it. A signal that arrives before the child exists is sent once it does."""
    proc: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc is None:
            pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        try:
            proc = subprocess.Popen(argv, env=env)  # noqa: S603 - running the user's command is the point
        except FileNotFoundError:
            click.echo(f"error: command not found: {argv[0]}", err=True)
            return 127  # as a shell does
        except PermissionError:
            click.echo(f"error: permission denied: {argv[0]}", err=True)
            return 126
        except ValueError as exc:  # e.g. a value with a NUL byte cannot be in an environment
            fail(f"cannot start {argv[0]}: {exc}")
            return 1
        for signum in pending:
            forward(signum, None)
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code
