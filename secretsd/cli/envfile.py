"""``.env`` files: parse them with python-dotenv (line numbers, malformed lines), plan an import,
and write secrets back as a dotenv file that parses to exactly the same values.

The contract (issue 6): ``import-env FILE --prefix P`` stores each ``KEY`` as the secret ``P/KEY``;
``export-env P`` writes each secret directly under ``P`` back as ``NAME=value``, ``NAME`` being its
last path segment; ``run --prefix P`` exposes the same names as environment variables.

Parsing follows python-dotenv exactly (its own parser, so a file means here what it means to
``load_dotenv``): ``export`` prefixes, single and double quotes, escapes in double quotes,
multi-line quoted values, comments. Differences, on purpose:

- interpolation (``${VAR}``) is off unless asked for: a ``$`` in a password stays a ``$``;
- a line python-dotenv cannot parse (it only warns and skips it) is an error with its line number;
- a key that is not a valid path segment (letters, digits, '.', '_', '-') is an error;
- a key given more than once: the last one wins, as in python-dotenv, and the plan says so;
- a ``KEY`` without ``=`` has no value (python-dotenv gives None): it is skipped, and reported;
- CRLF and CR line endings read as LF, and a UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from secretsd.errors import InvalidPathError, RequestError
from secretsd.paths import validate_path


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    line: int


@dataclass
class ParsedEnv:
    #: key -> its last assignment, in the order keys first appear.
    entries: dict[str, Entry] = field(default_factory=dict)
    #: key -> every line that assigns it, for keys assigned more than once (the last line wins).
    duplicates: dict[str, list[int]] = field(default_factory=dict)
    #: (key, line) of keys without '=': no value, not imported.
    without_value: list[tuple[str, int]] = field(default_factory=list)


def read_text(path: Path) -> str:
    """The file's text: UTF-8 (a byte-order mark is dropped), any line ending read as LF."""
    with path.open("r", encoding="utf-8-sig", newline=None) as fh:
        return fh.read()


def _line_of(original: str, line: int) -> int:
    """python-dotenv numbers a binding from the blank lines before it; skip them."""
    stripped = original.lstrip()
    return line + original[: len(original) - len(stripped)].count("\n")


#: ``KEY=value`` with nothing python-dotenv would treat specially (no quote, space, '#', '$' or
#: backslash): its key and value are the text on either side of the first '='.
_PLAIN_LINE = re.compile(r"([A-Za-z0-9_.-]+)=([A-Za-z0-9_./:@+%,=~?&!-]*)")


def _bindings(text: str) -> Iterator[tuple[str | None, str | None, int, bool]]:
    """(key, value, line, malformed) for each binding of ``text``, as python-dotenv parses it.

    Without a quote anywhere in the text, no value can span lines, so each line is parsed on its
    own, and a plain ``KEY=value`` line without python-dotenv's parser (which costs ~50 µs a line:
    most of a 10,000-line import). With a quote, the whole text goes through python-dotenv.
    ``tests/test_env.py`` checks the two agree on generated files.
    """
    if "'" in text or '"' in text:
        for binding in parse_stream(io.StringIO(text)):
            yield (binding.key, binding.value, _line_of(binding.original.string, binding.original.line),
                   binding.error)
        return
    for number, raw in enumerate(text.split("\n"), start=1):
        plain = _PLAIN_LINE.fullmatch(raw)
        if plain is not None:
            yield plain[1], plain[2], number, False
        elif raw.strip():
            for binding in parse_stream(io.StringIO(raw)):
                yield binding.key, binding.value, number, binding.error


