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
from collections.abc import Iterable, Mapping
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


def parse(text: str, *, prefix: str, source: str = ".env", interpolate: bool = False) -> ParsedEnv:
    """Parse ``text`` and check every key becomes a valid path ``prefix/KEY``.

    Raises ``RequestError`` naming ``source:LINE`` of the first problem (and how many more there
    are); nothing is returned, so nothing can be written, when any line is wrong.
    """
    problems: list[str] = []
    result = ParsedEnv()
    lines: dict[str, list[int]] = {}
    for binding in parse_stream(io.StringIO(text)):
        line = _line_of(binding.original.string, binding.original.line)
        if binding.error:
            # Never quote the line: it may hold a value.
            problems.append(f"{source}:{line}: malformed line: expected KEY=VALUE, a comment or a blank line")
            continue
        if binding.key is None:
            continue
        key = binding.key
        try:
            if "/" in key:
                raise InvalidPathError("a key may not contain '/'")
            validate_path(f"{prefix}/{key}")
        except InvalidPathError as exc:
            problems.append(f"{source}:{line}: key {_shorten(key)!r} cannot be a secret name: {exc.message}")
            continue
        if binding.value is None:
            result.without_value.append((key, line))
            continue
        lines.setdefault(key, []).append(line)
        result.entries[key] = Entry(key, binding.value, line)
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
