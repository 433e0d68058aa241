-- The token purge ([tokens] purge_after_days) finds revoked and expired tokens by time: two partial
-- indexes, so a sweep reads only what it deletes, however many live tokens there are.
CREATE INDEX IF NOT EXISTS tokens_revoked_at ON tokens (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS tokens_expires_at ON tokens (expires_at) WHERE expires_at IS NOT NULL
