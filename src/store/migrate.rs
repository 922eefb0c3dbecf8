//! Ordered schema migrations from `clickhouse/migrations/`, recorded in `schema_migrations`.
//!
//! Each migration runs once; its statements are all `IF NOT EXISTS` / `IF EXISTS` (or an
//! `ADD COLUMN` whose "already exists" counts as done, since ClickHouse 18.16 has no
//! `ADD COLUMN IF NOT EXISTS`), so a migration interrupted halfway is safe to run again. A migration whose text changed
//! after it was applied stops start-up: schema history is append-only.
//!
//! One instance migrates at a time: instances starting together (a deployment's pods) would
//! otherwise run the same migration at once, and one re-creating the views could drop those
//! another had just created while that one already inserts. The lock is a table whose `CREATE`
//! only one of them wins (`CREATE TABLE` without `IF NOT EXISTS` is atomic in every ClickHouse);
//! the others wait, then find the migrations recorded. A lock left by an instance that died
//! while migrating is taken over once it is [`LOCK_STALE_AFTER`] old, by one instance only.
//!
//! A statement may outlast its caller: ClickHouse goes on with an `INSERT … SELECT` whose client
//! stopped waiting (a timeout, a killed process). A copy run again while the first still runs
//! would find its target empty and count everything twice, so every statement runs under a query
//! id starting with [`STATEMENT_ID_PREFIX`], and a run waits until no such statement of an
//! earlier one runs any more before it runs its own. A copy that stopped in the middle is
//! dropped and made again ([`Migration::copies_into`]).

use std::{hash::Hasher, time::Duration};

use clickhouse::Row;
use serde::Deserialize;
use siphasher::sip::SipHasher13;

use super::clickhouse::{ClickHouse, StoreError, error_code};

/// The lock table (see the module's comment).
const LOCK_TABLE: &str = "schema_migrations_lock";

/// Age (by the table's creation time, as ClickHouse records it) past which a lock is taken for
/// that of an instance that died while migrating. Most migrations take seconds (DDL); one that
/// copies existing aggregates (0008) can take minutes on a large database, so a lock is not
/// taken over while one of its database's migration statements runs.
pub const LOCK_STALE_AFTER: Duration = Duration::from_secs(300);

/// How often a waiting instance looks at the lock again.
const LOCK_POLL: Duration = Duration::from_millis(500);

/// The start of every migration statement's query id (see the module's comment).
pub const STATEMENT_ID_PREFIX: &str = "adbeacon-migration-";

/// How long a run waits for one statement: the copies of migration 0008 read every aggregate
/// the database holds, far longer than QUERY_TIMEOUT allows on a large one.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(3600);

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The number in its file name.
    pub version: u32,
    /// The file name.
    pub name: &'static str,
    /// The SQL text.
    pub sql: &'static str,
    /// Checksums of earlier texts of this file that a database may have recorded. A migration is
    /// revised in place only when the change matters to new databases alone (such as a table
    /// setting), never to what an existing database holds; see the file's header.
    pub superseded: &'static [u64],
    /// Why an insert by another running instance between its steps would be missing from the
    /// aggregates (it re-creates views, or copies existing aggregates into a new table before
    /// creating its views), if it would. [`apply_at_startup`] leaves such a migration of a
    /// database that holds events to an explicit `adbeacon migrate`.
    pub needs_quiet: Option<&'static str>,
    /// For a migration that copies existing data into a new table before creating the view that
    /// feeds it: that table and that view. A run that stopped in the middle of a copy left part
    /// of it behind, and each copy runs only into an empty grain, so a second run would skip it
    /// and leave the table short: while the view does not exist yet (it comes last), nothing
    /// but the copy wrote into the table, and a new run drops it and copies again.
    pub copies_into: Option<(&'static str, &'static str)>,
}

macro_rules! migration {
    ($version:expr, $name:literal) => {
        migration!($version, $name, [])
    };
    ($version:expr, $name:literal, needs_quiet = $why:literal) => {
        Migration { needs_quiet: Some($why), ..migration!($version, $name, []) }
    };
    ($version:expr, $name:literal, needs_quiet = $why:literal, copies_into = ($table:literal, $view:literal)) => {
        Migration { copies_into: Some(($table, $view)), ..migration!($version, $name, needs_quiet = $why) }
    };
    ($version:expr, $name:literal, [$($old:expr),*]) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../clickhouse/migrations/", $name)),
            superseded: &[$($old),*],
            needs_quiet: None,
            copies_into: None,
        }
    };
}

