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

/// Follows `op` until it ends, printing events and log lines if `print` is set.
pub(crate) async fn follow(
    ops: &mut OperationServiceClient<Channel>,
    op: &pb::Operation,
    pal: &Palette,
    print: bool,
) -> Result<Followed, tonic::Status> {
    let mut events = ops
        .watch_operations(pb::WatchOperationsRequest {
            operation_id: op.id.clone(),
            machine_id: String::new(),
            after_revision: Some(0),
        })
        .await?
        .into_inner();
    let mut logs = ops
        .stream_logs(pb::StreamLogsRequest {
            operation_id: op.id.clone(),
            after_sequence: 0,
        })
        .await?
        .into_inner();
    let mut events_done = false;
    let mut logs_done = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // Once the last event is in, the log stream gets a moment to deliver its tail.
    let mut tail_deadline: Option<tokio::time::Instant> = None;
    loop {
        if events_done && logs_done {
            break;
        }
        let tail = async {
            match tail_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            e = events.next(), if !events_done => match e {
                Some(Ok(batch)) => {
                    for ev in &batch.events {
                        if print {
                            for line in render::event_lines(ev, pal) {
                                anstream::println!("{line}");
                            }
                        }
                    }
                }
                Some(Err(s)) => return Err(s),
                None => {
                    events_done = true;
                    tail_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                }
            },
            l = logs.next(), if !logs_done => match l {
                Some(Ok(batch)) => {
                    if print {
                        for line in &batch.lines {
                            anstream::println!("{}", render::log_line(line, pal));
                        }
                    }
                }
                Some(Err(s)) => return Err(s),
                None => logs_done = true,
            },
            () = tail => break,
            _ = &mut ctrl_c => return Ok(Followed::Interrupted),
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
    anstream::print!("{}", render::header_box(&op, pal));
    let already_ended = is_terminal(op.phase);
    let done = if already_ended {
        op
    } else {
        anstream::println!();
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
    anstream::println!();
    anstream::print!(
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
