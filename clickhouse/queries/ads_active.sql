-- Every active ad, newest version of each, oldest first: the answer of GET /ads.
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
GROUP BY id
HAVING latest_active = 1
ORDER BY first_created_at, id