/// Every migration, in order. A test checks that this list matches the directory.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_ads.sql"),
    migration!(2, "0002_events.sql"),
    // Revised: index_granularity 128 (the first text used the default, 8192).
    migration!(3, "0003_ad_stats_hourly.sql", [13_758_912_732_950_552_151]),
    migration!(4, "0004_ad_stats_minutely.sql"),
    migration!(5, "0005_ad_stats_daily.sql"),
    migration!(6, "0006_ad_errors_minutely.sql"),
    migration!(7, "0007_traffic_quality.sql", needs_quiet = "it re-creates the aggregate views"),
    // Its header says that a copy interrupted in the middle leaves a grain short: the runner
    // now drops such a partial copy and copies again (`copies_into`).
    migration!(
        8,
        "0008_ad_counts.sql",
        needs_quiet = "it copies the aggregates into a new table before creating that table's views",
        copies_into = ("ad_counts", "ad_counts_mv")
    ),
];

const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS schema_migrations \
    (version UInt32, name String, checksum UInt64, applied_at DateTime('UTC')) \
    ENGINE = ReplacingMergeTree ORDER BY version";

impl Migration {
    /// The statements of the file: `--` comment lines dropped, split on `;`.
    /// Migration files must not put `;` inside string literals.
    pub fn statements(&self) -> Vec<String> {
        let text: String =
            self.sql.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        text.split(';').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
    }

    /// A stable checksum of the file's text.
    pub fn checksum(&self) -> u64 {
        let mut h = SipHasher13::new_with_keys(0, 0);
        h.write(self.sql.as_bytes());
        h.finish()
    }
}

#[derive(Debug, Row, Deserialize)]
struct Applied {
    version: u32,
    name: String,
    checksum: u64,
}

/// Applies every pending migration (`adbeacon migrate`); returns the versions it applied.
pub async fn apply(ch: &ClickHouse) -> Result<Vec<u32>, StoreError> {
    apply_through(ch, u32::MAX, false).await
}

/// Applies the pending migrations as `adbeacon serve` does at start-up: like [`apply`], except
/// that a migration that re-creates views is refused on a database that already holds events,
/// since other instances may be inserting (a rolling deploy) and their inserts between the
/// drop and the create would never reach the aggregates. A new database takes it at once.
pub async fn apply_at_startup(ch: &ClickHouse) -> Result<Vec<u32>, StoreError> {
    apply_through(ch, u32::MAX, true).await
}

/// Whether the ledger records migration `version` now.
async fn recorded(ch: &ClickHouse, version: u32) -> Result<bool, StoreError> {
    let n: Vec<u64> = ch
        .fetch_all(ch.client().query("SELECT count() FROM schema_migrations WHERE version = ?").bind(version))
        .await?;
    Ok(n.first().copied().unwrap_or(0) > 0)
}

/// A lock as `system.tables` shows it: its age in seconds, when it was made (unix seconds) and
/// its `CREATE` statement (which names its holder).
struct LockState {
    age: i64,
    made_at: i64,
    create: String,
}

/// The lock as `system.tables` shows it now; none when nobody holds it.
async fn lock_state(ch: &ClickHouse, table: &str) -> Result<Option<LockState>, StoreError> {
    let rows: Vec<(i64, i64, String)> = system_tables(ch, || {
        ch.client()
            .query(
                "SELECT toInt64(now()) - toInt64(metadata_modification_time), \
                 toInt64(metadata_modification_time), create_table_query \
                 FROM system.tables WHERE database = currentDatabase() AND name = ?",
            )
            .bind(table)
    })
    .await?;
    Ok(rows.into_iter().next().map(|(age, made_at, create)| LockState { age, made_at, create }))
}

/// Runs a query of `system.tables`, again when it fails because a table of the database was
/// dropped while it read them (ClickHouse 18.16 then answers code 60, "doesn't exist"): the lock
/// and the markers come and go while instances wait.
async fn system_tables<T>(
    ch: &ClickHouse,
    query: impl Fn() -> clickhouse::query::Query,
) -> Result<Vec<T>, StoreError>
where
    T: clickhouse::RowOwned + clickhouse::RowRead,
{
    let mut tries = 0;
    loop {
        match ch.fetch_all(query()).await {
            Err(StoreError::Rejected(t) | StoreError::Retryable(t))
                if error_code(&t) == Some(60) && tries < 20 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            done => return done,
        }
    }
}

