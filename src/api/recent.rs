//! `RecentMap`: a bounded map of small per-key states that only matter for a while (the rate
//! limiter's per-client arrival times, the repeat rule's counted event times).
//!
//! Two generations per shard: writes go to the current one, reads look in both, and every
//! `period` the current becomes the previous and the old previous is dropped. So a key written
//! at time t is kept until at least t + `period` (and at most t + 2 × `period`), with no per-key
//! timers or eviction bookkeeping. This is several times cheaper per request than a general cache
//! (a mutex and a hash look-up, no allocation once warm), which matters on the tracking path.
//! Memory is bounded: a generation that reaches its share of the capacity is rotated early, which
//! forgets the oldest keys first.

use std::{
    hash::{BuildHasher, Hash},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// Shards: enough that two cores rarely contend on one lock.
const SHARDS: usize = 16;

struct Shard<K, V> {
    current: hashbrown::HashMap<K, V>,
    previous: hashbrown::HashMap<K, V>,
    /// When `current` became current, in nanoseconds since the map's start.
    rotated_at: u64,
}

/// A bounded map of recent per-key states; see the module documentation.
pub struct RecentMap<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    hasher: hashbrown::DefaultHashBuilder,
    /// How long a written value is kept at least, in nanoseconds.
    period: u64,
    /// Keys per generation and shard at most.
    shard_capacity: usize,
    start: Instant,
}

impl<K: Hash + Eq, V: Copy> RecentMap<K, V> {
    /// A map that keeps each value at least `period` after it was written and holds at most
    /// about `capacity` keys.
    pub fn new(period: Duration, capacity: usize) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    current: hashbrown::HashMap::default(),
                    previous: hashbrown::HashMap::default(),
                    rotated_at: 0,
                })
            })
            .collect();
        RecentMap {
            shards,
            hasher: hashbrown::DefaultHashBuilder::default(),
            period: u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1),
            // Two generations share the capacity.
            shard_capacity: (capacity / SHARDS / 2).max(1),
            start: Instant::now(),
        }
    }

    /// Nanoseconds since the map's start: the clock of [`RecentMap::update_at`].
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs `f` on the value of `key` (`None` when there is none or it expired) at time `now`
    /// (from [`RecentMap::now`]); the key then holds what `f` returns, or is removed for `None`.
    /// `f` runs under the shard's lock, so updates of one key never interleave.
    pub fn update_at<R>(&self, key: K, now: u64, f: impl FnOnce(Option<V>) -> (Option<V>, R)) -> R {
        let shard = &self.shards[(self.hasher.hash_one(&key) as usize) % SHARDS];
        let mut shard = shard.lock();
        let age = now.saturating_sub(shard.rotated_at);
        if age >= self.period {
            let current = std::mem::take(&mut shard.current);
            // Two periods of silence: the previous generation is stale too.
            shard.previous = if age >= 2 * self.period { hashbrown::HashMap::default() } else { current };
            shard.rotated_at = now;
        }
        let old = shard.current.get(&key).or_else(|| shard.previous.get(&key)).copied();
        let (new, result) = f(old);
        match new {
            Some(value) => {
                if shard.current.len() >= self.shard_capacity && !shard.current.contains_key(&key) {
                    shard.previous = std::mem::take(&mut shard.current);
                    shard.rotated_at = now;
                }
                shard.current.insert(key, value);
            }
            None => {
                shard.current.remove(&key);
                shard.previous.remove(&key);
            }
        }
        result
    }

    /// Keys held (both generations; a key in both counts twice), for tests and gauges.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.current.len() + s.previous.len()
            })
            .sum()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn get(m: &RecentMap<u32, u32>, key: u32, now: u64) -> Option<u32> {
        m.update_at(key, now, |v| (v, v))
    }

    #[test]
    fn a_value_lives_one_to_two_periods() {
        let m = RecentMap::new(Duration::from_secs(10), 1000);
        m.update_at(1, SECOND, |_| (Some(7), ()));
        assert_eq!(get(&m, 1, 10 * SECOND), Some(7), "9 s later");
        // A look-up writes it back, so it stays while it is used.
        assert_eq!(get(&m, 1, 19 * SECOND), Some(7));
        assert_eq!(get(&m, 1, 29 * SECOND), Some(7));
        assert_eq!(get(&m, 1, 60 * SECOND), None, "forgotten after two quiet periods");
    }

    #[test]
    fn none_removes_and_capacity_is_bounded() {
        let m = RecentMap::new(Duration::from_secs(3600), 64);
        m.update_at(5, 0, |_| (Some(1), ()));
        m.update_at(5, 0, |_| (None, ()));
        assert_eq!(get(&m, 5, 0), None);
        for k in 0..10_000 {
            m.update_at(k, 0, |_| (Some(k), ()));
        }
        assert!(m.len() <= 64 + SHARDS * 2, "{} keys held", m.len());
        assert_eq!(get(&m, 9_999, 0), Some(9_999), "the newest stay");
    }
}
