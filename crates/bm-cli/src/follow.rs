//! Following an operation live: `WatchOperations` and `StreamLogs` at once, rendered
//! interleaved as they arrive, then the final box.

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

/// How long a follow keeps trying to reconnect to a server that went away.
pub(crate) const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Follows `op` until it ends, printing events and log lines if `print` is set. When the
/// server goes away (a restart), it reconnects and resumes both streams where they were.
pub(crate) async fn follow(
    ops: &mut OperationServiceClient<Channel>,
    op: &pb::Operation,
    pal: &Palette,
    print: bool,
) -> Result<Followed, tonic::Status> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let (mut last_revision, mut last_sequence) = (0u64, 0u64);
    let (mut events_done, mut logs_done) = (false, false);
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
                    _ = &mut ctrl_c => return Ok(Followed::Interrupted),
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
                _ = &mut ctrl_c => return Ok(Followed::Interrupted),
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

/// Runs an operation command's follow and prints the boxes; returns the exit code.
pub(crate) async fn run(
    ops: &mut OperationServiceClient<Channel>,
    op: pb::Operation,
    started: Instant,
    pal: &Palette,
) -> Result<u8, tonic::Status> {
    out!("{}", render::header_box(&op, pal));
    let already_ended = is_terminal(op.phase);
    let done = if already_ended {
        op
    } else {
        outln!();
        match follow(ops, &op, pal, true).await? {
            Followed::Ended(done) => *done,
            Followed::Interrupted => {
                anstream::eprintln!(
                    "\nStopped following. Operation {} goes on on the server; `bmctl logs {}` follows it again, `bmctl cancel {}` stops it.",
                    op.id,
                    op.id,
                    op.id
                );
                return Ok(130);
            }
        }
    };
    outln!();
    out!(
        "{}",
        render::final_box(&done, started.elapsed().as_secs_f64(), already_ended, pal)
    );
    Ok(exit_code(done.phase))
}

/// 0 for SUCCEEDED, 1 for FAILED, 3 for CANCELED (and anything else).
pub(crate) fn exit_code(phase: i32) -> u8 {
    match pb::OperationPhase::try_from(phase) {
        Ok(pb::OperationPhase::Succeeded) => 0,
        Ok(pb::OperationPhase::Failed) => 1,
        _ => 3,
    }
}
