//! The accept loop and the connections it hands to the transport, with the limits that
//! apply before and between requests (see `limits.rs` for the whole picture).
//!
//! tonic's own `TcpIncoming` retries a failed accept at once: at the process's open files
//! limit (EMFILE) the listener stays readable, so the server spun at 100% CPU, refused new
//! clients and logged nothing. Here a failed accept is logged (rate-limited) and retried
//! after a backoff that grows to [`MAX_ACCEPT_BACKOFF`]; connections already open are
//! served meanwhile, health checks included.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use crate::limits::{ConnInfo, ConnState, Shared};
use crate::tls::Tls;

/// The first wait after a failed accept; it doubles up to [`MAX_ACCEPT_BACKOFF`].
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait between two accepts that fail.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// An idle connection that read something this recently is not closed yet: what it read
/// may be a call that is about to open a stream.
const READ_GRACE: Duration = Duration::from_secs(1);

/// The HTTP/2 client preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, in bytes.
const PREFACE_LEN: usize = 24;
/// The first byte of a TLS ClientHello (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The header of an HTTP/2 frame, in bytes.
const FRAME_HEADER_LEN: usize = 9;

/// The connections accepted on `listener`, within the limits of `shared`, over TLS when
/// `tls` is given. The stream never yields an error: accept and handshake errors are
/// handled here.
pub(crate) fn incoming(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<Tls>>,
) -> futures::stream::BoxStream<'static, Result<Conn, io::Error>> {
    let accepted = accepted(listener, shared.clone());
    let Some(tls) = tls else {
        return Box::pin(accepted.map(move |(io, remote, slot)| {
            Ok(Conn::new(Io::Plain(io), remote, None, &shared, slot))
        }));
    };
    // TLS handshakes run in tasks of their own, so that a slow client does not hold up the
    // accept loop; finished connections come back over a channel.
    let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        while let Some((io, remote, slot)) = accepted.next().await {
            let (tls, shared, tx) = (tls.clone(), shared.clone(), tx.clone());
            tokio::spawn(async move {
                let timeout = shared.limits.handshake_timeout;
                match tokio::time::timeout(timeout, handshake(io, remote, &tls)).await {
                    Ok(Ok(Some((io, cert)))) => {
                        let _ = tx.send(Conn::new(io, remote, cert, &shared, slot)).await;
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        if let Some(held_back) = shared.warn_tls.hit() {
                            tracing::warn!(%remote, error = %e, held_back, "TLS handshake failed");
                        }
                    }
                    Err(_) => {
                        if let Some(held_back) = shared.warn_handshake.hit() {
                            tracing::warn!(%remote, held_back, "closing a connection that did not finish its TLS handshake within {timeout:?} (--handshake-timeout)");
                        }
                    }
                }
            });
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))
}

/// The message a plaintext client gets from a TLS listener.
pub(crate) const PLAINTEXT_ON_TLS: &str = "this server requires TLS: connect with https:// (bmctl: --server https://HOST:PORT and --ca FILE)";

/// The TLS handshake of one connection, with the client certificate's identity; `None`
/// when the client spoke plaintext HTTP/2 and was answered with [`PLAINTEXT_ON_TLS`].
async fn handshake(
    io: TcpStream,
    remote: SocketAddr,
    tls: &Tls,
) -> io::Result<Option<(Io, Option<Arc<str>>)>> {
    let mut first = [0u8; 4];
    let n = io.peek(&mut first).await?;
    if n > 0 && first[..n] == b"PRI "[..n] {
        tracing::warn!(%remote, "a plaintext client connected to the TLS listener; answering UNAVAILABLE: {PLAINTEXT_ON_TLS}");
        refuse_plaintext(io).await;
        return Ok(None);
    }
    let stream = tls.acceptor().accept(io).await?;
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(crate::tls::identity)
        .map(Arc::from);
    Ok(Some((Io::Tls(Box::new(stream)), cert)))
}

