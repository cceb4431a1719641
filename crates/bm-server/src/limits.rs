//! Limits on connections and streams, and the rate-limited warnings that say when one is hit.
//!
//! A hostile or broken client is held to a bounded cost in three places:
//!
//! - the listener (`listener.rs`) accepts at most [`Limits::max_connections`], closes a
//!   connection that does not finish its HTTP/2 handshake within
//!   [`Limits::handshake_timeout`] or that has no stream for [`Limits::max_connection_idle`],
//!   and backs off (instead of spinning) when accepting fails, at the process's open files
//!   limit above all;
//! - HTTP/2 itself: [`Limits::max_concurrent_streams`] is announced in the SETTINGS frame and
//!   enforced by the transport, and keepalive pings close connections whose peer is gone;
//! - [`AdmissionLayer`], which sees every request with the connection it came on. It counts
//!   the streams of each connection (which is what the idle limit and the stream limit's
//!   warning need);
//! - `quota.rs`, after authentication: the request size, and the limits per principal
//!   (server streams open, operation requests per second) of issue 11.
//!
//! Every limit logs a warning when it is hit, at most once per [`WARN_EVERY`] per limit,
//! with the number of hits the previous warnings left out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The limits the server holds every client to. [`Default`] gives the server's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; a connection over it is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Streams (calls) open at once on one connection, announced to the client in HTTP/2's
    /// SETTINGS_MAX_CONCURRENT_STREAMS; a compliant client queues its further calls, the
    /// transport refuses them from one that is not.
    pub max_concurrent_streams: u32,
    /// How long a new connection may take to send the HTTP/2 preface and its first SETTINGS
    /// frame before it is closed.
    pub handshake_timeout: Duration,
    /// How long a connection may stay open without a stream before it is closed (its
    /// client reconnects on its next call).
    pub max_connection_idle: Duration,
    /// How often an HTTP/2 ping checks that the peer of a connection is still there.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before its connection is closed.
    pub keepalive_timeout: Duration,
    /// The largest request message, in bytes, and the largest request body of an API call
    /// (one message and its 5-byte gRPC prefix); a larger one is refused with
    /// RESOURCE_EXHAUSTED as soon as its length prefix arrives (`quota.rs`).
    pub max_request_bytes: usize,
    /// Server streams (WatchOperations, StreamLogs) one principal may hold open at once.
    pub max_streams_per_principal: usize,
    /// Operation requests (the operator and admin RPCs of the role table) one principal
    /// may make per second, on average.
    pub op_rate_per_principal: u32,
    /// How many operation requests one principal may make at once, above the rate.
    pub op_burst_per_principal: u32,
    /// Streams open at once through the HTTP gateway (`--http-listen`), over all callers:
    /// each holds an in-process connection of its own; one more is RESOURCE_EXHAUSTED.
    pub http_max_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            max_concurrent_streams: 1024,
            handshake_timeout: Duration::from_secs(10),
            max_connection_idle: Duration::from_secs(10 * 60),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            // gRPC's default; bmctl imports 1,000 rows per request, well below it.
            max_request_bytes: 4 * 1024 * 1024,
            max_streams_per_principal: 64,
            // A rack's worth of operations at once, then fifty a second: more than people
            // and their scripts ask for, far less than what would swamp the BMCs.
            op_rate_per_principal: 50,
            op_burst_per_principal: 500,
            http_max_streams: 1024,
        }
    }
}

/// How often each limit may log that it was hit.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);

/// Lets a warning through at most once per [`WARN_EVERY`] and counts the ones it held back.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    /// `Some(n)` when the caller should log now, `n` being the hits held back since the last
    /// warning; `None` when it should stay quiet.
    pub(crate) fn hit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match s.last {
            Some(last) if now.duration_since(last) < WARN_EVERY => {
                s.held_back += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.held_back))
            }
        }
    }
}

/// The limits and what enforcing them shares over every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) limits: Limits,
    /// One permit per connection that may be open.
    pub(crate) connection_slots: Arc<Semaphore>,
    pub(crate) warn_accept: Throttle,
    pub(crate) warn_connections: Throttle,
    pub(crate) warn_handshake: Throttle,
    pub(crate) warn_idle: Throttle,
    pub(crate) warn_tls: Throttle,
    warn_streams: Throttle,
}

impl Shared {
    pub(crate) fn new(limits: Limits) -> Self {
        let slots = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Shared {
            limits,
            connection_slots: Arc::new(Semaphore::new(slots)),
            warn_accept: Throttle::default(),
            warn_connections: Throttle::default(),
            warn_handshake: Throttle::default(),
            warn_idle: Throttle::default(),
            warn_tls: Throttle::default(),
            warn_streams: Throttle::default(),
        }
    }
}

