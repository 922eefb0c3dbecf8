//! Traffic quality: whether an accepted event counts in the net numbers, and if not, why.
//!
//! What the IAB/MRC guidelines call general invalid traffic is filtered by rules, not guessed:
//! declared bots and spiders and non-browser HTTP tools (user-agent patterns), requests without a
//! user agent, and repeats of the same ad, client and kind within the dedup window. Filtered
//! events are still stored, flagged with the reason, so analysts can see and audit them; the
//! aggregates behind analytics count only valid ones.

use std::hash::BuildHasher;

use aho_corasick::AhoCorasick;
use parking_lot::Mutex;
use serde_repr::{Deserialize_repr, Serialize_repr};

/// Why an event counts or not. The discriminants are the `Enum8` values of `events.traffic`;
/// never renumber them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize_repr, Deserialize_repr)]
#[repr(i8)]
pub enum Traffic {
    /// Counts in the net numbers.
    Valid = 0,
    /// The same ad, client IP and kind as a counted event within the dedup window.
    Duplicate = 1,
    /// A user agent that declares a bot, spider or crawler, or a non-browser HTTP tool.
    Bot = 2,
    /// The request carried no user agent (or an empty one).
    EmptyUserAgent = 3,
}

impl Traffic {
    /// Every reason an event is filtered, in discriminant order.
    pub const FILTERED: [Traffic; 3] = [Traffic::Duplicate, Traffic::Bot, Traffic::EmptyUserAgent];

    /// The `Enum8` name in ClickHouse and the label in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Traffic::Valid => "valid",
            Traffic::Duplicate => "duplicate",
            Traffic::Bot => "bot",
            Traffic::EmptyUserAgent => "empty_user_agent",
        }
    }

    /// Parses [`Traffic::name`].
    pub fn from_name(name: &str) -> Option<Traffic> {
        [Traffic::Valid, Traffic::Duplicate, Traffic::Bot, Traffic::EmptyUserAgent]
            .into_iter()
            .find(|t| t.name() == name)
    }
}

/// User-agent fragments (matched anywhere, ignoring ASCII case) of declared bots, spiders and
/// crawlers, of headless browsers and of HTTP tools and libraries that no video player sends.
/// Generic words catch the long tail (most crawlers call themselves "…bot" or "…spider").
pub const BUILTIN_BOT_PATTERNS: &[&str] = &[
    // Declared robots; the generic words cover Googlebot, bingbot, AdsBot-Google, YandexBot, …
    "bot",
    "crawl",
    "spider",
    "slurp",
    "scraper",
    "archiver",
    "facebookexternalhit",
    "mediapartners-google",
    "google-inspectiontool",
    "feedfetcher",
    "bingpreview",
    "pingdom",
    "uptimerobot",
    "statuscake",
    "site24x7",
    "lighthouse",
    "pagespeed",
    "gtmetrix",
    // Headless and automated browsers.
    "headlesschrome",
    "phantomjs",
    "selenium",
    "puppeteer",
    "playwright",
    // HTTP tools and libraries (non-browser user agents).
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "python-httpx",
    "aiohttp",
    "scrapy",
    "go-http-client",
    "java/",
    "apache-httpclient",
    "libwww-perl",
    "node-fetch",
    "axios/",
    "httpie",
    "postmanruntime",
    "insomnia",
    "guzzlehttp",
    "windowspowershell",
    // Load generators.
    "k6/",
];

/// Fragments that contain a bot pattern but name real devices (the phone maker Cubot, whose
/// Android user agents say "CUBOT"), so that a match inside them does not count.
const NOT_BOTS: &[&str] = &["cubot"];

/// Agents up to this many bytes go through the SIMD prefilter (lower-cased in a buffer on the
/// stack); longer ones, rare, through the automaton alone.
const PREFILTER_MAX: usize = 384;

