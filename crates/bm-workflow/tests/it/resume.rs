//! Durable execution: an interrupted operation resumes at its stage on the next start and
//! re-runs only that stage; unsafe or crash-looping stages fail for a person to look.

use std::sync::Arc;
use std::time::Duration;

use bm_domain::{
    ConditionType, EffectiveState, EventKind, Labels, OperationPhase, OperationType, StageOutcome,
};
use bm_provider_fake::{
    Action, FakeConfig, FakeProvider, LABEL_DELAY_MS, LABEL_HANG_ACTION, Timing,
};
use bm_store::{MemoryStore, SqliteConfig, SqliteStore, Store};
use bm_workflow::CancelRequest;

use crate::harness::{Harness, config, start_with};
use crate::hold::HoldingStore;

fn fake() -> Arc<FakeProvider> {
    Arc::new(FakeProvider::new(FakeConfig {
        timing: Timing::Instant,
        ..FakeConfig::default()
    }))
}

/// Interrupts `op` at `stage` by shutting the engine down, clears the hang label, and
/// returns a new engine (a "restart") over the same store and provider counters.
async fn restart(h: Harness, machine: &str) -> Harness {
    h.engine.shutdown(Duration::from_secs(5)).await;
    let m = h.get(machine).await;
    h.engine
        .update_machine(bm_workflow::MachineUpdate {
            id: m.id.clone(),
            patch: bm_domain::MachinePatch {
                labels: Some(Labels::default()),
                ..Default::default()
            },
        })
        .await
        .unwrap();
    start_with(h.store.clone(), config(), h.fake.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_stage_resumes_at_that_stage_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(dir.path())).unwrap());
    let h = start_with(store, config(), fake());
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "repave")])
        .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h
        .submit("machine-1", OperationType::Reimage, "r")
        .await
        .unwrap();
    h.wait_log(op.id, "injected hang").await;

    let h = restart(h, "machine-1").await;
    let done = h.wait_end(op.id).await;
    assert_eq!(done.phase, OperationPhase::Succeeded, "{:?}", done.error);
    // Stages that had succeeded did not run again; the interrupted one did.
    assert_eq!(h.fake.calls("machine-1", Action::SetNetboot), 1);
    assert_eq!(h.fake.calls("machine-1", Action::PowerCycle), 1);
    assert_eq!(h.fake.calls("machine-1", Action::Repave), 2);
    let repave = done
        .stages
        .iter()
        .find(|s| s.name == "repave-image")
        .unwrap();
    // A graceful stop is not a crash: the stage ran again without counting an interruption.
    assert_eq!(
        (repave.attempts, repave.interruptions, repave.outcome),
        (2, 0, StageOutcome::Succeeded)
    );
    assert!(!repave.released);
    assert_eq!(done.stages.len(), 5);
    let m = h.get("machine-1").await;
    assert_eq!(m.effective_state(), EffectiveState::MaintenanceIdle);
    assert!(m.status.conditions.is_true(&ConditionType::Provisioned));
}

/// A stop that lets a stage finish (the grace period of `apply-net-config`) commits that
/// stage's success: after the restart the operation goes on with the next stage instead of
/// finding the network change cut off.
///
/// Paused time over the memory store: the action's 1 s and the stop's grace period are
/// virtual, so the outcome does not depend on how fast the machine runs the test.
#[tokio::test(start_paused = true)]
async fn a_stage_that_finishes_during_a_stop_is_not_lost() {
    let h = start_with(Arc::new(MemoryStore::new()), config(), fake());
    // Shorter than the stop's grace period for a stage that is not safe to run twice.
    h.machine("machine-1", &[(LABEL_DELAY_MS, "1000")]).await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h
        .submit("machine-1", OperationType::NetReconfig, "n")
        .await
        .unwrap();
    // The provider is inside the action (its first line), not merely about to be called.
    h.wait_log(op.id, "Rendering network config").await;
    h.engine.shutdown(Duration::from_secs(5)).await;
    // The stage ended during the stop, and its success was committed with the stop.
    let stopped = h.engine.get_operation(op.id).await.unwrap();
    assert_eq!(stopped.stages[0].outcome, StageOutcome::Succeeded);

    let h = start_with(h.store.clone(), config(), h.fake.clone());
    let done = h.wait_end(op.id).await;
    assert_eq!(done.phase, OperationPhase::Succeeded, "{:?}", done.error);
    assert_eq!(h.fake.calls("machine-1", Action::ApplyNetConfig), 1);
    let apply = &done.stages[0];
    assert_eq!(
        (apply.name.as_str(), apply.attempts, apply.interruptions),
        ("apply-net-config", 1, 0)
    );
}

