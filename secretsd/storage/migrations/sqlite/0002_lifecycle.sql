-- Secret lifecycle (docs/rotation.md): staging labels, rotation policy and schedule, per-version
-- expiry and grace. latest_version is the highest version number ever allocated for the path
-- (a discarded pending version keeps its number), so a new version is always latest_version + 1.
ALTER TABLE secrets ADD COLUMN latest_version INTEGER NOT NULL DEFAULT 0;
UPDATE secrets SET latest_version = COALESCE(
    (SELECT MAX(v.version) FROM secret_versions v WHERE v.path = secrets.path), current_version);
ALTER TABLE secrets ADD COLUMN previous_version INTEGER;
ALTER TABLE secrets ADD COLUMN pending_version INTEGER;
ALTER TABLE secrets ADD COLUMN rotation TEXT;                          -- JSON RotationPolicy, NULL: none
ALTER TABLE secrets ADD COLUMN rotation_due TEXT;                      -- next scheduled attempt, UTC
ALTER TABLE secrets ADD COLUMN rotation_status TEXT NOT NULL DEFAULT '{}';
ALTER TABLE secret_versions ADD COLUMN expires_at TEXT;                -- not served from then on
ALTER TABLE secret_versions ADD COLUMN grace_until TEXT;               -- superseded: readers until then
CREATE INDEX secrets_rotation_due ON secrets (rotation_due) WHERE rotation_due IS NOT NULL;
CREATE INDEX secrets_rotation_pending ON secrets (path) WHERE pending_version IS NOT NULL
