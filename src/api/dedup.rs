//! The old service's repeat rule: one event of a kind per ad and client within a window.
//!
//! A second click on the same ad from the same client-IP hash within DEDUP_WINDOW (10 s by
//! default) of a counted one is a double click, a reload or a script, not a second customer. It
//! is still stored, flagged `duplicate`, so it shows as filtered traffic; only the first counts.
//! Windows are measured on event time, so a batch an SDK sends after being offline is judged by
//! when its events happened, not by when they arrived; a late event is judged against the last
//! few counted ones of its key (up to [`REMEMBERED`]), so it cannot sneak in between them, and
//! one older than all of them, with all of them remembered, is taken for a repeat. Event times
//! are the client's to choose, so they are not trusted alone: at most [`REMEMBERED`] events of a
//! key count per window of arrival time. Without that, one address sending a burst of clicks
//! dated 10 s apart would have every one counted (about `RATE_LIMIT` a second), where a real
//! viewer, or an offline batch, has a handful at most. Memory
//! is bounded: an entry is forgotten one to two windows (of arrival time) after it was last used
//! (see [`super::recent`]), and at most about [`MAX_KEYS`] are kept (past that the oldest go
//! first, and a repeat of a forgotten one counts).

use std::time::Duration;

use uuid::Uuid;

use super::recent::RecentMap;
use crate::domain::EventKind;

/// How many (ad, client, kind) keys are remembered at most: about 80 bytes each in the map, so
/// some 80 MB at the bound; real traffic stays far below it, since an entry lives only one or two
/// windows.
pub const MAX_KEYS: usize = 1_000_000;

/// How many counted event times a key keeps (the newest ones), and how many of its events count
/// at most per window of arrival time.
pub const REMEMBERED: usize = 4;

type Key = (Uuid, u64, EventKind);

/// What a key remembers: its counted event times, newest first (`EMPTY` marks unused slots), and
/// how many counted events arrived since `burst_since` (arrival time, Unix seconds).
#[derive(Debug, Clone, Copy)]
struct Times {
    times: [i64; REMEMBERED],
    burst_since: i64,
    burst: u8,
}

impl Times {
    const NONE: Times = Times { times: [EMPTY; REMEMBERED], burst_since: i64::MIN, burst: 0 };
}

const EMPTY: i64 = i64::MIN;

/// A counted event's entry, so that it can be taken back when the event is not held after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    key: Key,
    at: i64,
    /// The arrival window it was counted in: only that window's budget gets it back.
    burst_since: i64,
}

/// What the window says of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first in its window (or a kind the rule does not cover): it counts.
    Counts(Option<Mark>),
    /// A repeat within the window of a counted one.
    Repeat,
}

/// The repeat rule's memory.
pub struct DedupWindow {
    window: i64,
    kinds: [bool; EventKind::ALL.len()],
    seen: RecentMap<Key, Times>,
}

impl std::fmt::Debug for DedupWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupWindow").field("window_secs", &self.window).finish_non_exhaustive()
    }
}

impl DedupWindow {
    /// A window of `window` (zero turns the rule off) applied to `kinds`.
    pub fn new(window: Duration, kinds: &[EventKind]) -> DedupWindow {
        let mut covered = [false; EventKind::ALL.len()];
        for k in kinds {
            covered[k.index()] = true;
        }
        DedupWindow {
            window: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
            kinds: covered,
            seen: RecentMap::new(window.max(Duration::from_secs(1)), MAX_KEYS),
        }
    }

