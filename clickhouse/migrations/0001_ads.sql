-- The ad catalog. Every change writes a new row with a higher `version`;
-- ReplacingMergeTree keeps the newest row per id once parts merge, and readers
-- pick the newest with argMax(…, version) so they never depend on merge timing.
CREATE TABLE IF NOT EXISTS ads
(
    id         UUID,
    name       String,
    video_url  String,
    target_url String,
    active     UInt8,
    created_at DateTime('UTC'),
    updated_at DateTime('UTC'),
    version    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY id;
