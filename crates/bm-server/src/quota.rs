//! Limits against abuse (issue 11): the size of a request, the server streams one principal
//! holds open, and the operation requests one principal makes per second.
//!
//! [`QuotaLayer`] runs after authentication, so it knows the caller's principal (from the
//! [`Caller`] the auth layer leaves in the request):
//!
//! - every request body is read through [`SizedBody`], which reads each gRPC message's
//!   length prefix as it arrives and refuses a message over [`Limits::max_request_bytes`]
//!   before any of it is buffered, and an API call whose body holds more than one such
//!   message; tonic's own decoding limit is set to the same value as a backstop;
//! - a call of [`SERVER_STREAMS`] takes one of its principal's
//!   [`Limits::max_streams_per_principal`] slots until its response body is dropped, which
//!   is when the stream ends or its client goes away (the transport drops the body of a
//!   reset stream or a closed connection);
//! - a call whose RPC needs the operator or admin role in the role table takes a token of
//!   its principal's bucket ([`Limits::op_rate_per_principal`],
//!   [`Limits::op_burst_per_principal`]).
//!
//! Each is refused with RESOURCE_EXHAUSTED and a message naming the limit and its flag (the
//! rate limit also says when to retry, in the message and in a `google.rpc.RetryInfo`), and
//! logged at warn, at most once per period per limit.
//!
//! The maps by principal stay small: a principal's stream count is removed when it falls to
//! zero, and its bucket once it has refilled (a full bucket is the same as none), swept
//! whenever the map has doubled since the last sweep.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::Bytes;

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::limits::{Limits, Throttle};

/// The server-streaming RPCs of the API, which count against
/// [`Limits::max_streams_per_principal`]; a test checks the list against the proto.
pub(crate) const SERVER_STREAMS: &[&str] = &[
    "/baremetal.v1.OperationService/WatchOperations",
    "/baremetal.v1.OperationService/StreamLogs",
    "/baremetal.v1.RolloutService/WatchRollout",
];

/// The length of a gRPC message's prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// The buckets kept before the first sweep.
const SWEEP_MIN: usize = 64;

/// The limits by principal, shared by every call.
#[derive(Debug)]
pub(crate) struct Quotas {
    max_request_bytes: usize,
    max_streams: usize,
    rate: f64,
    burst: f64,
    streams: Mutex<HashMap<String, usize>>,
    buckets: Mutex<Buckets>,
    warn_size: Throttle,
    warn_streams: Throttle,
    warn_rate: Throttle,
}

/// Token buckets by principal.
#[derive(Debug)]
struct Buckets {
    map: HashMap<String, Bucket>,
    /// The size at which the next sweep runs.
    sweep_at: usize,
}

/// One principal's bucket: `tokens` at `at`, refilling at the rate up to the burst.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

