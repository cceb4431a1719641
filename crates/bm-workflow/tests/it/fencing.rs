//! Lease fencing as a replica sees it: an executor whose lease another claim superseded
//! (it stalled past the expiry, and another replica took the operation over) learns it at
//! its next renewal, cancels the provider action it was in, and writes nothing more.

use std::sync::Arc;
use std::time::Duration;

use bm_domain::{OperationPhase, OperationType};
use bm_provider_fake::{Action, LABEL_HANG_ACTION};
use bm_store::{EventFilter, Lease, MemoryStore, Store};

use crate::harness::{config, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_cancels_the_action_and_writes_nothing_more() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let h = start(
        store.clone(),
        bm_workflow::EngineConfig {
            // Renewals every 100 ms, so the loss is learnt quickly.
            lease_duration: Duration::from_millis(300),
            ..config()
        },
    );
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "repave")])
        .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h
        .submit("machine-1", OperationType::Reimage, "r")
        .await
        .unwrap();
    h.wait_log(op.id, "injected hang").await;
    // The enter-maintenance run releases its slot just after its end is committed (which
    // `run` waited for): wait for that, then only the reimage runs.
    tokio::time::timeout(Duration::from_secs(20), async {
        while h.engine.running_operations() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the ended enter-maintenance run did not release its slot");
    assert_eq!(h.engine.running_operations(), 1);

    // Another replica, whose clock is past this executor's lease (as if it had stalled),
    // claims the operation: a new generation.
    let later = bm_domain::Timestamp::from_system_time(std::time::SystemTime::now())
        .saturating_add(Duration::from_secs(3600));
    let lease = Lease {
        owner: "replica-b".into(),
        expires_at: later.saturating_add(Duration::from_secs(3600)),
    };
    let taken = store.claim(&lease, later, 10).await.unwrap();
    assert_eq!(taken.len(), 1, "the other replica took the operation over");
    let revision = store.last_revision().await.unwrap();
    let log_lines = store.logs_after(op.id, 0, 1000).await.unwrap().len();

    // The renewal reports the loss; the hanging action is canceled (it ends only then) and
    // the run stops.
    tokio::time::timeout(Duration::from_secs(20), async {
        while h.engine.running_operations() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the run whose lease was lost did not stop within 20 s");
    store.flush().await.unwrap();

    // Nothing was written for it after the takeover: no event, no log line, no end.
    let filter = EventFilter {
        operation_id: Some(op.id),
        machine_id: None,
    };
    assert!(
        store
            .events_after(revision, &filter, 100)
            .await
            .unwrap()
            .is_empty(),
        "the executor that lost the lease wrote events"
    );
    assert_eq!(
        store.logs_after(op.id, 0, 1000).await.unwrap().len(),
        log_lines,
        "the executor that lost the lease wrote log lines"
    );
    let stored = store.get_operation(op.id).await.unwrap();
    assert_eq!(stored.phase, OperationPhase::Running);
    assert_eq!(h.fake.calls("machine-1", Action::Repave), 1);
    // The new holder's writes go through.
    assert!(
        !store
            .save_progress(&taken[0].fence, &stored, vec![])
            .await
            .unwrap()
    );
    h.engine.shutdown(Duration::from_secs(5)).await;
}
