//! The `adbeacon` binary: parse the command and configuration, start logging, run.

use std::process::ExitCode;

use adbeacon::{App, Config, app, telemetry};

// Per-request allocations are a measurable share of a tracking request's CPU; mimalloc's
// thread-local free lists make them cheaper than glibc malloc (see `make bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Writes `text` to stdout. A reader that stops early (`adbeacon openapi | head`) is not an error:
/// `print!` would panic on the broken pipe.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("adbeacon: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or("serve");
    match command {
        "-h" | "--help" | "help" => return print_out(&Config::help_text()),
        "-V" | "--version" | "version" => {
            return print_out(&format!("adbeacon {}\n", env!("CARGO_PKG_VERSION")));
        }
        "serve" | "migrate" | "openapi" if args.len() <= 1 => {}
        _ => {
            eprintln!("adbeacon: unknown command {:?}\n\n{}", args.join(" "), Config::help_text());
            return ExitCode::from(2);
        }
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("adbeacon: {e}");
            return ExitCode::from(2);
        }
    };
    if command == "openapi" {
        return print_out(&app::openapi_yaml(&config));
    }
    telemetry::init(config.log_format, &config.log_level);
    let result = match command {
        "migrate" => app::connect_and_migrate(&config).await.map(|(_, applied)| {
            tracing::info!(?applied, "migrations are up to date");
        }),
        _ => {
            // Listening for signals starts before the build, so that a SIGTERM during start-up
            // (or before the server first polls the future) means a clean stop, not the default
            // kill.
            let shutdown = shutdown_signal();
            match App::build(config).await {
                Ok(app) => app.run_until(shutdown).await,
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "adbeacon stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (orchestrators). The handlers are registered when
/// this is called, not when the future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = wait(interrupt) => tracing::info!("SIGINT received; shutting down"),
            _ = wait(terminate) => tracing::info!("SIGTERM received; shutting down"),
        }
    }
}