def parse(text: str, *, prefix: str, source: str = ".env", interpolate: bool = False) -> ParsedEnv:
    """Parse ``text`` and check every key becomes a valid path ``prefix/KEY``.

    Raises ``RequestError`` naming ``source:LINE`` of the first problem (and how many more there
    are); nothing is returned, so nothing can be written, when any line is wrong.
    """
    problems: list[str] = []
    result = ParsedEnv()
    lines: dict[str, list[int]] = {}
    for key_or_none, value, line, error in _bindings(text):
        if error:
            # Never quote the line: it may hold a value.
            problems.append(f"{source}:{line}: malformed line: expected KEY=VALUE, a comment or a blank line")
            continue
        if key_or_none is None:
            continue
        key = key_or_none
        try:
            if "/" in key:
                raise InvalidPathError("a key may not contain '/'")
            validate_path(f"{prefix}/{key}")
        except InvalidPathError as exc:
            problems.append(f"{source}:{line}: key {_shorten(key)!r} cannot be a secret name: {exc.message}")
            continue
        if value is None:
            result.without_value.append((key, line))
            continue
        lines.setdefault(key, []).append(line)
        result.entries[key] = Entry(key, value, line)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise RequestError(problems[0] + more + "; nothing was imported")
    result.duplicates = {k: v for k, v in lines.items() if len(v) > 1}
    if interpolate:
        resolved = dotenv_values(stream=io.StringIO(text), interpolate=True)
        for key, entry in list(result.entries.items()):
            value = resolved.get(key)
            if value is not None:
                result.entries[key] = Entry(key, value, entry.line)
    return result


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the plan -----------------------------------------------------------------------------------
NEW, CHANGED, UNCHANGED = "new", "changed", "unchanged"


@dataclass(frozen=True)
class PlanItem:
    key: str
    path: str
    line: int
    action: str  # new | changed | unchanged
    write: bool  # False for unchanged values, and for changed ones without --overwrite
    #: The version a write must find (check-and-set): 0 for a path that does not exist yet.
    cas: int

    def describe(self) -> str:
        if self.action == CHANGED and not self.write:
            return "changed (skipped: exists; --overwrite to replace)"
        return self.action


def plan(prefix: str, entries: Iterable[Entry], current: Mapping[str, tuple[int, str | None]],
         *, overwrite: bool) -> list[PlanItem]:
    """Compare each entry with the current value (``path -> (version, value or None if unreadable)``)."""
    items = []
    for entry in entries:
        path = f"{prefix}/{entry.key}"
        if path not in current:
            items.append(PlanItem(entry.key, path, entry.line, NEW, True, 0))
            continue
        version, value = current[path]
        if value == entry.value:
            items.append(PlanItem(entry.key, path, entry.line, UNCHANGED, False, version))
        else:
            items.append(PlanItem(entry.key, path, entry.line, CHANGED, overwrite, version))
    return items


# -- writing a dotenv file ------------------------------------------------------------------------
_UNQUOTED_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.,:/@+%=")


