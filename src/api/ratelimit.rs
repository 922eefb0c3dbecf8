//! Per-client rate limits on the tracking endpoints: GCRA (the generic cell rate algorithm, a
//! token bucket kept as one timestamp per client), in process.
//!
//! A client is its trusted IP address (see [`super::client_ip`]); IPv6 clients are limited per
//! /64, the block one subscriber gets, since every address in it is theirs for the asking. Each
//! instance limits on its own: behind a load balancer spreading clients over N instances, a
//! client gets up to N times the rate. Memory is bounded: a client idle long enough to have
//! its full burst back is forgotten (its state equals a fresh one; see [`super::recent`]), and at
//! most about [`MAX_CLIENTS`] are remembered at once.

use std::{net::IpAddr, time::Duration};

use super::recent::RecentMap;

/// How many clients' states are kept at most: 32 bytes each in the map (about 10 MB at the
/// bound); past it the least recently seen are forgotten first, and their next request starts
/// with a full burst.
pub const MAX_CLIENTS: usize = 250_000;

/// Marks a click-through request over the limit: it is still redirected (a viewer's navigation
/// is never refused), but not recorded.
#[derive(Debug, Clone, Copy)]
pub struct OverLimit;

/// A GCRA limiter keyed by client address.
pub struct RateLimiter {
    /// Nanoseconds between requests at the sustained rate.
    interval: u64,
    /// How far ahead of now a client's theoretical arrival time may run: (burst − 1) intervals.
    tolerance: u64,
    /// Each client's theoretical arrival time, in nanoseconds of the map's clock plus one
    /// interval (so that a fresh state, 0, is never in the future).
    clients: RecentMap<u128, u64>,
}

impl RateLimiter {
    /// `per_second` requests per second sustained, `burst` at once; `None` when `per_second` is 0
    /// (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<RateLimiter> {
        if per_second == 0 {
            return None;
        }
        let interval = 1_000_000_000 / u64::from(per_second);
        let burst = u64::from(burst.max(1));
        let tolerance = interval * (burst - 1);
        Some(RateLimiter {
            interval,
            tolerance,
            // After this long without a request a client has its whole burst back.
            clients: RecentMap::new(Duration::from_nanos(tolerance + interval), MAX_CLIENTS),
        })
    }

    /// Ok when `ip` may make a request now (and counts it); else how long until it may.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check_at(ip, self.now())
    }

    fn now(&self) -> u64 {
        self.clients.now().saturating_add(self.interval)
    }

    fn check_at(&self, ip: IpAddr, now: u64) -> Result<(), Duration> {
        self.clients.update_at(key(ip), now - self.interval, |tat| {
            let from = tat.unwrap_or(0).max(now);
            if from - now > self.tolerance {
                // A refused request does not move the arrival time: waiting is enough.
                (tat, Err(Duration::from_nanos(from - now - self.tolerance)))
            } else {
                (Some(from + self.interval), Ok(()))
            }
        })
    }
}

/// The limited unit of an address: itself for IPv4, its /64 for IPv6 (IPv4-mapped IPv6
/// addresses count as the IPv4 address).
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            // The tag bit keeps every /64 (even ::/64) apart from the IPv4 keys below 2^32.
            None => (u128::from(v6) & !((1u128 << 64) - 1)) | (1 << 32),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let l = RateLimiter::new(10, 5).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = SECOND;
        for _ in 0..5 {
            assert!(l.check_at(ip, t0).is_ok());
        }
        let wait = l.check_at(ip, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // One interval later one more request fits, and only one.
        assert!(l.check_at(ip, t0 + SECOND / 10).is_ok());
        assert!(l.check_at(ip, t0 + SECOND / 10).is_err());
        // Another client is not affected.
        assert!(l.check_at("192.0.2.2".parse().unwrap(), t0).is_ok());
        // After a quiet half second the whole burst is back.
        let later = t0 + SECOND / 10 + SECOND / 2;
        for _ in 0..5 {
            assert!(l.check_at(ip, later).is_ok());
        }
        assert!(l.check_at(ip, later).is_err());
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        let l = RateLimiter::new(1, 1).unwrap();
        assert!(l.check_at("2001:db8:1:2::1".parse().unwrap(), SECOND).is_ok());
        assert!(l.check_at("2001:db8:1:2::ffff".parse().unwrap(), SECOND).is_err());
        assert!(l.check_at("2001:db8:1:3::1".parse().unwrap(), SECOND).is_ok());
        assert_eq!(key("::ffff:192.0.2.1".parse().unwrap()), key("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(RateLimiter::new(0, 100).is_none());
    }
}
