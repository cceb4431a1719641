//! Following an operation live: `WatchOperations` and `StreamLogs` at once, rendered
//! interleaved as they arrive, then the final box.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bm_proto::v1 as pb;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use futures::StreamExt;
use tonic::transport::Channel;

use crate::render::{self, Palette};

/// How following ended.
pub(crate) enum Followed {
    /// The operation ended; here it is as stored.
    Ended(Box<pb::Operation>),
    /// The user pressed Ctrl+C; the operation goes on.
    Interrupted,
}

/// True when the phase is a final one.
pub(crate) fn is_terminal(phase: i32) -> bool {
    matches!(
        pb::OperationPhase::try_from(phase),
        Ok(pb::OperationPhase::Succeeded
            | pb::OperationPhase::Failed
            | pb::OperationPhase::Canceled)
    )
}

/// Whether a stream error means the connection or the server went away (a restart): the
/// follow reconnects and resumes where it was.
pub(crate) fn is_disconnect(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
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

/// How long a follow keeps trying to reconnect to a server that went away.
pub(crate) const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Follows `op` until it ends, printing events and log lines if `print` is set (otherwise
/// the provider log is not read at all). When the server goes away (a restart), it
/// reconnects and resumes both streams where they were.
pub(crate) async fn follow(
    ops: &mut OperationServiceClient<Channel>,
    op: &pb::Operation,
    pal: &Palette,
    print: bool,
) -> Result<Followed, tonic::Status> {
    let mut ctrl_c = interrupt_listener().await;
    let (mut last_revision, mut last_sequence) = (0u64, 0u64);
    // Only the events say when the operation ends; the log is read only to be shown.
    let (mut events_done, mut logs_done) = (false, !print);
    let mut lost_since: Option<Instant> = None;
    while !(events_done && logs_done) {
        let connected = async {
            let events = if events_done {
                None
            } else {
                Some(
                    ops.watch_operations(pb::WatchOperationsRequest {
                        operation_id: op.id.clone(),
                        machine_id: String::new(),
                        after_revision: Some(last_revision),
                    })
                    .await?
                    .into_inner(),
                )
            };
            let logs = if logs_done {
                None
            } else {
                Some(
                    ops.stream_logs(pb::StreamLogsRequest {
                        operation_id: op.id.clone(),
                        after_sequence: last_sequence,
                    })
                    .await?
                    .into_inner(),
                )
            };
            Ok::<_, tonic::Status>((events, logs))
        }
        .await;
        let (mut events, mut logs) = match connected {
            Ok(streams) => streams,
            Err(s) if is_disconnect(&s) => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    return Err(s);
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut ctrl_c => return Ok(Followed::Interrupted),
                }
            }
            Err(s) => return Err(s),
        };
        if lost_since.take().is_some() && print {
            outln!(
                "{}",
                render::notice(
                    &format!("reconnected; resuming after revision {last_revision}"),
                    pal
                )
            );
        }
        // Once the last event is in, the log stream gets a moment to deliver its tail.
        let mut tail_deadline: Option<tokio::time::Instant> = None;
        let disconnected = loop {
            if events_done && logs_done {
                break None;
            }
            let tail = async {
                match tail_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                e = async { events.as_mut()?.next().await }, if !events_done => match e {
                    Some(Ok(batch)) => {
                        for ev in &batch.events {
                            last_revision = last_revision.max(ev.revision);
                            if print {
                                for line in render::event_lines(ev, pal) {
                                    outln!("{line}");
                                }
                            }
                        }
                    }
                    Some(Err(s)) if is_disconnect(&s) => break Some(s),
                    Some(Err(s)) => return Err(s),
                    None => {
                        events_done = true;
                        tail_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                    }
                },
                l = async { logs.as_mut()?.next().await }, if !logs_done => match l {
                    Some(Ok(batch)) => {
                        for line in &batch.lines {
                            last_sequence = last_sequence.max(line.sequence);
                            if print {
                                outln!("{}", render::log_line(line, pal));
                            }
                        }
                    }
                    Some(Err(s)) if is_disconnect(&s) => break Some(s),
                    Some(Err(s)) => return Err(s),
                    None => logs_done = true,
                },
                () = tail => {
                    logs_done = true;
                }
                () = &mut ctrl_c => return Ok(Followed::Interrupted),
            }
        };
        if let Some(s) = disconnected {
            if print {
                outln!(
                    "{}",
                    render::notice(
                        &format!("lost the server ({}); reconnecting...", s.message()),
                        pal
                    )
                );
            }
            lost_since = Some(Instant::now());
        }
    }
    let op = ops
        .get_operation(pb::GetOperationRequest {
            operation_id: op.id.clone(),
        })
        .await?
        .into_inner();
    Ok(Followed::Ended(Box::new(op)))
}

