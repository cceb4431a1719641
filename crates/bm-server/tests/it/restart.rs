//! Restarts: graceful ones keep everything and resume running operations; a SIGKILL in
//! the middle of reimages loses nothing and leaves nothing stuck.

use bm_proto::v1 as pb;
use bm_provider_fake::LABEL_HANG_ACTION;

use crate::support::{Server, condition, fake_machine, phase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_state_and_resumes_operations() {
    let mut server = Server::start();
    let mut c = server.clients().await;
    c.register(fake_machine("machine-1", 1, &[])).await;
    c.register(fake_machine(
        "machine-2",
        2,
        &[(LABEL_HANG_ACTION, "repave")],
    ))
    .await;
    c.enter_maintenance("machine-1").await;
    c.enter_maintenance("machine-2").await;
    let done = c.reimage("machine-1", "r1").await.unwrap();
    c.wait_end(&done.id).await;
    let running = c.reimage("machine-2", "r2").await.unwrap();
    c.wait_stage(&running.id, "repave-image").await;
    // A watcher: its stream ends with UNAVAILABLE and where to resume, not as if done.
    let mut watch = c
        .operations
        .watch_operations(pb::WatchOperationsRequest {
            after_revision: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // SIGTERM: exit 0 within a few seconds, even with an operation running.
    let (status, took) = server.terminate();
    let end = loop {
        match watch.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status_of_stream = end.expect_err("the stream ends with an error");
    assert_eq!(
        status_of_stream.code(),
        tonic::Code::Unavailable,
        "{status_of_stream:?}"
    );
    assert!(
        status_of_stream
            .message()
            .contains("resume with after_revision="),
        "{status_of_stream:?}"
    );
    // And for programs, in an ErrorInfo (what bmctl resumes from).
    let info = tonic_types::StatusExt::get_details_error_info(&status_of_stream)
        .expect("an ErrorInfo in the status");
    assert_eq!(info.reason, "SERVER_SHUTTING_DOWN");
    let after: u64 = info.metadata["after_revision"].parse().unwrap();
    assert!(after > 0, "{info:?}");
    assert!(status.success(), "{status:?}\n{}", server.log());
    // The hung operation did not hold the exit up: the engine stopped it rather than waiting
    // out its grace period, which it would have logged. (`terminate` allows 15 s; the exit
    // takes about 2 s, the time given to connections still open, so no wall-clock bound
    // here can tell the two apart on a busy machine.)
    assert!(
        !server.log().contains("did not stop within"),
        "took {took:?}:\n{}",
        server.log()
    );
    assert!(server.log().contains("released leases"), "{}", server.log());

    server.spawn();
    let mut c = server.clients().await;
    let m1 = c.machine("machine-1").await;
    assert!(condition(&m1, "Provisioned"));
    let history = c
        .operations
        .list_operations(pb::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.operations.len(), 4);
    // The interrupted reimage resumed at its stage (a second attempt, which hangs again).
    c.wait_attempt(&running.id, "repave-image", Some(2)).await;
    let op = c.operation(&running.id).await;
    assert_eq!(op.phase(), pb::OperationPhase::Running);
    let repave = op.stages.iter().find(|s| s.name == "repave-image").unwrap();
    assert_eq!(
        repave.interruptions, 0,
        "a graceful stop is not counted as a crash: {op:?}"
    );
    assert_eq!(repave.attempts, 2, "{op:?}");
    let canceled = c
        .operations
        .cancel_operation(pb::CancelOperationRequest {
            operation_id: running.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(canceled.phase(), pb::OperationPhase::Canceled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_reimage_loses_nothing_and_leaves_nothing_stuck() {
    // Normal timing: a reimage takes 2-3 s, so the kill lands mid-operation.
    let mut server = Server::start_with(&["--fake-timing", "normal"]);
    let mut c = server.clients().await;
    let n = 8;
    for i in 1..=n {
        c.register(fake_machine(&format!("m-{i}"), i, &[])).await;
    }
    let mut enters = Vec::new();
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
        enters.push(op.id);
    }
    for id in &enters {
        c.wait_end(id).await;
    }
    let mut reimages = Vec::new();
    for i in 1..=n {
        reimages.push(
            c.reimage(&format!("m-{i}"), &format!("reimage-{i}"))
                .await
                .unwrap()
                .id,
        );
    }
    // Kill once the first one is writing its disk.
    c.wait_stage(&reimages[0], "repave-image").await;
    server.kill();

    server.spawn();
    let mut c = server.clients().await;
    for id in &reimages {
        let op = c.wait_end(id).await;
        assert_eq!(
            op.phase(),
            pb::OperationPhase::Succeeded,
            "{op:?}\n{}",
            server.log()
        );
        // Every stage ran to success exactly once as far as the record goes; an interrupted
        // one shows its interruption and a second attempt.
        assert_eq!(op.stages.len(), 5, "{op:?}");
        for s in &op.stages {
            assert_eq!(s.outcome(), pb::StageOutcome::Succeeded);
            assert_eq!(s.attempts, 1 + s.interruptions, "{s:?}");
        }
    }
    let first = c.operation(&reimages[0]).await;
    assert!(
        first.stages.iter().any(|s| s.interruptions == 1),
        "the first was interrupted: {first:?}"
    );
    // Invariants: no machine keeps an active operation, none is running, every machine is
    // provisioned in maintenance, and the same request id still maps to the same operation.
    let machines = c
        .machines
        .list_machines(pb::ListMachinesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .machines;
    assert_eq!(machines.len(), n as usize);
    for m in &machines {
        assert_eq!(
            m.effective_state(),
            pb::EffectiveState::MaintenanceIdle,
            "{m:?}"
        );
        assert_eq!(phase(m), pb::Phase::Maintenance);
        assert!(condition(m, "Provisioned") && condition(m, "InCustomerCluster"));
        assert!(m.status.as_ref().unwrap().active_operation_id.is_empty());
    }
    let running = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            phase: pb::OperationPhase::Running.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(running.operations.is_empty());
    let again = c.reimage("m-1", "reimage-1").await.unwrap();
    assert_eq!(again.id, reimages[0]);
    // The events tell the resumption.
    let events = c.events(&reimages[0]).await;
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("resumed after a server restart"))
    );
}
