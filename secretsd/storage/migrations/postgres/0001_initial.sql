-- The first PostgreSQL schema. Times are timestamptz, blobs bytea (ciphertext or hashes only),
-- structured fields jsonb (the same JSON as SQLite's text columns, via secretsd.storage.codec).
--
-- Paths and token ids are COLLATE "C": list_secrets does a range scan on byte order ('/' sorts just
-- before '0', see codec.prefix_bounds), which a linguistic collation (en_US, ICU) would break.
-- Portability: YugabyteDB (PostgreSQL's own parser) should accept this as is. CockroachDB compares
-- STRING bytewise anyway; if its version refuses COLLATE "C", dropping the clause keeps the meaning.
-- Its INT is 64-bit and it has BYTES (bytea), JSONB and TIMESTAMPTZ.
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE keyring_terms (
    term        integer     PRIMARY KEY,
    wrappings   jsonb       NOT NULL,   -- JSON array of WrappedKey records
    created_at  timestamptz NOT NULL,
    encryptions bigint      NOT NULL DEFAULT 0
);

CREATE TABLE secrets (
    path            text COLLATE "C" PRIMARY KEY,
    current_version integer     NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'
);

CREATE TABLE secret_versions (
    path       text COLLATE "C" NOT NULL REFERENCES secrets(path),
    version    integer     NOT NULL,
    term       integer     NOT NULL REFERENCES keyring_terms(term),
    nonce      bytea       NOT NULL,
    ciphertext bytea       NOT NULL,
    created_at timestamptz NOT NULL,
    created_by text        NOT NULL,
    state      text        NOT NULL CHECK (state IN ('active', 'deleted', 'destroyed')),
    deleted_at timestamptz,
    PRIMARY KEY (path, version)
);

CREATE TABLE tokens (
    token_id    text COLLATE "C" PRIMARY KEY,
    secret_hash bytea       NOT NULL,
    client      text        NOT NULL,
    policies    jsonb       NOT NULL,   -- JSON array of policy names
    created_at  timestamptz NOT NULL,
    created_by  text        NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz
);
