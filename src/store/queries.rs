//! The SQL the service runs, kept as files under `clickhouse/queries/` so analysts can read and run
//! them as they are. `?` marks a bound parameter (bound by the `clickhouse` crate, quoted).

/// Newest version of one ad; `?` = the id.
pub const AD_BY_ID: &str = include_str!("../../clickhouse/queries/ad_by_id.sql");
/// Every active ad.
pub const ADS_ACTIVE: &str = include_str!("../../clickhouse/queries/ads_active.sql");
/// Number of distinct ads.
pub const ADS_COUNT: &str = include_str!("../../clickhouse/queries/ads_count.sql");

/// Rows of one batch that are stored; `?` = first and last event_time (unix seconds), batch id.
pub const BATCH_ROWS: &str = include_str!("../../clickhouse/queries/batch_rows.sql");

/// Every query file with its name, for the test that the list is complete.
pub const ALL: &[(&str, &str)] = &[
    ("ad_by_id.sql", AD_BY_ID),
    ("ads_active.sql", ADS_ACTIVE),
    ("ads_count.sql", ADS_COUNT),
    ("batch_rows.sql", BATCH_ROWS),
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
