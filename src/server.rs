//! The HTTP/1.1 accept loop in front of the poem endpoint, with graceful shutdown.
//!
//! poem's own `Server` polls two cancellation tokens on every poll of every connection and
//! negotiates HTTP/2 and upgrades per connection. A tracking request is small enough for that to
//! show in `make bench`, so adbeacon runs its own loop: hyper's HTTP/1.1 connection driving the
//! same poem endpoint (routing, extractors, OpenAPI stay poem's). Shutdown costs one atomic load
//! per poll: each connection registers its task's waker once, and shutdown wakes them all.
//! The header read timeout costs one timer per connection (`HeadWatch`), not hyper's one per
//! request. hyper answers a head it cannot parse itself, with no body; the socket wrapper
//! (`Watched`) writes the `{"error": …}` answer every other refusal gets in its place, and
//! lingers on a connection hyper closes, so that an answer sent before the body was read is not
//! lost to a reset.
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
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::TokioIo;
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
    /// The task's waker as last given to the shutdown signal and the head watch.
    registered: Option<Waker>,
    shutting_down: bool,
    /// Closes the connection when a request's headers are late.
    heads: HeadWatch,
}

impl<C: Future> Future for Graceful<C> {
    /// The connection's own end, or None when the head watch closed it.
    type Output = Option<C::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A spawned task keeps its waker, so this runs about once per connection: the shutdown
        // signal and the head watch's alarm wake the task through it.
        let stale = self.registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker()));
        if stale {
            let waker = cx.waker().clone();
            self.heads.wake(waker.clone());
            if !self.shutting_down && !self.signal.triggered.load(Ordering::Acquire) {
                self.signal.wakers.lock().insert(self.id, waker.clone());
            }
            self.registered = Some(waker);
        }
        // Checked after registering too, so a shutdown between the two is not missed.
        if !self.shutting_down && self.signal.triggered.load(Ordering::Acquire) {
            self.shutting_down = true;
            let begin = self.begin_shutdown;
            begin(self.conn.as_mut());
        }
        if let Poll::Ready(out) = self.conn.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if self.heads.late() {
            // Dropping the connection closes the socket; no request exists to answer.
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl<C> Drop for Graceful<C> {
    fn drop(&mut self) {
        if self.registered.is_some() {
            self.signal.wakers.lock().remove(&self.id);
        }
    }
}

/// Called for each request refused where no endpoint can count it: a connection closed because a
/// request's headers did not arrive within the header read timeout, or a head hyper refused.
pub type OnRefusal = Arc<dyn Fn() + Send + Sync>;

/// How the server treats connections.
#[derive(Clone)]
pub struct Limits {
    /// How long a connection may wait for a request's headers, counted from its opening or from
    /// the last write of an answer (slow-header attacks hold connections open otherwise).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
    /// Told of each connection cut off in the middle of a request's headers. An idle keep-alive
    /// connection closed by the same timeout is not a slow client and is not reported.
    pub on_slow_headers: OnRefusal,
    /// Told of each request hyper refused itself (a malformed head): it answers before any
    /// endpoint sees the request, so only here can it be counted.
    pub on_malformed: OnRefusal,
    /// Open connections at most: past it the next is accepted once one closes (it waits in the
    /// kernel's listen queue), so that idle sockets can neither exhaust memory nor take the
    /// file descriptors ClickHouse, Redis and the log need.
    pub max_connections: usize,
}

/// hyper's buffer limit per connection, for a request's head (tracking heads are under 2 KiB) and
/// answers queued for a client that does not read: a head is refused once a read leaves more
/// than this unparsed, so at 64 to 128 KiB. hyper's default is about 400 KiB.
const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

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
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
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
        let served =
            connection(stream, peer, endpoint.clone(), local.clone(), signal.clone(), limits.clone());
        connections.spawn(async move {
            served.await;
            drop(slot);
        });
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

/// What a connection's service needs for every request, behind one `Arc`.
struct Shared<E> {
    endpoint: Arc<E>,
    local: LocalAddr,
    remote: RemoteAddr,
    clock: Arc<HeadClock>,
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
    let clock = Arc::new(HeadClock::new());
    let shared = Arc::new(Shared { endpoint, local, remote: RemoteAddr(peer.into()), clock: clock.clone() });
    let service = hyper::service::service_fn(move |req: poem::http::Request<Incoming>| {
        shared.clock.since.store(SERVING, Ordering::Relaxed);
        let shared = shared.clone();
        async move {
            let request = Request::from((req, shared.local.clone(), shared.remote.clone(), Scheme::HTTP));
            // The endpoint's own `get_response`, not the `Arc`'s: poem's `Endpoint` for `Arc`
            // wraps the call in two more async layers, each with its copy of the request.
            let response = shared.endpoint.as_ref().get_response(request).await;
            shared.clock.since.store(ANSWERED, Ordering::Relaxed);
            Ok::<_, Infallible>(HyperResponse::from(response))
        }
    });
    // No hyper timer: its header read timeout arms and drops a timer for every request, about
    // 1,300 instructions of a click's 31,700 (callgrind). The watch below keeps one timer per
    // connection and looks at the clock only when it fires.
    let conn = http1::Builder::new().keep_alive(true).max_buf_size(MAX_CONNECTION_BUFFER).serve_connection(
        TokioIo::new(Watched {
            stream,
            clock: clock.clone(),
            refusal: None,
            linger: None,
            shutdown: signal.clone(),
        }),
        service,
    );
    let id = signal.next_id.fetch_add(1, Ordering::Relaxed);
    let graceful = Graceful {
        conn: Box::pin(conn),
        begin_shutdown: |conn| conn.graceful_shutdown(),
        signal,
        id,
        registered: None,
        shutting_down: false,
        heads: HeadWatch::new(clock.clone(), limits.header_read_timeout),
    };
    match graceful.await {
        Some(Ok(())) => {}
        Some(Err(e)) if e.is_parse() || e.is_parse_too_large() => {
            (limits.on_malformed)();
            // With the id its answer carries, so a caller's report can be matched to this line.
            let mut id = clock.refused.get().cloned();
            let _scope = crate::telemetry::RequestScope::enter(&mut id);
            tracing::debug!(error = %e, "refused a malformed request");
        }
        // Clients closing mid-request are ordinary; nothing the operator must act on.
        Some(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
        // Cut off by the head watch: in the middle of a request's headers, a slow client; with
        // none begun, an idle keep-alive connection, not reported.
        None => {
            if clock.partial.load(Ordering::Relaxed) {
                (limits.on_slow_headers)();
            }
        }
    }
}

/// `HeadClock::since` while a request is being served, from its head's arrival until hyper has
/// its answer.
const SERVING: u64 = u64::MAX;
/// `HeadClock::since` from the answer's hand-over to hyper until its first bytes are written
/// (or the head watch finds it so and starts counting).
const ANSWERED: u64 = u64::MAX - 1;

/// What the head watch of one connection reads: shared by its socket, its service and the watch.
struct HeadClock {
    /// Since when (milliseconds after `start`) the connection has been waiting for a request's
    /// head: its opening, then each write of an answer; SERVING or ANSWERED meanwhile.
    since: AtomicU64,
    /// Whether request bytes arrived since the last answer was written: a late head then means
    /// a slow client, not an idle keep-alive connection.
    partial: AtomicBool,
    start: tokio::time::Instant,
    /// The request id of the JSON answer put on hyper's refusal of a head, for the log line.
    refused: std::sync::OnceLock<poem::http::HeaderValue>,
}

impl HeadClock {
    fn new() -> Self {
        Self {
            since: AtomicU64::new(0),
            partial: AtomicBool::new(false),
            start: tokio::time::Instant::now(),
            refused: std::sync::OnceLock::new(),
        }
    }

    /// Milliseconds since the connection opened (u64 holds 584 million years of them).
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// The header read timeout with one timer per connection: when it fires, the connection is
/// closed if it has waited for a head for the whole limit, else the timer is set again for
/// when that would be. The timer is polled only when it has fired (its waker is an [`Alarm`]):
/// polling it at every wake-up of the connection cost about 440 instructions per click.
struct HeadWatch {
    clock: Arc<HeadClock>,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    alarm: Arc<Alarm>,
    /// The alarm as a waker, made once.
    alarm_waker: Waker,
}

/// The head watch's timer waker: notes that the timer fired and wakes the connection's task.
#[derive(Default)]
struct Alarm {
    rung: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl std::task::Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rung.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().as_ref() {
            task.wake_by_ref();
        }
    }
}

impl HeadWatch {
    fn new(clock: Arc<HeadClock>, limit: Duration) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(clock.start + limit));
        let alarm = Arc::new(Alarm::default());
        let alarm_waker = Waker::from(alarm.clone());
        Self { clock, limit, timer, alarm, alarm_waker }
    }

    /// Has the alarm wake `task`, the connection task's waker (at its first poll, and whenever
    /// it changes), and has the next [`HeadWatch::late`] poll the timer, which arms it.
    fn wake(&mut self, task: Waker) {
        *self.alarm.task.lock() = Some(task);
        self.alarm.rung.store(true, Ordering::Release);
    }

    /// Whether the connection's next head is late.
    fn late(&mut self) -> bool {
        if !self.alarm.rung.load(Ordering::Acquire) {
            return false;
        }
        self.alarm.rung.store(false, Ordering::Relaxed);
        let mut alarm_cx = Context::from_waker(&self.alarm_waker);
        while self.timer.as_mut().poll(&mut alarm_cx).is_ready() {
            let next = match self.clock.since.load(Ordering::Relaxed) {
                // Serving a request: its body has a limit of its own.
                SERVING => tokio::time::Instant::now() + self.limit,
                // An answer none of which could be written yet (a client that does not read):
                // counted from now, so it is closed if that lasts another whole limit.
                ANSWERED => {
                    let now = self.clock.now_ms();
                    let _ = self.clock.since.compare_exchange(
                        ANSWERED,
                        now,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tokio::time::Instant::now() + self.limit
                }
                since => {
                    let due = self.clock.start + Duration::from_millis(since) + self.limit;
                    if due <= tokio::time::Instant::now() {
                        return true;
                    }
                    due
                }
            };
            self.timer.as_mut().reset(next);
        }
        false
    }
}

/// A connection's socket that tells its `HeadClock` when request bytes arrive and when an
/// answer is written, and that puts a JSON body on hyper's own refusals of a head.
struct Watched {
    stream: TcpStream,
    clock: Arc<HeadClock>,
    /// The answer written in place of hyper's bodiless refusal, and how much of it is written.
    refusal: Option<(Vec<u8>, usize)>,
    /// Set when hyper shuts the connection down, while what the client still sends is drained.
    linger: Option<Linger>,
    /// The server's shutdown: connections it closes do not linger, so that stopping never waits
    /// on them.
    shutdown: Arc<ShutdownSignal>,
}

/// How long a closing connection keeps reading what its client still sends (a body the answer
/// came before, such as a 401's or a 413's), so that closing it does not reset the connection
/// before the client has sent it all and read the answer: a reset makes a client that sends its
/// whole body before reading (Python's `http.client`, for one) fail with a broken pipe instead.
const LINGER: Duration = Duration::from_secs(2);
/// At most this much is read and thrown away while lingering.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// A closing connection's lingering: its deadline and how much it has thrown away.
struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    discarded: usize,
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
            self.clock.partial.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(refused) = self.refuse(cx, &[io::IoSlice::new(buf)]) {
            return refused;
        }
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
        if let Some(refused) = self.refuse(cx, bufs) {
            return refused;
        }
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.write_refusal(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    // hyper shuts down a connection it will not keep: the answer sent, this closes the sending
    // side and lingers (see `LINGER`) before the socket is closed.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.write_refusal(cx))?;
        if self.linger.is_none() {
            ready!(Pin::new(&mut self.stream).poll_shutdown(cx))?;
            self.linger = Some(Linger { until: Box::pin(tokio::time::sleep(LINGER)), discarded: 0 });
        }
        // The shutdown signal wakes this connection's task, so a linger under way ends too.
        if self.shutdown.triggered.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        self.poll_linger(cx)
    }
}

