//! The client event ids this instance took: those a request is storing right now (*in flight*)
//! and those whose events it held (*remembered*), so that a repeat is answered but not stored
//! twice.
//!
//! An id is remembered for `EVENT_ID_TTL` after it was taken, and among the last
//! `EVENT_IDS_MAX` ids (the oldest go first). Some ids are *kept* instead when their turn
//! comes (their time is up, or too many are remembered): they leave the first line for one of
//! two others:
//! - the *waiting* line while this instance still holds its events, in neither ClickHouse, the
//!   Redis spill nor the dead letters yet, whatever the bounds say: during a long outage more
//!   of them can wait than the bound counts, and their clients are the ones that retry (a 2xx
//!   lost on the way). The buffer (`BUFFER_MAX_BYTES`) bounds their number. An id there has its
//!   next turn as soon as its events are stored and it is at the front, and goes then, as it
//!   would have in the first line past the bound (counted as forgotten early unless its time
//!   was up too);
//! - the *late* line for another `EVENT_ID_TTL` once its events are found stored, if a request
//!   for it ended without a 2xx while they waited (a 503 in `committed` mode, a client that
//!   hung up): that client retries until it gets a 2xx, however long the outage lasted and
//!   however many new ids came meanwhile. Its time brings its next turn. Past a bound of their
//!   own (`EVENT_IDS_MAX`, or as many events as the buffer holds if that is more) the oldest of
//!   these go first, counted as forgotten early. A request can also end without its 2xx just
//!   after its events were stored, when its ids may have had their turn already: they come
//!   back then, straight into this line (unless another request has one in flight, to store
//!   it again).
//!
//! Everything sits under one lock, which every claim and every settlement takes once (a batch
//! claims all its ids under one): an id must be in flight or remembered at every moment in
//! between, or two concurrent repeats could both be stored. A least-recently-used cache (moka)
//! was here before; it could neither keep unconfirmed ids nor say which ids it dropped early,
//! and it cost more per insert.
//!
//! Memory: a full buffer of events with ids means millions of waiting ids, so an id costs as
//! little as it can. Each remembered id is one 40-byte slot in a slab that grows a chunk at a
//! time (never copying what it holds), found through an index of its own (`Index`: 8 bytes
//! a place, 10.7 to 21.3 an id) and linked into its line, which it leaves in place: 2.4 million
//! ids take 127 MiB (and the index's old table, 16 MiB, while it doubles; the doubling past
//! 1.57 million ids holds the lock about 30 ms). A hash map of ids and two queues of (id,
//! second) were here before: with entries passed over in the queues and every table doubling
//! by copy, the same ids took 234 MiB, 305 MiB at the peak, and with them the service's peak
//! RSS reached 2.9 times `BUFFER_MAX_BYTES`. Like those tables, the slab keeps what it grew to
//! (freed slots are reused, not given back).
//!
//! Speed: a batch of ids with the store's tables out of the cache waits for memory about twice
//! per id (finding it, and forgetting an old one), so those reads are issued together, ahead
//! of the work that needs them ([`EventIds::claim_all`], and in each line's turns).

use std::{
    hash::BuildHasher,
    ops::Range,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hashbrown::{DefaultHashBuilder, HashMap};
use prometheus::{IntCounter, IntGauge};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How many ids from the front of each line a new id lets [`EventIds::forget`] look at: each
/// new id frees about one, so the work per id stays constant, and a bound that was exceeded
/// comes back down over the next ids.
const STEPS_PER_ID: usize = 2;

pub use crate::ingest::buffer::ID_BYTES;

/// How often [`EventIds::tidy_every`] gives the fronts of the lines their turns, and how many
/// ids each line gives at most: up to 100,000 ids a second per line. With nothing due a tidy
/// holds the lock for well under a microsecond; forgetting 2,000 ids from each line held it
/// 0.64 ms at most (the store alone, 1.5 million ids, release build).
const TIDY_EVERY: Duration = Duration::from_millis(20);
const TIDY_STEPS: usize = 2_000;

/// No slot: the end of a line, or of the free list.
const NIL: u32 = u32::MAX;
/// log2 of the slots in one chunk of the slab (65,536 slots, 2.5 MiB).
const CHUNK_BITS: u32 = 16;
/// Slots in one chunk of the slab.
const CHUNK: usize = 1 << CHUNK_BITS;
/// [`Slot::len`]'s flag: a request for the id ended without a 2xx ([`Unanswered`]), so its
/// client may retry once its events are stored. Cleared at the turn that finds them stored.
const RETRIED: u32 = 1 << 31;
/// [`Slot::len`]'s flag: kept (in the waiting line or the late one), not in the first.
const KEPT: u32 = 1 << 30;
/// [`Slot::len`]'s flag, with [`KEPT`]: kept a turn more after its events were stored, for a
/// late retry (the late line), not while they waited.
const LATE: u32 = 1 << 29;
/// [`Slot::len`]'s bits that count events (a request holds far fewer than 2^29).
const LEN: u32 = LATE - 1;

/// The outcome of [`EventIds::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// Neither in flight nor remembered: now in flight, for the caller to store.
    Fresh,
    /// Remembered: the sequence numbers of the events of the request that took it.
    Held(Range<u64>),
    /// Another request is storing it right now.
    InFlight,
    /// The same request claimed it before (an id twice in one batch).
    Mine,
}

/// The metrics this store keeps up to date.
#[derive(Debug, Clone)]
pub struct IdMetrics {
    /// `adbeacon_event_ids_remembered`: ids remembered now.
    pub remembered: IntGauge,
    /// `adbeacon_event_ids_forgotten_early_total`: ids forgotten for the count bound before
    /// their time was up.
    pub forgotten_early: IntCounter,
}

/// A remembered id (40 bytes; or a free slot, linked through `next`).
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: Uuid,
    /// The first sequence number of the events of the request that took it.
    start: u64,
    /// How many events that request held (the bits of [`LEN`]), with [`KEPT`], [`LATE`] and
    /// [`RETRIED`].
    len: u32,
    /// The second it was taken (in the waiting line too), or went into the late line.
    since: u32,
    /// The slot before it in its line.
    prev: u32,
    /// The slot after it in its line, or the next free slot.
    next: u32,
}

impl Slot {
    fn seqs(&self) -> Range<u64> {
        self.start..self.start + u64::from(self.len & LEN)
    }

    /// Which of [`Ids::lines`] it is in: [`FIRST`], [`WAITED`] or [`LATE_LINE`].
    fn line(&self) -> usize {
        if self.len & LATE != 0 {
            LATE_LINE
        } else if self.len & KEPT != 0 {
            WAITED
        } else {
            FIRST
        }
    }

    /// Whether [`RETRIED`] was set, clearing it.
    fn take_retried(&mut self) -> bool {
        let retried = self.len & RETRIED != 0;
        self.len &= !RETRIED;
        retried
    }
}

/// [`Ids::lines`]: ids in the order they were taken.
const FIRST: usize = 0;
/// [`Ids::lines`]: ids kept because their events still waited when their turn came, in the
/// order they were kept. Each goes at its next turn once its events are stored, which comes as
/// soon as it is at the front. (When they stayed until their time was up instead, the ids of a
/// backlog that ClickHouse had stored long before filled this line to its bound, as many ids as
/// the buffer holds events: half the buffer's size again, in memory its cap did not count.)
const WAITED: usize = 1;
/// [`Ids::lines`]: ids kept a turn more after their events were stored, because a request for
/// them ended without a 2xx (their clients retry however long that takes), in the order they
/// were kept; each stays until its time is up or the line passes its bound.
const LATE_LINE: usize = 2;

/// Why an id whose turn came stays ([`EventIds::stays`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stay {
    /// It goes.
    No,
    /// Its events still wait: into the waiting line.
    Waiting,
    /// Its events are stored and a request for it ended without a 2xx: into the late line.
    Late,
}

/// A line of slots, oldest first.
#[derive(Debug, Clone, Copy)]
struct Line {
    head: u32,
    tail: u32,
    len: usize,
}

impl Line {
    const EMPTY: Line = Line { head: NIL, tail: NIL, len: 0 };
}

/// The slot numbered `i` of the slab `chunks`.
fn slot_in(chunks: &[Vec<Slot>], i: u32) -> &Slot {
    &chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)]
}

/// The index of the remembered ids: an open-addressing table of slot numbers, each beside 32
/// bits of its id's hash, probed linearly (an id's *home* is those bits modulo the table's
/// size).
///
/// Why not hashbrown's table, which was here before: it keeps its control bytes and its slot
/// numbers in two arrays, so a look-up reads two places, and it does not tell where an id's
/// place is, so those reads cannot be issued ahead of the work ([`Index::touch`]). Here an
/// entry is 8 bytes, its hash bits and slot number together. Measured in the service (the
/// no-op sink, batches of 100 events with fresh ids, alternating 8-second runs; medians):
/// 10,565 batches a second against 9,970 with hashbrown's table read ahead by look-ups, and
/// 8,853 before either. The hash bits also spare reading a slot for any entry but the id's
/// own, and tell each entry's home: a deletion shifts the entries after it back instead of
/// leaving tombstones, and a doubling never reads the slab (30 ms at 1.57 million ids, where
/// hashbrown's took 90 ms at 1.8 million). It costs more room: at most 3/4 full, against 7/8.
struct Index {
    /// `(hash bits << 32) | (slot + 1)`; 0 is empty, so that a new table is zeroed memory,
    /// which the kernel maps only as it is written.
    entries: Vec<u64>,
    len: usize,
}

