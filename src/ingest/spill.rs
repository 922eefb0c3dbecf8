//! The Redis spill: batches ClickHouse could not take, one stream entry per batch, until a
//! replayer ([`super::replay`]) has them in ClickHouse.
//!
//! An entry carries the batch token, the rows in the log's compact encoding (65 bytes a row)
//! with a CRC-32C, how many INSERT attempts the batch had, and whether one of them may have
//! landed. Spilling and acknowledging are each one `MULTI` that also moves a counter of spilled
//! events, so the backlog in events is one `GET` away and never drifts from the stream.
//!
//! Redis must never evict a spilled batch: [`Spill::check`] refuses a Redis whose
//! `maxmemory-policy` is not `noeviction`, and the result is what `/readyz` reports.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use redis::{
    Value,
    streams::{StreamClaimReply, StreamId, StreamInfoConsumersReply, StreamRangeReply, StreamReadReply},
};
use uuid::Uuid;

use super::wal::{decode_rows, encode_rows};
use crate::store::{EventRow, PolicyError, Redis, RedisError};

/// The consumer group every replayer reads the spill with.
pub const GROUP: &str = "replayers";
/// Version of the entry layout, in field `v`.
const VERSION: &str = "1";
/// How long a policy check is trusted.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The keys of one deployment, all under `REDIS_KEY_PREFIX`.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The spill stream.
    pub spill: String,
    /// Events in the spill stream (a counter kept with it).
    pub spill_events: String,
    /// The dead-letter stream.
    pub dead_letters: String,
    /// The batch tokens of the entries in the spill stream (a set kept with it), so that a batch
    /// is never in the spill twice and a batch recovered from the log can tell it is there.
    pub spill_tokens: String,
}

impl Keys {
    /// Keys under `prefix` (such as `adbeacon:`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            spill: format!("{prefix}spill"),
            spill_events: format!("{prefix}spill:events"),
            dead_letters: format!("{prefix}dead-letters"),
            spill_tokens: format!("{prefix}spill:tokens"),
        }
    }
}

/// What Redis can do for the spill right now, as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisState {
    /// Answers and never evicts.
    Ok,
    /// Does not answer (the cause is logged).
    Unavailable,
    /// May evict keys: refused.
    Evicting(String),
}

impl RedisState {
    /// The `/readyz` word.
    pub fn name(&self) -> &'static str {
        match self {
            RedisState::Ok => "ok",
            RedisState::Unavailable => "unavailable",
            RedisState::Evicting(_) => "evicting",
        }
    }
}

/// Why a batch could not be spilled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpillError {
    /// Redis failed the command, or did not answer it: it may have been carried out.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// Redis is known not to answer (its last check failed): nothing was sent.
    #[error("Redis does not answer")]
    Unavailable,
    /// Redis may evict keys: nothing was sent.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl SpillError {
    /// Whether the command was sent, so that it may have been carried out though it failed.
    pub fn sent(&self) -> bool {
        matches!(self, SpillError::Redis(_))
    }
}

/// One spilled batch, read back.
#[derive(Debug)]
pub struct Spilled {
    /// The stream entry id.
    pub entry: String,
    /// The batch token (every row's `batch_id`).
    pub token: Uuid,
    /// The rows.
    pub rows: Vec<EventRow>,
    /// INSERT attempts before and since it was spilled.
    pub attempts: u32,
    /// Whether an INSERT of it may have landed: check before sending.
    pub uncertain: bool,
    /// Its size in the stream ([`fields_bytes`]).
    pub bytes: usize,
}

/// An entry that is not a readable batch (cut short, altered, from an unknown version).
#[derive(Debug)]
pub struct Corrupt {
    /// The stream entry id.
    pub entry: String,
    /// What is wrong.
    pub why: String,
    /// The events its `events` field claims (0 when unreadable), which the backlog counter
    /// counted when it was spilled.
    pub events: usize,
    /// Its fields as they are, for the dead letter.
    pub fields: Fields,
    /// Its size in the stream ([`fields_bytes`]).
    pub bytes: usize,
}