impl Quotas {
    pub(crate) fn new(limits: &Limits) -> Self {
        Quotas {
            max_request_bytes: limits.max_request_bytes,
            max_streams: limits.max_streams_per_principal,
            rate: f64::from(limits.op_rate_per_principal.max(1)),
            burst: f64::from(limits.op_burst_per_principal.max(1)),
            streams: Mutex::default(),
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                sweep_at: SWEEP_MIN,
            }),
            warn_size: Throttle::default(),
            warn_streams: Throttle::default(),
            warn_rate: Throttle::default(),
        }
    }

    /// Takes one operation token of `principal` at `now`, or says how long until one is
    /// there. `now` is a parameter so that the tests need no clock.
    fn take_op(&self, principal: &str, now: Instant) -> Result<(), Duration> {
        let (rate, burst) = (self.rate, self.burst);
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.map.len() >= b.sweep_at {
            b.map.retain(|_, k| k.level(now, rate, burst) < burst);
            b.sweep_at = (b.map.len() * 2).max(SWEEP_MIN);
        }
        let bucket = match b.map.get_mut(principal) {
            Some(k) => k,
            None => b.map.entry(principal.to_owned()).or_insert(Bucket {
                tokens: burst,
                at: now,
            }),
        };
        let level = bucket.level(now, rate, burst);
        if level >= 1.0 {
            *bucket = Bucket {
                tokens: level - 1.0,
                at: now,
            };
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - level) / rate))
        }
    }

    /// The buckets kept (for the tests of the sweep).
    #[cfg(test)]
    fn buckets_kept(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    /// One more stream for `principal`, or the number it has open already when that is the
    /// limit.
    fn open_stream(self: &Arc<Self>, principal: &str) -> Result<StreamSlot, usize> {
        let mut m = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let open = m.get(principal).copied().unwrap_or(0);
        if open >= self.max_streams {
            return Err(open);
        }
        m.insert(principal.to_owned(), open + 1);
        Ok(StreamSlot {
            quotas: self.clone(),
            principal: principal.to_owned(),
        })
    }

    /// The streams `principal` has open.
    #[cfg(test)]
    fn open_streams(&self, principal: &str) -> usize {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(principal)
            .copied()
            .unwrap_or(0)
    }

    /// Logs that `principal` hit `limit`, at most once per period per limit.
    fn warn(throttle: &Throttle, principal: &str, limit: &str, message: &str) {
        if let Some(held_back) = throttle.hit() {
            tracing::warn!(principal, limit, held_back, "limit hit: {message}");
        }
    }
}

/// A stream counted against its principal until dropped.
#[derive(Debug)]
struct StreamSlot {
    quotas: Arc<Quotas>,
    principal: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self
            .quotas
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut open = 0;
        if let Some(n) = m.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
            open = *n;
            if open == 0 {
                m.remove(&self.principal);
            }
        }
        drop(m);
        tracing::debug!(principal = %self.principal, open, "a server stream ended");
    }
}

/// Enforces the limits of this module (see the module doc).
#[derive(Clone, Debug)]
pub(crate) struct QuotaLayer {
    quotas: Arc<Quotas>,
}

impl QuotaLayer {
    pub(crate) fn new(quotas: Arc<Quotas>) -> Self {
        QuotaLayer { quotas }
    }
}

impl<S> tower::Layer<S> for QuotaLayer {
    type Service = QuotaService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        QuotaService {
            inner,
            quotas: self.quotas.clone(),
        }
    }
}

/// The service of [`QuotaLayer`].
#[derive(Clone, Debug)]
pub(crate) struct QuotaService<S> {
    inner: S,
    quotas: Arc<Quotas>,
}

fn refusal(message: String, retry_after: Option<Duration>) -> http::Response<Body> {
    tonic::Status::from(ApiError::Exhausted {
        message,
        retry_after,
    })
    .into_http()
}

impl<S> tower::Service<http::Request<Body>> for QuotaService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let q = &self.quotas;
        let path = req.uri().path().to_owned();
        // The auth layer in front left the caller, with the role its RPC needs, on every API
        // call; health and reflection come without one.
        let caller = req.extensions().get::<Caller>();
        let role = caller.map(Caller::role);
        let principal = caller.map(|c| c.principal.name.clone());
        let name = principal.as_deref().unwrap_or("-");
        if principal.is_some()
            && role.is_some_and(|r| r >= Role::Operator)
            && let Err(wait) = q.take_op(name, Instant::now())
        {
            // Whole milliseconds, rounded up: a client that waits that long succeeds.
            let wait = Duration::from_millis(
                u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX),
            );
            let message = format!(
                "{name} requested operations faster than {} per second (--op-rate-per-principal) with bursts of {} (--op-burst-per-principal); retry in {}",
                q.rate,
                q.burst,
                humantime::format_duration(wait)
            );
            Quotas::warn(&q.warn_rate, name, "--op-rate-per-principal", &message);
            return Box::pin(std::future::ready(Ok(refusal(message, Some(wait)))));
        }

        let mut slot = None;
        if principal.is_some() && SERVER_STREAMS.contains(&path.as_str()) {
            match q.open_stream(name) {
                Ok(s) => slot = Some(s),
                Err(open) => {
                    let message = format!(
                        "{name} has {open} streams open (WatchOperations, StreamLogs, WatchRollout), the limit (--max-streams-per-principal); end one before opening another"
                    );
                    Quotas::warn(
                        &q.warn_streams,
                        name,
                        "--max-streams-per-principal",
                        &message,
                    );
                    return Box::pin(std::future::ready(Ok(refusal(message, None))));
                }
            }
        }
        // An API call carries one message; health and reflection (a bidirectional stream)
        // are held to the size of each message only.
        let req = req.map(|body| {
            Body::new(SizedBody {
                inner: body,
                quotas: q.clone(),
                principal: name.to_owned(),
                one_message: role.is_some(),
                seen: 0,
                header: [0; PREFIX],
                have: 0,
                skip: 0,
                failed: false,
            })
        });
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(match slot {
                Some(slot) => response.map(|body| Body::new(SlotBody { body, _slot: slot })),
                None => response,
            })
        })
    }
}