/// A stop that comes after a stage's start was committed but before the provider was called
/// takes that attempt back: after the restart the stage runs once and counts one attempt
/// (it used to count two while the provider ran once).
#[tokio::test(start_paused = true)]
async fn a_stop_before_the_provider_is_called_does_not_count_an_attempt() {
    let store = HoldingStore::new(Arc::new(MemoryStore::new()));
    let h = start_with(store.clone(), config(), fake());
    h.machine("machine-1", &[]).await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let hold = store.hold_after_start_of("apply-net-config");
    let op = h
        .submit("machine-1", OperationType::NetReconfig, "n")
        .await
        .unwrap();
    hold.committed.await.unwrap();
    // The executor is held in the write that committed the stage's start. The stop's first
    // poll fires the shutdown; then the executor may go on and sees it.
    let stop = h.engine.shutdown(Duration::from_secs(5));
    tokio::pin!(stop);
    assert!(futures::poll!(&mut stop).is_pending());
    assert!(h.engine.is_shutting_down());
    hold.release.send(()).unwrap();
    stop.await;
    assert_eq!(h.fake.calls("machine-1", Action::ApplyNetConfig), 0);
    let stopped = h.engine.get_operation(op.id).await.unwrap();
    let s = &stopped.stages[0];
    assert_eq!(
        (s.name.as_str(), s.attempts, s.released),
        ("apply-net-config", 0, true),
        "the start is on record, the attempt is not"
    );

    let h = start_with(h.store.clone(), config(), h.fake.clone());
    let done = h.wait_end(op.id).await;
    assert_eq!(done.phase, OperationPhase::Succeeded, "{:?}", done.error);
    assert_eq!(h.fake.calls("machine-1", Action::ApplyNetConfig), 1);
    let apply = &done.stages[0];
    assert_eq!(
        (apply.name.as_str(), apply.attempts, apply.interruptions),
        ("apply-net-config", 1, 0)
    );
}

/// The same window with an operator's cancel: the operation ends CANCELED, and a disk-writing
/// stage that never reached the provider does not mark the disk as incomplete.
#[tokio::test(start_paused = true)]
async fn a_cancel_before_the_provider_is_called_leaves_the_disk_alone() {
    let store = HoldingStore::new(Arc::new(MemoryStore::new()));
    let h = start_with(store.clone(), config(), fake());
    h.machine("machine-1", &[]).await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    h.run("machine-1", OperationType::Reimage, "r1").await;
    assert!(
        h.get("machine-1")
            .await
            .status
            .conditions
            .is_true(&ConditionType::Provisioned)
    );
    let hold = store.hold_after_start_of("repave-image");
    let op = h
        .submit("machine-1", OperationType::Reimage, "r2")
        .await
        .unwrap();
    hold.committed.await.unwrap();
    let mut events = h.store.subscribe_events();
    let cancel = tokio::spawn({
        let engine = h.engine.clone();
        async move {
            engine
                .cancel(CancelRequest {
                    operation_id: op.id,
                    requested_by: bm_domain::Actor::default(),
                })
                .await
        }
    });
    // The cancel fires the operation's token in the same step that commits its request
    // (the runtime has one thread): once the request is seen, the executor may go on.
    while events.recv().await.unwrap().kind != EventKind::CancelRequested {}
    hold.release.send(()).unwrap();
    let canceled = cancel.await.unwrap().unwrap();
    assert_eq!(canceled.phase, OperationPhase::Canceled);
    assert_eq!(
        h.fake.calls("machine-1", Action::Repave),
        1,
        "only the first reimage"
    );
    let repave = canceled.stages.last().unwrap();
    assert_eq!(
        (repave.name.as_str(), repave.attempts, repave.outcome),
        ("repave-image", 0, StageOutcome::Canceled)
    );
    let m = h.get("machine-1").await;
    assert!(
        m.status
            .conditions
            .is_true(&ConditionType::OperationCanceled)
    );
    assert!(
        m.status.conditions.is_true(&ConditionType::Provisioned),
        "the image written by the first reimage is still whole"
    );
}

/// Leaves `op_type` on `machine` as a crash leaves an operation: RUNNING in `stage`, cut off
/// `crashes` times, its lease released (as the SQLite store does when it opens after one).
async fn crashed(
    h: &Harness,
    machine: &str,
    op_type: OperationType,
    stage: &str,
    crashes: u32,
) -> bm_domain::OperationId {
    let now = bm_domain::Timestamp::from_system_time(std::time::SystemTime::now());
    let mut op = bm_domain::Operation::new(
        bm_domain::OperationId::from_parts(now.as_unix_millis() as u64, 42),
        crate::harness::id(machine),
        op_type,
        bm_domain::RequestId::new("crashed").unwrap(),
        String::new(),
        now,
    )
    .unwrap();
    h.store.admit(op.clone()).await.unwrap();
    let lease = bm_store::Lease {
        owner: "dead".into(),
        expires_at: now.saturating_add(Duration::from_secs(60)),
    };
    let fence = h.store.claim(&lease, now, 1).await.unwrap().remove(0).fence;
    op.start(now).unwrap();
    op.begin_stage(stage, now);
    op.stages.last_mut().unwrap().interruptions = crashes;
    h.store.save_progress(&fence, &op, vec![]).await.unwrap();
    h.store.release("dead").await.unwrap();
    op.id
}