/// The holder a lock's `CREATE` statement names (its column's default).
fn holder_of(create: &str) -> Option<&str> {
    let rest = &create[create.find("DEFAULT '")? + 9..];
    Some(&rest[..rest.find('\'')?])
}

/// Takes the migration lock, waiting while another instance holds it (see the module's comment);
/// returns this holder's id, which [`unlock`] checks.
async fn lock(ch: &ClickHouse) -> Result<String, StoreError> {
    let me = uuid::Uuid::new_v4().simple().to_string();
    let mut said = false;
    loop {
        let create = format!("CREATE TABLE {LOCK_TABLE} (holder String DEFAULT '{me}') ENGINE = Memory");
        match ch.execute(&create).await {
            Ok(()) => return Ok(me),
            Err(e) if exists_already(&e) => {}
            Err(e) => return Err(e),
        }
        let Some(held) = lock_state(ch, LOCK_TABLE).await? else { continue };
        // Old, but not stale while one of its migration statements runs (a long copy): its holder
        // is at work, and running the same migration beside it could copy twice.
        if held.age >= LOCK_STALE_AFTER.as_secs() as i64 && running_statements(ch).await? == 0 {
            // A marker that old belongs to an instance that took over a lock and then stopped
            // before removing it: without this, that lock would never be taken over again.
            drop_old_markers(ch).await?;
            if take_over(ch, &me, &held).await? {
                continue;
            }
        }
        if !std::mem::replace(&mut said, true) {
            tracing::info!("another instance is applying migrations; waiting for it");
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// Whether a `CREATE TABLE` failed because the table exists (code 57).
fn exists_already(e: &StoreError) -> bool {
    matches!(e, StoreError::Rejected(t) | StoreError::Retryable(t) if error_code(t) == Some(57))
}

/// The start of the names of the tables that mark a stale lock as taken over ([`take_over`]).
const TAKEN_OVER: &str = "schema_migrations_lock_taken_over_";

/// Removes `held`, a lock left by an instance that stopped while migrating, so that the next
/// `CREATE` of the lock can win; true when this instance removed it. Of several instances that
/// judged it stale at once, only the one whose `CREATE` of a marker table named after that lock
/// (its statement and the time it was made) wins removes it, and only if it still finds that
/// lock. The marker outlives the lock, so no instance that judged it stale later can remove a
/// lock taken since. (Moving the lock aside and putting back what was not the dead instance's
/// let a third instance create a lock while a second had the first's moved aside: two instances
/// migrated at once.)
async fn take_over(ch: &ClickHouse, me: &str, held: &LockState) -> Result<bool, StoreError> {
    let mut h = SipHasher13::new_with_keys(0, 0);
    h.write(held.create.as_bytes());
    h.write(&held.made_at.to_le_bytes());
    let marker = format!("{TAKEN_OVER}{:016x}", h.finish());
    match ch.execute(&format!("CREATE TABLE {marker} (by String DEFAULT '{me}') ENGINE = Memory")).await {
        Ok(()) => {}
        Err(e) if exists_already(&e) => return Ok(false),
        Err(e) => return Err(e),
    }
    // Still that lock? Its holder may have released it meanwhile (it was slow, not dead) and
    // another instance taken a fresh one, which is not this one's to drop.
    match lock_state(ch, LOCK_TABLE).await? {
        Some(now) if now.create == held.create && now.made_at == held.made_at => {}
        _ => return Ok(false),
    }
    tracing::warn!(
        age_s = held.age,
        holder = holder_of(&held.create).unwrap_or("(none named)"),
        "took over a migration lock left by an instance that stopped while migrating"
    );
    ch.execute(&format!("DROP TABLE IF EXISTS {LOCK_TABLE}")).await?;
    Ok(true)
}

/// Releases the lock if this holder still holds it (after [`LOCK_STALE_AFTER`] another instance
/// may have taken it over, and its lock is not this one's to drop), and drops old markers.
async fn unlock(ch: &ClickHouse, me: &str) -> Result<(), StoreError> {
    if let Some(held) = lock_state(ch, LOCK_TABLE).await?
        && holder_of(&held.create) == Some(me)
    {
        ch.execute(&format!("DROP TABLE IF EXISTS {LOCK_TABLE}")).await?;
    }
    drop_old_markers(ch).await
}

/// Drops the markers ([`take_over`]) made [`LOCK_STALE_AFTER`] ago or earlier: no instance
/// still acts on what it saw of the locks they name.
async fn drop_old_markers(ch: &ClickHouse) -> Result<(), StoreError> {
    let markers: Vec<String> = system_tables(ch, || {
        ch.client()
            .query(
                "SELECT name FROM system.tables WHERE database = currentDatabase() \
                 AND startsWith(name, ?) AND metadata_modification_time < now() - ?",
            )
            .bind(TAKEN_OVER)
            .bind(LOCK_STALE_AFTER.as_secs())
    })
    .await?;
    for marker in markers {
        ch.execute(&format!("DROP TABLE IF EXISTS {marker}")).await?;
    }
    Ok(())
}

/// Applies the pending migrations up to version `last`, refusing view re-creations on a
/// database with events when `at_startup` (see [`apply_at_startup`]). One instance at a time.
pub async fn apply_through(ch: &ClickHouse, last: u32, at_startup: bool) -> Result<Vec<u32>, StoreError> {
    let me = lock(ch).await?;
    let applied = apply_locked(ch, last, at_startup).await;
    // Released whatever happened (an error leaves nothing half-recorded: each migration is
    // recorded after its last statement). A release that fails leaves a lock that goes stale.
    if let Err(e) = unlock(ch, &me).await {
        tracing::warn!(error = %e, "cannot release the migration lock; other instances take it over once it is stale");
    }
    applied
}

async fn apply_locked(ch: &ClickHouse, last: u32, at_startup: bool) -> Result<Vec<u32>, StoreError> {
    ch.execute(CREATE_LEDGER).await?;
    let applied: Vec<Applied> = ch
        .fetch_all(ch.client().query(
            "SELECT version, argMax(name, applied_at), argMax(checksum, applied_at) \
             FROM schema_migrations GROUP BY version",
        ))
        .await?;
    let mut done = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version <= last) {
        if let Some(a) = applied.iter().find(|a| a.version == m.version) {
            if m.superseded.contains(&a.checksum) {
                tracing::info!(
                    version = m.version,
                    name = m.name,
                    "migration was applied in an earlier revision; its tables keep the settings they were created with"
                );
            } else if a.checksum != m.checksum() {
                return Err(StoreError::Rejected(format!(
                    "migration {} ({}) changed after it was applied as {}; add a new migration instead",
                    m.version, m.name, a.name
                )));
            }
            continue;
        }
        // Another instance starting at the same moment may have applied it since the ledger
        // was read: then it is done (and re-creating views now, while that instance may already
        // insert, would lose its inserts between the steps).
        if recorded(ch, m.version).await? {
            tracing::info!(
                version = m.version,
                name = m.name,
                "migration applied meanwhile by another instance"
            );
            continue;
        }
        if let Some(why) = m.needs_quiet.filter(|_| at_startup)
            && holds_events(ch).await?
        {
            return Err(StoreError::Rejected(format!(
                "migration {}: {why}, and this database already holds events: \
                 an insert by another running instance between its steps would be missing from analytics. \
                 Run `adbeacon migrate` once while no instance inserts (or accept that risk), then start again",
                m.name
            )));
        }
        wait_for_earlier_statements(ch).await?;
        if let Some((table, view)) = m.copies_into {
            drop_partial_copy(ch, m, table, view).await?;
        }
        for statement in m.statements() {
            run(ch, &statement).await.map_err(|e| match e {
                StoreError::Rejected(t) => StoreError::Rejected(format!("migration {}: {t}", m.name)),
                StoreError::Retryable(t) => StoreError::Retryable(format!("migration {}: {t}", m.name)),
            })?;
        }
        ch.execute(&format!(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) \
             SELECT {}, '{}', {}, now()",
            m.version,
            m.name,
            m.checksum()
        ))
        .await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        done.push(m.version);
    }
    Ok(done)
}

/// Drops `table` when it exists without `view`: an earlier run of `m` stopped during its copy
/// (see [`Migration::copies_into`]).
async fn drop_partial_copy(
    ch: &ClickHouse,
    m: &Migration,
    table: &str,
    view: &str,
) -> Result<(), StoreError> {
    let found: Vec<String> = system_tables(ch, || {
        ch.client()
            .query("SELECT name FROM system.tables WHERE database = currentDatabase() AND name IN (?, ?)")
            .bind(table)
            .bind(view)
    })
    .await?;
    if found.iter().any(|n| n == table) && !found.iter().any(|n| n == view) {
        tracing::warn!(
            migration = m.name,
            table,
            "an earlier run of this migration stopped before it finished copying; dropping its partial copy to copy again"
        );
        ch.execute(&format!("DROP TABLE IF EXISTS {table}")).await?;
    }
    Ok(())
}

/// Whether `events` or the hourly aggregates have any row (false while neither table exists):
/// the aggregates too, since they outlive the raw events that retention drops.
async fn holds_events(ch: &ClickHouse) -> Result<bool, StoreError> {
    let rows: Vec<u64> = ch
        .fetch_all(ch.client().query(
            "SELECT toUInt64(sum(rows)) FROM system.parts \
             WHERE active AND database = currentDatabase() AND table IN ('events', 'ad_stats_hourly')",
        ))
        .await?;
    Ok(rows.first().copied().unwrap_or(0) > 0)
}

/// Runs one statement of a migration; an `ADD COLUMN` of a column that exists is done already.
pub async fn run(ch: &ClickHouse, statement: &str) -> Result<(), StoreError> {
    let query_id = format!("{}{}", statement_prefix(ch).await?, uuid::Uuid::new_v4().simple());
    match ch.execute_long(statement, &query_id, STATEMENT_TIMEOUT).await {
        Err(StoreError::Rejected(text) | StoreError::Retryable(text))
            if adds_existing_column(statement, &text) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The start of the query ids of this database's migration statements: per database, so that a
/// run does not wait for the migrations of other databases on the same server (other
/// deployments; the tests, each with a database of its own).
async fn statement_prefix(ch: &ClickHouse) -> Result<String, StoreError> {
    let db: Vec<String> = ch.fetch_all(ch.client().query("SELECT currentDatabase()")).await?;
    Ok(format!("{STATEMENT_ID_PREFIX}{}-", db.into_iter().next().unwrap_or_default()))
}

/// How many of this database's migration statements run on the server.
async fn running_statements(ch: &ClickHouse) -> Result<u64, StoreError> {
    let pattern = super::clickhouse::starting_with(&statement_prefix(ch).await?);
    let running: Vec<u64> =
        ch.fetch_all(ch.client().query(super::queries::RUNNING_QUERIES).bind(&pattern)).await?;
    Ok(running.into_iter().next().unwrap_or(0))
}

/// Waits while a migration statement of an earlier run still runs on the server (its caller
/// stopped waiting for it, or died): running this run's statements beside it could copy the same
/// aggregates twice, and once it ends, this run finds what it did (a copy runs only into an empty
/// grain).
async fn wait_for_earlier_statements(ch: &ClickHouse) -> Result<(), StoreError> {
    let mut said = false;
    loop {
        let running = running_statements(ch).await?;
        if running == 0 {
            return Ok(());
        }
        if !std::mem::replace(&mut said, true) {
            tracing::warn!(
                running,
                "a migration statement of an earlier run still runs on ClickHouse; waiting for it to end"
            );
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// True when `statement` adds a column and the server said the column exists: a re-run of a
/// migration that got that far before.
fn adds_existing_column(statement: &str, error: &str) -> bool {
    let upper = statement.to_ascii_uppercase();
    upper.starts_with("ALTER TABLE") && upper.contains(" ADD COLUMN ") && error.contains("already exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_names_its_holder() {
        let create =
            "CREATE TABLE t_1.schema_migrations_lock (`holder` String DEFAULT 'abc123') ENGINE = Memory";
        assert_eq!(holder_of(create), Some("abc123"));
        assert_eq!(holder_of("CREATE TABLE x (taken_at DateTime) ENGINE = Memory"), None);
    }

    #[test]
    fn the_list_matches_the_directory_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clickhouse/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, listed, "add every new migration file to MIGRATIONS");
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn statements_are_split_without_comments() {
        let m = MIGRATIONS[2];
        let st = m.statements();
        assert_eq!(st.len(), 2);
        assert!(st[1].starts_with("CREATE MATERIALIZED VIEW IF NOT EXISTS"));
        assert!(st.iter().all(|s| !s.contains("--")));
    }
}
