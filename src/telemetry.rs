//! Logging: a tracing subscriber writing JSON (default) or pretty lines to stdout, each line
//! logged while a request is handled carrying its `request_id`.

use std::{
    cell::Cell,
    io::{self, Write},
};

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter, fmt,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

use crate::config::LogFormat;

thread_local! {
    /// The id of the request whose future this thread is polling (the `x-request-id` header),
    /// set by [`RequestScope`]. A `Cell`, not tokio's task-local (a `RefCell` behind a checked
    /// thread-local, swapped in and out on every poll): that cost about 420 instructions of a
    /// click (callgrind).
    static REQUEST_ID: Cell<Option<poem::http::HeaderValue>> = const { Cell::new(None) };
}

/// While it lives, the log lines of this thread carry a request's id: the front endpoint enters
/// one around each poll of a request's future. Dropped (also when the poll panics), it puts back
/// whatever id was set before, and the request's own id back into the request's slot.
pub struct RequestScope<'a> {
    slot: &'a mut Option<poem::http::HeaderValue>,
    outer: Option<poem::http::HeaderValue>,
}

impl<'a> RequestScope<'a> {
    /// Sets the id in `slot` (taken out of it until the scope ends) as the current request's.
    pub fn enter(slot: &'a mut Option<poem::http::HeaderValue>) -> Self {
        let outer = REQUEST_ID.replace(slot.take());
        RequestScope { slot, outer }
    }
}

impl Drop for RequestScope<'_> {
    fn drop(&mut self) {
        *self.slot = REQUEST_ID.replace(self.outer.take());
    }
}

/// The id of the request whose future this thread is polling, if any. (None too while the
/// thread's locals are being destroyed, when a line may still be logged.)
pub fn current_request_id() -> Option<poem::http::HeaderValue> {
    REQUEST_ID
        .try_with(|cell| {
            let id = cell.take();
            let copy = id.clone();
            cell.set(id);
            copy
        })
        .ok()
        .flatten()
}

/// Adds `request_id` to every line logged while a request's id is set ([`RequestScope`]): as a
/// JSON field, or as ` request_id=…` at the end of a pretty line. Request ids hold nothing that
/// needs escaping.
struct WithRequestId<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithRequestId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some(id) = current_request_id() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let id = id.to_str().unwrap_or_default();
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        match (self.json, body.strip_suffix('}')) {
            (true, Some(open)) => writeln!(writer, "{open},\"request_id\":\"{id}\"}}"),
            _ => writeln!(writer, "{body} request_id={id}"),
        }
    }
}

/// Stdout that never fails. When stdout is a closed pipe (`adbeacon | tee log` after Ctrl-C),
/// tracing-subscriber would report the error with `eprintln!`, which panics if stderr is closed
/// too, and a panic during shutdown would lose the buffered events. Losing log lines is the lesser
/// harm, so write errors are dropped here.
struct LossyStdout;

impl Write for LossyStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stdout().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stdout().flush();
        Ok(())
    }
}

/// Installs the global subscriber. A second call (tests build many apps) is a no-op.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_target(true).with_writer(|| LossyStdout);
    let _ = match format {
        LogFormat::Json => {
            let json = fmt::format().json().flatten_event(true).with_current_span(false).with_target(true);
            builder.event_format(WithRequestId { inner: json, json: true }).try_init()
        }
        LogFormat::Pretty => {
            // Colours for a person at a terminal; none in a file or a log collector, where the
            // escape codes would be noise in every line, nor when NO_COLOR is set (no-color.org).
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            let ansi = io::IsTerminal::is_terminal(&io::stdout()) && !no_color;
            let inner = fmt::format().with_target(true).with_ansi(ansi);
            builder.with_ansi(ansi).event_format(WithRequestId { inner, json: false }).try_init()
        }
    };
}

/// Test support: log lines captured in memory.
#[cfg(test)]
pub(crate) mod captured {
    use std::{
        io::{self, Write},
        sync::{Arc, Mutex},
    };

    /// Everything written to it, shared by its clones.
    #[derive(Clone, Default)]
    pub struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// What was written so far.
        pub fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }

        /// Sends the current thread's log lines here (plain text) until the guard is dropped.
        pub fn install(&self) -> tracing::subscriber::DefaultGuard {
            let sink = self.clone();
            let subscriber =
                tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).finish();
            tracing::subscriber::set_default(subscriber)
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{captured::Captured, *};

    /// Formats one `info!` with the given format, inside a request when `id` is given.
    fn line(json: bool, id: Option<&'static str>) -> String {
        let out = Captured::default();
        let sink = out.clone();
        let writer = move || sink.clone();
        let subscriber: Box<dyn Subscriber + Send + Sync> = if json {
            let inner = fmt::format().json().flatten_event(true).with_current_span(false);
            Box::new(fmt().with_writer(writer).event_format(WithRequestId { inner, json }).finish())
        } else {
            let inner = fmt::format().with_ansi(false);
            Box::new(
                fmt()
                    .with_writer(writer)
                    .with_ansi(false)
                    .event_format(WithRequestId { inner, json })
                    .finish(),
            )
        };
        tracing::subscriber::with_default(subscriber, || match id {
            Some(id) => {
                let mut slot = Some(poem::http::HeaderValue::from_static(id));
                let _scope = RequestScope::enter(&mut slot);
                tracing::info!(ad = 7, "stored");
            }
            None => tracing::info!(ad = 7, "stored"),
        });
        out.text()
    }

    #[test]
    fn lines_logged_during_a_request_carry_its_id() {
        let json: serde_json::Value = serde_json::from_str(&line(true, Some("abc-1"))).unwrap();
        assert_eq!(json["request_id"], "abc-1");
        assert_eq!(json["ad"], 7);
        let json: serde_json::Value = serde_json::from_str(&line(true, None)).unwrap();
        assert!(json.get("request_id").is_none());
        let pretty = line(false, Some("abc-2"));
        assert!(pretty.trim_end().ends_with("request_id=abc-2") && pretty.contains("stored"), "{pretty}");
        assert_eq!(pretty.lines().count(), 1);
    }
}
