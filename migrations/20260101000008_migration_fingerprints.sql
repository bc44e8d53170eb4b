-- Whitespace-insensitive fingerprints of the migrations as applied. sqlx keeps only an exact
-- checksum, which cannot tell a migration file whose whitespace was trimmed since it was applied
-- from an edited one; `apitree migrate` records these, and `apitree drift check` compares them.
CREATE TABLE apitree_migration_fingerprints (
    version     bigint PRIMARY KEY,
    fingerprint bytea NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
