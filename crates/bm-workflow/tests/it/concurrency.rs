//! One operation per machine under concurrent requests; parallel across machines under a
//! global limit, where a slow machine holds up nobody else.

use std::collections::BTreeSet;
use std::sync::Arc;

use bm_domain::{DomainError, OperationPhase, OperationType};
use bm_provider_fake::{Action, LABEL_HANG_ACTION};
use bm_store::MemoryStore;

use crate::harness::{config, memory, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_make_one_operation_and_one_execution() {
    let h = Arc::new(memory());
    h.machine("machine-1", &[]).await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move {
                h.submit("machine-1", OperationType::Reimage, "same-key")
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().id);
    }
    assert_eq!(ids.len(), 1);
    let op = h.wait_end(*ids.first().unwrap()).await;
    assert_eq!(op.phase, OperationPhase::Succeeded);
    assert_eq!(
        h.fake.calls("machine-1", Action::SetNetboot),
        1,
        "one execution"
    );
    assert_eq!(h.fake.calls("machine-1", Action::Repave), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_requests_on_one_machine_admit_one() {
    let h = Arc::new(memory());
    // The reimage hangs, so it stays active while the others arrive.
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "repave")])
        .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                h.submit("machine-1", OperationType::Reimage, &format!("key-{i}"))
                    .await
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refusals = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(op) => admitted.push(op.id),
            Err(e) => refusals.push(e),
        }
    }
    assert_eq!(admitted.len(), 1);
    assert_eq!(refusals.len(), 99);
    for e in &refusals {
        match e.as_domain() {
            Some(DomainError::Busy { active, .. }) => assert_eq!(*active, admitted[0]),
            _ => panic!("unexpected refusal: {e}"),
        }
        assert!(
            e.to_string().contains(&admitted[0].to_string()),
            "the message names the active operation"
        );
    }
    assert_eq!(
        h.cancel(admitted[0]).await.unwrap().phase,
        OperationPhase::Canceled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_machine_holds_up_no_one_and_the_limit_holds() {
    let h = start(
        Arc::new(MemoryStore::new()),
        bm_workflow::EngineConfig {
            max_concurrent_operations: 3,
            ..config()
        },
    );
    h.machine("stuck", &[(LABEL_HANG_ACTION, "drain")]).await;
    let stuck = h
        .submit("stuck", OperationType::EnterMaintenance, "s")
        .await
        .unwrap();
    h.wait_stage(stuck.id, "drain").await;
    let mut ops = Vec::new();
    for i in 0..20 {
        let name = format!("m-{i}");
        h.machine(&name, &[]).await;
        ops.push(
            h.submit(&name, OperationType::EnterMaintenance, "e")
                .await
                .unwrap()
                .id,
        );
    }
    for id in ops {
        assert_eq!(h.wait_end(id).await.phase, OperationPhase::Succeeded);
    }
    assert!(h.engine.running_operations() <= 3);
    assert_eq!(
        h.engine.get_operation(stuck.id).await.unwrap().phase,
        OperationPhase::Running
    );
    h.cancel(stuck.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_the_limit_run_at_once() {
    let h = start(
        Arc::new(MemoryStore::new()),
        bm_workflow::EngineConfig {
            max_concurrent_operations: 2,
            ..config()
        },
    );
    let mut ops = Vec::new();
    for i in 0..4 {
        let name = format!("h-{i}");
        h.machine(&name, &[(LABEL_HANG_ACTION, "drain")]).await;
        ops.push(
            h.submit(&name, OperationType::EnterMaintenance, "e")
                .await
                .unwrap()
                .id,
        );
    }
    h.wait_log(ops[0], "injected hang").await;
    h.wait_log(ops[1], "injected hang").await;
    assert_eq!(h.engine.running_operations(), 2);
    assert_eq!(
        h.fake.total_calls(Action::Drain),
        2,
        "the other two wait for a slot"
    );
    // Freeing a slot lets the next one run.
    h.cancel(ops[0]).await.unwrap();
    h.wait_stage(ops[2], "drain").await;
    assert_eq!(
        h.engine.get_operation(ops[3]).await.unwrap().phase,
        OperationPhase::Pending
    );
    for id in &ops[1..] {
        h.cancel(*id).await.unwrap();
    }
}
