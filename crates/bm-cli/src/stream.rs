//! Server streams that outlive a restart of the server.
//!
//! [`Resuming`] is the one way bmctl reads a stream: when the connection goes away it
//! reconnects and resumes after the last item it delivered, so that nothing is shown twice
//! and nothing is missed. `follow` reads two at once (events and provider log); `watch` and
//! `logs` read one through [`read_to_end`].

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::connect::Transport;
use bm_proto::v1 as pb;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use futures::StreamExt;
use tonic::Streaming;
use tonic_types::StatusExt;

/// The exit code after Ctrl+C (128 + SIGINT), as the README says: the command stopped, an
/// operation it followed goes on.
pub(crate) const INTERRUPTED: u8 = 130;

/// How long a stream keeps trying to reconnect to a server that went away.
pub(crate) const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// The pause between two attempts to reconnect.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A message of a stream that a request can resume after.
pub(crate) trait Resumable {
    /// The request field that resumes the stream, which is also the key of the resume point
    /// in the `ErrorInfo` of a status that cut the stream off.
    const FIELD: &'static str;

    /// The position of the last item of this message, if it has items.
    fn last(&self) -> Option<u64>;
}

impl Resumable for pb::WatchOperationsResponse {
    const FIELD: &'static str = "after_revision";

    fn last(&self) -> Option<u64> {
        self.events.iter().map(|e| e.revision).max()
    }
}

impl Resumable for pb::StreamLogsResponse {
    const FIELD: &'static str = "after_sequence";

    fn last(&self) -> Option<u64> {
        self.lines.iter().map(|l| l.sequence).max()
    }
}

/// What reading a [`Resuming`] stream gives next.
#[derive(Debug)]
pub(crate) enum Next<T> {
    /// A message of the stream.
    Message(T),
    /// The connection or the server went away (the status says how); the next read
    /// reconnects.
    Lost(tonic::Status),
    /// Connected again; the stream goes on after this position (`None`: live only, when
    /// neither an item nor the server said where the stream was).
    Resumed(Option<u64>),
    /// The server ended the stream.
    End,
}

type Opening<T> = Pin<Box<dyn Future<Output = Result<Streaming<T>, tonic::Status>>>>;

/// A server stream that reconnects when the server goes away (a restart) and resumes after
/// the last position it knows: the last item it delivered, or the resume point the server
/// gave when it cut the stream off (which covers a stream that had delivered nothing yet).
/// After [`RECONNECT_FOR`] without a server it gives up with the last error.
pub(crate) struct Resuming<T> {
    open: Box<dyn FnMut(Option<u64>) -> Opening<T>>,
    position: Option<u64>,
    stream: Option<Streaming<T>>,
    lost_since: Option<Instant>,
    /// No reconnect before this time: after a failed attempt, or after the server said it
    /// is shutting down (reconnecting at once would only reach the server on its way out).
    reopen_at: Option<tokio::time::Instant>,
}

impl<T: Resumable> Resuming<T> {
    /// A stream that `open` opens after a position (`None`: live only), first after
    /// `after`. Nothing is opened before the first [`Resuming::next`].
    pub(crate) fn new<F, Fut>(after: Option<u64>, mut open: F) -> Self
    where
        F: FnMut(Option<u64>) -> Fut + 'static,
        Fut: Future<Output = Result<Streaming<T>, tonic::Status>> + 'static,
    {
        Resuming {
            open: Box::new(move |after| Box::pin(open(after))),
            position: after,
            stream: None,
            lost_since: None,
            reopen_at: None,
        }
    }

    /// The next message, or news of the connection. Cancel-safe: a read dropped before it
    /// completes (in a `select!`) loses nothing.
    ///
    /// # Errors
    ///
    /// The status of a failed first connection, of a stream that failed for another reason
    /// than a lost server, or of the last attempt to reconnect after [`RECONNECT_FOR`].
    pub(crate) async fn next(&mut self) -> Result<Next<T>, tonic::Status> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                if let Some(at) = self.reopen_at {
                    tokio::time::sleep_until(at).await;
                    self.reopen_at = None;
                }
                match (self.open)(self.position).await {
                    Ok(s) => {
                        self.stream = Some(s);
                        if self.lost_since.take().is_some() {
                            return Ok(Next::Resumed(self.position));
                        }
                    }
                    Err(s) => match self.lost_since {
                        Some(since) if is_disconnect(&s) && since.elapsed() <= RECONNECT_FOR => {
                            self.reopen_at = Some(tokio::time::Instant::now() + RETRY_EVERY);
                        }
                        _ => return Err(s),
                    },
                }
                continue;
            };
            return match stream.next().await {
                Some(Ok(m)) => {
                    if let Some(p) = m.last() {
                        self.advance(p);
                    }
                    Ok(Next::Message(m))
                }
                Some(Err(s)) if is_disconnect(&s) => {
                    self.stream = None;
                    self.lost_since = Some(Instant::now());
                    if let Some(p) = resume_point(&s, T::FIELD) {
                        self.advance(p);
                        self.reopen_at = Some(tokio::time::Instant::now() + RETRY_EVERY);
                    }
                    Ok(Next::Lost(s))
                }
                Some(Err(s)) => Err(s),
                None => Ok(Next::End),
            };
        }
    }

    fn advance(&mut self, to: u64) {
        self.position = Some(self.position.map_or(to, |p| p.max(to)));
    }
}