impl Corrupt {
    /// The batch token the entry names, when that field is readable: it leaves the spill's token
    /// set with the entry.
    pub fn token(&self) -> Option<Uuid> {
        let (_, value) = self.fields.iter().find(|(name, _)| name == "token")?;
        Uuid::try_parse_ascii(value).ok()
    }
}

/// A spill entry read back.
#[derive(Debug)]
pub enum Entry {
    /// A batch to replay.
    Batch(Spilled),
    /// Not readable: goes to the dead letters.
    Corrupt(Corrupt),
}

impl Entry {
    /// Rows it holds (none when damaged).
    pub fn rows(&self) -> usize {
        match self {
            Entry::Batch(b) => b.rows.len(),
            Entry::Corrupt(_) => 0,
        }
    }

    /// The stream entry id.
    pub fn id(&self) -> &str {
        match self {
            Entry::Batch(b) => &b.entry,
            Entry::Corrupt(c) => &c.entry,
        }
    }

    /// Its size in the stream ([`fields_bytes`]).
    pub fn bytes(&self) -> usize {
        match self {
            Entry::Batch(b) => b.bytes,
            Entry::Corrupt(c) => c.bytes,
        }
    }
}

/// A stream entry's fields, in `XADD` order.
pub type Fields = Vec<(String, Vec<u8>)>;

/// An entry's size as the metrics count it: its field names and values (Redis adds its own
/// overhead, which `adbeacon_spill_backlog_bytes` includes).
pub fn fields_bytes(fields: &Fields) -> usize {
    fields.iter().map(|(name, value)| name.len() + value.len()).sum()
}

/// One text field.
pub fn field(name: &str, value: impl ToString) -> (String, Vec<u8>) {
    (name.to_string(), value.to_string().into_bytes())
}

/// The fields of an entry holding `rows` under `token`.
pub fn batch_fields(token: Uuid, rows: &[EventRow], attempts: u32, uncertain: bool) -> Fields {
    let body = encode_rows(rows);
    vec![
        field("v", VERSION),
        field("token", token),
        field("events", rows.len()),
        field("attempts", attempts),
        field("uncertain", u8::from(uncertain)),
        field("crc", crc32c::crc32c(&body)),
        ("rows".to_string(), body),
    ]
}

/// The raw fields of a stream entry.
fn raw_fields(id: &StreamId) -> Fields {
    let mut fields: Fields = id
        .map
        .iter()
        .map(|(k, v)| {
            let bytes = match v {
                Value::BulkString(b) => b.clone(),
                Value::SimpleString(s) => s.clone().into_bytes(),
                other => format!("{other:?}").into_bytes(),
            };
            (k.clone(), bytes)
        })
        .collect();
    fields.sort();
    fields
}

/// Reads a batch back from its fields; Err says what is wrong.
pub(crate) fn parse_batch(
    fields: &HashMap<String, Vec<u8>>,
) -> Result<(Uuid, Vec<EventRow>, u32, bool), String> {
    let text = |name: &str| -> Result<&str, String> {
        let raw = fields.get(name).ok_or_else(|| format!("field {name} is missing"))?;
        std::str::from_utf8(raw).map_err(|_| format!("field {name} is not text"))
    };
    let version = text("v")?;
    if version != VERSION {
        return Err(format!("unknown layout version {version:?}"));
    }
    let token: Uuid = text("token")?.parse().map_err(|_| "field token is not a UUID".to_string())?;
    let events: usize = text("events")?.parse().map_err(|_| "field events is not a number".to_string())?;
    let attempts: u32 =
        text("attempts")?.parse().map_err(|_| "field attempts is not a number".to_string())?;
    let uncertain = text("uncertain")? == "1";
    let crc: u32 = text("crc")?.parse().map_err(|_| "field crc is not a number".to_string())?;
    let body = fields.get("rows").ok_or("field rows is missing")?;
    if crc32c::crc32c(body) != crc {
        return Err("the rows do not match their checksum".into());
    }
    let rows = decode_rows(body, token).ok_or("the rows cannot be decoded")?;
    if rows.len() != events {
        return Err(format!("{} rows where the entry says {events}", rows.len()));
    }
    Ok((token, rows, attempts, uncertain))
}

