"""The store's read queries, each written once, rendered for a dialect once at import.

A read that carries a rule (which secrets the rotation scheduler looks at and in which order, what a
prefix listing returns after a cursor, which row a label reads, the order of tokens and keyring
terms) is a ``Query`` here, in a neutral form:

``:name``
    A parameter. ``Query.params`` lists the names in the order a dialect passes the values, so a
    dialect binds a plain tuple: no dict and no reordering per call.
``{secret}``, ``{v.version}``
    A record's column list (``COLUMNS``: the order its row codec in ``engine`` reads), optionally
    under a table alias. JSON columns are read as text, which the row codecs decode.

``render(query, dialect)`` turns one into the dialect's SQL text (SQLite ``?N``, PostgreSQL ``$N``;
PostgreSQL casts ``jsonb`` to text). ``Statements.render`` does it for every query at once; each
dialect keeps the result in a module constant, so a request pays nothing for it.

What stays in a dialect: turning parameters and stored times into its driver's values (SQLite keeps
times as ISO text), connections, transactions, row locks (``lock=True``: PostgreSQL's FOR UPDATE).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from secretsd.storage import engine, rows


@dataclass(frozen=True, slots=True)
class Query:
    """One query in neutral form; ``params`` is the order in which a dialect passes the values."""

    text: str
    params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs in the text of a read between backends, and nothing else."""

    name: str
    #: The placeholder of the n-th parameter (from 1).
    placeholder: Callable[[int], str]
    #: A JSON column read as text.
    json_text: Callable[[str], str]
    #: Appended to a locking read inside a write transaction.
    row_lock: str


#: ``?N``: numbered, so a parameter may appear twice or out of order in the text.
SQLITE = Dialect("sqlite", lambda n: f"?{n}", lambda column: column, "")
#: BEGIN IMMEDIATE already holds SQLite's one write lock; PostgreSQL locks the rows it read.
POSTGRES = Dialect("postgres", lambda n: f"${n}", lambda column: f"{column}::text", " FOR UPDATE")

#: Column lists by name: (table, columns in the order the row codec reads them).
COLUMNS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "secret": ("secrets", engine.SECRET_COLUMNS),
    "version": ("secret_versions", engine.VERSION_COLUMNS),
    "version_info": ("secret_versions", engine.VERSION_INFO_COLUMNS),
    "term": ("keyring_terms", engine.TERM_COLUMNS),
    "token": ("tokens", engine.TOKEN_COLUMNS),
    "wrappings": ("keyring_terms", ("wrappings",)),
}
#: Where a joined secret + version row splits: the secret's columns come first (``read_*``).
SECRET_WIDTH = len(engine.SECRET_COLUMNS)

_PARAM = re.compile(r"(?<![:\w]):([a-z_]+)")
_COLUMNS = re.compile(r"\{(?:([a-z]+)\.)?([a-z_]+)\}")


def _columns(dialect: Dialect, alias: str | None, name: str) -> str:
    table, columns = COLUMNS[name]
    prefix = f"{alias}." if alias else ""
    return ", ".join(dialect.json_text(prefix + c) if rows.kind(table, c) == "json" else prefix + c
                     for c in columns)


def render(query: Query, dialect: Dialect, *, lock: bool = False) -> str:
    """The query's text for ``dialect``; ``ValueError`` for a parameter ``params`` does not name."""
    def param(m: re.Match[str]) -> str:
        if m[1] not in query.params:
            raise ValueError(f"query parameter :{m[1]} is not in params {query.params}")
        return dialect.placeholder(query.params.index(m[1]) + 1)

    text = _COLUMNS.sub(lambda m: _columns(dialect, m[1], m[2]), query.text)
    text = _PARAM.sub(param, text)
    return text + dialect.row_lock if lock else text


# -- the reads ------------------------------------------------------------------------------------
_JOIN = "FROM secrets s JOIN secret_versions v ON v.path = s.path AND v.version = "