/// Serves a plaintext HTTP/2 client: every call ends with UNAVAILABLE and a message that
/// says to use TLS, which is clearer than a connection closed for no stated reason.
async fn refuse_plaintext(io: TcpStream) {
    let service = hyper::service::service_fn(|_req| async {
        Ok::<_, std::convert::Infallible>(
            tonic::Status::unavailable(PLAINTEXT_ON_TLS).into_http::<tonic::body::Body>(),
        )
    });
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// The TCP connections accepted on `listener`, each with its slot among the connections.
fn accepted(
    listener: TcpListener,
    shared: Arc<Shared>,
) -> impl Stream<Item = (TcpStream, SocketAddr, OwnedSemaphorePermit)> + Send + 'static {
    futures::stream::unfold(
        (listener, shared, MIN_ACCEPT_BACKOFF),
        |(listener, shared, mut backoff)| async move {
            loop {
                match listener.accept().await {
                    Ok((io, remote)) => {
                        backoff = MIN_ACCEPT_BACKOFF;
                        if let Some(slot) = admit(&shared, remote) {
                            return Some(((io, remote, slot), (listener, shared, backoff)));
                        }
                    }
                    // The peer gave up before we took its connection: nothing to do.
                    Err(e) if is_connection_error(&e) => {
                        tracing::debug!(error = %e, "accepting a connection failed");
                    }
                    // Out of file descriptors (EMFILE, ENFILE), of buffers or of memory:
                    // retrying at once would spin; the backlog keeps the clients meanwhile.
                    Err(e) => {
                        if let Some(held_back) = shared.warn_accept.hit() {
                            tracing::warn!(
                                error = %e,
                                held_back,
                                "cannot accept connections (at the open files limit? see --open-files-limit and --max-connections); serving the open ones, retrying in {backoff:?}"
                            );
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    }
                }
            }
        },
    )
}

/// A slot among [`crate::Limits::max_connections`], or `None` (and the socket closed)
/// when the server is at its connection limit.
fn admit(shared: &Arc<Shared>, remote: SocketAddr) -> Option<OwnedSemaphorePermit> {
    let Ok(slot) = shared.connection_slots.clone().try_acquire_owned() else {
        if let Some(held_back) = shared.warn_connections.hit() {
            tracing::warn!(
                %remote,
                held_back,
                "refusing a connection: {} are open (--max-connections)",
                shared.limits.max_connections
            );
        }
        return None;
    };
    Some(slot)
}

/// Errors of one connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// An accepted connection: the socket, with the handshake and idle limits applied to its
/// reads, holding its slot among [`crate::Limits::max_connections`].
pub(crate) struct Conn {
    io: Io,
    info: ConnInfo,
    shared: Arc<Shared>,
    /// Until the client's preface and first frame have been read.
    handshake: Option<Handshake>,
    idle: Pin<Box<Sleep>>,
    last_read: Instant,
    /// Set once the connection was closed for idleness: every read is the end from then.
    closed: bool,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// The connection over `io`, holding `slot`.
    fn new(
        io: Io,
        remote: SocketAddr,
        client_cert: Option<Arc<str>>,
        shared: &Arc<Shared>,
        slot: OwnedSemaphorePermit,
    ) -> Conn {
        let tcp = io.tcp();
        // Small messages (one event, one status) go out at once.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let now = Instant::now();
        Conn {
            info: ConnInfo {
                local: tcp.local_addr().ok(),
                remote: Some(remote),
                client_cert,
                state: Arc::new(ConnState::new()),
            },
            io,
            shared: shared.clone(),
            handshake: Some(Handshake {
                deadline: Box::pin(tokio::time::sleep(shared.limits.handshake_timeout)),
                seen: 0,
                frame_header: [0; FRAME_HEADER_LEN],
            }),
            idle: Box::pin(tokio::time::sleep_until(
                now + shared.limits.max_connection_idle,
            )),
            last_read: now,
            closed: false,
            _slot: slot,
        }
    }

    /// Ready when the connection has had no stream for the idle limit.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(idle_since) = self.info.state.idle_since(cx) else {
            return Poll::Pending;
        };
        let deadline =
            (idle_since + self.shared.limits.max_connection_idle).max(self.last_read + READ_GRACE);
        if self.idle.deadline() != deadline {
            self.idle.as_mut().reset(deadline);
        }
        self.idle.as_mut().poll(cx)
    }
}

/// The socket of a connection, plain or TLS.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(io) => io,
            Io::Tls(io) => io.get_ref().0,
        }
    }
}