/// Classifies user agents. Built once at start-up: the built-in patterns plus the configured
/// ones, compiled into one automaton so a check is a single pass over the header.
#[derive(Debug)]
pub struct UserAgentFilter {
    bots: AhoCorasick,
    not_bots: AhoCorasick,
    /// The bot patterns, lower-cased, in a SIMD (Teddy) searcher that runs on a lower-cased copy
    /// of the agent: it tells a browser's or player's agent from a bot's about three times as fast
    /// as the automaton (50 against 145 ns for a 108-byte agent), and almost every request has
    /// one. A hit goes to the automaton, which alone decides. `None` where the CPU or the number of
    /// patterns does not allow one.
    prefilter: Option<aho_corasick::packed::Searcher>,
    /// Agents classified lately, with their class (see [`Seen`]).
    seen: Seen,
}

impl Clone for UserAgentFilter {
    /// The same patterns, with nothing seen yet: a clone built to compare (say, without the
    /// prefilter) must classify by itself, not recall what the original decided.
    fn clone(&self) -> Self {
        UserAgentFilter {
            bots: self.bots.clone(),
            not_bots: self.not_bots.clone(),
            prefilter: self.prefilter.clone(),
            seen: Seen::new(),
        }
    }
}

/// How many agents [`Seen`] keeps: far more than the distinct agents of the players and
/// browsers one campaign reaches at a time, and at most `SEEN_SLOTS * PREFILTER_MAX` bytes.
const SEEN_SLOTS: usize = 1024;

/// Agents classified lately, by hash, one per slot; a new agent takes its slot's place.
///
/// Why: a player sends the same agent with every beacon of a view, and the agents of one
/// campaign's audience are a few hundred browser and device versions. The search over the
/// agent was the largest single item of a click's own work (callgrind: about 1,200 of some
/// 30,000 instructions, with a 108-byte agent); a slot's look-up is one hash of the agent and one
/// comparison. The whole agent is compared, so a hash collision costs a search, never a wrong
/// class; agents longer than `PREFILTER_MAX` are not kept.
#[derive(Debug)]
struct Seen {
    hasher: hashbrown::DefaultHashBuilder,
    slots: Box<[Slot]>,
}

/// One agent of [`Seen`] and its class, or none yet.
type Slot = Mutex<Option<(Box<[u8]>, Traffic)>>;