#: The meta key whose presence means the store is initialised (claimed once, ``engine.initialize``).
INITIALIZED_AT = "initialized_at"
GET_META = Query("SELECT value FROM meta WHERE key = :key", ("key",))
IS_INITIALIZED = Query(f"SELECT 1 FROM meta WHERE key = '{INITIALIZED_AT}'")  # noqa: S608 - a constant
#: A row back (RETURNING) if and only if the value was written: always, or only where the key was absent.
PUT_META = Query("INSERT INTO meta (key, value) VALUES (:key, :value) "
                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value RETURNING 1", ("key", "value"))
PUT_META_IF_ABSENT = Query("INSERT INTO meta (key, value) VALUES (:key, :value) "
                           "ON CONFLICT (key) DO NOTHING RETURNING 1", ("key", "value"))
KEYRING_TERMS = Query("SELECT {term} FROM keyring_terms ORDER BY term")
GET_SECRET = Query("SELECT {secret} FROM secrets WHERE path = :path", ("path",))
GET_VERSION = Query("SELECT {v.version} FROM secret_versions v WHERE v.path = :path AND v.version = :version",
                    ("path", "version"))
GET_CURRENT_VERSION = Query(f"SELECT {{v.version}} {_JOIN}s.current_version WHERE s.path = :path", ("path",))
#: One indexed lookup per read: the label's column (``engine.label_column``) names the version.
READ_BY_LABEL: Mapping[str, Query] = {
    column: Query(f"SELECT {{s.secret}}, {{v.version}} {_JOIN}s.{column} WHERE s.path = :path", ("path",))
    for column in engine.LABEL_COLUMNS.values()
}
READ_BY_NUMBER = Query("SELECT {s.secret}, {v.version} " + _JOIN + ":version WHERE s.path = :path",
                       ("path", "version"))
LIST_VERSIONS = Query("SELECT {version_info} FROM secret_versions WHERE path = :path ORDER BY version", ("path",))
#: Paths under a prefix: the range ``codec.prefix_bounds`` gives (a primary-key range scan, bytewise
#: in both backends: SQLite's BINARY collation, PostgreSQL's COLLATE "C") plus the prefix itself,
#: strictly after the cursor, in path order.
#: One range of the primary key, [prefix, high), so the index gives the order and LIMIT stops the
#: scan: paths in it below ``low`` other than the prefix itself (siblings such as 'a/b-c' of 'a/b')
#: are filtered out. (An OR of the two ranges made SQLite sort the whole prefix for every page.)
_UNDER_PREFIX = ("{p}path >= :prefix AND {p}path < :high AND {p}path > :after "
                 "AND ({p}path = :prefix OR {p}path >= :low) ORDER BY {p}path LIMIT :limit")
_PAGE_PARAMS = ("low", "high", "prefix", "after", "limit")
LIST_SECRETS = Query("SELECT {secret} FROM secrets WHERE " + _UNDER_PREFIX.replace("{p}", ""),  # noqa: S608 - constants
                     _PAGE_PARAMS)
#: A listing page (as ``LIST_SECRETS``) with each secret's current version beside it, in one read
#: (``GET /v1/secrets:read``); a secret whose current version row is missing comes with NULLs.
_READ_CURRENT_PAGE = ("SELECT {s.secret}, {v.version} FROM secrets s LEFT JOIN secret_versions v "
                      "ON v.path = s.path AND v.version = s.current_version WHERE ")
READ_CURRENT_PAGE = Query(_READ_CURRENT_PAGE + _UNDER_PREFIX.replace("{p}", "s."), _PAGE_PARAMS)
COUNT_SECRETS = Query("SELECT count(*) FROM secrets")
#: The rotation scheduler's candidates: every secret with a pending version (whenever it is due),
#: and every one due by ``now``; those without a due time first, then by due time, then by path.
#: Two disjoint arms, so each can use its partial index (secrets_rotation_pending, _due) and
#: UNION ALL needs no de-duplication; NULLS FIRST spelled out, as PostgreSQL sorts NULL last.
ROTATION_CANDIDATES = Query(
    "SELECT {secret} FROM secrets WHERE pending_version IS NOT NULL "
    "UNION ALL SELECT {secret} FROM secrets "
    "WHERE rotation_due IS NOT NULL AND rotation_due <= :now AND pending_version IS NULL "
    "ORDER BY rotation_due NULLS FIRST, path LIMIT :limit",
    ("now", "limit"),
)
GET_TOKEN = Query("SELECT {token} FROM tokens WHERE token_id = :token_id", ("token_id",))
LIST_TOKENS = Query("SELECT {token} FROM tokens ORDER BY created_at, token_id")
#: A page of ``GET /v1/auth/tokens``: by token id after the cursor; tokens expired by
#: ``:shown_after`` are left out (the caller passes the epoch to include them: one shape, no flag).
LIST_TOKENS_PAGE = Query("SELECT {token} FROM tokens WHERE token_id > :after "
                         "AND (expires_at IS NULL OR expires_at > :shown_after) ORDER BY token_id LIMIT :limit",
                         ("after", "shown_after", "limit"))
#: The tokens a guarded revocation weighs (``engine.revoke_token``), in one order on every backend:
#: only live ones (unrevoked, unexpired at :now: an expired root token is no usable root), plus the
#: target itself whatever its expiry, so the rows read never grow with expired tokens.
ACTIVE_TOKENS = Query("SELECT {token} FROM tokens WHERE revoked_at IS NULL "
                      "AND (expires_at IS NULL OR expires_at > :now OR token_id = :token_id) ORDER BY token_id",
                      ("token_id", "now"))
#: A batch the purge may delete (``engine.purge_tokens``): revoked or expired at or before :cutoff.
#: Each arm uses its partial index (tokens_revoked_at, tokens_expires_at; migration 0004).
PURGEABLE_TOKENS = Query("SELECT {token} FROM tokens WHERE token_id IN ("
                         "SELECT token_id FROM tokens WHERE revoked_at IS NOT NULL AND revoked_at <= :cutoff "
                         "UNION SELECT token_id FROM tokens WHERE expires_at IS NOT NULL AND expires_at <= :cutoff"
                         ") ORDER BY token_id LIMIT :limit", ("cutoff", "limit"))
TERM_WRAPPINGS = Query("SELECT {wrappings} FROM keyring_terms WHERE term = :term", ("term",))
#: The sealing term's count grows in the write's own transaction; no row back: the term does not exist.
COUNT_ENCRYPTION = Query("UPDATE keyring_terms SET encryptions = encryptions + :n WHERE term = :term "
                         "RETURNING encryptions", ("term", "n"))
#: Only an unrevoked token is revoked, so its first revocation time stays; a row back iff this one did.
REVOKE_TOKEN = Query("UPDATE tokens SET revoked_at = :now WHERE token_id = :token_id AND revoked_at IS NULL "
                     "RETURNING 1", ("token_id", "now"))
#: Only an active token renews (not revoked, not expired at :now); a row back iff it did.
RENEW_TOKEN = Query("UPDATE tokens SET expires_at = :expires_at WHERE token_id = :token_id AND revoked_at IS NULL "
                    "AND expires_at IS NOT NULL AND expires_at > :now RETURNING 1", ("token_id", "expires_at", "now"))
PRUNABLE_VERSIONS = Query("SELECT version, grace_until FROM secret_versions WHERE path = :path AND version <= :upto",
                          ("path", "upto"))


@dataclass(frozen=True, slots=True)
class Statements:
    """Every query above as one dialect's text; a dialect renders it once, at import."""

    get_meta: str
    is_initialized: str
    put_meta: str
    put_meta_if_absent: str
    keyring_terms: str
    get_secret: str
    get_version: str
    get_current_version: str
    read_by_label: Mapping[str, str]
    read_by_number: str
    read_current_page: str
    list_versions: str
    list_secrets: str
    count_secrets: str
    rotation_candidates: str
    get_token: str
    list_tokens: str
    list_tokens_page: str
    # The engine's row operations that read or carry a rule (inside a write transaction).
    lock_secret: str
    lock_active_tokens: str
    lock_purgeable_tokens: str
    lock_term_wrappings: str
    prunable_versions: str
    count_encryption: str
    revoke_token: str
    renew_token: str

    @classmethod
    def render(cls, dialect: Dialect) -> Statements:
        def r(query: Query) -> str:
            return render(query, dialect)

        def locked(query: Query) -> str:
            return render(query, dialect, lock=True)

        return cls(
            get_meta=r(GET_META), is_initialized=r(IS_INITIALIZED), put_meta=r(PUT_META),
            put_meta_if_absent=r(PUT_META_IF_ABSENT), keyring_terms=r(KEYRING_TERMS),
            get_secret=r(GET_SECRET), get_version=r(GET_VERSION), get_current_version=r(GET_CURRENT_VERSION),
            read_by_label={column: r(q) for column, q in READ_BY_LABEL.items()},
            read_by_number=r(READ_BY_NUMBER), read_current_page=r(READ_CURRENT_PAGE),
            list_versions=r(LIST_VERSIONS), list_secrets=r(LIST_SECRETS),
            count_secrets=r(COUNT_SECRETS), rotation_candidates=r(ROTATION_CANDIDATES), get_token=r(GET_TOKEN),
            list_tokens=r(LIST_TOKENS), list_tokens_page=r(LIST_TOKENS_PAGE),
            lock_purgeable_tokens=locked(PURGEABLE_TOKENS), lock_secret=locked(GET_SECRET),
            lock_active_tokens=locked(ACTIVE_TOKENS),
            lock_term_wrappings=locked(TERM_WRAPPINGS), prunable_versions=r(PRUNABLE_VERSIONS),
            count_encryption=r(COUNT_ENCRYPTION), revoke_token=r(REVOKE_TOKEN), renew_token=r(RENEW_TOKEN),
        )