/// Forwards an IO method to the socket, plain or TLS.
macro_rules! forward {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

/// Where a new connection stands in its handshake.
struct Handshake {
    deadline: Pin<Box<Sleep>>,
    /// Bytes read so far.
    seen: usize,
    /// The header of the first frame after the preface (the client's SETTINGS).
    frame_header: [u8; FRAME_HEADER_LEN],
}

impl Handshake {
    /// Takes the next bytes read; true once the preface and the whole first frame are in.
    /// Their content is the transport's to check.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let (start, end) = (self.seen, self.seen + bytes.len());
        let from = start.max(PREFACE_LEN);
        let to = end.min(PREFACE_LEN + FRAME_HEADER_LEN);
        if from < to {
            self.frame_header[from - PREFACE_LEN..to - PREFACE_LEN]
                .copy_from_slice(&bytes[from - start..to - start]);
        }
        self.seen = end;
        if self.seen < PREFACE_LEN + FRAME_HEADER_LEN {
            return false;
        }
        let [a, b, c, ..] = self.frame_header;
        let payload = u32::from_be_bytes([0, a, b, c]) as usize;
        self.seen >= PREFACE_LEN + FRAME_HEADER_LEN + payload
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        };
        match read {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if let Some(h) = &this.handshake
                    && h.seen == 0
                    && new.first() == Some(&TLS_HANDSHAKE_RECORD)
                    && matches!(this.io, Io::Plain(_))
                {
                    if let Some(held_back) = this.shared.warn_tls.hit() {
                        tracing::warn!(
                            remote = ?this.info.remote,
                            held_back,
                            "a TLS client connected to this plaintext listener; closing (serve TLS with --tls-cert and --tls-key, or connect with http://)"
                        );
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a TLS client on the plaintext listener",
                    )));
                }
                if !new.is_empty() {
                    this.last_read = Instant::now();
                    if let Some(h) = &mut this.handshake
                        && h.feed(new)
                    {
                        this.handshake = None;
                    }
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if let Some(h) = &mut this.handshake {
            if h.deadline.as_mut().poll(cx).is_ready() {
                let timeout = this.shared.limits.handshake_timeout;
                if let Some(held_back) = this.shared.warn_handshake.hit() {
                    tracing::warn!(
                        remote = ?this.info.remote,
                        bytes = h.seen,
                        held_back,
                        "closing a connection that did not finish its HTTP/2 handshake within {timeout:?} (--handshake-timeout)"
                    );
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no HTTP/2 handshake within {timeout:?}"),
                )));
            }
            return Poll::Pending;
        }
        if this.poll_idle(cx).is_ready() {
            let idle = this.shared.limits.max_connection_idle;
            if let Some(held_back) = this.shared.warn_idle.hit() {
                tracing::info!(
                    remote = ?this.info.remote,
                    held_back,
                    "closing a connection without a stream for {idle:?} (--max-connection-idle)"
                );
            }
            this.closed = true;
            // The end of the input: the transport closes the connection.
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        forward!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        forward!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, io => io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// A SETTINGS frame with `n` settings (6 bytes each).
    fn settings(n: usize) -> Vec<u8> {
        let len = (6 * n) as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([0x4, 0x0, 0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(0u8, 6 * n));
        f
    }

    fn handshake() -> Handshake {
        Handshake {
            deadline: Box::pin(tokio::time::sleep(Duration::ZERO)),
            seen: 0,
            frame_header: [0; FRAME_HEADER_LEN],
        }
    }

    #[tokio::test]
    async fn the_handshake_is_done_after_the_preface_and_the_whole_first_frame() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(settings(3));
        bytes.extend(b"more frames");
        let whole = PREFACE_LEN + FRAME_HEADER_LEN + 18;
        // In one read, and byte by byte: done exactly when the frame's last byte is in.
        let mut h = handshake();
        assert!(h.feed(&bytes));
        let mut h = handshake();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(h.feed(&[*b]), i + 1 >= whole, "after {} bytes", i + 1);
        }
        // A preface alone, or with half a frame header, is not a handshake.
        let mut h = handshake();
        assert!(!h.feed(PREFACE));
        assert!(!h.feed(&settings(0)[..4]));
        assert!(h.feed(&settings(0)[4..]));
    }
}
