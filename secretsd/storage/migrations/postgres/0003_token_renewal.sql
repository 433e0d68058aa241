-- Tokens that renew (POST /v1/auth/tokens/renew-self): the TTL a renewal extends by, and the end no
-- renewal passes. Both NULL on tokens made before: such a token does not renew (its expiry stays).
ALTER TABLE tokens ADD COLUMN ttl_seconds integer;
ALTER TABLE tokens ADD COLUMN max_expires_at timestamptz
