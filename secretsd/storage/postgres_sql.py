"""PostgreSQL text for the storage engine: the reads rendered (``queries``) and the row operations.

``PostgresRowOps`` is the engine's row-operation interface (``secretsd.storage.engine.RowOps``,
as coroutines) on one asyncpg connection inside a transaction opened by ``PostgresStorage``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from secretsd.storage import codec, engine, queries, rows
from secretsd.storage.base import KeyringTerm, SecretRecord, TokenRecord, VersionRecord

#: The reads (secretsd.storage.queries), rendered once for PostgreSQL.
SQL = queries.Statements.render(queries.POSTGRES)


def as_is(value: Any) -> Any:
    """asyncpg already returns aware datetimes for timestamptz columns."""
    return value


def assignments(table: str, values: Mapping[str, Any], first: int) -> list[str]:
    """``column = $n`` (cast to jsonb for JSON columns, which the engine passes as text)."""
    kinds = rows.COLUMN_KINDS[table][1]
    out = []
    for i, column in enumerate(values, start=first):
        if column not in kinds:  # names come from the engine, never from a caller; refuse all the same
            raise ValueError(f"unknown column {table}.{column}")
        out.append(f"{column} = ${i}::jsonb" if kinds[column] == "json" else f"{column} = ${i}")
    return out


class PostgresRowOps:
    """The engine's row operations (``engine.RowOps``, as coroutines) on one connection in a transaction.

    The ``lock_*`` reads take row locks (``FOR UPDATE``) held until commit: that is how writers on
    different replicas take turns on a secret, a keyring term or the set of active tokens.
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def lock_secret(self, path: str) -> SecretRecord | None:
        row = await self.conn.fetchrow(SQL.lock_secret, path)
        return engine.secret_from_row(row, as_is) if row is not None else None

    async def insert_secret(self, values: Mapping[str, Any]) -> None:
        marks = [a.split(" = ", 1)[1] for a in assignments("secrets", values, 1)]
        await self.conn.execute(f"INSERT INTO secrets ({', '.join(values)}) "  # noqa: S608 - checked columns
                                f"VALUES ({', '.join(marks)})", *values.values())

    async def update_secret(self, path: str, values: Mapping[str, Any]) -> None:
        sets = ", ".join(assignments("secrets", values, 2))
        await self.conn.execute(f"UPDATE secrets SET {sets} WHERE path = $1", path, *values.values())  # noqa: S608

    async def lock_versions(self, path: str, versions: Sequence[int]) -> list[tuple[int, str, datetime | None]]:
        found = await self.conn.fetch(
            "SELECT version, state, deleted_at FROM secret_versions "
            "WHERE path = $1 AND version = ANY($2::integer[]) FOR UPDATE",
            path, list(versions),
        )
        return [(r[0], r[1], r[2]) for r in found]

    async def insert_version(self, record: VersionRecord) -> None:
        await self.conn.execute(
            "INSERT INTO secret_versions (path, version, term, nonce, ciphertext, created_at, "
            "created_by, state, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            record.path, record.version, record.term, record.nonce, record.ciphertext,
            record.created_at, record.created_by, record.state.value, record.expires_at,
        )

    async def update_version(self, path: str, version: int, values: Mapping[str, Any]) -> None:
        sets = ", ".join(assignments("secret_versions", values, 3))
        await self.conn.execute(f"UPDATE secret_versions SET {sets} WHERE path = $1 AND version = $2",  # noqa: S608
                                path, version, *values.values())

    async def prunable_versions(self, path: str, upto: int) -> list[tuple[int, datetime | None]]:
        found = await self.conn.fetch(SQL.prunable_versions, path, upto)
        return [(r[0], r[1]) for r in found]

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        await self.conn.execute("DELETE FROM secret_versions WHERE path = $1 AND version = ANY($2::integer[])",
                                path, list(versions))

    async def count_encryption(self, term: int, n: int) -> int | None:
        count = await self.conn.fetchval(SQL.count_encryption, term, n)
        return None if count is None else int(count)

    async def claim_initialized(self, at: datetime) -> bool:
        # ON CONFLICT: of two replicas initialising at once, the second waits on the key, then
        # sees it taken, instead of failing with a bare unique violation.
        at_text = at.astimezone(UTC).isoformat()
        claimed = await self.conn.fetchval(SQL.put_meta_if_absent, queries.INITIALIZED_AT, at_text)
        return claimed is not None

    async def insert_meta(self, items: Sequence[tuple[str, str]]) -> None:
        await self.conn.executemany("INSERT INTO meta (key, value) VALUES ($1, $2)", items)

    async def insert_term(self, term: KeyringTerm) -> None:
        await self.conn.execute(
            "INSERT INTO keyring_terms (term, wrappings, created_at, encryptions) VALUES ($1, $2::jsonb, $3, $4)",
            term.term, codec.wrappings_to_json(term.wrappings), term.created_at, term.encryptions,
        )

    async def lock_term_wrappings(self, term: int) -> str | None:
        # The row lock orders concurrent re-wraps from several replicas: the second sees the
        # first's wrappings, not the ones it expected, and fails.
        found = await self.conn.fetchval(SQL.lock_term_wrappings, term)
        return None if found is None else str(found)

    async def update_term_wrappings(self, term: int, wrappings_json: str) -> None:
        await self.conn.execute("UPDATE keyring_terms SET wrappings = $2::jsonb WHERE term = $1", term, wrappings_json)

    async def insert_token(self, token: TokenRecord) -> None:
        await self.conn.execute(
            "INSERT INTO tokens (token_id, secret_hash, client, policies, created_at, created_by, "
            "expires_at, revoked_at, ttl_seconds, max_expires_at) "
            "VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10)",
            token.token_id, token.secret_hash, token.client, codec.policies_to_json(token.policies),
            token.created_at, token.created_by, token.expires_at, token.revoked_at,
            token.ttl_seconds, token.max_expires_at,
        )

    async def lock_active_tokens(self, token_id: str, now: datetime) -> list[TokenRecord]:
        # FOR UPDATE locks every live token row until COMMIT: a concurrent guarded revocation
        # on any replica waits, then re-reads the rows (READ COMMITTED drops the one revoked
        # meanwhile) and judges what is really left.
        found = await self.conn.fetch(SQL.lock_active_tokens, token_id, now)
        return [engine.token_from_row(r, as_is) for r in found]

    async def lock_purgeable_tokens(self, cutoff: datetime, limit: int) -> list[TokenRecord]:
        found = await self.conn.fetch(SQL.lock_purgeable_tokens, cutoff, limit)
        return [engine.token_from_row(r, as_is) for r in found]

    async def delete_tokens(self, token_ids: Sequence[str]) -> None:
        await self.conn.execute("DELETE FROM tokens WHERE token_id = ANY($1::text[])", list(token_ids))

    async def revoke_token(self, token_id: str, now: datetime) -> bool:
        hit = await self.conn.fetchval(SQL.revoke_token, token_id, now)
        return hit is not None

    async def renew_token(self, token_id: str, expires_at: datetime, now: datetime) -> bool:
        hit = await self.conn.fetchval(SQL.renew_token, token_id, expires_at, now)
        return hit is not None

    async def notify(self, channel: str, payload: str) -> None:
        # Delivered to listeners when (and only if) the transaction commits.
        # portability: CockroachDB has no LISTEN/NOTIFY; see docs/ha.md.
        await self.conn.execute("SELECT pg_notify($1, $2)", channel, payload)

    # A batch item's own savepoint: a refused item is undone without aborting the transaction.
    async def savepoint(self) -> None:
        await self.conn.execute("SAVEPOINT batch_item")

    async def release_savepoint(self) -> None:
        await self.conn.execute("RELEASE SAVEPOINT batch_item")

    async def rollback_savepoint(self) -> None:
        await self.conn.execute("ROLLBACK TO SAVEPOINT batch_item")
        await self.conn.execute("RELEASE SAVEPOINT batch_item")
