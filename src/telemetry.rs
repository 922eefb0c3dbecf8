//! Logging: a tracing subscriber writing JSON (default) or pretty lines to stdout.

use std::io::{self, Write};

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

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
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