impl Watched {
    /// Writes adbeacon's JSON answer in place of `bufs` when they are hyper's own refusal of a
    /// head it could not parse (see [`refusal_answer`]). hyper's bytes then count as written;
    /// whatever of the replacement the socket does not take at once goes out with the flush or
    /// the shutdown that follow a refusal.
    fn refuse(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Option<Poll<io::Result<usize>>> {
        // The cheap test first: every answer's first write passes through here.
        let first = bufs.iter().find(|b| !b.is_empty())?;
        if !first.starts_with(b"HTTP/1.1 4") || self.refusal.is_some() {
            return None;
        }
        // hyper refuses a head only between answers: never while a request is served, nor
        // before an answer handed over has been written (then this is that answer).
        let state = self.clock.since.load(Ordering::Relaxed);
        if state == SERVING || state == ANSWERED {
            return None;
        }
        let head: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let id = crate::api::new_request_id();
        let answer = refusal_answer(&head, &id)?;
        let _ = self.clock.refused.set(id);
        self.refusal = Some((answer, 0));
        if let Poll::Ready(Err(e)) = self.write_refusal(cx) {
            return Some(Poll::Ready(Err(e)));
        }
        let consumed = Poll::Ready(Ok(head.len()));
        self.written(&consumed);
        Some(consumed)
    }

    /// Reads and throws away what the client still sends, until it closes its side or resets the
    /// connection, `LINGER` has passed or `LINGER_BYTES` are read.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Self { stream, linger, .. } = self;
        let Some(linger) = linger else { return Poll::Ready(Ok(())) };
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match tokio::io::AsyncRead::poll_read(Pin::new(&mut *stream), cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    linger.discarded += buf.filled().len();
                    if linger.discarded >= LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                // The client's end, or its reset: nothing is left to protect.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return linger.until.as_mut().poll(cx).map(Ok),
            }
        }
    }

    /// Writes what is left of the refusal's answer, if any.
    fn write_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Self { stream, refusal, .. } = self;
        if let Some((answer, done)) = refusal {
            while *done < answer.len() {
                match ready!(tokio::io::AsyncWrite::poll_write(Pin::new(&mut *stream), cx, &answer[*done..]))?
                {
                    0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    n => *done += n,
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn written(&self, polled: &Poll<io::Result<usize>>) {
        if matches!(polled, Poll::Ready(Ok(n)) if *n > 0) {
            self.clock.partial.store(false, Ordering::Relaxed);
            // A `100 Continue` written while the request is served does not start the wait for
            // the next head; an answer does, counted from its last write: a client that stops
            // reading a long answer is closed once none of it could be written for the limit.
            if self.clock.since.load(Ordering::Relaxed) != SERVING {
                self.clock.since.store(self.clock.now_ms(), Ordering::Relaxed);
            }
        }
    }
}

/// adbeacon's answer for hyper's own refusal `head`, or None if `head` is not one. hyper answers
/// a request line, header or `Content-Length` it cannot parse (400), a URI over 65,534 bytes
/// (414) or a head larger than the connection's buffer (431) itself, before any endpoint sees
/// the request, with a head alone (`content-length: 0`). The answer keeps its status, its `date`
/// and its `connection: close`, and adds the `{"error": …}` body and a request id (`id`), as
/// every other answer has.
fn refusal_answer(head: &[u8], id: &poem::http::HeaderValue) -> Option<Vec<u8>> {
    let head = std::str::from_utf8(head).ok()?;
    let lines: Vec<&str> = head.strip_suffix("\r\n\r\n")?.split("\r\n").collect();
    let header = |name: &str| {
        lines[1..].iter().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    if header("content-length") != Some("0") {
        return None;
    }
    let (status, error) = match lines[0].strip_prefix("HTTP/1.1 ")?.get(..3)? {
        "400" => (
            "400 Bad Request",
            "the request is not valid HTTP/1.1: its request line, a header or its Content-Length \
             could not be parsed"
                .to_string(),
        ),
        "414" => ("414 URI Too Long", "the request's URI is too long: at most 65,534 bytes".to_string()),
        "431" => (
            "431 Request Header Fields Too Large",
            format!(
                "the request's line and headers are too large: keep them under {} KiB",
                MAX_CONNECTION_BUFFER / 1024
            ),
        ),
        _ => return None,
    };
    let body = serde_json::to_vec(&crate::api::error::ErrorBody { error }).ok()?;
    let mut answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\ncache-control: no-store\r\nx-request-id: {}\r\n",
        body.len(),
        id.to_str().unwrap_or_default(),
    );
    if let Some(date) = header("date") {
        answer.push_str(&format!("date: {date}\r\n"));
    }
    answer.push_str("\r\n");
    let mut answer = answer.into_bytes();
    answer.extend_from_slice(&body);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(head: &str) -> Option<String> {
        let id = poem::http::HeaderValue::from_static("id-1");
        refusal_answer(head.as_bytes(), &id).map(|a| String::from_utf8(a).unwrap())
    }

    /// hyper's three refusals, byte for byte as hyper 1.x writes them.
    #[test]
    fn hypers_refusals_get_a_json_body() {
        let date = "date: Tue, 24 Nov 2026 00:33:26 GMT";
        for (status, reason, needle) in [
            (400, "Bad Request", "not valid HTTP/1.1"),
            (414, "URI Too Long", "URI is too long"),
            (431, "Request Header Fields Too Large", "under 64 KiB"),
        ] {
            let head = format!(
                "HTTP/1.1 {status} {reason}\r\nconnection: close\r\ncontent-length: 0\r\n{date}\r\n\r\n"
            );
            let answer = answer(&head).unwrap_or_else(|| panic!("{status} not recognised"));
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} {reason}\r\n")), "{head}");
            for line in [
                "content-type: application/json; charset=utf-8",
                "connection: close",
                "cache-control: no-store",
                "x-request-id: id-1",
                date,
            ] {
                assert!(head.split("\r\n").any(|l| l == line), "{line:?} missing from {head}");
            }
            let length: usize =
                head.split("\r\n").find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
            assert_eq!(length, body.len());
            let error: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(error["error"].as_str().unwrap().contains(needle), "{error}");
        }
    }

    /// Only a bodiless 400, 414 or 431 head is replaced: never an answer with a body, another
    /// status, or bytes that are not a whole head.
    #[test]
    fn other_bytes_are_not_refusals() {
        for head in [
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n",
            "HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n",
            "HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{\"a\":1}",
            "{\"error\":\"HTTP/1.1 400 \"}",
        ] {
            assert_eq!(answer(head), None, "{head:?}");
        }
    }
}
