//! Validated domain types: what an event and an ad are, with no I/O.
//!
//! Request DTOs (`api/`) become these through `TryFrom`; these become storage rows (`store/`).

mod ad;
mod event;

pub use ad::{Ad, demo_ads};
pub use event::{Event, EventKind, EventReport, EventTime, PlaybackTime};