/// Reads one stream entry.
fn entry(id: &StreamId) -> Entry {
    let fields = raw_fields(id);
    let bytes = fields_bytes(&fields);
    let map: HashMap<String, Vec<u8>> = fields.iter().cloned().collect();
    match parse_batch(&map) {
        Ok((token, rows, attempts, uncertain)) => {
            Entry::Batch(Spilled { entry: id.id.clone(), token, rows, attempts, uncertain, bytes })
        }
        Err(why) => {
            let events = map
                .get("events")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Entry::Corrupt(Corrupt { entry: id.id.clone(), why, events, fields, bytes })
        }
    }
}

/// Reads entries back off the async workers: a 100,000-row entry is megabytes to convert, check
/// and decode, which would hold up the requests that share the worker.
async fn decode(
    reply: Value,
    ids: impl FnOnce(Value) -> redis::RedisResult<Vec<StreamId>> + Send + 'static,
) -> Result<Vec<Entry>, RedisError> {
    if matches!(reply, Value::Nil) {
        return Ok(Vec::new());
    }
    tokio::task::spawn_blocking(move || Ok(ids(reply)?.iter().map(entry).collect()))
        .await
        .expect("decoding spill entries does not panic")
}

/// Adds an `XADD key * fields…` to a pipeline.
pub(crate) fn xadd(pipe: &mut redis::Pipeline, key: &str, fields: &Fields) {
    let cmd = pipe.cmd("XADD").arg(key).arg("*");
    for (name, value) in fields {
        cmd.arg(name).arg(value);
    }
}

/// Appends an entry's field names and values to a command.
fn arg_fields(cmd: &mut redis::Cmd, fields: &Fields) {
    for (name, value) in fields {
        cmd.arg(name).arg(value);
    }
}

