-- The first schema. Times are ISO-8601 UTC text; blobs are ciphertext or hashes only.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE keyring_terms (
    term        INTEGER PRIMARY KEY,
    wrappings   TEXT    NOT NULL,   -- JSON array of WrappedKey records
    created_at  TEXT    NOT NULL,
    encryptions INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE secrets (
    path            TEXT PRIMARY KEY,
    current_version INTEGER NOT NULL,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    metadata        TEXT    NOT NULL DEFAULT '{}'
);

CREATE TABLE secret_versions (
    path       TEXT    NOT NULL REFERENCES secrets(path),
    version    INTEGER NOT NULL,
    term       INTEGER NOT NULL REFERENCES keyring_terms(term),
    nonce      BLOB    NOT NULL,
    ciphertext BLOB    NOT NULL,
    created_at TEXT    NOT NULL,
    created_by TEXT    NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('active', 'deleted', 'destroyed')),
    deleted_at TEXT,
    PRIMARY KEY (path, version)
);

CREATE TABLE tokens (
    token_id    TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    client      TEXT NOT NULL,
    policies    TEXT NOT NULL,      -- JSON array of policy names
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT
);