/// What the server knows of a connection; every request carries it in its extensions.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    pub(crate) local: Option<SocketAddr>,
    pub(crate) remote: Option<SocketAddr>,
    /// The identity named by the client's certificate, verified against the client CA in
    /// the TLS handshake (see `tls.rs`); `None` without mutual TLS.
    pub(crate) client_cert: Option<Arc<str>>,
    pub(crate) state: Arc<ConnState>,
}

/// The streams of one connection, shared by its requests and its IO.
#[derive(Debug)]
pub(crate) struct ConnState {
    open_streams: AtomicUsize,
    /// When the last stream ended (or the connection opened).
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when its last stream ends so it arms the idle timer.
    reader: AtomicWaker,
}

impl ConnState {
    pub(crate) fn new() -> Self {
        ConnState {
            open_streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            reader: AtomicWaker::new(),
        }
    }

    /// When the connection became idle, or `None` while a stream is open. Registers `cx`
    /// to be woken when the last open stream ends.
    pub(crate) fn idle_since(&self, cx: &Context<'_>) -> Option<Instant> {
        self.reader.register(cx.waker());
        if self.open_streams.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One open stream of a connection; the count goes down when it is dropped.
#[derive(Debug)]
struct OpenStream {
    state: Arc<ConnState>,
}

impl OpenStream {
    fn open(info: &ConnInfo, shared: &Shared) -> Self {
        let open = info.state.open_streams.fetch_add(1, Ordering::AcqRel) + 1;
        let max = shared.limits.max_concurrent_streams as usize;
        if open >= max
            && let Some(held_back) = shared.warn_streams.hit()
        {
            tracing::warn!(
                remote = ?info.remote,
                held_back,
                "a connection reached its limit of {max} concurrent streams (--max-concurrent-streams); its further calls wait"
            );
        }
        OpenStream {
            state: info.state.clone(),
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.state.open_streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .state
                .idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
            self.state.reader.wake();
        }
    }
}

/// The layer that sees every request with its connection: it counts the connection's
/// streams.
#[derive(Clone, Debug)]
pub(crate) struct AdmissionLayer {
    shared: Arc<Shared>,
}

impl AdmissionLayer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        AdmissionLayer { shared }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`AdmissionLayer`].
#[derive(Clone, Debug)]
pub(crate) struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Admission<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<StreamBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let stream = req.extensions().get::<ConnInfo>().cloned().map(|info| {
            // What tonic's `Request::remote_addr` reads.
            req.extensions_mut()
                .insert(tonic::transport::server::TcpConnectInfo {
                    local_addr: info.local,
                    remote_addr: info.remote,
                });
            OpenStream::open(&info, &self.shared)
        });
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            // The stream stays open until its response body is done with.
            Ok(response.map(|body| StreamBody {
                body,
                _stream: stream,
            }))
        })
    }
}

/// A response body that keeps its stream counted while it lives.
#[derive(Debug)]
pub(crate) struct StreamBody<B> {
    body: B,
    _stream: Option<OpenStream>,
}

impl<B: http_body::Body + Unpin> http_body::Body for StreamBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_throttle_lets_one_warning_through_per_period_and_counts_the_rest() {
        let t = Throttle::default();
        assert_eq!(t.hit(), Some(0));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        tokio::time::advance(WARN_EVERY).await;
        assert_eq!(t.hit(), Some(2));
        assert_eq!(t.hit(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn streams_are_counted_until_dropped_and_the_last_one_marks_the_connection_idle() {
        {
            let shared = Shared::new(Limits::default());
            let info = ConnInfo {
                local: None,
                remote: None,
                client_cert: None,
                state: Arc::new(ConnState::new()),
            };
            let waker = futures::task::noop_waker();
            let cx = Context::from_waker(&waker);
            let opened = info.state.idle_since(&cx).unwrap();
            let a = OpenStream::open(&info, &shared);
            let b = OpenStream::open(&info, &shared);
            assert_eq!(info.state.idle_since(&cx), None);
            tokio::time::advance(Duration::from_secs(5)).await;
            drop(a);
            assert_eq!(info.state.idle_since(&cx), None, "b is still open");
            drop(b);
            assert_eq!(
                info.state.idle_since(&cx),
                Some(opened + Duration::from_secs(5))
            );
        }
    }
}
