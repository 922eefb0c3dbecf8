//! Validated domain types: what an event, an ad and an analytics window are, with no I/O.
//!
//! Request DTOs (`api/`) become these through `TryFrom`; these become storage rows (`store/`).

mod ad;
mod event;
mod traffic;
mod window;

pub use ad::{Ad, MAX_URL_LEN, demo_ads, is_http_url, is_sent_url};
pub use event::{Event, EventKind, EventReport, PlaybackTime, event_time};
pub use traffic::{BUILTIN_BOT_PATTERNS, Traffic, UserAgentFilter};
pub use window::{Cuts, Timeframe, Window, WindowKind, end_of_minute, months_before, rfc3339};
