-- Server-side insert deduplication, on ClickHouse 22.8 and later (the service runs this at
-- start-up there; 18.16 has no such settings and relies on the token check alone).
--
-- Every INSERT into events then carries:
--   insert_deduplicate = 1,
--   insert_deduplication_token = <a hash of the event ids it sends, in order>,
--   deduplicate_blocks_in_dependent_materialized_views = 1
-- so that an INSERT repeated with exactly the same rows (a retry whose first attempt landed
-- after all) is stored once, in events and in every table its views write. A re-send of only the
-- missing rows has other ids, so another token: it is stored. The window must be set on the
-- views' tables too, or they would count the repeat that events refused.
-- The token check of src/ingest/insert.rs still runs on every version; this is a second guard.
ALTER TABLE events MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE ad_stats_minutely MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE ad_stats_hourly MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE ad_stats_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE ad_errors_minutely MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE ad_filtered_minutely MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE ad_counts MODIFY SETTING non_replicated_deduplication_window = 10000;
