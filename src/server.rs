//! The HTTP/1.1 accept loop in front of the poem endpoint, with graceful shutdown.
//!
//! poem's own `Server` polls two cancellation tokens on every poll of every connection and
//! negotiates HTTP/2 and upgrades per connection. A tracking request is small enough for that to
//! show in `make bench`, so adbeacon runs its own loop: hyper's HTTP/1.1 connection driving the
//! same poem endpoint (routing, extractors, OpenAPI stay poem's). Shutdown costs one atomic load
//! per poll: each connection registers its task's waker once, and shutdown wakes them all.
//!
//! HTTP/2 is not served: players, ad servers and browsers reach adbeacon through a load balancer
//! or directly over HTTP/1.1, and HTTP/2 to the origin brings nothing to one-request beacons.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use poem::{
    Endpoint, Request, Response,
    http::uri::Scheme,
    web::{LocalAddr, RemoteAddr},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

/// What poem converts a response into for hyper.
type HyperResponse = hyper::Response<http_body_util::combinators::BoxBody<bytes::Bytes, io::Error>>;

/// Tells connections to finish their current request and close.
#[derive(Default)]
struct ShutdownSignal {
    triggered: AtomicBool,
    next_id: AtomicU64,
    wakers: Mutex<HashMap<u64, Waker>>,
}

impl ShutdownSignal {
    fn trigger(&self) {
        self.triggered.store(true, Ordering::Release);
        for (_, waker) in self.wakers.lock().drain() {
            waker.wake();
        }
    }
}

/// A connection that starts a graceful shutdown once the signal fires.
struct Graceful<C> {
    conn: Pin<Box<C>>,
    /// hyper's `graceful_shutdown` for this connection type (a fn pointer, because the type,
    /// with its closure service, cannot be named in a trait bound).
    begin_shutdown: fn(Pin<&mut C>),
    signal: Arc<ShutdownSignal>,
    id: u64,
    registered: Option<Waker>,
    shutting_down: bool,
}

impl<C: Future> Future for Graceful<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        if !self.shutting_down {
            // A spawned task keeps its waker, so this runs about once per connection.
            let stale = self.registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker()));
            if stale && !self.signal.triggered.load(Ordering::Acquire) {
                let (id, waker) = (self.id, cx.waker().clone());
                self.signal.wakers.lock().insert(id, waker.clone());
                self.registered = Some(waker);
            }
            // Checked after registering too, so a shutdown between the two is not missed.
            if self.signal.triggered.load(Ordering::Acquire) {
                self.shutting_down = true;
                let begin = self.begin_shutdown;
                begin(self.conn.as_mut());
            }
        }
        self.conn.as_mut().poll(cx)
    }
}

impl<C> Drop for Graceful<C> {
    fn drop(&mut self) {
        if self.registered.is_some() {
            self.signal.wakers.lock().remove(&self.id);
        }
    }
}

/// Called for each connection closed because a request's headers did not arrive within the
/// header read timeout (the metrics count them; no request exists to answer).
pub type OnSlowHeaders = Arc<dyn Fn() + Send + Sync>;

/// How the server treats connections.
#[derive(Clone)]
pub struct Limits {
    /// How long a client may take to send a request's headers (slow-header attacks hold
    /// connections open otherwise).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
    /// Told of each connection cut off in the middle of a request's headers. An idle keep-alive
    /// connection closed by the same timeout is not a slow client and is not reported.
    pub on_slow_headers: OnSlowHeaders,
}

/// Serves `endpoint` on `listener` until `shutdown` completes; then stops accepting, lets every
/// connection finish its current request (for at most `limits.shutdown_grace`) and returns.
pub async fn serve<E>(
    listener: TcpListener,
    endpoint: E,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> io::Result<()>
where
    E: Endpoint<Output = Response> + 'static,
{
    let endpoint = Arc::new(endpoint);
    let local = LocalAddr(listener.local_addr()?.into());
    let signal = Arc::new(ShutdownSignal::default());
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        connections.spawn(connection(
            stream,
            peer,
            endpoint.clone(),
            local.clone(),
            signal.clone(),
            limits.clone(),
        ));
    }
    drop(listener);
    signal.trigger();
    connections.close();
    if tokio::time::timeout(limits.shutdown_grace, connections.wait()).await.is_err() {
        // Their requests can no longer be stored: the buffer refuses pushes once closed (503).
        tracing::warn!(grace = ?limits.shutdown_grace, "connections still open after the grace period");
    }
    Ok(())
}

async fn connection<E>(
    stream: TcpStream,
    peer: SocketAddr,
    endpoint: Arc<E>,
    local: LocalAddr,
    signal: Arc<ShutdownSignal>,
    limits: Limits,
) where
    E: Endpoint<Output = Response> + 'static,
{
    let remote = RemoteAddr(peer.into());
    let service = hyper::service::service_fn(move |req: poem::http::Request<Incoming>| {
        let endpoint = endpoint.clone();
        let request = Request::from((req, local.clone(), remote.clone(), Scheme::HTTP));
        async move {
            let response = endpoint.get_response(request).await;
            Ok::<_, Infallible>(HyperResponse::from(response))
        }
    });
    let partial = Arc::new(AtomicBool::new(false));
    let watched = Watched { stream, partial: partial.clone() };
    let conn = http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(watched), service);
    let id = signal.next_id.fetch_add(1, Ordering::Relaxed);
    let graceful = Graceful {
        conn: Box::pin(conn),
        begin_shutdown: |conn| conn.graceful_shutdown(),
        signal,
        id,
        registered: None,
        shutting_down: false,
    };
    if let Err(e) = graceful.await {
        if e.is_timeout() && partial.load(Ordering::Relaxed) {
            (limits.on_slow_headers)();
        }
        // Clients closing mid-request are ordinary; nothing the operator must act on.
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A connection's socket that notes whether request bytes arrived since the last response was
/// written: a header timeout then means a slow client, not an idle keep-alive connection.
struct Watched {
    stream: TcpStream,
    partial: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.partial.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(&polled);
        polled
    }

    // hyper writes a response's head and body with one writev; keep it one system call.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Watched {
    fn written(&self, polled: &Poll<io::Result<usize>>) {
        if matches!(polled, Poll::Ready(Ok(n)) if *n > 0) {
            self.partial.store(false, Ordering::Relaxed);
        }
    }
}