/// The position a status that cut a stream off says to resume after: the `field` of its
/// `google.rpc.ErrorInfo`, which bm-server adds when it shuts down.
fn resume_point(s: &tonic::Status, field: &str) -> Option<u64> {
    s.get_details_error_info()?
        .metadata
        .get(field)?
        .parse()
        .ok()
}

/// Whether a stream error means the connection or the server went away (a restart): the
/// stream reconnects and resumes where it was.
pub(crate) fn is_disconnect(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// The operation events of a machine and/or an operation (empty: any), after revision
/// `after` (`None`: live only).
pub(crate) fn events(
    ops: &OperationServiceClient<Transport>,
    machine_id: String,
    operation_id: String,
    after: Option<u64>,
) -> Resuming<pb::WatchOperationsResponse> {
    let ops = ops.clone();
    Resuming::new(after, move |after_revision| {
        let mut ops = ops.clone();
        let req = pb::WatchOperationsRequest {
            machine_id: machine_id.clone(),
            operation_id: operation_id.clone(),
            after_revision,
        };
        async move {
            ops.watch_operations(req)
                .await
                .map(tonic::Response::into_inner)
        }
    })
}

/// An operation's provider log lines after sequence number `after`.
pub(crate) fn logs(
    ops: &OperationServiceClient<Transport>,
    operation_id: String,
    after: u64,
) -> Resuming<pb::StreamLogsResponse> {
    let ops = ops.clone();
    Resuming::new(Some(after), move |after_sequence| {
        let mut ops = ops.clone();
        let req = pb::StreamLogsRequest {
            operation_id: operation_id.clone(),
            after_sequence: after_sequence.unwrap_or(0),
        };
        async move { ops.stream_logs(req).await.map(tonic::Response::into_inner) }
    })
}

/// Reads a stream until it ends (exit code 0) or Ctrl+C ([`INTERRUPTED`]), handing each
/// message to `each`; says on stderr when it loses the server and when it is back.
pub(crate) async fn read_to_end<T: Resumable>(
    mut stream: Resuming<T>,
    mut each: impl FnMut(T) -> anyhow::Result<()>,
) -> anyhow::Result<u8> {
    let mut ctrl_c = interrupt_listener().await;
    loop {
        tokio::select! {
            next = stream.next() => match next? {
                Next::Message(m) => each(m)?,
                Next::Lost(s) => {
                    anstream::eprintln!("↻ lost the server ({}); reconnecting...", s.message());
                }
                Next::Resumed(after) => anstream::eprintln!("↻ {}", resumed::<T>(after)),
                Next::End => return Ok(0),
            },
            () = &mut ctrl_c => return Ok(INTERRUPTED),
        }
    }
}

/// What a reconnect notice says of where the stream goes on.
pub(crate) fn resumed<T: Resumable>(after: Option<u64>) -> String {
    match after {
        Some(p) => format!("reconnected; resuming with {}={p}", T::FIELD),
        None => "reconnected; live from now on: nothing had come before the server went away, \
                 so what happened while it was away is not shown (--since replays it)"
            .to_owned(),
    }
}

/// Ctrl+C, listened to from the call on: the handler is installed at once rather than at
/// the first `select!` that polls it, so that no Ctrl+C after the first output is lost (to
/// the default action, which kills the process).
pub(crate) async fn interrupt_listener() -> Pin<Box<dyn Future<Output = ()>>> {
    let mut ctrl_c = Box::pin(async {
        // Without a handler (an error installing it), Ctrl+C keeps its default action.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    });
    // The first poll installs the handler; a Ctrl+C that came already stays ready.
    if futures::poll!(ctrl_c.as_mut()).is_ready() {
        return Box::pin(std::future::ready(()));
    }
    ctrl_c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Scripted, event, line, serve, shutting_down};

    /// Reads `s` until it ends, and names what it read.
    async fn read_all<T: Resumable>(
        mut s: Resuming<T>,
        show: impl Fn(&T) -> Vec<u64>,
    ) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match s.next().await.expect("no error") {
                Next::Message(m) => seen.push(format!("items {:?}", show(&m))),
                Next::Lost(st) => seen.push(format!("lost {:?}", st.code())),
                Next::Resumed(p) => seen.push(format!("resumed after {p:?}")),
                Next::End => return seen,
            }
        }
    }

    fn revisions(m: &pb::WatchOperationsResponse) -> Vec<u64> {
        m.events.iter().map(|e| e.revision).collect()
    }

    #[tokio::test]
    async fn a_live_watch_that_saw_nothing_resumes_where_the_server_stopped() {
        // The gap this closes: `bmctl watch` without --since, cut off by a shutdown before
        // any event came, used to reconnect live only and miss what happened meanwhile.
        let fake = Scripted::default();
        fake.script_watch(vec![Err(shutting_down("after_revision", 41))]);
        fake.script_watch(vec![Ok(vec![event(42)])]);
        let (ops, fake) = serve(fake).await;
        let seen = read_all(events(&ops, String::new(), String::new(), None), revisions).await;
        assert_eq!(
            seen,
            ["lost Unavailable", "resumed after Some(41)", "items [42]"]
        );
        let asked: Vec<_> = fake
            .watch_requests()
            .iter()
            .map(|r| r.after_revision)
            .collect();
        assert_eq!(asked, [None, Some(41)]);
    }

    #[tokio::test]
    async fn a_stream_resumes_after_the_last_item_it_delivered() {
        // A server that died without a word (no resume point in the status).
        let fake = Scripted::default();
        fake.script_watch(vec![
            Ok(vec![event(5), event(6)]),
            Err(tonic::Status::unavailable("connection reset")),
        ]);
        fake.script_watch(vec![Ok(vec![event(7)])]);
        fake.script_logs(vec![
            Ok(vec![line(1), line(2)]),
            Err(tonic::Status::unknown("h2 protocol error")),
        ]);
        fake.script_logs(vec![Ok(vec![line(3)])]);
        let (ops, fake) = serve(fake).await;
        let seen = read_all(events(&ops, String::new(), "op-1".into(), None), revisions).await;
        assert_eq!(
            seen,
            [
                "items [5, 6]",
                "lost Unavailable",
                "resumed after Some(6)",
                "items [7]"
            ]
        );
        let seen = read_all(logs(&ops, "op-1".into(), 0), |m| {
            m.lines.iter().map(|l| l.sequence).collect()
        })
        .await;
        assert_eq!(
            seen,
            [
                "items [1, 2]",
                "lost Unknown",
                "resumed after Some(2)",
                "items [3]"
            ]
        );
        let asked: Vec<_> = fake
            .watch_requests()
            .iter()
            .map(|r| r.after_revision)
            .collect();
        assert_eq!(asked, [None, Some(6)]);
        let asked: Vec<_> = fake
            .log_requests()
            .iter()
            .map(|r| r.after_sequence)
            .collect();
        assert_eq!(asked, [0, 2]);
    }

    #[tokio::test]
    async fn other_errors_end_the_stream_and_the_first_connection_is_not_retried() {
        let fake = Scripted::default();
        fake.script_watch(vec![Err(tonic::Status::out_of_range(
            "revision 9 is ahead",
        ))]);
        let (ops, fake) = serve(fake).await;
        let mut s = events(&ops, String::new(), String::new(), Some(9));
        let e = s.next().await.expect_err("out of range");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert_eq!(fake.watch_requests().len(), 1);
        // A first connection that fails is an error at once, not a reconnect loop.
        let gone = OperationServiceClient::with_interceptor(
            tonic::transport::Channel::from_static("http://127.0.0.1:1").connect_lazy(),
            crate::connect::Credentials::default(),
        );
        let mut s = logs(&gone, "op-1".into(), 0);
        let e = s.next().await.expect_err("nothing listens on port 1");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn a_reconnect_notice_says_where_the_stream_goes_on() {
        assert_eq!(
            resumed::<pb::WatchOperationsResponse>(Some(41)),
            "reconnected; resuming with after_revision=41"
        );
        assert_eq!(
            resumed::<pb::StreamLogsResponse>(Some(7)),
            "reconnected; resuming with after_sequence=7"
        );
        assert!(resumed::<pb::WatchOperationsResponse>(None).contains("--since"));
    }
}
