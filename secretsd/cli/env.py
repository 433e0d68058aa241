"""Moving from ``.env`` files: ``import-env``, ``export-env`` and ``run``.

The contract: ``import-env FILE --prefix P`` stores each ``KEY`` as the secret ``P/KEY``;
``export-env P`` and ``run --prefix P`` use each secret directly under ``P`` by its last path
segment. Values are never printed, except by ``export-env`` whose output is the values.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import click

from secretsd.cli.common import Ctx, emit_json, fail, json_option, main, remote, table, write_private
from secretsd.client import SecretsClient
from secretsd.client.operations import children
from secretsd.errors import ConflictError, NotFoundError, SecretsdError
from secretsd.paths import validate_path

#: Plan rows shown in a table; --json lists them all.
PLAN_ROWS = 50
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
    """path -> (current version, current value or None if unreadable) for the paths that exist."""
    wanted = {f"{prefix}/{k}" for k in keys}
    existing = {s["path"]: int(s["current_version"]) for s in children(client.list_all(prefix), prefix)
                if s["path"] in wanted}
    current: dict[str, tuple[int, str | None]] = {}
    with _progress("reading current values", len(existing)) as advance:
        for path, version in existing.items():
            try:
                current[path] = (version, client.get(path)["value"])
            except NotFoundError:  # current version deleted or destroyed
                current[path] = (version, None)
            advance()
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
    written = 0
    with _progress("importing", len(to_write)) as advance:
        for item in to_write:
            value = parsed.entries[item.key].value
            try:
                # Check-and-set: nothing changed since the plan, and a retried write cannot
                # create a second version.
                client.put(item.path, value, cas=item.cas)
            except ConflictError:
                try:
                    now = client.get(item.path)["value"]
                except NotFoundError:
                    now = None
                if now != value:
                    raise ConflictError(f"{item.path} changed while importing (after writing {written} of "
                                        f"{len(to_write)}); run import-env again to see the new plan") from None
            except SecretsdError as exc:
                raise type(exc)(f"{exc.message} (after writing {written} of {len(to_write)}; "
                                "running import-env again continues where it stopped)") from exc
            written += 1
            advance()
    return written


@main.command(name="export-env")
@click.argument("prefix")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (mode 0600, replaced atomically); default: standard output.")
@json_option
@remote
def export_env(ctx: Ctx, prefix: str, output: Path | None, as_json: bool) -> None:
    """Write the secrets directly under PREFIX as a dotenv file (NAME=value).

    NAME is each secret's last path segment. Values are quoted so that the file reads back
    unchanged through 'secretsd import-env' (newlines, quotes, backslashes, '$', unicode, empty
    values); import it without --interpolate. Secrets whose current version is deleted are left out.

    \b
    Examples:
      secretsd export-env billing -o billing.env
      secretsd export-env billing > /dev/shm/billing.env
    """
    from secretsd.cli import envfile

    prefix = _prefix(prefix)
    values: dict[str, str] = {}
    missing: list[str] = []
    with ctx.client() as client:
        found = children(client.list_all(prefix), prefix)
        with _progress("reading", len(found)) as advance:
            for s in found:
                try:
                    values[s["path"].rsplit("/", 1)[-1]] = client.get(s["path"])["value"]
                except NotFoundError:
                    missing.append(s["path"])
                advance()
    text = envfile.format_dotenv(values, header=f"exported by secretsd export-env {prefix}")
    if output is None:
        click.echo(text, nl=False)
    else:
        write_private(output, text.encode("utf-8"))
    summary = {"prefix": prefix, "file": None if output is None else str(output),
               "names": list(values), "left_out_deleted": missing}
    if as_json and output is not None:
        emit_json(summary)
    elif output is not None:
        click.echo(f"wrote {len(values)} secret(s) to {output} (mode 0600)")
    for path in missing:
        click.echo(f"note: {path} left out: its current version is deleted", err=True)


def _mapping(items: tuple[str, ...]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or "\0" in name:
            raise click.BadParameter(f"{item!r} is not NAME=path", param_hint="--map")
        try:
            result[name] = validate_path(path.strip("/"))
        except SecretsdError as exc:
            raise click.BadParameter(f"{item!r}: {exc.message}", param_hint="--map") from None
    return result


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--prefix", help="Expose each secret directly under PREFIX as NAME (its last path segment).")
@click.option("--map", "maps", multiple=True, metavar="NAME=PATH",
              help="Expose the secret PATH as NAME (repeatable; wins over --prefix).")
@click.option("--pass-token", is_flag=True,
              help="Let the command see SECRETSD_TOKEN too (by default it is removed from its environment).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@remote
def run(ctx: Ctx, prefix: str | None, maps: tuple[str, ...], pass_token: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND with secrets in its environment; exit with its exit code.

    Secrets are added to the current environment (a secret wins over a variable of the same
    name) and written nowhere. SIGINT, SIGTERM and SIGHUP are passed on to the command; if it is
    killed by a signal, the exit code is 128 + the signal number, as in a shell.

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
            for s in children(client.list_all(base), base):
                with contextlib.suppress(NotFoundError):  # current version deleted
                    secrets[s["path"].rsplit("/", 1)[-1]] = client.get(s["path"])["value"]
        for name, path in mapping.items():
            secrets[name] = client.get(path)["value"]
    env = dict(os.environ)
    if not pass_token:
        env.pop("SECRETSD_TOKEN", None)
    env.update(secrets)
    sys.exit(run_child(list(command), env))


def run_child(argv: list[str], env: dict[str, str]) -> int:
    """Run ``argv``, passing on SIGINT/SIGTERM/SIGHUP; its exit code, or 128+N if signal N killed it."""
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
