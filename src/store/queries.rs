//! The SQL the service runs, kept as files under `clickhouse/queries/` so analysts can read and run
//! them as they are. `?` marks a bound parameter (bound by the `clickhouse` crate, quoted).

/// Newest version of one ad; `?` = the id.
pub const AD_BY_ID: &str = include_str!("../../clickhouse/queries/ad_by_id.sql");
/// Every active ad.
pub const ADS_ACTIVE: &str = include_str!("../../clickhouse/queries/ads_active.sql");
/// Number of distinct ads.
pub const ADS_COUNT: &str = include_str!("../../clickhouse/queries/ads_count.sql");

/// One ad's per-hour series, totals, filtered traffic and errors by code over a window;
/// parameters in the file's header.
pub const AD_SERIES: &str = include_str!("../../clickhouse/queries/ad_series.sql");
/// Every ad's totals over a window, busiest first, paged; parameters in the file's header.
pub const ADS_TOTALS: &str = include_str!("../../clickhouse/queries/ads_totals.sql");
/// The first UTC day with any event.
pub const FIRST_EVENT_DAY: &str = include_str!("../../clickhouse/queries/first_event_day.sql");

/// The columns of `events` and their types (checked before INSERTs).
pub const EVENTS_COLUMNS: &str = include_str!("../../clickhouse/queries/events_columns.sql");
/// The months (YYYYMM partitions) of raw events that hold data.
pub const EVENTS_PARTITIONS: &str = include_str!("../../clickhouse/queries/events_partitions.sql");
/// Drops one month of raw events; `?` = the month as YYYYMM.
pub const DROP_EVENTS_PARTITION: &str = include_str!("../../clickhouse/queries/drop_events_partition.sql");

/// Stored event ids of batches; `?` = first and last event_time (unix seconds), the batch ids.
pub const BATCH_EVENT_IDS: &str = include_str!("../../clickhouse/queries/batch_event_ids.sql");
/// Ends possibly running INSERTs; `?` = their query ids.
pub const KILL_BATCH_INSERT: &str = include_str!("../../clickhouse/queries/kill_batch_insert.sql");
/// Ends a replayer's possibly running INSERTs; `?` = a LIKE pattern of their query ids.
pub const KILL_REPLAY_INSERTS: &str = include_str!("../../clickhouse/queries/kill_replay_inserts.sql");
/// How many of these INSERTs still run; `?` = their query ids.
pub const RUNNING_BATCH_INSERTS: &str = include_str!("../../clickhouse/queries/running_batch_inserts.sql");
/// How many queries (a replayer's INSERTs, earlier migration statements) still run; `?` = a LIKE
/// pattern of their query ids.
pub const RUNNING_QUERIES: &str = include_str!("../../clickhouse/queries/running_queries.sql");

/// Every query file with its name, for the test that the list is complete.
pub const ALL: &[(&str, &str)] = &[
    ("ad_by_id.sql", AD_BY_ID),
    ("ad_series.sql", AD_SERIES),
    ("ads_totals.sql", ADS_TOTALS),
    ("first_event_day.sql", FIRST_EVENT_DAY),
    ("ads_active.sql", ADS_ACTIVE),
    ("ads_count.sql", ADS_COUNT),
    ("batch_event_ids.sql", BATCH_EVENT_IDS),
    ("drop_events_partition.sql", DROP_EVENTS_PARTITION),
    ("events_columns.sql", EVENTS_COLUMNS),
    ("events_partitions.sql", EVENTS_PARTITIONS),
    ("kill_batch_insert.sql", KILL_BATCH_INSERT),
    ("kill_replay_inserts.sql", KILL_REPLAY_INSERTS),
    ("running_batch_inserts.sql", RUNNING_BATCH_INSERTS),
    ("running_queries.sql", RUNNING_QUERIES),
];

#[cfg(test)]
mod tests {
    #[test]
    fn every_query_file_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clickhouse/queries");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let mut listed: Vec<&str> = super::ALL.iter().map(|(n, _)| *n).collect();
        listed.sort();
        assert_eq!(files, listed);
    }
}