impl Index {
    /// A table that takes `room` ids before it doubles.
    fn with_room(room: usize) -> Self {
        Index { entries: vec![0; Self::size_for(room)], len: 0 }
    }

    /// The smallest size (a power of two, at least 16) that holds `n` ids at most 3/4 full.
    fn size_for(n: usize) -> usize {
        n.saturating_mul(4).div_ceil(3).next_power_of_two().max(16)
    }

    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// Reads the home of hash `hash`, so that the look-up that follows finds it in the cache:
    /// the reads of many ids in a row overlap, where each look-up alone waits for memory.
    fn touch(&self, hash: u64) {
        std::hint::black_box(self.entries[Self::bits(hash) as usize & self.mask()]);
    }

    /// Ids in the table.
    fn len(&self) -> usize {
        self.len
    }

    fn bits(hash: u64) -> u64 {
        hash & u64::from(u32::MAX)
    }

    /// The slot, among those whose id's hash is `hash`, that `is` it.
    fn find(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<u32> {
        let (mask, bits) = (self.mask(), Self::bits(hash));
        let mut at = bits as usize & mask;
        loop {
            let e = self.entries[at];
            if e == 0 {
                return None;
            }
            if e >> 32 == bits && is(e as u32 - 1) {
                return Some(e as u32 - 1);
            }
            at = (at + 1) & mask;
        }
    }

    /// Adds slot `slot`, whose id's hash is `hash` and which is not in the table.
    fn insert(&mut self, hash: u64, slot: u32) {
        if (self.len + 1) * 4 > self.entries.len() * 3 {
            self.grow();
        }
        Self::place(&mut self.entries, (Self::bits(hash) << 32) | (u64::from(slot) + 1));
        self.len += 1;
    }

    /// Puts entry `e` at the first empty place from its home.
    fn place(entries: &mut [u64], e: u64) {
        let mask = entries.len() - 1;
        let mut at = (e >> 32) as usize & mask;
        while entries[at] != 0 {
            at = (at + 1) & mask;
        }
        entries[at] = e;
    }

    /// Doubles the table, placing each entry by the hash bits it carries.
    fn grow(&mut self) {
        let size = self.entries.len() * 2;
        let old = std::mem::replace(&mut self.entries, vec![0; size]);
        for e in old.into_iter().filter(|&e| e != 0) {
            Self::place(&mut self.entries, e);
        }
    }

    /// Removes slot `slot`, whose id's hash is `hash`, if the table holds it.
    fn remove(&mut self, hash: u64, slot: u32) {
        let (mask, want) = (self.mask(), (Self::bits(hash) << 32) | (u64::from(slot) + 1));
        let mut hole = Self::bits(hash) as usize & mask;
        loop {
            match self.entries[hole] {
                0 => return,
                e if e == want => break,
                _ => hole = (hole + 1) & mask,
            }
        }
        // Each entry after the hole, up to the next empty place, moves back into it unless its
        // home lies after the hole (it would no longer be found from there).
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let e = self.entries[at];
            if e == 0 {
                break;
            }
            let home = (e >> 32) as usize & mask;
            if at.wrapping_sub(home) & mask >= at.wrapping_sub(hole) & mask {
                self.entries[hole] = e;
                hole = at;
            }
        }
        self.entries[hole] = 0;
        self.len -= 1;
    }
}

struct Ids {
    /// Each with the request that claimed it ([`EventIds::owner`]).
    in_flight: HashMap<Uuid, u64>,
    /// The slot number of every remembered id, found by the id's hash.
    index: Index,
    hasher: DefaultHashBuilder,
    /// The slab: chunks of [`CHUNK`] slots (every chunk but the last is full).
    chunks: Vec<Vec<Slot>>,
    /// The first free slot.
    free: u32,
    /// The first line, the waiting one and the late one ([`FIRST`], [`WAITED`],
    /// [`LATE_LINE`]).
    lines: [Line; 3],
}

impl Ids {
    fn new(room: usize) -> Self {
        Ids {
            in_flight: HashMap::new(),
            index: Index::with_room(room),
            hasher: DefaultHashBuilder::default(),
            chunks: Vec::new(),
            free: NIL,
            lines: [Line::EMPTY; 3],
        }
    }

    fn slot(&self, i: u32) -> &Slot {
        slot_in(&self.chunks, i)
    }

    fn slot_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)]
    }

    /// The slot of a remembered id.
    #[cfg(test)]
    fn find(&self, id: &Uuid) -> Option<u32> {
        self.find_hashed(self.hasher.hash_one(id), id)
    }

    /// The slot of a remembered id whose hash is `hash`.
    fn find_hashed(&self, hash: u64, id: &Uuid) -> Option<u32> {
        self.index.find(hash, |i| self.slot(i).id == *id)
    }

    /// Remembers a new id, whose hash is `hash`, in a free slot, at the back of the line its
    /// flags name.
    fn insert(&mut self, hash: u64, slot: Slot) {
        let i = if self.free == NIL {
            if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                self.chunks.push(Vec::with_capacity(CHUNK));
            }
            let full = (self.chunks.len() - 1) * CHUNK;
            let chunk = self.chunks.last_mut().expect("a chunk with room");
            let i = u32::try_from(full + chunk.len()).ok().filter(|&i| i != NIL);
            chunk.push(slot);
            // Four billion ids would take 160 GB first.
            i.expect("fewer than 2^32 - 1 ids remembered")
        } else {
            let i = self.free;
            self.free = self.slot(i).next;
            *self.slot_mut(i) = slot;
            i
        };
        self.index.insert(hash, i);
        self.push_back(i);
    }

    /// Forgets the id of slot `i`.
    fn remove(&mut self, i: u32) {
        let hash = self.hasher.hash_one(self.slot(i).id);
        self.index.remove(hash, i);
        self.unlink(i);
        let free = self.free;
        self.slot_mut(i).next = free;
        self.free = i;
    }

    /// Puts slot `i` at the back of the line its flags name.
    fn push_back(&mut self, i: u32) {
        let l = self.slot(i).line();
        let tail = self.lines[l].tail;
        let slot = self.slot_mut(i);
        slot.prev = tail;
        slot.next = NIL;
        if tail == NIL {
            self.lines[l].head = i;
        } else {
            self.slot_mut(tail).next = i;
        }
        self.lines[l].tail = i;
        self.lines[l].len += 1;
    }

    /// Takes slot `i` out of its line.
    fn unlink(&mut self, i: u32) {
        let slot = *self.slot(i);
        let l = slot.line();
        if slot.prev == NIL {
            self.lines[l].head = slot.next;
        } else {
            self.slot_mut(slot.prev).next = slot.next;
        }
        if slot.next == NIL {
            self.lines[l].tail = slot.prev;
        } else {
            self.slot_mut(slot.next).prev = slot.prev;
        }
        self.lines[l].len -= 1;
    }

    /// Ids remembered.
    fn len(&self) -> usize {
        self.index.len()
    }

    /// Ids kept, in the waiting line and the late one.
    #[cfg(test)]
    fn kept_len(&self) -> usize {
        self.lines[WAITED].len + self.lines[LATE_LINE].len
    }
}

/// Client event ids in flight and remembered (see the module docs).
pub struct EventIds {
    ids: Mutex<Ids>,
    max: usize,
    /// Kept ids at most, besides those whose events wait ([`EventIds::keeping`]).
    kept_max: usize,
    ttl: u32,
    epoch: Instant,
    /// Every sequence number below this one is confirmed (in ClickHouse, the spill or the dead
    /// letters).
    confirmed_below: Box<dyn Fn() -> u64 + Send + Sync>,
    metrics: IdMetrics,
    /// Told the memory of the ids remembered past `max` ([`EventIds::charging`]).
    charge: Option<Box<dyn Fn(usize) + Send + Sync>>,
    /// The last number handed out by [`EventIds::owner`].
    owners: AtomicU64,
}

