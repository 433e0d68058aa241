"""The read queries, written once (``secretsd.storage.queries``), and their rendering per dialect.

The conformance suite (``secretsd.storage.testing``) holds both backends to one answer for each
read; these tests pin the renderer and that the dialects run one text.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretsd.storage import postgres_sql, queries, sqlite
from secretsd.storage.migrations import load_migrations
from secretsd.storage.queries import POSTGRES, SQLITE, Query, Statements, render


@pytest.fixture
def schema(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "schema.db")
    for migration in load_migrations("sqlite"):
        for statement in migration.statements():
            conn.execute(statement)
    yield conn
    conn.close()


def texts(statements: Statements) -> dict[str, str]:
    out: dict[str, str] = {}
    for field in dataclasses.fields(statements):
        value = getattr(statements, field.name)
        if isinstance(value, str):
            out[field.name] = value
        else:
            out.update({f"{field.name}[{k}]": v for k, v in value.items()})
    return out


def test_a_parameter_is_numbered_by_its_place_in_params() -> None:
    query = Query("SELECT :b, :a, :b", ("a", "b"))
    assert render(query, SQLITE) == "SELECT ?2, ?1, ?2"
    assert render(query, POSTGRES) == "SELECT $2, $1, $2"
    # The dialect passes values in params order, whatever order the text uses them in.
    assert sqlite3.connect(":memory:").execute(render(query, SQLITE), (1, 2)).fetchone() == (2, 1, 2)


def test_a_parameter_missing_from_params_is_refused() -> None:
    with pytest.raises(ValueError, match=":path"):
        render(Query("SELECT 1 FROM secrets WHERE path = :path"), SQLITE)


def test_json_columns_are_read_as_text_and_a_cast_is_not_a_parameter() -> None:
    text = render(Query("SELECT {s.secret} FROM secrets s WHERE s.path = :path", ("path",)), POSTGRES)
    assert "s.metadata::text" in text and "s.rotation_status::text" in text and text.endswith("s.path = $1")
    assert "s.metadata," in render(Query("SELECT {s.secret} FROM secrets s"), SQLITE)


def test_a_locking_read_locks_rows_only_where_the_backend_needs_it() -> None:
    assert queries.Statements.render(POSTGRES).lock_secret.endswith(" FOR UPDATE")
    assert "FOR UPDATE" not in queries.Statements.render(SQLITE).lock_secret  # BEGIN IMMEDIATE locks


def test_each_read_is_one_text_on_both_backends() -> None:
    """Up to placeholders, JSON-as-text casts and row locks, the two dialects run the same SQL."""
    lite, pg = texts(Statements.render(SQLITE)), texts(Statements.render(POSTGRES))
    assert lite.keys() == pg.keys()
    for name, text in pg.items():
        neutral = re.sub(r"\$(\d+)", r"?\1", text.replace("::text", "").removesuffix(" FOR UPDATE"))
        assert neutral == lite[name], name
        assert not re.search(r"[{}]|(?<![:\w]):[a-z]", text), name  # nothing left unrendered


def test_the_dialects_run_the_rendered_reads() -> None:
    assert Statements.render(SQLITE) == sqlite._SQL
    assert Statements.render(POSTGRES) == postgres_sql.SQL


def test_every_sqlite_read_prepares_against_the_schema(schema: sqlite3.Connection) -> None:
    for name, text in texts(Statements.render(SQLITE)).items():
        count = max((int(n) for n in re.findall(r"\?(\d+)", text)), default=0)
        try:
            schema.execute(f"EXPLAIN {text}", (None,) * count).fetchall()
        except sqlite3.Error as exc:  # a misspelt column or table
            pytest.fail(f"{name}: {exc}")


def test_rotation_candidates_reads_through_both_partial_indexes(schema: sqlite3.Connection) -> None:
    """Why the rule is two disjoint arms (UNION ALL) and not an OR: each arm has its index."""
    details = [str(row[3]) for row in schema.execute(
        f"EXPLAIN QUERY PLAN {Statements.render(SQLITE).rotation_candidates}", ("2026-01-01T00:00:00+00:00", 10))]
    plan = " | ".join(details)
    assert "secrets_rotation_pending" in plan and "secrets_rotation_due" in plan, plan
    assert not [d for d in details if d.startswith("SCAN secrets") and "USING INDEX" not in d], plan


@pytest.mark.parametrize("read", ["list_secrets", "read_current_page"])
def test_a_listing_page_is_one_ordered_range_scan_that_limit_stops(schema: sqlite3.Connection, read: str) -> None:
    # Not a MULTI-INDEX OR with a sort: that read (and sorted) every path under the prefix for each
    # page, so listing or reading N secrets cost O(N) per page of 1,000.
    plan = [r[3] for r in schema.execute(
        f"EXPLAIN QUERY PLAN {getattr(Statements.render(SQLITE), read)}", ("a/", "a0", "a", "", 1000))]
    assert any("USING INDEX sqlite_autoindex_secrets_1 (path>? AND path<?)" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step or "MULTI-INDEX OR" in step for step in plan), plan
