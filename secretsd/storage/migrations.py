"""Numbered SQL migrations shipped inside the package, one folder per backend."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

from secretsd.errors import StorageError

_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The script's statements. Our migrations keep ';' and '--' out of string literals."""
        lines = [line.split("--", 1)[0] for line in self.sql.splitlines()]
        return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def load_migrations(backend: str) -> list[Migration]:
    folder = resources.files("secretsd.storage").joinpath("migrations", backend)
    found = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.number)
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{backend} migrations are not numbered 1..n without gaps: {numbers}")
    return found


def pending_migrations(migrations: list[Migration], done: Iterable[int], where: str) -> list[Migration]:
    """The migrations still to apply, in order; ``StorageError`` if a newer secretsd wrote the store.

    A schema newer than this code is refused rather than used: its columns and rules are unknown here.
    """
    applied = set(done)
    if applied and max(applied) > len(migrations):
        raise StorageError(f"the {where} was written by a newer secretsd "
                           f"(schema {max(applied)}, this version knows {len(migrations)})")
    return [m for m in migrations if m.number not in applied]
