-- The newest version of one ad (any state). Used to resolve the ad of every tracking event
-- (cached in the service). Parameter 1: the ad id as a string.
-- sample-params: '11111111-1111-1111-1111-111111111111'
SELECT
    id,
    argMax(name, version)       AS latest_name,
    argMax(video_url, version)  AS latest_video_url,
    argMax(target_url, version) AS latest_target_url,
    argMax(active, version)     AS latest_active,
    min(created_at)             AS first_created_at,
    argMax(updated_at, version) AS last_updated_at,
    max(version)                AS latest_version
FROM ads
WHERE id = toUUID(?)
GROUP BY id
