//! Streams, against a server in this process: a stalled watcher does not stall the executor
//! and loses nothing; a shutdown ends streams with where to resume.

use std::time::Duration;

use bm_proto::v1 as pb;

use crate::inproc::InProcess;
use crate::support::fake_machine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_does_not_stall_the_executor() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    // A watcher that subscribes to everything and then does not read.
    let mut stalled = c
        .operations
        .watch_operations(pb::WatchOperationsRequest {
            after_revision: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let n = 200;
    let rows: Vec<pb::Machine> = (1..=n)
        .map(|i| fake_machine(&format!("m-{i}"), i, &[]))
        .collect();
    c.machines
        .import_machines(pb::ImportMachinesRequest {
            machines: rows,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ops = Vec::new();
    for i in 1..=n {
        let op = c
            .machines
            .enter_maintenance(pb::EnterMaintenanceRequest {
                machine_id: format!("m-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ops.push(op.id);
    }
    for i in 1..=n {
        let op = c.reimage(&format!("m-{i}"), "r").await;
        // Admission waits for the enter-maintenance to end; retry until it has.
        let op = match op {
            Ok(op) => op,
            Err(_) => {
                c.wait_end(&ops[i as usize - 1]).await;
                c.reimage(&format!("m-{i}"), "r").await.unwrap()
            }
        };
        ops.push(op.id);
    }
    // Every operation ends while the watcher reads nothing.
    tokio::time::timeout(Duration::from_secs(60), async {
        for id in &ops {
            let op = c.wait_end(id).await;
            assert_eq!(op.phase(), pb::OperationPhase::Succeeded);
        }
    })
    .await
    .expect("the executor was held up by a stalled watcher");

    // When the watcher finally reads, it gets every event, in order, none lost.
    let mut revisions = Vec::new();
    let expected_terminal = ops.len();
    let mut terminal = 0;
    while terminal < expected_terminal {
        let batch = tokio::time::timeout(Duration::from_secs(30), stalled.message())
            .await
            .expect("the watcher catches up")
            .unwrap()
            .unwrap();
        for e in batch.events {
            if e.r#type == pb::EventType::PhaseChanged as i32
                && matches!(
                    e.phase(),
                    pb::OperationPhase::Succeeded
                        | pb::OperationPhase::Failed
                        | pb::OperationPhase::Canceled
                )
            {
                terminal += 1;
            }
            revisions.push(e.revision);
        }
    }
    assert_eq!(
        revisions,
        (1..=revisions.len() as u64).collect::<Vec<_>>(),
        "every revision, in order"
    );
}

/// `serve` returns once its shutdown future completes; a watch open at that moment ends
/// with UNAVAILABLE and the revision to resume after, not as if it were done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_on_its_signal_and_streams_say_where_to_resume() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    let op = c.enter_maintenance("m-1").await;
    assert_eq!(op.phase(), pb::OperationPhase::Succeeded);
    let mut watch = c
        .operations
        .watch_operations(pb::WatchOperationsRequest {
            after_revision: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let read_to_end = async {
        let mut last_revision = 0;
        loop {
            match watch.message().await {
                Ok(Some(batch)) => {
                    last_revision = batch.events.last().map_or(last_revision, |e| e.revision);
                }
                other => return (other, last_revision),
            }
        }
    };
    let (served, (end, last_revision)) = tokio::join!(server.stop(), read_to_end);
    served.expect("serve returned an error");
    let status = end.expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(last_revision > 0, "the replay came first");
    assert!(
        status
            .message()
            .contains(&format!("resume with after_revision={last_revision}")),
        "{status:?}"
    );
}