impl std::fmt::Debug for EventIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventIds").field("max", &self.max).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl EventIds {
    /// Ids remembered for `ttl` and `max` at most while their events are confirmed, as
    /// `confirmed_below` tells (every sequence number below what it returns is).
    pub fn new(
        max: usize,
        ttl: Duration,
        confirmed_below: impl Fn() -> u64 + Send + Sync + 'static,
        metrics: IdMetrics,
    ) -> Self {
        // Room in the index for the bound (up to a million) from the start: growing a table of
        // that size moves it under the lock that every request with an id waits for. The room
        // costs 8 bytes a place (16 MiB for a million), mapped only as ids fill it.
        EventIds {
            ids: Mutex::new(Ids::new(max.min(1 << 20))),
            max,
            kept_max: max,
            ttl: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
            epoch: Instant::now(),
            confirmed_below: Box::new(confirmed_below),
            metrics,
            charge: None,
            owners: AtomicU64::new(0),
        }
    }

    /// Keeps up to `kept_max` ids for retries once their events are stored (never fewer than
    /// the bound of the others): the app passes as many events as the buffer holds, so that
    /// every request answered 503 during an outage without a spill is covered.
    pub fn keeping(mut self, kept_max: usize) -> Self {
        self.kept_max = kept_max.max(self.max);
        self
    }

    /// Tells `charge` how much memory the ids remembered past the bound take (about
    /// [`ID_BYTES`] each) whenever their number changes: the app counts it against the buffer's
    /// cap while the buffer holds events (see `Buffer::set_ids_bytes`).
    pub fn charging(mut self, charge: impl Fn(usize) + Send + Sync + 'static) -> Self {
        self.charge = Some(Box::new(charge));
        self
    }

    /// Sets the gauge and the charge to the number of ids remembered now.
    fn counted(&self, ids: &Ids) {
        self.metrics.remembered.set(ids.len() as i64);
        if let Some(charge) = &self.charge {
            charge(ids.len().saturating_sub(self.max) * ID_BYTES);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ids> {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Seconds since this store began.
    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Whether events numbered `seqs` are still held unconfirmed by this instance.
    fn waiting(&self, seqs: &Range<u64>) -> bool {
        !seqs.is_empty() && seqs.end > (self.confirmed_below)()
    }

    /// A number for a request that claims ids, unique in this store and never 0.
    pub fn owner(&self) -> u64 {
        self.owners.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Claims `id` for request `owner`: [`Claimed::Fresh`] (and in flight, until
    /// [`EventIds::remember`] or [`EventIds::give_back`]) for exactly one of any number of
    /// concurrent callers. (A request's own earlier claim is found here too, in one look-up:
    /// a batch of a thousand items searched its own list once per item.)
    pub fn claim(&self, id: Uuid, owner: u64) -> Claimed {
        let mut ids = self.lock();
        let hash = ids.hasher.hash_one(id);
        self.claim_hashed(&mut ids, id, hash, owner)
    }

    /// [`EventIds::claim`] for each of `ids` in turn, under one lock: the ids of a batch. Their
    /// places in the index are read first, all together, where claiming them one by one
    /// waited for memory once per id (see `Index::touch`).
    pub fn claim_all(&self, ids: &[Uuid], owner: u64) -> Vec<Claimed> {
        let mut guard = self.lock();
        let hashes: Vec<u64> = ids.iter().map(|id| guard.hasher.hash_one(id)).collect();
        for &hash in &hashes {
            guard.index.touch(hash);
        }
        ids.iter().zip(hashes).map(|(&id, hash)| self.claim_hashed(&mut guard, id, hash, owner)).collect()
    }

    /// [`EventIds::claim`] of `id`, whose hash is `hash`, under the lock.
    fn claim_hashed(&self, ids: &mut Ids, id: Uuid, hash: u64, owner: u64) -> Claimed {
        if let Some(&by) = ids.in_flight.get(&id) {
            return if by == owner { Claimed::Mine } else { Claimed::InFlight };
        }
        if let Some(i) = ids.find_hashed(hash, &id) {
            let now = self.now();
            let seqs = ids.slot(i).seqs();
            if now.saturating_sub(ids.slot(i).since) <= self.ttl {
                return Claimed::Held(seqs);
            }
            // Its time is up: its turn has come here rather than in its line. The fronts get
            // no turns from this look: within a batch's claims (one lock) an id found held must
            // stay found for its repeats later in the batch, and the tidy gives the fronts
            // their turns when no new ids come.
            let stay = self.stays(ids.slot_mut(i));
            if stay != Stay::No {
                Self::keep(ids, i, now, stay);
                return Claimed::Held(seqs);
            }
            ids.remove(i);
            self.counted(ids);
        }
        ids.in_flight.insert(id, owner);
        Claimed::Fresh
    }

    /// Claimed ids whose events were not held: no longer in flight, so a retry stores them.
    pub fn give_back(&self, claimed: &[Uuid]) {
        let mut ids = self.lock();
        for id in claimed {
            ids.in_flight.remove(id);
        }
    }

    /// Claimed ids whose events are held as `seqs`: remembered from now on, and no longer in
    /// flight (both under one lock, so that no repeat finds them in neither).
    pub fn remember(&self, claimed: impl IntoIterator<Item = Uuid>, seqs: &Range<u64>) {
        let now = self.now();
        let (start, len) = Self::span(seqs);
        let mut ids = self.lock();
        let mut added = 0;
        for id in claimed {
            ids.in_flight.remove(&id);
            let hash = ids.hasher.hash_one(id);
            match ids.find_hashed(hash, &id) {
                // Remembered already (not in flight then; kept for safety): taken anew.
                Some(i) => {
                    ids.unlink(i);
                    let slot = ids.slot_mut(i);
                    (slot.start, slot.len, slot.since) = (start, len, now);
                    ids.push_back(i);
                }
                None => ids.insert(hash, Slot { id, start, len, since: now, prev: NIL, next: NIL }),
            }
            added += 1;
        }
        self.forget(&mut ids, now, added * STEPS_PER_ID);
        self.counted(&ids);
    }

    /// Whether an id whose turn came is kept, and where: while its events wait, and for one
    /// more turn once they are found stored if a request for it ended without a 2xx (see the
    /// module docs).
    fn stays(&self, slot: &mut Slot) -> Stay {
        if self.waiting(&slot.seqs()) {
            Stay::Waiting
        } else if slot.take_retried() {
            Stay::Late
        } else {
            Stay::No
        }
    }

    /// Requests for these ids ended without a 2xx while their events may still wait: their
    /// clients retry, so the ids stay a turn after the events are stored. (Tests: the service
    /// names the events, [`EventIds::unanswered_naming`].)
    #[cfg(test)]
    fn unanswered(&self, unanswered: &[Uuid]) {
        self.unanswered_naming(unanswered, &Seqs::Each(Vec::new()));
    }

    /// [`EventIds::unanswered`], where `seqs` names the events of each id. An id already
    /// forgotten comes back, with those events, into the late line: its turn can come between
    /// its events' store and the request's answer (a batch refused for a full buffer once its
    /// repeats were confirmed, a `committed` request whose events went to the spill), and in
    /// the waiting line it comes as soon as it is at the front. Unless another request has it
    /// in flight: that one stores it again.
    fn unanswered_naming(&self, unanswered: &[Uuid], seqs: &Seqs) {
        let mut ids = self.lock();
        let now = self.now();
        // Ids brought back here: one named twice (twice in a batch) gets one turn more, not two.
        let mut back = Vec::new();
        for (k, &id) in unanswered.iter().enumerate() {
            let hash = ids.hasher.hash_one(id);
            if let Some(i) = ids.find_hashed(hash, &id) {
                if !back.contains(&id) {
                    ids.slot_mut(i).len |= RETRIED;
                }
                continue;
            }
            // Forgotten, so its events are stored (no id goes while they wait).
            let seqs = seqs.of(k);
            if seqs.is_empty() || self.waiting(&seqs) || ids.in_flight.contains_key(&id) {
                continue;
            }
            let (start, len) = Self::span(&seqs);
            ids.insert(hash, Slot { id, start, len: len | KEPT | LATE, since: now, prev: NIL, next: NIL });
            back.push(id);
        }
        if !back.is_empty() {
            self.counted(&ids);
        }
    }

    /// A request's events `seqs` as a slot holds them: the first sequence number and how many,
    /// at most [`LEN`] (were it more, the range keeps its end, which tells whether they wait).
    fn span(seqs: &Range<u64>) -> (u64, u32) {
        let len = u32::try_from(seqs.end.saturating_sub(seqs.start)).unwrap_or(LEN).min(LEN);
        (seqs.end - u64::from(len), len)
    }

    /// A guard over the ids of a request until its answer (it may wait for the log, or in
    /// `committed` mode for its events or its repeats' first events to be confirmed): unless
    /// [`Unanswered::answered`] says the request got its 2xx, dropping it marks them as
    /// unanswered. So a 503, an error, and a client that hung up while the request waited (its
    /// future dropped) all count. `seqs` names the events of each id (see
    /// [`EventIds::unanswered_naming`]).
    pub fn until_answered(self: &Arc<Self>, ids: Vec<Uuid>, seqs: Seqs) -> Unanswered {
        Unanswered { store: self.clone(), ids, seqs }
    }

    /// Moves slot `i` to the back of the line `stay` names, as looked at `now`. In the waiting
    /// line an id keeps the second it was taken: at the front, its time does not bring its
    /// turn there (a claim of it once its time is up does, wherever it is), and when it goes it
    /// tells whether it went early. In the late line its time starts again.
    fn keep(ids: &mut Ids, i: u32, now: u32, stay: Stay) {
        ids.unlink(i);
        let slot = ids.slot_mut(i);
        if stay == Stay::Late {
            slot.since = now;
            slot.len |= KEPT | LATE;
        } else {
            slot.len = (slot.len & !LATE) | KEPT;
        }
        ids.push_back(i);
    }

    /// Takes up to `steps` ids from the front of each line (at most once round it): while
    /// there are too many in it, or, in the first and the late line, while the front one's
    /// time is up, and in the waiting line while the front one's events are stored. Each is
    /// forgotten, or kept if it stays ([`EventIds::stays`]).
    fn forget(&self, ids: &mut Ids, now: u32, steps: usize) {
        for l in [FIRST, WAITED, LATE_LINE] {
            self.turns(ids, now, steps, l);
        }
    }

    /// Whether `slot`, the front of line `l`, has its turn with `len` ids in the line.
    fn due(&self, l: usize, len: usize, slot: &Slot, now: u32) -> bool {
        let expired = || now.saturating_sub(slot.since) > self.ttl;
        match l {
            FIRST => len > self.max || expired(),
            // Kept whatever its time while its events wait, so only their store brings its turn
            // (or too many kept: the front, still waiting, goes to the back).
            WAITED => len > self.kept_max || !self.waiting(&slot.seqs()),
            _ => len > self.kept_max || expired(),
        }
    }

    /// [`EventIds::forget`] on line `l`: the first, bounded by `max`, or one of the kept lines,
    /// each bounded by `kept_max`.
    fn turns(&self, ids: &mut Ids, now: u32, steps: usize, l: usize) {
        let steps = steps.min(ids.lines[l].len);
        // The index places of the ids whose turn comes, read first, together (see
        // `Index::touch`). Only a guess where an id kept stays in its line (the waiting and
        // late lines): some may stay unread; and an id kept rather than forgotten was read for
        // nothing.
        let mut i = ids.lines[l].head;
        for k in 0..steps {
            let slot = ids.slot(i);
            if !self.due(l, ids.lines[l].len - k, slot, now) {
                break;
            }
            ids.index.touch(ids.hasher.hash_one(slot.id));
            i = slot.next;
        }
        for _ in 0..steps {
            let i = ids.lines[l].head;
            if !self.due(l, ids.lines[l].len, ids.slot(i), now) {
                break;
            }
            let expired = now.saturating_sub(ids.slot(i).since) > self.ttl;
            let stay = self.stays(ids.slot_mut(i));
            if stay != Stay::No {
                Self::keep(ids, i, now, stay);
                continue;
            }
            ids.remove(i);
            if !expired {
                self.metrics.forgotten_early.inc();
            }
        }
    }

    /// Gives the fronts of the lines up to `steps` turns each, as new ids do: ids whose time is
    /// up, or past the bound once their events are stored, are forgotten.
    pub fn tidy(&self, steps: usize) {
        let mut ids = self.lock();
        self.forget(&mut ids, self.now(), steps);
        self.counted(&ids);
    }

    /// [`EventIds::tidy`] every 20 ms until `stop`: without it, ids were forgotten only as new
    /// ids came, so ids past the bound whose events were stored (those of the first line and
    /// of the waiting one) and ids past their time stayed for as long as traffic without ids
    /// went on. The late line's ids stay until their own time is up or that line passes its
    /// bound.
    pub async fn tidy_every(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TIDY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.tidy(TIDY_STEPS),
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The events the ids of an [`Unanswered`] name.
#[derive(Debug, Clone)]
pub enum Seqs {
    /// The same events for every id: the request's own.
    All(Range<u64>),
    /// The events of each id in turn: repeats, each naming its first request's (none past the
    /// end of the list).
    Each(Vec<Range<u64>>),
}

impl Seqs {
    /// The events of the `k`-th id.
    fn of(&self, k: usize) -> Range<u64> {
        match self {
            Seqs::All(seqs) => seqs.clone(),
            Seqs::Each(each) => each.get(k).cloned().unwrap_or(0..0),
        }
    }
}

/// The ids of a request that has not been answered 2xx yet ([`EventIds::until_answered`]).
#[must_use = "dropping it marks the ids as unanswered at once"]
pub struct Unanswered {
    store: Arc<EventIds>,
    ids: Vec<Uuid>,
    seqs: Seqs,
}

impl Unanswered {
    /// The request got its 2xx.
    pub fn answered(mut self) {
        self.ids.clear();
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.store.unanswered_naming(&self.ids, &self.seqs);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use super::*;

    fn metrics() -> IdMetrics {
        IdMetrics {
            remembered: IntGauge::new("r", "r").unwrap(),
            forgotten_early: IntCounter::new("f", "f").unwrap(),
        }
    }

    /// A store whose confirmed watermark the test moves.
    fn store(max: usize, ttl: Duration) -> (EventIds, Arc<AtomicU64>) {
        let below = Arc::new(AtomicU64::new(0));
        let b = below.clone();
        (EventIds::new(max, ttl, move || b.load(Ordering::Relaxed), metrics()), below)
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n + 1)
    }

    /// The guard a request's answer settles, over ids `ns`, naming the events the store holds
    /// for each (as the service names those it took or found held).
    fn guard(ids: &Arc<EventIds>, ns: Vec<Uuid>) -> Unanswered {
        let seqs = {
            let g = ids.lock();
            ns.iter().map(|n| g.find(n).map_or(0..0, |i| g.slot(i).seqs())).collect()
        };
        ids.until_answered(ns, Seqs::Each(seqs))
    }

    /// Takes ids `ns` as one request holding events `seqs`.
    fn take(ids: &EventIds, ns: Range<u128>, seqs: Range<u64>) {
        let owner = ids.owner();
        for n in ns.clone() {
            assert_eq!(ids.claim(id(n), owner), Claimed::Fresh, "id {n}");
        }
        ids.remember(ns.map(id), &seqs);
    }

    #[test]
    fn a_claimed_id_is_in_flight_until_remembered_or_given_back() {
        let (ids, _) = store(10, Duration::from_secs(3600));
        let (a, b) = (ids.owner(), ids.owner());
        assert_eq!(ids.claim(id(1), a), Claimed::Fresh);
        assert_eq!(ids.claim(id(1), b), Claimed::InFlight);
        assert_eq!(ids.claim(id(1), a), Claimed::Mine);
        ids.give_back(&[id(1)]);
        assert_eq!(ids.claim(id(1), b), Claimed::Fresh);
        ids.give_back(&[id(1)]);
        assert_eq!(ids.claim(id(1), 0), Claimed::Fresh);
        ids.remember([id(1)], &(5..6));
        assert_eq!(ids.claim(id(1), 0), Claimed::Held(5..6));
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn past_the_bound_the_oldest_confirmed_ids_go_first_and_are_counted() {
        let (ids, below) = store(3, Duration::from_secs(3600));
        below.store(100, Ordering::Relaxed);
        for n in 0..5 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
        }
        assert_eq!(ids.len(), 3);
        assert_eq!(ids.claim(id(0), 0), Claimed::Fresh, "the oldest went first");
        assert_eq!(ids.claim(id(1), 0), Claimed::Fresh);
        assert_eq!(ids.claim(id(2), 0), Claimed::Held(2..3));
        assert_eq!(ids.claim(id(4), 0), Claimed::Held(4..5));
        assert_eq!(ids.metrics.forgotten_early.get(), 2);
    }

    #[test]
    fn ids_whose_events_wait_unconfirmed_are_kept_past_the_bound() {
        let (ids, below) = store(3, Duration::from_secs(3600));
        // An outage: 10 requests held, none confirmed.
        for n in 0..10 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
        }
        for n in 0..10 {
            assert_eq!(ids.claim(id(n), 0), Claimed::Held(n as u64..n as u64 + 1), "id {n} kept");
        }
        // Seven kept while they wait, past the kept ids' own bound too.
        assert_eq!(ids.lock().kept_len(), 7);
        assert_eq!(ids.metrics.forgotten_early.get(), 0);
        // Stored at last (their requests answered 2xx): the bound applies again, and the kept
        // ids go at their next turns, long before their time is up.
        below.store(10, Ordering::Relaxed);
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..1));
        take(&ids, 10..11, 10..11);
        below.store(11, Ordering::Relaxed);
        ids.tidy(100);
        assert_eq!((ids.len(), ids.lock().kept_len()), (3, 0));
        assert_eq!(ids.metrics.forgotten_early.get(), 8);
        for n in 11..40 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
            below.store(n as u64 + 1, Ordering::Relaxed);
        }
        assert_eq!((ids.len(), ids.lock().kept_len()), (3, 0));
        assert_eq!(ids.claim(id(39), 0), Claimed::Held(39..40));
        assert_eq!(ids.claim(id(36), 0), Claimed::Fresh);
        assert_eq!(ids.claim(id(0), 0), Claimed::Fresh);
        assert_eq!(ids.claim(id(6), 0), Claimed::Fresh);
    }

    #[test]
    fn a_backlog_larger_than_the_bound_keeps_only_the_ids_whose_events_still_wait() {
        // ClickHouse behind for a long time: 500 events always wait, ten times the bound, and
        // every request got its 2xx. The ids kept while their events waited go once their events
        // are stored, as new ids come; they did not stay for their time until the kept ids'
        // bound (as many ids as the buffer holds events) filled up.
        let (ids, below) = store(50, Duration::from_secs(3600));
        let ids = ids.keeping(5_000);
        for n in 0..20_000u128 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
            below.store((n as u64 + 1).saturating_sub(500), Ordering::Relaxed);
            if n % 1_000 == 999 {
                assert!(ids.len() <= 50 + 500 + 2, "{} ids after {n}", ids.len());
                check_lines(&ids.lock());
            }
        }
        // Every id whose events wait is still a repeat.
        for n in 19_500..20_000u128 {
            assert_eq!(ids.claim(id(n), 0), Claimed::Held(n as u64..n as u64 + 1), "id {n}");
        }
        // A request left unanswered still keeps its id a turn more after the store.
        let ids = Arc::new(ids);
        drop(guard(&ids, vec![id(19_600)]));
        below.store(20_000, Ordering::Relaxed);
        for n in 20_000..21_000u128 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
            below.store(n as u64 + 1, Ordering::Relaxed);
        }
        assert_eq!(ids.claim(id(19_600), 0), Claimed::Held(19_600..19_601));
        assert_eq!(ids.claim(id(19_601), 0), Claimed::Fresh);
        assert_eq!(ids.len(), 51);
    }

    #[test]
    fn an_id_is_forgotten_once_its_time_is_up_unless_its_events_wait() {
        let (ids, below) = store(100, Duration::ZERO);
        take(&ids, 0..1, 0..1);
        take(&ids, 1..2, 1..2);
        below.store(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(ids.claim(id(0), 0), Claimed::Fresh, "confirmed and its time up");
        assert_eq!(ids.claim(id(1), 0), Claimed::Held(1..2), "still waits to be stored");
        // Passed over in the line, not counted as forgotten early.
        take(&ids, 2..4, 2..3);
        assert_eq!(ids.metrics.forgotten_early.get(), 0);
    }

    /// One second: with a time to live of zero, time is up for an id taken a second ago.
    fn tick() {
        std::thread::sleep(Duration::from_millis(1100));
    }

    #[test]
    fn an_id_left_unanswered_stays_a_turn_after_its_events_are_stored_when_new_ids_come() {
        let (ids, below) = store(100, Duration::ZERO);
        take(&ids, 0..1, 0..1);
        ids.unanswered(&[id(0)]);
        take(&ids, 1..2, 1..2);
        // The outage outlasts the time to live, and no turn comes meanwhile.
        tick();
        below.store(2, Ordering::Relaxed);
        // New ids bring both turns: the id left unanswered stays, the other goes.
        take(&ids, 2..4, 2..4);
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..1), "a retry just after the store");
        assert_eq!(ids.claim(id(1), 0), Claimed::Fresh);
        // A turn later it goes too.
        tick();
        assert_eq!(ids.claim(id(0), 0), Claimed::Fresh);
        assert_eq!(ids.metrics.forgotten_early.get(), 0);
    }

    #[test]
    fn an_id_left_unanswered_stays_a_turn_after_its_events_are_stored_when_retried() {
        let (ids, below) = store(100, Duration::ZERO);
        take(&ids, 0..1, 0..1);
        ids.unanswered(&[id(0)]);
        tick();
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..1), "still waiting");
        below.store(1, Ordering::Relaxed);
        tick();
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..1), "a retry after the store");
        tick();
        assert_eq!(ids.claim(id(0), 0), Claimed::Fresh);
    }

    #[test]
    fn an_id_left_unanswered_is_kept_past_the_bound_for_its_time_after_the_store() {
        let (ids, below) = store(2, Duration::from_secs(3600));
        take(&ids, 0..1, 0..1);
        ids.unanswered(&[id(0)]);
        below.store(1, Ordering::Relaxed);
        // Two more ids: the one left unanswered is at the front when the bound is passed.
        take(&ids, 1..3, 1..3);
        below.store(3, Ordering::Relaxed);
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..1));
        take(&ids, 3..5, 3..5);
        below.store(5, Ordering::Relaxed);
        take(&ids, 5..7, 5..7);
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..1), "kept however many ids came");
        assert_eq!(ids.len(), 3, "the bound's two, and the one kept");
    }

    #[test]
    fn an_id_kept_while_it_waits_goes_at_its_next_turn_once_stored_unless_unanswered() {
        let (ids, below) = store(100, Duration::ZERO);
        take(&ids, 0..2, 0..2);
        ids.unanswered(&[id(1)]);
        tick();
        // Their turn comes while their events wait: both kept.
        take(&ids, 2..3, 2..3);
        assert_eq!(ids.lock().kept_len(), 2);
        below.store(3, Ordering::Relaxed);
        tick();
        take(&ids, 3..4, 3..4);
        assert_eq!(ids.claim(id(0), 0), Claimed::Fresh, "stored, and answered 2xx: goes");
        assert_eq!(ids.claim(id(1), 0), Claimed::Held(0..2), "left unanswered: kept a turn more");
    }

    #[test]
    fn a_request_that_ends_without_its_2xx_leaves_its_ids_unanswered() {
        let (ids, below) = store(100, Duration::ZERO);
        let ids = Arc::new(ids);
        take(&ids, 0..3, 0..3);
        // A 503 or a client that hung up: the guard is dropped. A 2xx: answered.
        drop(guard(&ids, vec![id(0)]));
        guard(&ids, vec![id(1)]).answered();
        below.store(3, Ordering::Relaxed);
        tick();
        take(&ids, 3..4, 3..4);
        take(&ids, 4..5, 4..5);
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..3));
        assert_eq!(ids.claim(id(1), 0), Claimed::Fresh);
        assert_eq!(ids.claim(id(2), 0), Claimed::Fresh);
    }

    #[test]
    fn retries_during_an_outage_without_new_ids_do_not_grow_the_line() {
        let (ids, _) = store(100, Duration::ZERO);
        take(&ids, 0..50, 0..50);
        for _ in 0..3 {
            tick();
            for n in 0..50 {
                assert_eq!(ids.claim(id(n), 0), Claimed::Held(0..50));
            }
        }
        let (line, kept) = {
            let ids = ids.lock();
            (ids.lines[0].len, ids.lines[1].len)
        };
        assert!(line <= 60 && kept <= 60, "{line} {kept}");
    }

    #[test]
    fn without_an_outage_the_kept_ids_stay_within_their_bound() {
        // A bound smaller than the ids waiting for a flush: each id's turn finds it waiting.
        let (ids, below) = store(3, Duration::from_secs(3600));
        for n in 0..1000u128 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
            below.store((n as u64 + 1).saturating_sub(5), Ordering::Relaxed);
        }
        assert!(ids.len() <= 3 + 3 + 5, "{}", ids.len());
        // Every request answered 503 (a ClickHouse slower than ACK_TIMEOUT), none waiting long.
        let (ids, below) = store(3, Duration::from_secs(3600));
        let ids = Arc::new(ids);
        for n in 0..1000u128 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
            drop(guard(&ids, vec![id(n)]));
            below.store(n as u64 + 1, Ordering::Relaxed);
        }
        assert!(ids.len() <= 3 + 3 + 1, "{}", ids.len());
        assert!(ids.metrics.forgotten_early.get() >= 990);
    }

    #[test]
    fn the_kept_ids_may_have_a_larger_bound_than_the_others() {
        let (ids, below) = store(3, Duration::from_secs(3600));
        let ids = Arc::new(ids.keeping(10));
        for n in 0..30u128 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
            drop(guard(&ids, vec![id(n)]));
            below.store(n as u64 + 1, Ordering::Relaxed);
        }
        assert!((12..=14).contains(&ids.len()), "{}", ids.len());
        assert_eq!(ids.claim(id(20), 0), Claimed::Held(20..21));
        assert_eq!(ids.claim(id(0), 0), Claimed::Fresh);
    }

    #[test]
    fn a_kept_id_gets_at_most_one_turn_in_one_pass() {
        let (ids, below) = store(1, Duration::from_secs(3600));
        let ids = Arc::new(ids);
        take(&ids, 0..2, 0..2);
        assert_eq!(ids.lock().kept_len(), 1, "id 0 kept while it waits");
        drop(guard(&ids, vec![id(0)]));
        below.store(2, Ordering::Relaxed);
        // Four ids at once: eight steps over each line. Id 0 goes from the waiting line to the
        // late one in that pass, and the late line's turns in the same pass leave it alone.
        take(&ids, 2..6, 2..6);
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..2), "its one more turn, not two at once");
    }

    #[test]
    fn remembering_many_ids_keeps_the_bound_with_constant_work() {
        let (ids, below) = store(1000, Duration::from_secs(3600));
        below.store(u64::MAX, Ordering::Relaxed);
        for n in 0..100u128 {
            take(&ids, n * 100..(n + 1) * 100, 0..100);
        }
        assert_eq!(ids.len(), 1000);
        assert_eq!(ids.lock().lines[0].len, 1000);
        assert_eq!(ids.metrics.forgotten_early.get(), 9000);
    }

    #[test]
    fn a_batch_claims_its_ids_as_one_by_one_claims_would() {
        let (ids, _) = store(100, Duration::from_secs(60));
        take(&ids, 0..3, 10..13);
        let other = ids.owner();
        assert_eq!(ids.claim(id(5), other), Claimed::Fresh);
        let owner = ids.owner();
        let batch = [id(7), id(1), id(5), id(7), id(8), id(2)];
        assert_eq!(
            ids.claim_all(&batch, owner),
            [
                Claimed::Fresh,
                Claimed::Held(10..13),
                Claimed::InFlight,
                Claimed::Mine,
                Claimed::Fresh,
                Claimed::Held(10..13)
            ]
        );
        // In flight now, as after claims one by one: another request finds them so.
        assert_eq!(ids.claim(id(8), other), Claimed::InFlight);
        ids.remember([id(7), id(8)], &(20..22));
        assert_eq!(ids.claim_all(&[id(8), id(9)], ids.owner()), [Claimed::Held(20..22), Claimed::Fresh]);
    }

    /// Every entry of the index is reachable from its home without crossing an empty place,
    /// and the count is right.
    fn check_index(index: &Index) {
        let mask = index.mask();
        let mut n = 0;
        for (at, &e) in index.entries.iter().enumerate() {
            if e == 0 {
                continue;
            }
            n += 1;
            let mut p = (e >> 32) as usize & mask;
            while p != at {
                assert_ne!(index.entries[p], 0, "entry at {at} cut off from its home");
                p = (p + 1) & mask;
            }
        }
        assert_eq!(n, index.len());
    }

    #[test]
    fn the_index_finds_what_it_holds_through_clusters_wrap_arounds_removals_and_doublings() {
        // Hashes with few distinct homes, several slots on one hash, and homes near the end of
        // the table, against a model; the table starts small, so it doubles on the way.
        let mut index = Index::with_room(4);
        let mut model: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        let mut held: Vec<u32> = Vec::new();
        let mut next = below_n(0x9e37_79b9_7f4a_7c15);
        let mut doubled = 0;
        for step in 0..60_000u64 {
            let size = index.entries.len();
            if next(3) > 0 && held.len() < 1500 {
                let slot = loop {
                    let s = next(100_000) as u32;
                    if !model.contains_key(&s) {
                        break s;
                    }
                };
                // The high half, beyond the hash bits kept, must not matter; half the low halves
                // are among 40 near the top (homes at the table's end, long clusters).
                let low = if next(2) == 0 { u64::from(u32::MAX) - next(40) } else { next(1 << 32) };
                let hash = (next(1 << 20) << 32) | low;
                index.insert(hash, slot);
                model.insert(slot, hash);
                held.push(slot);
            } else if !held.is_empty() {
                let slot = held.swap_remove(next(held.len() as u64) as usize);
                let hash = model.remove(&slot).expect("held");
                index.remove(hash, slot);
                // A slot it does not hold is no change.
                index.remove(hash, slot);
            }
            doubled += usize::from(index.entries.len() != size);
            if step % 500 == 0 || held.len() < 40 {
                check_index(&index);
                for (&slot, &hash) in &model {
                    assert_eq!(index.find(hash, |s| s == slot), Some(slot), "step {step}, slot {slot}");
                }
            }
            assert_eq!(index.len(), model.len());
        }
        check_index(&index);
        assert!(doubled >= 6, "the table doubled {doubled} times");
        assert!(index.entries.len() * 3 >= index.len() * 4, "load above 3/4");
    }

    #[test]
    fn a_small_table_stays_consistent_after_every_change_with_homes_at_its_end() {
        // 16 places, never more than 12 entries (so it never doubles): homes among the last
        // two and first two places, so clusters wrap around the end; every change checked.
        let mut index = Index::with_room(0);
        assert_eq!(index.entries.len(), 16);
        let mut next = below_n(0x2545_f491_4f6c_dd1d);
        let mut model: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        let mut gone: Vec<(u32, u64)> = Vec::new();
        for step in 0..200_000u64 {
            if next(2) == 0 && model.len() < 12 {
                let slot = next(64) as u32;
                if model.contains_key(&slot) {
                    continue;
                }
                // Low halves 14, 15, 16 (home 0), 17 (home 1), or a few wider ones; equal low
                // halves for different slots; the high half anything.
                let low = [14, 15, 16, 17, 14 + 16, 15 + 64, 0xffff_fff0, 0xffff_ffff][next(8) as usize];
                let hash = (next(1 << 32) << 32) | low;
                index.insert(hash, slot);
                model.insert(slot, hash);
            } else if !model.is_empty() {
                let slots: Vec<u32> = model.keys().copied().collect();
                let slot = slots[next(slots.len() as u64) as usize];
                let hash = model.remove(&slot).unwrap();
                index.remove(hash, slot);
                gone.push((slot, hash));
            }
            // A slot it does not hold, with the bits of one it holds: no change.
            if let Some(&(slot, hash)) = gone.last()
                && !model.contains_key(&slot)
            {
                let before = index.entries.clone();
                index.remove(hash, slot);
                assert_eq!(index.entries, before, "step {step}");
            }
            assert_eq!(index.entries.len(), 16, "step {step}");
            check_index(&index);
            for (&slot, &hash) in &model {
                // `is` sees only slots whose hash bits are equal.
                let is = |s: u32| {
                    assert_eq!(Index::bits(model[&s]), Index::bits(hash), "step {step}");
                    s == slot
                };
                assert_eq!(index.find(hash, is), Some(slot), "step {step}");
            }
            for &(slot, hash) in gone.iter().rev().take(4) {
                if !model.contains_key(&slot) {
                    assert_eq!(index.find(hash, |s| s == slot), None, "step {step}");
                }
            }
            if gone.len() > 64 {
                gone.drain(..32);
            }
        }
    }

    #[test]
    fn a_table_made_with_room_for_n_takes_n_before_it_doubles_and_stays_at_most_3_4_full() {
        for n in (0..5_000).chain([786_431, 786_432, 786_433, 1 << 20]) {
            let size = Index::size_for(n);
            assert!(size.is_power_of_two() && size >= 16, "{n}");
            assert!(n * 4 <= size * 3, "{n}: {size}");
        }
        for n in [0usize, 1, 11, 12, 13, 100, 767, 768, 769, 3000] {
            let mut index = Index::with_room(n);
            let size = index.entries.len();
            for k in 0..n as u32 {
                index.insert(u64::from(k.wrapping_mul(0x9e37_79b9)), k);
            }
            assert_eq!(index.entries.len(), size, "{n}: doubled before its room was used");
            for k in n as u32..n as u32 + 2000 {
                index.insert(u64::from(k.wrapping_mul(0x9e37_79b9)), k);
                assert!(index.len() * 4 <= index.entries.len() * 3, "{n}: load above 3/4");
            }
            check_index(&index);
        }
    }

    /// The remembered ids of each line in order, as (id, start, len, since).
    fn lines_of(ids: &Ids) -> [Vec<(Uuid, u64, u32, u32)>; 3] {
        [FIRST, WAITED, LATE_LINE].map(|l| {
            let mut out = Vec::new();
            let mut i = ids.lines[l].head;
            while i != NIL {
                let s = ids.slot(i);
                out.push((s.id, s.start, s.len, s.since));
                i = s.next;
            }
            out
        })
    }

    #[test]
    fn claims_of_a_whole_batch_match_claims_one_by_one_through_turns_and_expiry() {
        // Two stores on the same clock, fed the same requests: one claims each batch with
        // `claim_all`, the other one id at a time. Small bounds and a time to live of zero, so
        // that claims of expired ids keep them and give the fronts their turns mid-batch.
        let (a, below_a) = store(25, Duration::ZERO);
        let (mut b, below_b) = store(25, Duration::ZERO);
        b.epoch = a.epoch;
        let (a, b) = (a.keeping(40), b.keeping(40));
        let mut next = below_n(0x1234_5678_9abc_def1);
        let mut seq = 0u64;
        for round in 0..6_000 {
            // Never across a second's boundary between the two stores.
            if a.epoch.elapsed().subsec_millis() > 900 {
                std::thread::sleep(Duration::from_millis(150));
            }
            match next(20) {
                0 => {
                    let to = seq.saturating_sub(next(150));
                    below_a.fetch_max(to, Ordering::Relaxed);
                    below_b.fetch_max(to, Ordering::Relaxed);
                }
                1..3 => {
                    let n = id(u128::from(next(300)));
                    a.unanswered(&[n]);
                    b.unanswered(&[n]);
                }
                _ => {
                    let batch: Vec<Uuid> = (0..=next(12)).map(|_| id(u128::from(next(300)))).collect();
                    // Another request holding one id in flight now and then.
                    let other = (next(4) == 0).then(|| (a.owner(), b.owner(), batch[0]));
                    if let Some((oa, ob, n)) = other {
                        assert_eq!(a.claim(n, oa), b.claim(n, ob));
                    }
                    let (oa, ob) = (a.owner(), b.owner());
                    let all = a.claim_all(&batch, oa);
                    let one_by_one: Vec<Claimed> = batch.iter().map(|&n| b.claim(n, ob)).collect();
                    assert_eq!(all, one_by_one, "round {round}");
                    let fresh: Vec<Uuid> = batch
                        .iter()
                        .zip(&all)
                        .filter(|(_, c)| **c == Claimed::Fresh)
                        .map(|(n, _)| *n)
                        .collect();
                    let k = next(3);
                    if k == 0 {
                        a.give_back(&fresh);
                        b.give_back(&fresh);
                    } else {
                        a.remember(fresh.iter().copied(), &(seq..seq + k));
                        b.remember(fresh.iter().copied(), &(seq..seq + k));
                        seq += k;
                    }
                    if let Some((_, _, n)) = other {
                        a.give_back(&[n]);
                        b.give_back(&[n]);
                    }
                }
            }
            if round % 1_500 == 1_499 {
                tick();
            }
            let (ga, gb) = (a.lock(), b.lock());
            assert_eq!(lines_of(&ga), lines_of(&gb), "round {round}");
            let flying = |g: &Ids| g.in_flight.keys().copied().collect::<std::collections::BTreeSet<Uuid>>();
            assert_eq!(flying(&ga), flying(&gb), "round {round}");
            check_lines(&ga);
            check_index(&ga.index);
        }
        assert_eq!(a.metrics.forgotten_early.get(), b.metrics.forgotten_early.get());
        assert!(a.metrics.forgotten_early.get() > 0);
    }

    #[test]
    fn the_ids_past_the_bound_are_charged_and_tidied_away_once_their_time_is_up_without_new_ids() {
        let (ids, below) = store(10, Duration::ZERO);
        let charged = Arc::new(AtomicU64::new(0));
        let c = charged.clone();
        let ids = ids.charging(move |bytes| c.store(bytes as u64, Ordering::Relaxed));
        // 30 ids whose events wait: all kept, 20 past the bound, charged.
        for n in 0..30 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
        }
        assert_eq!(ids.len(), 30);
        assert_eq!(charged.load(Ordering::Relaxed), 20 * ID_BYTES as u64);
        // Waiting still: a tidy keeps them, their time up or not.
        tick();
        ids.tidy(100);
        assert_eq!(ids.len(), 30);
        // Stored: no new id comes, and the tidy forgets them at their turn, as new ids would
        // have (all of them are in the waiting line now, kept at the tick, and go once stored,
        // their time up or not); the charge goes with them.
        below.store(30, Ordering::Relaxed);
        ids.tidy(100);
        assert_eq!(ids.len(), 0);
        assert_eq!(charged.load(Ordering::Relaxed), 0);
        // At most `steps` turns per line at a time.
        for n in 30..60 {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
        }
        below.store(60, Ordering::Relaxed);
        tick();
        ids.tidy(4);
        assert_eq!(ids.len(), 22);
    }

    use crate::ingest::buffer::{Buffer, Limits, PushError};
    use crate::store::EventRow;

    fn rrow() -> EventRow {
        EventRow {
            event_id: Uuid::new_v4(),
            ad_id: Uuid::nil(),
            kind: crate::domain::EventKind::Click,
            event_time: time::OffsetDateTime::UNIX_EPOCH,
            received_at: time::OffsetDateTime::UNIX_EPOCH,
            ip_hash: 1,
            playback_time: None,
            error_code: 0,
            batch_id: Uuid::nil(),
            traffic: crate::domain::Traffic::Valid,
        }
    }

    /// The app's wiring (app.rs `state`): a buffer of `cap_rows` rows, the store charging it.
    fn wired(cap_rows: usize, max: usize, ttl: Duration) -> (Arc<Buffer>, EventIds) {
        let b = Arc::new(Buffer::new(
            Limits {
                max_bytes: cap_rows * EventRow::SIZE,
                batch_rows: 1_000_000,
                batch_bytes: usize::MAX / 2,
                max_age: Duration::from_secs(1),
            },
            Arc::new(crate::metrics::Metrics::new()),
        ));
        let (b1, b2) = (b.clone(), b.clone());
        let ids = EventIds::new(max, ttl, move || b1.confirmed_below(), metrics())
            .keeping(cap_rows * EventRow::SIZE / EventRow::SIZE)
            .charging(move |bytes| b2.set_ids_bytes(bytes));
        (b, ids)
    }

    /// One request with one id and one event, as `Settle::apply` does; false when refused.
    fn request(b: &Arc<Buffer>, ids: &EventIds, n: u128) -> bool {
        let owner = ids.owner();
        assert_eq!(ids.claim(id(n), owner), Claimed::Fresh);
        match b.push(vec![rrow()]) {
            Ok(seqs) => {
                ids.remember([id(n)], &seqs);
                true
            }
            Err(PushError::Full) => {
                ids.give_back(&[id(n)]);
                false
            }
            Err(e) => panic!("{e:?}"),
        }
    }

    /// ClickHouse takes everything held.
    fn flush(b: &Buffer) {
        while let Some(batch) = b.take(Instant::now(), true) {
            b.release(&batch);
        }
        assert_eq!(b.held_bytes(), 0);
    }

    /// Rows requests could still reserve now.
    fn room(b: &Arc<Buffer>) -> usize {
        let mut n = 0;
        let mut held = Vec::new();
        while let Ok(r) = b.reserve(1) {
            held.push(r);
            n += 1;
        }
        n
    }

    #[test]
    fn repeated_outages_with_unanswered_ids_never_leave_the_buffer_without_room() {
        // The app's wiring, in `committed` mode: every request of each outage is answered 503
        // (ACK_TIMEOUT), so its id is kept for late retries, outage after outage. Kept ids
        // charged against the buffer whole until their time was up left it no room at all after
        // seven such outages (a reviewer's test: 46, 21, 10, 4, 2, 1, then 0 rows of 100).
        let cap = 100;
        let (b, ids) = wired(cap, 400, Duration::from_secs(3600));
        let mut n: u128 = 0;
        for outage in 0..7 {
            let first = n;
            while request(&b, &ids, n) {
                n += 1;
            }
            // Ids past the bound count while their events wait, one per event at most: never
            // fewer events fit than with an id charged on each.
            let taken = (n - first) as usize;
            assert!(taken >= cap * EventRow::SIZE / (EventRow::SIZE + ID_BYTES), "outage {outage}: {taken}");
            let waiting: Vec<Uuid> = (first..n).map(id).collect();
            ids.unanswered(&waiting);
            flush(&b);
            // The kept ids still count, one per event held at most: never less than this room.
            assert!(room(&b) >= cap * EventRow::SIZE / (EventRow::SIZE + ID_BYTES), "after outage {outage}");
            for _ in 0..10 {
                ids.tidy(2000);
            }
        }
        assert!(!b.is_full());
        assert!(request(&b, &ids, 99_999_999));
    }

    #[test]
    fn a_remembered_id_takes_a_40_byte_slot() {
        assert_eq!(std::mem::size_of::<Slot>(), 40);
    }

    /// Every remembered id is in exactly one line, in the one its flag names, the lines are
    /// linked both ways, and their lengths add up to the index's.
    fn check_lines(ids: &Ids) {
        let mut seen = std::collections::HashSet::new();
        for (l, line) in ids.lines.iter().enumerate() {
            let (mut i, mut prev, mut n) = (line.head, NIL, 0);
            while i != NIL {
                let slot = ids.slot(i);
                assert_eq!((slot.prev, slot.line()), (prev, l), "slot {i}");
                assert_eq!(ids.find(&slot.id), Some(i));
                assert!(seen.insert(slot.id), "{} twice", slot.id);
                (prev, i, n) = (i, slot.next, n + 1);
            }
            assert_eq!((line.tail, line.len), (prev, n), "line {l}");
        }
        assert_eq!(seen.len(), ids.len());
    }

    /// A repeatable stream of numbers below the one asked for (xorshift), from `seed`.
    fn below_n(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed;
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    #[test]
    fn the_lines_stay_linked_through_any_mix_of_takes_retries_and_stores() {
        // Small bounds and a time to live of zero, so that ids are kept, forgotten and their
        // slots reused all the time; a model of the ids left unforgotten checks every answer.
        let (ids, below) = store(40, Duration::ZERO);
        let ids = Arc::new(ids.keeping(60));
        let mut next = below_n(0x2545_f491_4f6c_dd1d);
        let mut seq = 0u64;
        let mut taken: HashMap<u128, Range<u64>> = HashMap::new();
        for round in 0..20_000 {
            let n = u128::from(next(500));
            match next(50) {
                // The watermark only rises, and leaves about a hundred ids waiting behind it.
                0 => _ = below.fetch_max(seq.saturating_sub(200), Ordering::Relaxed),
                1..10 => {
                    let seqs = Seqs::Each(vec![taken.get(&n).cloned().unwrap_or(0..0)]);
                    drop(ids.until_answered(vec![id(n)], seqs));
                }
                _ => {
                    let owner = ids.owner();
                    match ids.claim(id(n), owner) {
                        Claimed::Fresh => {
                            let k = next(3) + 1;
                            ids.remember([id(n)], &(seq..seq + k));
                            taken.insert(n, seq..seq + k);
                            seq += k;
                        }
                        Claimed::Held(seqs) => assert_eq!(Some(&seqs), taken.get(&n), "id {n}"),
                        other => panic!("{other:?} for id {n} with no request in flight"),
                    }
                }
            }
            if round % 5_000 == 4_999 {
                tick();
            }
            check_lines(&ids.lock());
        }
        // Ids whose events wait are never forgotten.
        let lowest = below.load(Ordering::Relaxed);
        for (n, seqs) in &taken {
            if seqs.end > lowest && ids.lock().find(&id(*n)).is_none() {
                panic!("id {n} forgotten while its events {seqs:?} wait");
            }
        }
    }

    /// The free list holds exactly the slots no line holds, each once, none of them indexed,
    /// and every chunk but the last is full.
    fn check_slab(ids: &Ids) {
        let total: usize = ids.chunks.iter().map(Vec::len).sum();
        for (k, c) in ids.chunks.iter().enumerate() {
            assert_eq!(c.capacity(), CHUNK, "chunk {k} reallocated");
            if k + 1 < ids.chunks.len() {
                assert_eq!(c.len(), CHUNK, "chunk {k}");
            }
        }
        let mut free = std::collections::HashSet::new();
        let mut i = ids.free;
        while i != NIL {
            assert!((i as usize) < total, "free slot {i} past the slab");
            assert!(free.insert(i), "slot {i} twice in the free list");
            assert_ne!(ids.find(&ids.slot(i).id), Some(i), "free slot {i} indexed");
            i = ids.slot(i).next;
        }
        assert_eq!(free.len() + ids.len(), total);
    }

    #[test]
    fn slots_are_taken_freed_and_reused_across_chunk_boundaries() {
        const C: u128 = CHUNK as u128;
        // The slab takes two chunks: slots 65,535 | 65,536 are both in use.
        const N: u128 = C + C / 2 + 7;
        let (ids, below) = store(10, Duration::from_secs(3600));
        let ids = Arc::new(ids);
        // An outage: every id waits, so every one is kept past both bounds.
        for n in 0..N {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
        }
        {
            let g = ids.lock();
            assert_eq!((g.len(), g.chunks.len()), (N as usize, 2));
            check_lines(&g);
            check_slab(&g);
        }
        for n in [0, C - 2, C - 1, C, C + 1, N - 1] {
            assert_eq!(ids.claim(id(n), 0), Claimed::Held(n as u64..n as u64 + 1), "id {n}");
        }
        drop(guard(&ids, vec![id(C - 1), id(C)]));
        // Stored: each new id frees old slots (two steps over each kept line) and takes one
        // (the most recently freed), so slots on both sides of the boundary are reused.
        below.store(N as u64, Ordering::Relaxed);
        for n in N..3 * N {
            take(&ids, n..n + 1, n as u64..n as u64 + 1);
            below.store(n as u64 + 1, Ordering::Relaxed);
            if n % 20_000 == 0 {
                let g = ids.lock();
                check_lines(&g);
                check_slab(&g);
            }
        }
        {
            let g = ids.lock();
            check_lines(&g);
            check_slab(&g);
            assert_eq!(g.chunks.len(), 2, "freed slots reused, the slab did not grow");
            assert!(g.len() <= 10 + 10, "{}", g.len());
        }
        // Every answer names the id's own events.
        for n in 0..3 * N {
            match ids.claim(id(n), 0) {
                Claimed::Held(seqs) => assert_eq!(seqs, n as u64..n as u64 + 1, "id {n}"),
                Claimed::Fresh => {
                    assert!(n < 3 * N - 10, "id {n} among the last ten");
                    ids.give_back(&[id(n)]);
                }
                other => panic!("{other:?} for id {n}"),
            }
        }
    }

    #[test]
    fn a_request_of_more_than_2_30_events_keeps_its_ids_while_the_last_waits() {
        let (ids, below) = store(100, Duration::ZERO);
        let big = 0..(1u64 << 31);
        take(&ids, 0..1, big.clone());
        tick();
        below.store(1 << 30, Ordering::Relaxed);
        // The range's end is what tells whether its events wait.
        let held = ids.claim(id(0), 0);
        assert!(matches!(&held, Claimed::Held(seqs) if seqs.end == big.end), "{held:?}");
    }

    #[test]
    fn an_id_whose_time_passed_while_it_waited_goes_with_the_store_unless_left_unanswered() {
        let (ids, below) = store(100, Duration::ZERO);
        let ids = Arc::new(ids);
        take(&ids, 0..1, 0..1);
        take(&ids, 1..2, 1..2);
        take(&ids, 2..3, 2..3);
        drop(guard(&ids, vec![id(2)]));
        tick();
        // An outage with retries only: id 1 is retried while its events wait, and the tidy
        // gives the front its turns: ids 0 and 2, their time up, are kept while they wait.
        assert_eq!(ids.claim(id(1), 0), Claimed::Held(1..2));
        ids.tidy(10);
        let lines = {
            let g = ids.lock();
            (g.lines[FIRST].len, g.kept_len())
        };
        assert_eq!(lines, (0, 3));
        below.store(3, Ordering::Relaxed);
        // Stored, past their time: id 0's request got its 2xx, so a retry now is new; id 2's
        // ended without one, so it stays a turn more for its client's retry.
        assert_eq!(ids.claim(id(0), 0), Claimed::Fresh);
        assert_eq!(ids.claim(id(2), 0), Claimed::Held(2..3));
        tick();
        assert_eq!(ids.claim(id(2), 0), Claimed::Fresh);
        assert_eq!(ids.metrics.forgotten_early.get(), 0, "none went before its time");
    }

    #[test]
    fn an_id_found_held_in_a_batch_stays_held_for_its_repeats_in_the_batch() {
        let (ids, below) = store(1, Duration::ZERO);
        let ids = Arc::new(ids);
        // X: its request ended without a 2xx, and its time is up by the batch.
        take(&ids, 1..2, 0..1);
        drop(guard(&ids, vec![id(1)]));
        tick();
        // Y, taken in the batch's second; Z after it sends both to the waiting line.
        while ids.epoch.elapsed().subsec_millis() > 500 {
            std::thread::sleep(Duration::from_millis(20));
        }
        take(&ids, 0..1, 1..2);
        take(&ids, 2..3, 2..3);
        below.store(3, Ordering::Relaxed);
        // Y, then X (its turn comes with the look: kept for its retry), then Y again: X's turn
        // gave the fronts none, so Y, at the front of the waiting line and stored, is still
        // there for its repeat.
        let got = ids.claim_all(&[id(0), id(1), id(0)], ids.owner());
        assert_eq!(got, vec![Claimed::Held(1..2), Claimed::Held(0..1), Claimed::Held(1..2)]);
    }

    #[test]
    fn an_id_whose_request_fails_after_its_events_are_stored_comes_back_for_the_retry() {
        // A bound of one, so that ids wait in the waiting line; their turn comes as soon as
        // their events are stored, before the request that found them held is answered.
        let (ids, below) = store(1, Duration::from_secs(3600));
        let ids = Arc::new(ids);
        take(&ids, 0..1, 0..1);
        take(&ids, 1..2, 1..2);
        // A batch repeats id 0 and waits for its first events; another repeats id 1.
        let (first, second) = (ids.claim(id(0), 0), ids.claim(id(1), 0));
        let seqs = |c: &Claimed| match c {
            Claimed::Held(s) => s.clone(),
            other => panic!("{other:?}"),
        };
        let a = ids.until_answered(vec![id(0)], Seqs::Each(vec![seqs(&first)]));
        let b = ids.until_answered(vec![id(1)], Seqs::All(seqs(&second)));
        below.store(2, Ordering::Relaxed);
        take(&ids, 2..3, 2..3);
        assert_eq!(ids.lock().find(&id(0)), None, "its turn came with the store");
        // Then the batch is refused (its new items find the buffer full): the id is back, for
        // the retry its client sends now. The other batch got its 2xx.
        drop(a);
        b.answered();
        assert_eq!(ids.claim(id(0), 0), Claimed::Held(0..1));
        assert_eq!(ids.claim(id(1), 0), Claimed::Fresh);
        // Not while another request has it in flight: that one stores it.
        let c = ids.until_answered(vec![id(1)], Seqs::All(1..2));
        drop(c);
        assert_eq!(ids.claim(id(1), ids.owner()), Claimed::InFlight);
    }

    #[test]
    fn no_id_is_forgotten_while_its_events_wait_through_batches_with_repeats() {
        // As the randomized test above, with requests of several ids (an id twice in one, and
        // ids already remembered), and every Fresh answer checked against the model.
        let (ids, below) = store(30, Duration::ZERO);
        let ids = Arc::new(ids.keeping(50));
        let mut next = below_n(0x9e37_79b9_7f4a_7c15);
        let mut seq = 0u64;
        let mut taken: HashMap<u128, Range<u64>> = HashMap::new();
        for round in 0..30_000 {
            match next(40) {
                0 => _ = below.fetch_max(seq.saturating_sub(next(300)), Ordering::Relaxed),
                1..6 => {
                    let n = u128::from(next(800));
                    let seqs = Seqs::Each(vec![taken.get(&n).cloned().unwrap_or(0..0)]);
                    drop(ids.until_answered(vec![id(n)], seqs));
                }
                _ => {
                    let owner = ids.owner();
                    let mut fresh = Vec::new();
                    for _ in 0..=next(4) {
                        let n = u128::from(next(800));
                        match ids.claim(id(n), owner) {
                            Claimed::Fresh => {
                                if let Some(s) = taken.get(&n) {
                                    let b = below.load(Ordering::Relaxed);
                                    assert!(s.end <= b, "id {n} forgotten while {s:?} wait (below {b})");
                                }
                                fresh.push(n);
                            }
                            Claimed::Mine => assert!(fresh.contains(&n)),
                            Claimed::Held(seqs) => assert_eq!(Some(&seqs), taken.get(&n), "id {n}"),
                            Claimed::InFlight => panic!("id {n} in flight"),
                        }
                    }
                    let k = next(4);
                    if k == 0 {
                        ids.give_back(&fresh.iter().map(|&n| id(n)).collect::<Vec<_>>());
                    } else {
                        // Duplicates passed on as the batch has them.
                        let mut all = fresh.clone();
                        all.extend(fresh.first().copied());
                        ids.remember(all.iter().map(|&n| id(n)), &(seq..seq + k));
                        for &n in &fresh {
                            taken.insert(n, seq..seq + k);
                        }
                        seq += k;
                    }
                }
            }
            if round % 6_000 == 5_999 {
                tick();
            }
            if round % 16 == 0 {
                let g = ids.lock();
                check_lines(&g);
                check_slab(&g);
            }
        }
    }
}
