//! Baseline for `scripts/bench.sh`: the cheapest HTTP server the same stack can build.
//!
//! A bare hyper 1.x HTTP/1.1 server (keep-alive, multi-threaded tokio runtime) that reads and
//! discards every request body and answers, whatever the path, a GET with `200` and the 1×1 GIF
//! that `GET /t/{event}` answers, and anything else with `202 {"message":"Click event queued"}` —
//! what `POST /ads/click` answers. The gap between this and `adbeacon serve` under the same wrk
//! load is what routing, validation, the catalog look-up, metrics and buffering cost.
//!
//! Listens on 127.0.0.1:`PORT` (default 8081) and exits on SIGINT or SIGTERM:
//!
//! ```text
//! PORT=8081 cargo run --release --example bare
//! ```

use std::{convert::Infallible, net::SocketAddr};

use adbeacon::api::pixel::PIXEL_GIF;

use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

/// The body `POST /ads/click` answers with.
const BODY: &[u8] = br#"{"message":"Click event queued"}"#;

/// Reads and drops the request body, then answers the fixed pixel (GET) or 202 (anything else).
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == Method::GET;
    // Drain the body so the work matches a server that parses it; a broken body still gets the
    // fixed answer, since this server judges nothing.
    let _ = req.into_body().collect().await;
    let (status, body, kind) = if get {
        (StatusCode::OK, PIXEL_GIF, "image/gif")
    } else {
        (StatusCode::ACCEPTED, BODY, "application/json")
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    Ok(resp)
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let port: u16 = match std::env::var("PORT") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid PORT={v:?}: {e}"))
        })?,
        _ => 8081,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = TcpListener::bind(addr).await?;
    eprintln!("bare: listening on http://{}", listener.local_addr()?);

    // Signal handlers are installed before the loop so an early SIGTERM is not lost.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            res = &mut shutdown => {
                res?;
                eprintln!("bare: shutting down");
                return Ok(());
            }
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    // E.g. EMFILE under a connection storm: keep serving the open ones.
                    Err(e) => {
                        eprintln!("bare: accept failed: {e}");
                        continue;
                    }
                };
                // No TCP_NODELAY: poem (adbeacon) leaves Nagle on too, so both are measured alike.
                tokio::spawn(async move {
                    let conn = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service_fn(handle));
                    // Clients resetting mid-request are normal under load; nothing to report.
                    let _ = conn.await;
                });
            }
        }
    }
}