/// Runs a follow and prints the boxes; returns the exit code. `if_ended` is what the final
/// box says when `op` had already ended (a replayed request, or a follow that came late).
pub(crate) async fn run(
    ops: &mut OperationServiceClient<Channel>,
    op: pb::Operation,
    started: Instant,
    if_ended: render::Ended,
    pal: &Palette,
) -> Result<u8, tonic::Status> {
    out!("{}", render::header_box(&op, pal));
    let (done, ended) = if is_terminal(op.phase) {
        (op, if_ended)
    } else {
        outln!();
        match follow(ops, &op, pal, true).await? {
            Followed::Ended(done) => (*done, render::Ended::Live),
            Followed::Interrupted => {
                anstream::eprintln!("\n{}", interrupted_message(&op.id));
                return Ok(crate::INTERRUPTED);
            }
        }
    };
    outln!();
    out!(
        "{}",
        render::final_box(&done, started.elapsed().as_secs_f64(), ended, pal)
    );
    Ok(exit_code(done.phase))
}

/// What Ctrl+C during a follow leaves behind, and the commands to go on.
pub(crate) fn interrupted_message(op: &str) -> String {
    format!(
        "Stopped following. Operation {op} goes on on the server; `bmctl follow {op}` follows it again, `bmctl cancel {op}` stops it."
    )
}

/// 0 for SUCCEEDED, 1 for FAILED, 3 for CANCELED (and anything else).
pub(crate) fn exit_code(phase: i32) -> u8 {
    match pb::OperationPhase::try_from(phase) {
        Ok(pb::OperationPhase::Succeeded) => 0,
        Ok(pb::OperationPhase::Failed) => 1,
        _ => 3,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use bm_proto::v1::operation_service_server::{OperationService, OperationServiceServer};
    use futures::Stream;
    use tonic::transport::Server;
    use tonic::transport::server::TcpIncoming;
    use tonic::{Request, Response, Status};

    use super::*;

    type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    /// An operation service whose one operation ends with the first event batch; it notes
    /// whether the provider log was asked for (and never ends that stream).
    struct Fake {
        logs_opened: Arc<AtomicBool>,
    }

    fn operation(phase: pb::OperationPhase) -> pb::Operation {
        pb::Operation {
            id: "op-1".into(),
            machine_id: "machine-1".into(),
            phase: phase.into(),
            ..Default::default()
        }
    }

    #[tonic::async_trait]
    impl OperationService for Fake {
        async fn get_operation(
            &self,
            _: Request<pb::GetOperationRequest>,
        ) -> Result<Response<pb::Operation>, Status> {
            Ok(Response::new(operation(pb::OperationPhase::Succeeded)))
        }

        async fn list_operations(
            &self,
            _: Request<pb::ListOperationsRequest>,
        ) -> Result<Response<pb::ListOperationsResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn cancel_operation(
            &self,
            _: Request<pb::CancelOperationRequest>,
        ) -> Result<Response<pb::Operation>, Status> {
            Err(Status::unimplemented("fake"))
        }

        type WatchOperationsStream = Stream_<pb::WatchOperationsResponse>;

        async fn watch_operations(
            &self,
            _: Request<pb::WatchOperationsRequest>,
        ) -> Result<Response<Self::WatchOperationsStream>, Status> {
            let ended = pb::OperationEvent {
                revision: 7,
                operation_id: "op-1".into(),
                r#type: pb::EventType::PhaseChanged.into(),
                phase: pb::OperationPhase::Succeeded.into(),
                ..Default::default()
            };
            let batch = pb::WatchOperationsResponse {
                events: vec![ended],
                ..Default::default()
            };
            Ok(Response::new(Box::pin(futures::stream::iter([Ok(batch)]))))
        }

        type StreamLogsStream = Stream_<pb::StreamLogsResponse>;

        async fn stream_logs(
            &self,
            _: Request<pb::StreamLogsRequest>,
        ) -> Result<Response<Self::StreamLogsStream>, Status> {
            self.logs_opened.store(true, Ordering::SeqCst);
            Ok(Response::new(Box::pin(futures::stream::pending())))
        }
    }

    #[tokio::test]
    async fn a_silent_follow_does_not_read_the_log() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let logs_opened = Arc::new(AtomicBool::new(false));
        let service = OperationServiceServer::new(Fake {
            logs_opened: logs_opened.clone(),
        });
        tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        let mut ops = OperationServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let running = operation(pb::OperationPhase::Running);
        let followed = follow(&mut ops, &running, &Palette::plain(), false)
            .await
            .unwrap();
        let Followed::Ended(done) = followed else {
            panic!("the follow was not interrupted");
        };
        assert_eq!(done.phase, pb::OperationPhase::Succeeded as i32);
        assert!(
            !logs_opened.load(Ordering::SeqCst),
            "a follow that prints nothing opened StreamLogs"
        );
    }

    #[test]
    fn ctrl_c_points_at_the_command_that_follows_again() {
        let m = interrupted_message("op-1");
        assert!(m.contains("`bmctl follow op-1` follows it again"), "{m}");
        assert!(m.contains("`bmctl cancel op-1` stops it"), "{m}");
    }
}