    /// Judges an event of `kind` on `ad` from `ip_hash` that happened at `at` and arrived at
    /// `arrived` (both Unix seconds), remembering it when it counts.
    pub fn judge(&self, ad: Uuid, ip_hash: u64, kind: EventKind, at: i64, arrived: i64) -> Verdict {
        if self.window == 0 || !self.kinds[kind.index()] {
            return Verdict::Counts(None);
        }
        let key = (ad, ip_hash, kind);
        let window = self.window.unsigned_abs();
        self.seen.update_at(key, self.seen.now(), |seen| {
            let mut k = seen.unwrap_or(Times::NONE);
            let times = &mut k.times;
            if times.iter().any(|&t| t != EMPTY && at.abs_diff(t) < window) {
                return (seen, Verdict::Repeat);
            }
            // Older than every remembered time with no slot free: it cannot be remembered, so
            // counting it would let the same time count again and again (a client dating its
            // clicks back 10 s at a time, then repeating one). Taken for a repeat: a key with
            // REMEMBERED counted events already is a script's or a replayed batch's.
            if times[REMEMBERED - 1] != EMPTY && at < times[REMEMBERED - 1] {
                return (seen, Verdict::Repeat);
            }
            // Counted events arriving together, however far apart they say they happened.
            let same_burst = arrived.abs_diff(k.burst_since) < window;
            if same_burst && usize::from(k.burst) >= REMEMBERED {
                return (seen, Verdict::Repeat);
            }
            if !same_burst {
                (k.burst_since, k.burst) = (arrived, 0);
            }
            k.burst += 1;
            // Keep the newest: `at` takes the oldest slot (or an empty one).
            times[REMEMBERED - 1] = at;
            times.sort_unstable_by(|a, b| b.cmp(a));
            (Some(k), Verdict::Counts(Some(Mark { key, at, burst_since: k.burst_since })))
        })
    }