/// The scripts' shared Lua: `xadd(key, from, to)` adds an entry to stream `key` whose field names
/// and values are `ARGV[from..=to]`.
macro_rules! lua_xadd {
    () => {
        r"
local function xadd(key, from, to)
  local add = {'XADD', key, '*'}
  for i = from, to do add[#add + 1] = ARGV[i] end
  return redis.call(unpack(add))
end
"
    };
}

/// [`Spill::push`]: KEYS the stream, the events counter and the token set; ARGV the token, the
/// number of events, then the entry's field names and values. 1 when added, 0 when the token was
/// in the set (nothing done).
const PUSH_SCRIPT: &str = concat!(
    lua_xadd!(),
    r"
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 0 end
xadd(KEYS[1], 3, #ARGV)
redis.call('INCRBY', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"
);

/// [`Spill::move_dead_letter`]: KEYS the dead letters, the spill, its events counter and its
/// token set; ARGV the dead letter's id, its number of events, its batch token, then the spill
/// entry's field names and values. 1 when moved (the token joins the set, as a push's does), 0
/// when the dead letter was gone, 2 when the spill holds an entry of the same batch (nothing
/// done in either case). An empty spill holds no batch, whatever the set says (a stream an
/// operator deleted by hand leaves its tokens behind).
const MOVE_SCRIPT: &str = concat!(
    lua_xadd!(),
    r"
if redis.call('XLEN', KEYS[2]) > 0 and redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 1 then return 2 end
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
xadd(KEYS[2], 4, #ARGV)
redis.call('INCRBY', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
return 1
"
);

/// [`Spill::renew`]: KEYS[1] the stream; ARGV group, consumer, then the ids. 1 when all were
/// pending for the consumer (their idle time is now 0), else 0 (nothing changed).
const RENEW_SCRIPT: &str = r"
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p ~= 1 or p[1][2] ~= ARGV[2] then return 0 end
  claim[#claim + 1] = ARGV[i]
end
claim[#claim + 1] = 'JUSTID'
redis.call(unpack(claim))
return 1
";

/// [`Spill::ack`]: KEYS the stream, the events counter, the dead letters and the token set;
/// ARGV group, consumer, events, the number of ids, the ids, the number of tokens, the tokens,
/// then each dead letter as its number of arguments followed by its field names and values.
/// 1 when done; 2 when none of the ids is pending any more (acknowledged already); 0 (nothing
/// done) when one is another consumer's, or some but not all are pending: another replayer
/// claimed some and acknowledged them, counting their events and dead letters itself.
const ACK_SCRIPT: &str = concat!(
    lua_xadd!(),
    r"
local n = tonumber(ARGV[4])
local ids = {}
for i = 5, 4 + n do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 then
    if p[1][2] ~= ARGV[2] then return 0 end
    ids[#ids + 1] = ARGV[i]
  end
end
if #ids == 0 then return 2 end
if #ids < n then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
redis.call('DECRBY', KEYS[2], ARGV[3])
local t = tonumber(ARGV[5 + n])
if t > 0 then redis.call('SREM', KEYS[4], unpack(ARGV, 6 + n, 5 + n + t)) end
local i = 6 + n + t
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  xadd(KEYS[3], i + 1, i + count)
  i = i + count + 1
end
return 1
"
);

/// [`Spill::forget_idle_consumers`]: deletes consumer ARGV[2] of group ARGV[1] in stream
/// KEYS[1] if it holds no entry; its DELCONSUMER answer, or -1 when it holds one.
const FORGET_SCRIPT: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
";

/// What [`Spill::ack`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// The entries are acknowledged, their events counted out and their dead letters added.
    Done,
    /// None of them is pending any more: acknowledged already, by an earlier call whose answer
    /// was lost, or by a replayer that claimed them all (nothing done now).
    NonePending,
    /// Another replayer holds some of them (or held and acknowledged some): nothing done.
    Claimed,
}

/// What [`Spill::move_dead_letter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Moved to the spill.
    Done,
    /// The dead letter was gone: nothing done.
    Gone,
    /// The spill holds an entry of the same batch: nothing done until it is stored.
    BatchInSpill,
}

/// The spill stream of one deployment.
pub struct Spill {
    /// The Redis holding it.
    pub redis: Arc<Redis>,
    /// Its keys.
    pub keys: Keys,
    /// What the last check found and when; shared by [`Spill::separate`] handles, so a change
    /// is logged once, not once per handle.
    state: Arc<Mutex<(RedisState, Option<Instant>)>>,
}

impl Spill {
    /// The spill under `keys` in `redis`.
    pub fn new(redis: Arc<Redis>, keys: Keys) -> Spill {
        Spill { redis, keys, state: Arc::new(Mutex::new((RedisState::Unavailable, None))) }
    }

    /// The same spill through a Redis connection of its own (for the flusher's and the
    /// replayer's threads), sharing this handle's last check.
    pub fn separate(&self) -> Spill {
        Spill { redis: Arc::new(self.redis.separate()), keys: self.keys.clone(), state: self.state.clone() }
    }

    /// Checks (at most every few seconds) that Redis answers and never evicts; logs a change.
    pub async fn check(&self) -> RedisState {
        {
            let state = self.state.lock();
            if state.1.is_some_and(|at| at.elapsed() < CHECK_EVERY) {
                return state.0.clone();
            }
        }
        let now = match self.redis.check_policy().await {
            Ok(()) => RedisState::Ok,
            Err(PolicyError::Unavailable(e)) => {
                tracing::debug!(error = %e, "Redis unavailable");
                RedisState::Unavailable
            }
            Err(PolicyError::Evicts(policy)) => RedisState::Evicting(policy),
        };
        let mut state = self.state.lock();
        if state.0 != now || state.1.is_none() {
            match &now {
                RedisState::Ok => tracing::info!("Redis takes the spill"),
                RedisState::Unavailable => tracing::warn!(
                    "Redis does not answer: batches ClickHouse cannot take stay in memory (and the local log)"
                ),
                RedisState::Evicting(policy) => tracing::error!(
                    policy = %policy,
                    "Redis may evict keys (maxmemory-policy is not noeviction): refusing to spill into it; set maxmemory-policy noeviction"
                ),
            }
        }
        *state = (now.clone(), Some(Instant::now()));
        now
    }

    /// Forgets the last check, so that the next [`Spill::check`] asks Redis (after a failure).
    fn recheck(&self) {
        self.state.lock().1 = None;
    }

    /// Adds a batch to the spill, with its counter and its token, in one step, unless the spill
    /// holds the batch already (an earlier push whose answer was lost, or a push before a crash
    /// that the log did not note): the entry's size ([`fields_bytes`]) when Redis took it now,
    /// `None` when it was there.
    pub async fn push(
        &self,
        token: Uuid,
        rows: &[EventRow],
        attempts: u32,
        uncertain: bool,
    ) -> Result<Option<usize>, SpillError> {
        match self.check().await {
            RedisState::Ok => {}
            RedisState::Unavailable => return Err(SpillError::Unavailable),
            RedisState::Evicting(p) => return Err(SpillError::Policy(PolicyError::Evicts(p))),
        }
        let fields = batch_fields(token, rows, attempts, uncertain);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUSH_SCRIPT)
            .arg(3)
            .arg(&self.keys.spill)
            .arg(&self.keys.spill_events)
            .arg(&self.keys.spill_tokens)
            .arg(token.to_string())
            .arg(rows.len());
        arg_fields(&mut cmd, &fields);
        // The command holds its own copy: the encoded rows (megabytes) need not wait for Redis.
        let bytes = fields_bytes(&fields);
        drop(fields);
        let added: Result<i64, RedisError> = self.redis.query(&cmd).await;
        added.map(|n| (n == 1).then_some(bytes)).map_err(|e| {
            self.recheck();
            SpillError::Redis(e)
        })
    }

    /// Whether the spill holds the batch `token`: pushed and not yet acknowledged by a replayer.
    pub async fn holds(&self, token: Uuid) -> Result<bool, RedisError> {
        let mut cmd = redis::cmd("SISMEMBER");
        cmd.arg(&self.keys.spill_tokens).arg(token.to_string());
        self.redis.query(&cmd).await
    }

    /// Creates the consumer group (and the stream) unless they exist.
    pub async fn ensure_group(&self) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE").arg(&self.keys.spill).arg(GROUP).arg("0").arg("MKSTREAM");
        match self.redis.query::<()>(&cmd).await {
            Err(e) if e.0.contains("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Up to `count` entries no consumer has read yet, now owned by `consumer`.
    pub async fn read_new(&self, consumer: &str, count: usize) -> Result<Vec<Entry>, RedisError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&self.keys.spill)
            .arg(">");
        // The raw reply: turning megabytes of it into entries happens off the async workers.
        let reply: Value = self.redis.query(&cmd).await?;
        decode(reply, |v| {
            let reply: Option<StreamReadReply> = redis::from_redis_value(&v)?;
            Ok(reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect())
        })
        .await
    }

    /// Entries read but not acknowledged for `min_idle` or longer: (entry id, consumer).
    pub async fn idle(&self, min_idle: Duration, count: usize) -> Result<Vec<(String, String)>, RedisError> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.keys.spill)
            .arg(GROUP)
            .arg("IDLE")
            .arg(min_idle.as_millis() as u64)
            .arg("-")
            .arg("+")
            .arg(count);
        let pending: Vec<(String, String, u64, u64)> = self.redis.query(&cmd).await?;
        Ok(pending.into_iter().map(|(id, consumer, _, _)| (id, consumer)).collect())
    }

    /// Takes over entries idle for `min_idle` (their consumer died) for `consumer`.
    pub async fn claim(
        &self,
        consumer: &str,
        min_idle: Duration,
        ids: &[String],
    ) -> Result<Vec<Entry>, RedisError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.keys.spill).arg(GROUP).arg(consumer).arg(min_idle.as_millis() as u64).arg(ids);
        let reply: Value = self.redis.query(&cmd).await?;
        decode(reply, |v| Ok(redis::from_redis_value::<StreamClaimReply>(&v)?.ids)).await
    }

    /// Deletes consumers other than `me` that hold no entry and were last seen `min_idle` ago
    /// or longer: replayers that died (each process reads under a name of its own, so without
    /// this every restart would leave one behind). Returns how many.
    pub async fn forget_idle_consumers(&self, me: &str, min_idle: Duration) -> Result<usize, RedisError> {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("CONSUMERS").arg(&self.keys.spill).arg(GROUP);
        let reply: StreamInfoConsumersReply = self.redis.query(&cmd).await?;
        let mut forgotten = 0;
        for c in reply.consumers {
            if c.name != me && c.pending == 0 && c.idle as u128 >= min_idle.as_millis() {
                // DELCONSUMER drops what a consumer holds, and the consumer may have read
                // entries since XINFO answered: the script looks again and deletes in one step.
                let mut del = redis::cmd("EVAL");
                del.arg(FORGET_SCRIPT).arg(1).arg(&self.keys.spill).arg(GROUP).arg(&c.name);
                let deleted: i64 = self.redis.query(&del).await?;
                if deleted >= 0 {
                    forgotten += 1;
                }
            }
        }
        Ok(forgotten)
    }

    /// Keeps `ids` this consumer's while it works on them: resets their idle time, so that no
    /// replayer claims them as a dead one's. False when one of them is no longer `consumer`'s
    /// (another replayer claimed it, or it was acknowledged): the caller must leave them alone.
    pub async fn renew(&self, consumer: &str, ids: &[String]) -> Result<bool, RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RENEW_SCRIPT).arg(1).arg(&self.keys.spill).arg(GROUP).arg(consumer).arg(ids);
        let held: i64 = self.redis.query(&cmd).await?;
        Ok(held == 1)
    }

    /// Acknowledges and deletes replayed entries holding `events` events (batches `tokens`, which
    /// leave the token set), and adds the dead letters that came out of them, in one step: the
    /// entries are gone exactly when their bad rows are kept. Only while every entry is still
    /// `consumer`'s: [`Acked::Claimed`] (nothing done) when another replayer claimed one, which
    /// then checks and acknowledges them itself, so that the backlog counter and the dead letters
    /// count them once.
    pub async fn ack(
        &self,
        consumer: &str,
        ids: &[String],
        tokens: &[Uuid],
        events: usize,
        dead: &[Fields],
    ) -> Result<Acked, RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ACK_SCRIPT)
            .arg(4)
            .arg(&self.keys.spill)
            .arg(&self.keys.spill_events)
            .arg(&self.keys.dead_letters)
            .arg(&self.keys.spill_tokens)
            .arg(GROUP)
            .arg(consumer)
            .arg(events)
            .arg(ids.len())
            .arg(ids)
            .arg(tokens.len());
        for token in tokens {
            cmd.arg(token.to_string());
        }
        for fields in dead {
            arg_fields(cmd.arg(fields.len() * 2), fields);
        }
        let done: i64 = self.redis.query(&cmd).await?;
        Ok(match done {
            1 => Acked::Done,
            2 => Acked::NonePending,
            _ => Acked::Claimed,
        })
    }

    /// Moves dead letter `id` back to the spill as `entry` (batch `token`, holding `events`
    /// events) in one step that deletes it first, so that it moves at most once. Nothing is done
    /// when it was gone (taken by another replay or a purge since it was read), nor while the
    /// spill holds an entry of the same batch: two entries with the same rows could go to two
    /// replayers, each checking ClickHouse before the other stored them.
    pub async fn move_dead_letter(
        &self,
        id: &str,
        token: Uuid,
        entry: &Fields,
        events: usize,
    ) -> Result<Moved, RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(MOVE_SCRIPT)
            .arg(4)
            .arg(&self.keys.dead_letters)
            .arg(&self.keys.spill)
            .arg(&self.keys.spill_events)
            .arg(&self.keys.spill_tokens)
            .arg(id)
            .arg(events)
            .arg(token.to_string());
        arg_fields(&mut cmd, entry);
        let moved: i64 = self.redis.query(&cmd).await?;
        Ok(match moved {
            1 => Moved::Done,
            2 => Moved::BatchInSpill,
            _ => Moved::Gone,
        })
    }

    /// The backlog: entries (batches) and events in the spill.
    pub async fn backlog(&self) -> Result<(u64, u64), RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&self.keys.spill).cmd("GET").arg(&self.keys.spill_events);
        let (entries, events): (u64, Option<i64>) = self.redis.pipe(&pipe).await?;
        Ok((entries, events.unwrap_or(0).max(0) as u64))
    }

    /// Memory the spill stream takes in Redis, as `MEMORY USAGE` estimates it from a few of the
    /// stream's nodes (constant time, whatever the backlog); 0 when there is no stream.
    pub async fn memory(&self) -> Result<u64, RedisError> {
        let bytes: Option<u64> =
            self.redis.query(redis::cmd("MEMORY").arg("USAGE").arg(&self.keys.spill)).await?;
        Ok(bytes.unwrap_or(0))
    }

    /// Entries `start..` of a stream (`-` for the first), at most `count`: id and fields.
    pub async fn range(
        &self,
        key: &str,
        start: &str,
        count: usize,
    ) -> Result<Vec<(String, Fields)>, RedisError> {
        self.range_to(key, start, "+", count).await
    }

    /// As [`Spill::range`], up to `end` (inclusive) only.
    pub async fn range_to(
        &self,
        key: &str,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<(String, Fields)>, RedisError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(key).arg(start).arg(end).arg("COUNT").arg(count);
        let reply: StreamRangeReply = self.redis.query(&cmd).await?;
        Ok(reply.ids.iter().map(|id| (id.id.clone(), raw_fields(id))).collect())
    }

    /// The id of the newest entry of a stream; `None` when it is empty or absent.
    pub async fn newest(&self, key: &str) -> Result<Option<String>, RedisError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(key).arg("+").arg("-").arg("COUNT").arg(1);
        let reply: StreamRangeReply = self.redis.query(&cmd).await?;
        Ok(reply.ids.first().map(|id| id.id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventKind, Traffic};
    use time::OffsetDateTime;

    fn row() -> EventRow {
        EventRow {
            event_id: Uuid::new_v4(),
            ad_id: Uuid::new_v4(),
            kind: EventKind::Click,
            event_time: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            received_at: OffsetDateTime::from_unix_timestamp(1_700_000_001).unwrap(),
            ip_hash: 7,
            playback_time: Some(1.5),
            error_code: 0,
            batch_id: Uuid::nil(),
            traffic: Traffic::Valid,
        }
    }

    fn map(fields: Fields) -> HashMap<String, Vec<u8>> {
        fields.into_iter().collect()
    }

    #[test]
    fn a_batch_round_trips_with_its_token() {
        let token = Uuid::new_v4();
        let rows = vec![row(), row()];
        let (t, back, attempts, uncertain) = parse_batch(&map(batch_fields(token, &rows, 3, true))).unwrap();
        assert_eq!((t, attempts, uncertain), (token, 3, true));
        let expected: Vec<_> = rows.into_iter().map(|r| EventRow { batch_id: token, ..r }).collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn damaged_entries_are_named_not_replayed() {
        let fields = batch_fields(Uuid::new_v4(), &[row(), row()], 1, false);
        let mut flipped = map(fields.clone());
        flipped.get_mut("rows").unwrap()[5] ^= 1;
        assert!(parse_batch(&flipped).unwrap_err().contains("checksum"));
        let mut short = map(fields.clone());
        short.remove("token");
        assert!(parse_batch(&short).unwrap_err().contains("token"));
        let mut miscounted = map(fields);
        miscounted.insert("events".into(), b"3".to_vec());
        assert!(parse_batch(&miscounted).unwrap_err().contains("says 3"));
    }

    #[tokio::test]
    async fn separate_handles_share_the_check_and_log_a_change_once() {
        let logged = crate::telemetry::captured::Captured::default();
        let _guard = logged.install();
        // Nothing listens on port 1: every connection is refused at once.
        let redis = Redis::new("redis://127.0.0.1:1", Duration::from_millis(500)).unwrap();
        let spill = Spill::new(Arc::new(redis), Keys::new("t"));
        let flusher = spill.separate();
        let replayer = spill.separate();
        for handle in [&spill, &flusher, &replayer] {
            assert_eq!(handle.check().await, RedisState::Unavailable);
        }
        let text = logged.text();
        assert_eq!(text.matches("Redis does not answer").count(), 1, "{text}");
        // A failure seen through one handle makes the next check of any handle ask again.
        let checked = spill.state.lock().1.expect("checked");
        flusher.recheck();
        assert_eq!(replayer.check().await, RedisState::Unavailable);
        assert!(spill.state.lock().1.expect("checked") > checked, "not asked again");
    }
}