def quote(value: str) -> str:
    """One value as python-dotenv will read it back unchanged (with interpolation off).

    Plain values stay bare; anything else is double-quoted with ``\\``, ``"``, newline and
    carriage return escaped. A value ending in a backslash cannot be double-quoted (python-dotenv
    would read ``\\"`` as an escaped quote), so it is written bare when it can be.
    """
    if value and set(value) <= _UNQUOTED_SAFE:
        return value
    if value.endswith("\\") and _bare_ok(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _bare_ok(value: str) -> bool:
    return (
        "\n" not in value and "\r" not in value and value == value.strip()
        and value[0] not in "'\"#" and not any(c.isspace() for c in value)
    )


def format_dotenv(values: Mapping[str, str], *, header: str | None = None) -> str:
    """A dotenv document of ``values`` that parses back to exactly ``values``, or ``RequestError``."""
    lines = [f"# {h}" for h in (header or "").splitlines()]
    lines += [f"{name}={quote(value)}" for name, value in values.items()]
    text = "\n".join(lines) + "\n"
    back = {b.key: b.value for b in parse_stream(io.StringIO(text)) if b.key is not None and not b.error}
    if back != dict(values):
        bad = sorted(k for k in values if back.get(k) != values[k]) or sorted(set(back) - set(values))
        raise RequestError(
            f"cannot write {', '.join(bad[:5])} as a dotenv value that reads back unchanged "
            "(a value ending in a backslash that also needs quotes); export those with 'secretsd get'"
        )
    return text


# -- writing for several readers at once -----------------------------------------------------------
# ``export-env --format``: which readers must read the file as we mean it.
PORTABLE, SH, DOTENV = "portable", "sh", "dotenv"
FORMATS = (PORTABLE, SH, DOTENV)


#: What python-dotenv's interpolation expands (its own pattern), in any quotes; there is no escape.
_DOTENV_VARIABLE = re.compile(r"\$\{[^}:]*(?::-[^}]*)?\}")


def quote_portable(value: str) -> tuple[str | None, str]:
    """``value`` written so that ``sh``/``bash`` (``set -a; . FILE``), docker compose ``env_file``
    (its documented rules) and python-dotenv (interpolation on or off) all read it unchanged;
    ``(None, why)`` when no form does.

    Bare when every character is plain. Otherwise single quotes, literal in all three -- except
    that python-dotenv and compose treat ``\\'`` (and python-dotenv ``\\\\``) as escapes, so a
    value with two backslashes in a row or a trailing one cannot be single-quoted. A value with a
    ``'`` is double-quoted, only when it holds none of ``$`` `` ` `` ``"`` (each special in a shell's
    or compose's double quotes): the backslash, the one escape all three read alike, is doubled.
    A line break has no common form (compose's documented lines are one per variable; only
    double-quoted ``\\n`` would do and a shell reads that literally), nor has ``${NAME}``: python-dotenv
    interpolates it in every kind of quotes.
    """
    if value and set(value) <= _UNQUOTED_SAFE:
        return value, ""
    if "\0" in value:
        return None, "a NUL character (no environment can hold one)"
    if "\n" in value or "\r" in value:
        return None, "a line break (docker compose env files have no form of it that sh reads alike)"
    if _DOTENV_VARIABLE.search(value):
        return None, "${...} (python-dotenv expands it even in single quotes, as load_dotenv does by default)"
    if "'" not in value:
        if "\\\\" in value or value.endswith("\\"):
            return None, "two backslashes in a row or a trailing backslash (python-dotenv and compose unescape them)"
        return f"'{value}'", ""
    if set(value) & set('$`"'):
        return None, "a single quote together with $, ` or \" (no quoting reads alike in sh, compose and python-dotenv)"
    if value.endswith("\\"):
        # compose takes a quote right after a backslash as escaped, even after an escaped backslash.
        return None, "a single quote and a trailing backslash (compose would read the closing quote as escaped)"
    return '"' + value.replace("\\", "\\\\") + '"', ""


def quote_sh(value: str) -> tuple[str | None, str]:
    """``value`` for a POSIX shell only: single quotes, a ``'`` written ``'"'"'``; any value but NUL."""
    if value and set(value) <= _UNQUOTED_SAFE:
        return value, ""
    if "\0" in value:
        return None, "a NUL character (no environment can hold one)"
    return "'" + value.replace("'", "'\"'\"'") + "'", ""


def format_env(values: Mapping[str, str], *, style: str, header: str | None = None,
               sources: Mapping[str, str] | None = None) -> str:
    """An env file of ``values`` (``NAME -> value``) in ``style`` (``portable`` or ``sh``), or a
    one-line ``RequestError`` naming each value that style cannot carry (``sources`` maps a name to
    the secret it comes from, for that message). Nothing is written unless every value fits."""
    quote_one = quote_portable if style == PORTABLE else quote_sh
    lines = [f"# {h}" for h in (header or "").splitlines()]
    refused: list[tuple[str, str]] = []
    for name, value in values.items():
        quoted, why = quote_one(value)
        if quoted is None:
            refused.append((name, why))
        else:
            lines.append(f"{name}={quoted}")
    if refused:
        name, why = refused[0]
        what = (sources or {}).get(name, name)
        more = f" (and {len(refused) - 1} more: {', '.join(n for n, _ in refused[1:6])})" if len(refused) > 1 else ""
        raise RequestError(f"cannot write {what} as {name} in the {style} format: its value holds {why}{more}; "
                           "choose --format sh or --format dotenv for that reader, or read it with 'secretsd get'")
    return "\n".join(lines) + "\n"
