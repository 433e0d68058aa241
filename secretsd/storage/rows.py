"""Raw rows for copying a whole store between backends (``secretsd storage migrate``).

A row is a mapping of column name to a backend-neutral value: ``None``, ``int``, ``str``, ``bytes``,
an aware ``datetime`` (``time`` columns) or a parsed JSON value (``json`` columns). Each backend
decodes its own column types into these and encodes them back; ciphertext, nonces, wrapped keys
and token hashes pass through as they are stored, never decrypted.

``COLUMN_KINDS`` names every column this version can carry. A table with any other column is
refused (``StorageError``) instead of being copied without it: when a migration adds a column, add
it here too (``tests/test_storage_migrate.py`` fails until then). Columns listed here but absent
from a store (an older schema) are simply not copied.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from secretsd.errors import AlreadyInitializedError, StorageError

Kind = Literal["text", "int", "bytes", "time", "json"]
Row = dict[str, Any]

#: table -> (key columns for ordering and paging, {column: kind}), tables in reference order.
COLUMN_KINDS: dict[str, tuple[tuple[str, ...], dict[str, Kind]]] = {
    "meta": (("key",), {"key": "text", "value": "text"}),
    "keyring_terms": (("term",), {"term": "int", "wrappings": "json", "created_at": "time",
                                  "encryptions": "int"}),
    "secrets": (("path",), {
        "path": "text", "current_version": "int", "created_at": "time", "updated_at": "time",
        "metadata": "json",
        # 0002_lifecycle
        "latest_version": "int", "previous_version": "int", "pending_version": "int", "rotation": "json",
        "rotation_due": "time", "rotation_status": "json",
    }),
    "secret_versions": (("path", "version"), {
        "path": "text", "version": "int", "term": "int", "nonce": "bytes", "ciphertext": "bytes",
        "created_at": "time", "created_by": "text", "state": "text", "deleted_at": "time",
        # 0002_lifecycle
        "expires_at": "time", "grace_until": "time",
    }),
    "tokens": (("token_id",), {
        "token_id": "text", "secret_hash": "bytes", "client": "text", "policies": "json",
        "created_at": "time", "created_by": "text", "expires_at": "time", "revoked_at": "time",
        # 0003_token_renewal
        "ttl_seconds": "int", "max_expires_at": "time",
    }),
}
TABLES = tuple(COLUMN_KINDS)


def key_columns(table: str) -> tuple[str, ...]:
    return COLUMN_KINDS[table][0]


def copy_columns(table: str, actual: Iterable[str], where: str) -> list[str]:
    """The columns to copy, in a stable order; ``StorageError`` if the store has unknown ones."""
    if table not in COLUMN_KINDS:
        raise ValueError(f"unknown table {table!r}")
    present = set(actual)
    kinds = COLUMN_KINDS[table][1]
    unknown = sorted(present - set(kinds))
    if unknown:
        raise StorageError(
            f"table {table} of {where} has column(s) {', '.join(unknown)} that this version of secretsd "
            "cannot copy; refusing rather than dropping them"
        )
    missing = sorted(set(key_columns(table)) - present)
    if missing:
        raise StorageError(f"table {table} of {where} lacks its key column(s) {', '.join(missing)}")
    return [c for c in kinds if c in present]


def require_empty(table: str, has_rows: bool, where: str) -> None:
    """An import loads only into an empty store: one row anywhere refuses it, changing nothing."""
    if has_rows:
        raise AlreadyInitializedError(f"the store {where} is not empty (table {table} has rows); nothing was changed")


def insert_columns(table: str, present: list[str], sample: Mapping[str, Any], where: str) -> list[str]:
    """The columns of an imported batch (rows of a batch share their keys): those the rows carry.

    Columns the rows lack keep the target's defaults; a column the target lacks is refused.
    """
    unknown = sorted(set(sample) - set(present))
    if unknown:
        raise StorageError(f"table {table} of {where} has no column(s) {', '.join(unknown)} to import into")
    return [c for c in present if c in sample]


def kind(table: str, column: str) -> Kind:
    return COLUMN_KINDS[table][1][column]


def to_json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(kind_: Kind, value: Any) -> Any:
    if value is None:
        return None
    if kind_ == "time":
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise TypeError(f"a time column holds {type(value).__name__}")
        return value.astimezone(UTC).isoformat()
    if kind_ == "bytes":
        return base64.b64encode(bytes(value)).decode()
    return value


def canonical_line(table: str, row: Mapping[str, Any]) -> bytes:
    """One row as canonical JSON: what the checksum of a table is computed over."""
    doc = {c: _canonical(kind(table, c), v) for c, v in row.items()}
    return to_json_text(doc).encode() + b"\n"


def from_canonical(table: str, doc: Mapping[str, Any]) -> Row:
    """The row ``canonical_line`` wrote, back as neutral values; ``ValueError`` for anything it could
    not have written (an unknown column, a value of the wrong kind)."""
    kinds = COLUMN_KINDS[table][1]
    row: Row = {}
    for column, value in doc.items():
        kind_ = kinds.get(column)
        if kind_ is None:
            raise ValueError(f"table {table} has no column {column!r}")
        if value is None or kind_ == "json":
            row[column] = value
        elif kind_ in ("text", "bytes", "time") and not isinstance(value, str):
            raise ValueError(f"column {table}.{column} holds {type(value).__name__}, not text")
        elif kind_ == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"column {table}.{column} holds {type(value).__name__}, not an integer")
        elif kind_ == "bytes":
            row[column] = base64.b64decode(value, validate=True)
        elif kind_ == "time":
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:
                raise ValueError(f"column {table}.{column} holds a time without its zone")
            row[column] = parsed
        else:
            row[column] = value
    missing = [k for k in key_columns(table) if row.get(k) is None]
    if missing:
        raise ValueError(f"a row of table {table} lacks its key column(s) {', '.join(missing)}")
    return row


class TableDigest:
    """Row count and SHA-256 over the canonical rows of one table, in key order."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.rows = 0
        self._hash = hashlib.sha256()

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self._hash.update(canonical_line(self.table, row))
            self.rows += 1

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