/// A request body held to [`Limits::max_request_bytes`] per message (see the module doc).
struct SizedBody {
    inner: Body,
    quotas: Arc<Quotas>,
    principal: String,
    /// Refuse a second message (an API call).
    one_message: bool,
    /// Bytes seen so far.
    seen: usize,
    /// The prefix being read, and how much of it is there.
    header: [u8; PREFIX],
    have: usize,
    /// The bytes of the current message still to come.
    skip: usize,
    failed: bool,
}

impl SizedBody {
    /// Follows the messages in `chunk`; the message for the client when one is too large.
    fn check(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        let max = self.quotas.max_request_bytes;
        while !chunk.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(chunk.len());
                self.skip -= n;
                self.seen += n;
                chunk = &chunk[n..];
                continue;
            }
            if self.one_message && self.seen > 0 {
                return Err(format!(
                    "the request has more than one message after {} bytes; the server takes one message of at most {max} bytes (--max-request-bytes)",
                    self.seen
                ));
            }
            let n = (PREFIX - self.have).min(chunk.len());
            self.header[self.have..self.have + n].copy_from_slice(&chunk[..n]);
            self.have += n;
            chunk = &chunk[n..];
            if self.have == PREFIX {
                self.have = 0;
                let [_, a, b, c, d] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if len > max {
                    return Err(format!(
                        "the request message is {len} bytes; the server takes at most {max} bytes (--max-request-bytes)"
                    ));
                }
                self.seen += PREFIX;
                self.skip = len;
            }
        }
        Ok(())
    }
}