impl Seen {
    fn new() -> Seen {
        Seen {
            hasher: hashbrown::DefaultHashBuilder::default(),
            slots: (0..SEEN_SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn slot(&self, ua: &[u8]) -> &Slot {
        // The slots are a power of two: the low bits of the hash pick one.
        &self.slots[(self.hasher.hash_one(ua) as usize) & (SEEN_SLOTS - 1)]
    }

    /// The class `classify` gives `ua`, from the slot when the slot holds `ua`, else from
    /// `classify`, kept in the slot.
    fn get_or(&self, ua: &[u8], classify: impl FnOnce() -> Traffic) -> Traffic {
        if ua.len() > PREFILTER_MAX {
            return classify();
        }
        let slot = self.slot(ua);
        if let Some((seen, class)) = &*slot.lock()
            && **seen == *ua
        {
            return *class;
        }
        // Classified outside the lock: another worker may look the slot up meanwhile.
        let class = classify();
        *slot.lock() = Some((ua.into(), class));
        class
    }
}

impl UserAgentFilter {
    /// The built-in patterns plus `extra` (case-insensitive fragments).
    pub fn new(extra: &[String]) -> UserAgentFilter {
        let patterns: Vec<&str> =
            BUILTIN_BOT_PATTERNS.iter().copied().chain(extra.iter().map(String::as_str)).collect();
        let build = |p: &[&str]| {
            AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(p)
                .expect("plain fragments always compile")
        };
        let lower: Vec<Vec<u8>> = patterns.iter().map(|p| p.as_bytes().to_ascii_lowercase()).collect();
        let prefilter = aho_corasick::packed::Searcher::new(lower.iter());
        UserAgentFilter { bots: build(&patterns), not_bots: build(NOT_BOTS), prefilter, seen: Seen::new() }
    }

    /// What a request with this user agent is; `None` means the header was absent.
    pub fn classify(&self, user_agent: Option<&[u8]>) -> Traffic {
        let ua = user_agent.unwrap_or_default();
        if ua.iter().all(u8::is_ascii_whitespace) {
            return Traffic::EmptyUserAgent;
        }
        self.seen.get_or(ua, || self.search(ua))
    }

    /// [`UserAgentFilter::classify`] for an agent that is not blank, without [`Seen`].
    fn search(&self, ua: &[u8]) -> Traffic {
        if !self.surely_not_bot(ua) && self.bots.is_match(ua) && !self.is_exception(ua) {
            return Traffic::Bot;
        }
        Traffic::Valid
    }

    /// True when the prefilter finds no bot pattern in the agent (ASCII case ignored, as the
    /// automaton does); false when it finds one or cannot tell.
    fn surely_not_bot(&self, ua: &[u8]) -> bool {
        let Some(prefilter) = &self.prefilter else { return false };
        if ua.len() > PREFILTER_MAX {
            return false;
        }
        let mut buf = [0u8; PREFILTER_MAX];
        let lower = &mut buf[..ua.len()];
        lower.copy_from_slice(ua);
        lower.make_ascii_lowercase();
        prefilter.find(&*lower).is_none()
    }

    /// True when every bot match lies inside a known non-bot fragment.
    fn is_exception(&self, ua: &[u8]) -> bool {
        if !self.not_bots.is_match(ua) {
            return false;
        }
        let spans: Vec<_> = self.not_bots.find_iter(ua).map(|m| m.range()).collect();
        self.bots
            .find_overlapping_iter(ua)
            .all(|m| spans.iter().any(|s| s.start <= m.start() && m.end() <= s.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ua: &str) -> Traffic {
        UserAgentFilter::new(&["evilscan".into()]).classify(Some(ua.as_bytes()))
    }

    #[test]
    fn browsers_and_players_are_valid() {
        for ua in [
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
            "AppleCoreMedia/1.0.0.21H16 (Apple TV; U; CPU OS 17_6 like Mac OS X; en_us)",
            "Roku/DVP-14.0 (14.0.4.5040-46)",
            "ExoPlayerLib/2.19.1",
            "Mozilla/5.0 (Linux; Android 9; CUBOT_X19) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36",
        ] {
            assert_eq!(class(ua), Traffic::Valid, "{ua}");
        }
    }

    #[test]
    fn bots_tools_and_configured_patterns_are_flagged() {
        for ua in [
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
            "AdsBot-Google (+http://www.google.com/adsbot.html)",
            "facebookexternalhit/1.1",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0 Safari/537.36",
            "curl/8.5.0",
            "python-requests/2.32.3",
            "Go-http-client/1.1",
            "k6/0.54.0 (https://k6.io/)",
            "GuzzleHttp/7",
            "Mozilla/5.0 (Windows NT; Windows NT 10.0; en-US) WindowsPowerShell/5.1.19041.4412",
            "EvilScan/1.0",
            "Mozilla/5.0 (Linux; Android 9; CUBOT_X19) Googlebot/2.1",
        ] {
            assert_eq!(class(ua), Traffic::Bot, "{ua}");
        }
    }

    #[test]
    fn the_prefilter_never_changes_a_verdict() {
        let with = UserAgentFilter::new(&["EvilScan".into(), "MyMonitor/".into()]);
        // Teddy exists for x86-64 (SSSE3/AVX2) and aarch64 (NEON); elsewhere there is no
        // prefilter and the automaton alone decides.
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert!(with.prefilter.is_some(), "this CPU should build the SIMD prefilter");
        let without = UserAgentFilter { prefilter: None, ..with.clone() };
        let long_browser = format!("Mozilla/5.0 {} Safari/537.36", "(KHTML, like Gecko) ".repeat(30));
        let long_bot = format!("{long_browser} GoogleBot/2.1");
        let cases = [
            "Mozilla/5.0 (SMART-TV; Linux; Tizen 7.0) AppleWebKit/537.36 (KHTML, like Gecko) Version/7.0 TV Safari/537.36",
            "MOZILLA/5.0 (COMPATIBLE; GOOGLEBOT/2.1)",
            "Mozilla/5.0 (compatible; bInGbOt/2.0)",
            "evilscan/1.0",
            "EVILSCAN/1.0",
            "mymonitor/3",
            "Mozilla/5.0 (Linux; Android 9; CUBOT_X19) AppleWebKit/537.36",
            "Mozilla/5.0 (Linux; Android 9; CUBOT_X19) Googlebot/2.1",
            "CURL/8.5.0",
            "Roku/DVP-14.0 (14.0.4.5040-46)",
            "b",
            "ot",
            long_browser.as_str(),
            long_bot.as_str(),
        ];
        for ua in cases {
            assert_eq!(with.classify(Some(ua.as_bytes())), without.classify(Some(ua.as_bytes())), "{ua}");
        }
        assert_eq!(with.classify(Some(long_bot.as_bytes())), Traffic::Bot);
        assert_eq!(with.classify(Some(b"EVILSCAN/1.0")), Traffic::Bot);
        assert_eq!(with.classify(Some(cases[0].as_bytes())), Traffic::Valid);
    }

    #[test]
    fn agents_seen_before_keep_their_verdict() {
        let f = UserAgentFilter::new(&["EvilScan".into()]);
        // Three times as many agents as slots, bots and browsers mixed: slots are shared and
        // taken over, and every answer, first or remembered, must be the search's own.
        let agents: Vec<String> = (0..3 * SEEN_SLOTS)
            .map(|i| match i % 3 {
                0 => {
                    format!("Mozilla/5.0 (Linux; Android {i}) AppleWebKit/537.36 Chrome/{i}.0 Safari/537.36")
                }
                1 => format!("Mozilla/5.0 (compatible; Googlebot/{i}.1)"),
                _ => format!("evilscan/{i}"),
            })
            .collect();
        for round in 0..3 {
            for ua in agents.iter().rev().skip(round) {
                let verdict = f.classify(Some(ua.as_bytes()));
                assert_eq!(verdict, f.search(ua.as_bytes()), "round {round}: {ua}");
                assert_eq!(verdict == Traffic::Valid, ua.starts_with("Mozilla/5.0 (Linux"), "{ua}");
            }
        }
        // An agent over the slots' limit is searched every time, with the same verdict.
        let long = format!("{} Googlebot/2.1", "x".repeat(PREFILTER_MAX));
        assert_eq!(f.classify(Some(long.as_bytes())), Traffic::Bot);
        assert_eq!(f.classify(Some(long.as_bytes())), Traffic::Bot);
        // A clone starts with nothing seen.
        let clone = f.clone();
        assert!(clone.seen.slots.iter().all(|s| s.lock().is_none()));
        assert!(f.seen.slots.iter().any(|s| s.lock().is_some()));
    }

    #[test]
    fn missing_and_blank_user_agents_are_flagged() {
        let f = UserAgentFilter::new(&[]);
        assert_eq!(f.classify(None), Traffic::EmptyUserAgent);
        assert_eq!(f.classify(Some(b"")), Traffic::EmptyUserAgent);
        assert_eq!(f.classify(Some(b"   ")), Traffic::EmptyUserAgent);
    }

    #[test]
    fn names_round_trip() {
        for t in [Traffic::Valid, Traffic::Duplicate, Traffic::Bot, Traffic::EmptyUserAgent] {
            assert_eq!(Traffic::from_name(t.name()), Some(t));
        }
    }
}