    /// Forgets a counted event that was not held, so that its retry counts.
    pub fn release(&self, mark: Mark) {
        self.seen.update_at(mark.key, self.seen.now(), |seen| {
            let Some(mut k) = seen else { return (None, ()) };
            if let Some(slot) = k.times.iter().position(|&t| t == mark.at) {
                k.times[slot] = EMPTY;
                k.times.sort_unstable_by(|a, b| b.cmp(a));
                if k.burst_since == mark.burst_since {
                    k.burst = k.burst.saturating_sub(1);
                }
            }
            (k.times.iter().any(|&t| t != EMPTY).then_some(k), ())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AD: Uuid = Uuid::from_u128(1);
    /// When the events of a test arrive: all within one window, unless a test says otherwise.
    const NOW: i64 = 5000;

    #[test]
    fn a_repeat_within_the_window_does_not_count() {
        let w = DedupWindow::new(Duration::from_secs(10), &[EventKind::Click]);
        assert!(matches!(w.judge(AD, 7, EventKind::Click, 1000, NOW), Verdict::Counts(Some(_))));
        assert_eq!(w.judge(AD, 7, EventKind::Click, 1009, NOW), Verdict::Repeat);
        assert_eq!(w.judge(AD, 7, EventKind::Click, 991, NOW), Verdict::Repeat, "a late event too");
        // Anchored on the counted event: 10 s after it counts again.
        assert!(matches!(w.judge(AD, 7, EventKind::Click, 1010, NOW), Verdict::Counts(Some(_))));
        // Another client, ad or kind is another key; impressions are not covered.
        assert!(matches!(w.judge(AD, 8, EventKind::Click, 1010, NOW), Verdict::Counts(Some(_))));
        assert!(matches!(w.judge(Uuid::from_u128(2), 7, EventKind::Click, 1010, NOW), Verdict::Counts(_)));
        assert_eq!(w.judge(AD, 7, EventKind::Impression, 1010, NOW), Verdict::Counts(None));
        assert_eq!(w.judge(AD, 7, EventKind::Impression, 1010, NOW), Verdict::Counts(None));
    }

    #[test]
    fn a_late_event_is_judged_against_every_counted_one() {
        let w = DedupWindow::new(Duration::from_secs(10), &[EventKind::Click]);
        assert!(matches!(w.judge(AD, 7, EventKind::Click, 1000, NOW), Verdict::Counts(_)));
        assert!(matches!(w.judge(AD, 7, EventKind::Click, 1020, NOW), Verdict::Counts(_)));
        // 5 s after the first counted click: a repeat, though the newest is 25 s away.
        assert_eq!(w.judge(AD, 7, EventKind::Click, 995, NOW), Verdict::Repeat);
        assert_eq!(w.judge(AD, 7, EventKind::Click, 1021, NOW), Verdict::Repeat);
        assert!(matches!(w.judge(AD, 7, EventKind::Click, 1010, NOW), Verdict::Counts(_)));
    }

    #[test]
    fn clicks_dated_ever_further_back_do_not_count_without_end() {
        let w = DedupWindow::new(Duration::from_secs(10), &[EventKind::Click]);
        for at in [1000, 990, 980, 970] {
            assert!(matches!(w.judge(AD, 7, EventKind::Click, at, NOW), Verdict::Counts(_)), "{at}");
        }
        // Older than all four remembered: it could not be remembered, so it would count every
        // time it came.
        for _ in 0..3 {
            assert_eq!(w.judge(AD, 7, EventKind::Click, 960, NOW), Verdict::Repeat);
        }
        // A newer one arriving a window later still counts, and takes the oldest slot.
        assert!(matches!(w.judge(AD, 7, EventKind::Click, 1010, NOW + 10), Verdict::Counts(_)));
        assert_eq!(w.judge(AD, 7, EventKind::Click, 975, NOW), Verdict::Repeat);
    }

    #[test]
    fn a_burst_of_clicks_dated_apart_counts_a_handful() {
        let w = DedupWindow::new(Duration::from_secs(10), &[EventKind::Click]);
        // 1,000 clicks from one address in one second, each dated 10 s after the one before.
        let counted = |arrived: i64| {
            (0..1000)
                .filter(|i| {
                    matches!(
                        w.judge(AD, 7, EventKind::Click, 100_000 + arrived + i * 10, arrived),
                        Verdict::Counts(_)
                    )
                })
                .count()
        };
        assert_eq!(counted(NOW), REMEMBERED);
        // A window of arrival time later, a handful more; in the same window none.
        assert_eq!(counted(NOW + 9), 0);
        assert_eq!(counted(NOW + 10), REMEMBERED);
        // Other addresses have budgets of their own.
        assert!(matches!(w.judge(AD, 8, EventKind::Click, 1000, NOW), Verdict::Counts(_)));
    }

    #[test]
    fn a_release_gives_budget_back_to_its_own_window_only() {
        let w = DedupWindow::new(Duration::from_secs(10), &[EventKind::Click]);
        let Verdict::Counts(Some(early)) = w.judge(AD, 7, EventKind::Click, 100, NOW) else { panic!() };
        // The next arrival window takes three of its four...
        for at in [200, 300, 400] {
            assert!(matches!(w.judge(AD, 7, EventKind::Click, at, NOW + 12), Verdict::Counts(_)));
        }
        // ...and the release of the earlier window's click does not free a place in it.
        w.release(early);
        assert!(matches!(w.judge(AD, 7, EventKind::Click, 500, NOW + 13), Verdict::Counts(_)));
        assert_eq!(w.judge(AD, 7, EventKind::Click, 600, NOW + 13), Verdict::Repeat);
    }

    #[test]
    fn a_released_event_counts_again() {
        let w = DedupWindow::new(Duration::from_secs(10), &[EventKind::Click]);
        let Verdict::Counts(Some(mark)) = w.judge(AD, 7, EventKind::Click, 1000, NOW) else { panic!() };
        let Verdict::Counts(Some(_)) = w.judge(AD, 7, EventKind::Click, 1030, NOW) else { panic!() };
        w.release(mark);
        assert!(matches!(w.judge(AD, 7, EventKind::Click, 1001, NOW), Verdict::Counts(Some(_))));
        // The other counted click is still remembered.
        assert_eq!(w.judge(AD, 7, EventKind::Click, 1035, NOW), Verdict::Repeat);
    }

    #[test]
    fn zero_turns_the_rule_off() {
        let w = DedupWindow::new(Duration::ZERO, &[EventKind::Click]);
        assert_eq!(w.judge(AD, 7, EventKind::Click, 1000, NOW), Verdict::Counts(None));
        assert_eq!(w.judge(AD, 7, EventKind::Click, 1000, NOW), Verdict::Counts(None));
    }
}