impl http_body::Body for SizedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(message) = self.check(data)
        {
            self.failed = true;
            let principal = self.principal.clone();
            Quotas::warn(
                &self.quotas.warn_size,
                &principal,
                "--max-request-bytes",
                &message,
            );
            return Poll::Ready(Some(Err(tonic::Status::from(ApiError::Exhausted {
                message,
                retry_after: None,
            }))));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds its stream's slot while it lives.
struct SlotBody {
    body: Body,
    _slot: StreamSlot,
}

impl http_body::Body for SlotBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
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

    fn quotas(rate: u32, burst: u32) -> Arc<Quotas> {
        Arc::new(Quotas::new(&Limits {
            max_request_bytes: 100,
            max_streams_per_principal: 2,
            op_rate_per_principal: rate,
            op_burst_per_principal: burst,
            ..Limits::default()
        }))
    }

    #[test]
    fn a_bucket_lets_a_burst_through_then_the_rate_and_says_when_to_retry() {
        let q = quotas(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            q.take_op("alice", t0).unwrap();
        }
        assert_eq!(q.take_op("alice", t0), Err(Duration::from_millis(100)));
        // Others have buckets of their own.
        q.take_op("bob", t0).unwrap();
        // Half a token later: still 50 ms to wait.
        let wait = q
            .take_op("alice", t0 + Duration::from_millis(50))
            .unwrap_err();
        assert!(
            wait > Duration::from_millis(49) && wait <= Duration::from_millis(50),
            "{wait:?}"
        );
        q.take_op("alice", t0 + Duration::from_millis(100)).unwrap();
        assert!(q.take_op("alice", t0 + Duration::from_millis(100)).is_err());
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            q.take_op("alice", later).unwrap();
        }
        assert!(q.take_op("alice", later).is_err());
    }

    #[test]
    fn idle_buckets_are_swept_and_busy_ones_kept() {
        let q = quotas(1, 2);
        let t0 = Instant::now();
        q.take_op("busy", t0 + Duration::from_secs(10)).unwrap();
        for i in 0..SWEEP_MIN - 1 {
            q.take_op(&format!("p{i}"), t0).unwrap();
        }
        assert_eq!(q.buckets_kept(), SWEEP_MIN);
        // Ten seconds on, the others have refilled; "busy" has not, and keeps its debt.
        let t1 = t0 + Duration::from_secs(10);
        q.take_op("new", t1).unwrap();
        assert_eq!(q.buckets_kept(), 2, "only busy and new remain");
        q.take_op("busy", t1).unwrap();
        assert!(q.take_op("busy", t1).is_err(), "busy's bucket was kept");
    }

    #[test]
    fn streams_are_counted_per_principal_and_released_on_drop() {
        let q = quotas(1, 1);
        let a = q.open_stream("alice").unwrap();
        let b = q.open_stream("alice").unwrap();
        assert_eq!(q.open_stream("alice").unwrap_err(), 2);
        let c = q.open_stream("bob").unwrap();
        assert_eq!((q.open_streams("alice"), q.open_streams("bob")), (2, 1));
        drop(a);
        let a2 = q.open_stream("alice").unwrap();
        drop((a2, b, c));
        assert_eq!(q.open_streams("alice"), 0);
        assert!(
            q.streams.lock().unwrap().is_empty(),
            "no entry stays behind"
        );
    }

    fn sized(one_message: bool) -> SizedBody {
        SizedBody {
            inner: Body::empty(),
            quotas: quotas(1, 1),
            principal: "alice".into(),
            one_message,
            seen: 0,
            header: [0; PREFIX],
            have: 0,
            skip: 0,
            failed: false,
        }
    }

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn messages_are_measured_by_their_prefix_across_chunks() {
        // At the limit, split anywhere, is fine.
        let m = message(100);
        for cut in [1, 3, 5, 6, 50, 104] {
            let mut s = sized(true);
            s.check(&m[..cut]).unwrap();
            s.check(&m[cut..]).unwrap();
        }
        // One byte more is refused on its prefix alone, even split inside it.
        let big = message(101);
        let mut s = sized(true);
        s.check(&big[..2]).unwrap();
        let e = s.check(&big[2..5]).unwrap_err();
        assert!(
            e.contains("101 bytes") && e.contains("--max-request-bytes"),
            "{e}"
        );
        // A second message in an API call is refused; a stream may carry many.
        let two = [message(10), message(0)].concat();
        assert!(sized(true).check(&two).is_err());
        sized(false).check(&two).unwrap();
        let after_empty = [message(0), message(1)].concat();
        assert!(sized(true).check(&after_empty).is_err());
        let mut s = sized(false);
        s.check(&[message(100), message(100)].concat()).unwrap();
        assert!(s.check(&message(101)).is_err());
    }

    #[test]
    fn the_server_streams_are_the_ones_the_proto_declares() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(bm_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut declared = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    if method.server_streaming() {
                        declared.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        declared.sort();
        let mut ours: Vec<String> = SERVER_STREAMS.iter().map(|s| (*s).to_owned()).collect();
        ours.sort();
        assert_eq!(declared, ours);
    }
}