/// Records the stages the telemetry hears end.
#[derive(Debug, Default)]
struct StagesEnded(std::sync::Mutex<Vec<(&'static str, bool)>>);

impl bm_workflow::Telemetry for StagesEnded {
    fn stage_ended(&self, _: OperationType, stage: &'static str, succeeded: bool, _: Duration) {
        self.0.lock().unwrap().push((stage, succeeded));
    }
}

/// A store no engine runs on, with one machine.
async fn idle_store(machine: &str, labels: &[(&str, &str)]) -> Harness {
    let h = start_with(Arc::new(bm_store::MemoryStore::new()), config(), fake());
    h.machine(machine, labels).await;
    h.engine.shutdown(Duration::from_secs(5)).await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_interrupted_too_often_fails_for_intervention() {
    let idle = idle_store("machine-1", &[]).await;
    // Three crashes in the same stage are tolerated (max_interruptions = 3)...
    let op = crashed(
        &idle,
        "machine-1",
        OperationType::EnterMaintenance,
        "drain",
        2,
    )
    .await;
    let h = start_with(idle.store.clone(), config(), idle.fake.clone());
    let done = h.wait_end(op).await;
    assert_eq!(done.phase, OperationPhase::Succeeded, "{:?}", done.error);
    assert_eq!(done.stages[0].interruptions, 3);

    // ...the fourth is not.
    let idle = idle_store("machine-2", &[]).await;
    let op = crashed(
        &idle,
        "machine-2",
        OperationType::EnterMaintenance,
        "drain",
        3,
    )
    .await;
    let stages = Arc::new(StagesEnded::default());
    let h = start_with(
        idle.store.clone(),
        bm_workflow::EngineConfig {
            telemetry: stages.clone(),
            ..config()
        },
        idle.fake.clone(),
    );
    let done = h.wait_end(op).await;
    assert_eq!(done.phase, OperationPhase::Failed);
    // The refused stage ended, failed, for the stage metrics too.
    assert_eq!(
        *stages.0.lock().unwrap(),
        [("drain", false)],
        "the stages the telemetry heard end"
    );
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("interrupted 4 times"),
        "{:?}",
        done.error
    );
    assert_eq!(
        h.get("machine-2").await.effective_state(),
        EffectiveState::Attention
    );
    assert_eq!(h.fake.calls("machine-2", Action::Drain), 0, "not run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_network_change_is_not_rerun_blindly() {
    let idle = idle_store("machine-1", &[]).await;
    let op = {
        let h = start_with(idle.store.clone(), config(), idle.fake.clone());
        h.run("machine-1", OperationType::EnterMaintenance, "e")
            .await;
        h.engine.shutdown(Duration::from_secs(5)).await;
        crashed(
            &h,
            "machine-1",
            OperationType::NetReconfig,
            "apply-net-config",
            0,
        )
        .await
    };
    let h = start_with(idle.store.clone(), config(), idle.fake.clone());
    let done = h.wait_end(op).await;
    assert_eq!(done.phase, OperationPhase::Failed);
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("not safe to run again"),
        "{:?}",
        done.error
    );
    assert_eq!(
        h.fake.calls("machine-1", Action::ApplyNetConfig),
        0,
        "not re-run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_requested_before_a_restart_is_honoured_after_it() {
    let store: Arc<dyn Store> = Arc::new(bm_store::MemoryStore::new());
    let h = start_with(store, config(), fake());
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "drain")])
        .await;
    let op = h
        .submit("machine-1", OperationType::EnterMaintenance, "e")
        .await
        .unwrap();
    h.wait_log(op.id, "injected hang").await;
    h.engine.shutdown(Duration::from_secs(5)).await;
    // Canceled while no executor runs it (it is RUNNING, so the request is recorded).
    let quick = bm_workflow::EngineConfig {
        cancel_wait: Duration::from_millis(50),
        ..config()
    };
    let idle = bm_workflow::Engine::new(h.store.clone(), h.engine.providers().clone(), quick);
    let requested = idle
        .cancel(bm_workflow::CancelRequest {
            operation_id: op.id,
            requested_by: bm_domain::Actor::default(),
        })
        .await
        .unwrap();
    assert!(requested.cancel_requested);
    let h = start_with(h.store.clone(), config(), h.fake.clone());
    let done = h.wait_end(op.id).await;
    assert_eq!(done.phase, OperationPhase::Canceled);
    assert_eq!(
        h.fake.calls("machine-1", Action::Drain),
        1,
        "not re-run after the cancel"
    );
}
