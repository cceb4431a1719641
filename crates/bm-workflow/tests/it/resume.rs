//! Durable execution: an interrupted operation resumes at its stage on the next start and
//! re-runs only that stage; unsafe or crash-looping stages fail for a person to look.

use std::sync::Arc;
use std::time::Duration;

use bm_domain::{
    ConditionType, EffectiveState, Labels, OperationPhase, OperationType, StageOutcome,
};
use bm_provider_fake::{Action, FakeConfig, FakeProvider, LABEL_HANG_ACTION, Timing};
use bm_store::{SqliteConfig, SqliteStore, Store};

use crate::harness::{Harness, config, start_with};

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
        .update_machine(&m.id, None, Some(Labels::default()))
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
    assert_eq!(
        (repave.attempts, repave.interruptions, repave.outcome),
        (2, 1, StageOutcome::Succeeded)
    );
    assert_eq!(done.stages.len(), 5);
    let m = h.get("machine-1").await;
    assert_eq!(m.effective_state(), EffectiveState::MaintenanceIdle);
    assert!(m.status.conditions.is_true(&ConditionType::Provisioned));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_interrupted_too_often_fails_for_intervention() {
    let store: Arc<dyn Store> = Arc::new(bm_store::MemoryStore::new());
    let mut h = start_with(store, config(), fake());
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "drain")])
        .await;
    let op = h
        .submit("machine-1", OperationType::EnterMaintenance, "e")
        .await
        .unwrap();
    // Three restarts while the stage hangs are tolerated (max_interruptions = 3)...
    for attempt in 1..=4 {
        h.wait_attempt(op.id, "drain", attempt).await;
        h.engine.shutdown(Duration::from_secs(5)).await;
        h = start_with(h.store.clone(), config(), h.fake.clone());
    }
    // ...the fourth is not.
    let done = h.wait_end(op.id).await;
    assert_eq!(done.phase, OperationPhase::Failed);
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("interrupted 4 times"),
        "{:?}",
        done.error
    );
    assert_eq!(
        h.get("machine-1").await.effective_state(),
        EffectiveState::Attention
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_network_change_is_not_rerun_blindly() {
    let store: Arc<dyn Store> = Arc::new(bm_store::MemoryStore::new());
    let h = start_with(store, config(), fake());
    h.machine("machine-1", &[]).await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let m = h.get("machine-1").await;
    let labels = Labels::from_pairs([(LABEL_HANG_ACTION, "apply-net-config")]).unwrap();
    h.engine
        .update_machine(&m.id, None, Some(labels))
        .await
        .unwrap();
    let op = h
        .submit("machine-1", OperationType::NetReconfig, "n")
        .await
        .unwrap();
    h.wait_log(op.id, "injected hang").await;
    let h = restart(h, "machine-1").await;
    let done = h.wait_end(op.id).await;
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
        1,
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
    let requested = idle.cancel(op.id).await.unwrap();
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
