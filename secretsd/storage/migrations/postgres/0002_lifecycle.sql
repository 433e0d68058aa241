-- Secret lifecycle (docs/rotation.md): staging labels, rotation policy and schedule, per-version
-- expiry and grace. latest_version is the highest version number ever allocated for the path
-- (a discarded pending version keeps its number), so a new version is always latest_version + 1.
ALTER TABLE secrets ADD COLUMN latest_version integer NOT NULL DEFAULT 0;
UPDATE secrets SET latest_version = COALESCE(
    (SELECT MAX(v.version) FROM secret_versions v WHERE v.path = secrets.path), current_version);
ALTER TABLE secrets ADD COLUMN previous_version integer;
ALTER TABLE secrets ADD COLUMN pending_version integer;
ALTER TABLE secrets ADD COLUMN rotation jsonb;                          -- RotationPolicy, NULL: none
ALTER TABLE secrets ADD COLUMN rotation_due timestamptz;                -- next scheduled attempt
ALTER TABLE secrets ADD COLUMN rotation_status jsonb NOT NULL DEFAULT '{}';
ALTER TABLE secret_versions ADD COLUMN expires_at timestamptz;          -- not served from then on
ALTER TABLE secret_versions ADD COLUMN grace_until timestamptz;         -- superseded: readers until then
CREATE INDEX secrets_rotation_due ON secrets (rotation_due) WHERE rotation_due IS NOT NULL;
CREATE INDEX secrets_rotation_pending ON secrets (path) WHERE pending_version IS NOT NULL
