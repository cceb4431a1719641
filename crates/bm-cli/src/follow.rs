//! Following an operation live: `WatchOperations` and `StreamLogs` at once, rendered
//! interleaved as they arrive, then the final box.

use std::time::{Duration, Instant};

use crate::connect::Transport;
use bm_proto::v1 as pb;
use bm_proto::v1::operation_service_client::OperationServiceClient;

use crate::render::{self, Palette};
use crate::stream::{self, Next};

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

/// How long the provider log may take to deliver its tail once the last event is in.
const LOG_TAIL: Duration = Duration::from_secs(3);

/// Follows `op` until it ends, printing events and log lines if `print` is set (otherwise
/// the provider log is not read at all). When the server goes away (a restart), both
/// streams reconnect and resume where they were; the events stream says so.
pub(crate) async fn follow(
    ops: &mut OperationServiceClient<Transport>,
    op: &pb::Operation,
    pal: &Palette,
    print: bool,
) -> Result<Followed, tonic::Status> {
    let mut ctrl_c = stream::interrupt_listener().await;
    let mut events = stream::events(ops, String::new(), op.id.clone(), Some(0));
    // Only the events say when the operation ends; the log is read only to be shown.
    let mut logs = print.then(|| stream::logs(ops, op.id.clone(), 0));
    let (mut events_done, mut logs_done) = (false, logs.is_none());
    // Once the last event is in, the log stream gets a moment to deliver its tail.
    let mut tail_deadline: Option<tokio::time::Instant> = None;
    while !(events_done && logs_done) {
        let tail = async {
            match tail_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let next_log = async {
            match logs.as_mut() {
                Some(l) => l.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            e = events.next(), if !events_done => match e? {
                Next::Message(batch) => {
                    if print {
                        for ev in &batch.events {
                            for line in render::event_lines(ev, pal) {
                                outln!("{line}");
                            }
                        }
                    }
                }
                Next::Lost(s) => {
                    if print {
                        let lost = format!("lost the server ({}); reconnecting...", s.message());
                        outln!("{}", render::notice(&lost, pal));
                    }
                }
                Next::Resumed(after) => {
                    if print {
                        let resumed = stream::resumed::<pb::WatchOperationsResponse>(after);
                        outln!("{}", render::notice(&resumed, pal));
                    }
                }
                Next::End => {
                    events_done = true;
                    tail_deadline = Some(tokio::time::Instant::now() + LOG_TAIL);
                }
            },
            // The log stream reconnects quietly: the events stream tells of the server.
            l = next_log, if !logs_done => match l? {
                Next::Message(batch) => {
                    for line in &batch.lines {
                        outln!("{}", render::log_line(line, pal));
                    }
                }
                Next::Lost(_) | Next::Resumed(_) => {}
                Next::End => logs_done = true,
            },
            () = tail => logs_done = true,
            () = &mut ctrl_c => return Ok(Followed::Interrupted),
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
    ops: &mut OperationServiceClient<Transport>,
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
                return Ok(stream::INTERRUPTED);
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
    use super::*;
    use crate::testing::{Scripted, event, serve};

    #[tokio::test]
    async fn a_silent_follow_does_not_read_the_log() {
        let fake = Scripted::default();
        fake.script_watch(vec![Ok(vec![event(6), event(7)])]);
        let (mut ops, fake) = serve(fake).await;
        let running = pb::Operation {
            id: "op-1".into(),
            phase: pb::OperationPhase::Running.into(),
            ..Default::default()
        };
        let followed = follow(&mut ops, &running, &Palette::plain(), false)
            .await
            .unwrap();
        let Followed::Ended(done) = followed else {
            panic!("the follow was not interrupted");
        };
        assert_eq!(done.phase, pb::OperationPhase::Succeeded as i32);
        assert!(
            fake.log_requests().is_empty(),
            "a follow that prints nothing opened StreamLogs"
        );
        let asked: Vec<_> = fake
            .watch_requests()
            .iter()
            .map(|r| r.after_revision)
            .collect();
        assert_eq!(
            asked,
            [Some(0)],
            "a follow replays the operation from its start"
        );
    }

    #[test]
    fn ctrl_c_points_at_the_command_that_follows_again() {
        let m = interrupted_message("op-1");
        assert!(m.contains("`bmctl follow op-1` follows it again"), "{m}");
        assert!(m.contains("`bmctl cancel op-1` stops it"), "{m}");
    }
}
