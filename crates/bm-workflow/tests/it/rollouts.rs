//! Rollouts driven by a started engine: the failure budget, the most in flight (read from
//! the event stream), a pause, an abort, and a restart of the engine mid-rollout.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bm_domain::{
    Actor, Amount, EventKind, LabelSelector, OperationType, Phase, Progress, RequestId, Rollout,
    RolloutAction, RolloutId, RolloutPhase, RolloutSpec, WhenBusy,
};
use bm_provider_fake::{FakeConfig, FakeProvider, LABEL_FAIL_ACTION, LABEL_FAIL_KIND, Timing};
use bm_store::{MemoryStore, Store};
use bm_workflow::{EventFilter, OperationQuery, RolloutRequest, RolloutTarget, Scope};

use crate::harness::{self, Harness, config};

fn spec(action: OperationType, in_flight: u32, budget: u32) -> RolloutSpec {
    RolloutSpec {
        action: RolloutAction::Operation(action),
        max_in_flight: Amount::Machines(in_flight),
        failure_budget: Amount::Machines(budget),
        batch_by: None,
        soak: Duration::ZERO,
        when_busy: WhenBusy::Skip,
    }
}

fn request(selector: &str, spec: RolloutSpec, request: &str) -> RolloutRequest {
    RolloutRequest {
        target: RolloutTarget {
            selector: selector.parse::<LabelSelector>().unwrap(),
            ..RolloutTarget::default()
        },
        spec,
        request_id: RequestId::new(request).unwrap(),
        note: "test".into(),
        requested_by: Actor::new("alice", "token"),
        scope: Scope::All,
    }
}

/// `n` machines `m-000`.. labelled `fleet=a`; those in `failing` fail their drain for good.
async fn fleet(h: &Harness, n: usize, failing: &[usize]) {
    for i in 0..n {
        let name = format!("m-{i:03}");
        let mut labels = vec![("fleet", "a")];
        if failing.contains(&i) {
            labels.push((LABEL_FAIL_ACTION, "drain"));
            labels.push((LABEL_FAIL_KIND, "permanent"));
        }
        h.machine(&name, &labels).await;
    }
}

/// Waits (on the engine's writes of rollouts, never on time) until `done` holds.
async fn wait_rollout(h: &Harness, id: RolloutId, done: impl Fn(&Rollout) -> bool) -> Rollout {
    wait_rollout_of(&[h], id, done).await
}

/// Waits on the writes of every engine of `hs` (replicas of one store): any of them may be
/// the one that writes the rollout.
async fn wait_rollout_of(
    hs: &[&Harness],
    id: RolloutId,
    done: impl Fn(&Rollout) -> bool,
) -> Rollout {
    let mut writes: Vec<_> = hs.iter().map(|h| h.engine.rollout_writes()).collect();
    let wait = async {
        loop {
            let r = hs[0].engine.get_rollout(id).await.unwrap();
            if done(&r) {
                return r;
            }
            let changed = writes.iter_mut().map(|w| Box::pin(w.changed()));
            futures::future::select_all(changed).await.0.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("the rollout did not get there within 30 s")
}

/// The most operations of `machines` that were in flight at once, replayed from the
/// events: from each one's creation to its end.
async fn most_in_flight(h: &Harness) -> usize {
    let mut rx = h
        .engine
        .watch(
            EventFilter {
                operation_id: None,
                machine_id: None,
            },
            Some(0),
        )
        .await
        .unwrap();
    let last = h.store.last_revision().await.unwrap();
    let (mut open, mut most) = (HashSet::new(), 0);
    let mut seen = 0;
    while seen < last {
        let batch = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for e in batch.iter() {
            seen = e.revision;
            if e.kind == EventKind::Created {
                open.insert(e.operation_id);
                most = most.max(open.len());
            } else if e.is_terminal() {
                open.remove(&e.operation_id);
            }
        }
    }
    most
}

/// Each machine's operations, by machine.
async fn operations_by_machine(h: &Harness) -> BTreeMap<String, Vec<bm_domain::Operation>> {
    let page = h
        .engine
        .list_operations(&OperationQuery {
            limit: 10_000,
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for op in page.items {
        out.entry(op.machine_id.to_string()).or_default().push(op);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_budget_stops_the_rollout_and_leaves_the_rest_untouched() {
    let h = harness::memory();
    let failing = [4, 9, 14, 19, 24, 29];
    fleet(&h, 50, &failing).await;
    let (r, created) = h
        .engine
        .create_rollout(request(
            "fleet=a",
            spec(OperationType::EnterMaintenance, 3, 5),
            "budget",
        ))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(r.machines.len(), 50);
    let r = wait_rollout(&h, r.id, |r| r.phase.is_terminal()).await;
    assert_eq!(r.phase, RolloutPhase::Failed);
    let c = r.counts();
    assert!(c.failed == 5 || c.failed == 6, "{c:?}");
    let failed: Vec<String> = r.failures().map(|(m, _)| m.to_string()).collect();
    assert!(
        failed
            .iter()
            .all(|m| failing.iter().any(|i| *m == format!("m-{i:03}")))
    );

    // The machines never started are exactly as they were: no operation, still new.
    let ops = operations_by_machine(&h).await;
    let mut untouched = 0;
    for m in &r.machines {
        if m.progress == Progress::Pending {
            untouched += 1;
            assert!(!ops.contains_key(m.machine_id.as_str()), "{}", m.machine_id);
            assert_eq!(
                h.get(m.machine_id.as_str()).await.status.phase,
                Phase::FactoryReady
            );
        }
    }
    assert_eq!(untouched as u32, c.pending);
    assert!(untouched >= 50 - 30 - 3, "{untouched} untouched");
    // Every machine started ran one operation, tagged with the rollout.
    for (machine, list) in &ops {
        assert_eq!(list.len(), 1, "{machine}");
        assert_eq!(list[0].rollout_id, Some(r.id));
        assert_eq!(list[0].request_id.as_str(), format!("{}.0", r.id));
    }
    assert!(most_in_flight(&h).await <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_holds_and_a_repeated_request_is_the_same_rollout() {
    let h = harness::memory();
    fleet(&h, 20, &[]).await;
    let req = request(
        "fleet=a",
        spec(OperationType::EnterMaintenance, 4, 1),
        "once",
    );
    let (r, _) = h.engine.create_rollout(req.clone()).await.unwrap();
    let (again, created) = h.engine.create_rollout(req).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, r.id);
    let r = wait_rollout(&h, r.id, |r| r.phase.is_terminal()).await;
    assert_eq!(r.phase, RolloutPhase::Succeeded);
    assert_eq!(r.counts().succeeded, 20);
    assert_eq!(most_in_flight(&h).await, 4);
    assert!(
        operations_by_machine(&h)
            .await
            .values()
            .all(|l| l.len() == 1)
    );
}

/// A fake provider whose actions take a while, so that operations are seen running.
fn slow() -> Harness {
    let fake = Arc::new(FakeProvider::new(FakeConfig {
        timing: Timing::Normal,
        ..FakeConfig::default()
    }));
    harness::start_with(Arc::new(MemoryStore::new()), config(), fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_lets_running_operations_finish_and_starts_nothing_until_resumed() {
    let h = slow();
    fleet(&h, 6, &[]).await;
    let (r, _) = h
        .engine
        .create_rollout(request(
            "fleet=a",
            spec(OperationType::EnterMaintenance, 2, 1),
            "pause",
        ))
        .await
        .unwrap();
    let r = wait_rollout(&h, r.id, |r| {
        r.counts().active == 2 && r.running().count() == 2
    })
    .await;
    let running: Vec<_> = r.running().collect();
    h.engine.pause_rollout(r.id).await.unwrap();
    for op in &running {
        h.wait_end(*op).await;
    }
    // The driver has seen both end (its write says so), and started nothing instead.
    let r = wait_rollout(&h, r.id, |r| r.counts().succeeded == 2).await;
    assert_eq!(r.phase, RolloutPhase::Paused);
    assert_eq!((r.counts().active, r.counts().pending), (0, 4));
    assert_eq!(operations_by_machine(&h).await.len(), 2);

    h.engine.resume_rollout(r.id).await.unwrap();
    let r = wait_rollout(&h, r.id, |r| r.phase.is_terminal()).await;
    assert_eq!(r.phase, RolloutPhase::Succeeded);
    assert_eq!(r.counts().succeeded, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_cancels_what_runs_and_starts_nothing_more() {
    let h = slow();
    fleet(&h, 5, &[]).await;
    let (r, _) = h
        .engine
        .create_rollout(request(
            "fleet=a",
            spec(OperationType::EnterMaintenance, 2, 1),
            "abort",
        ))
        .await
        .unwrap();
    let r = wait_rollout(&h, r.id, |r| r.running().count() == 2).await;
    h.engine.abort_rollout(r.id).await.unwrap();
    let r = wait_rollout(&h, r.id, |r| r.phase.is_terminal()).await;
    assert_eq!(r.phase, RolloutPhase::Aborted);
    let c = r.counts();
    assert_eq!(c.pending, 3, "{c:?}");
    assert_eq!(c.canceled + c.succeeded, 2, "{c:?}");
    assert_eq!(operations_by_machine(&h).await.len(), 2);
    let e = h.engine.pause_rollout(r.id).await.unwrap_err();
    assert!(e.to_string().contains("ABORTED"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_engine_on_the_same_store_carries_on_and_runs_nothing_twice() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fake = || {
        Arc::new(FakeProvider::new(FakeConfig {
            timing: Timing::Normal,
            ..FakeConfig::default()
        }))
    };
    let first = harness::start_with(store.clone(), config(), fake());
    fleet(&first, 8, &[]).await;
    let (r, _) = first
        .engine
        .create_rollout(request(
            "fleet=a",
            spec(OperationType::EnterMaintenance, 3, 1),
            "restart",
        ))
        .await
        .unwrap();
    wait_rollout(&first, r.id, |r| {
        r.counts().succeeded >= 1 && r.running().count() > 0
    })
    .await;
    first.engine.shutdown(Duration::from_secs(5)).await;
    drop(first);

    let second = harness::start_with(store, config(), fake());
    let r = wait_rollout(&second, r.id, |r| r.phase.is_terminal()).await;
    assert_eq!(r.phase, RolloutPhase::Succeeded);
    assert_eq!(r.counts().succeeded, 8);
    let ops = operations_by_machine(&second).await;
    assert_eq!(ops.len(), 8);
    for (machine, list) in ops {
        assert_eq!(list.len(), 1, "{machine} ran {} operations", list.len());
    }
    assert_eq!(second.get("m-000").await.status.phase, Phase::Maintenance);
}

/// Two engines on one store (two replicas) drive the same rollout: their writes collide, and
/// whichever loses adopts what the other started. No machine is skipped as busy by its
/// own rollout's operation, and none runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_drive_one_rollout_without_skipping_or_repeating_a_machine() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = harness::start(store.clone(), config());
    let b = harness::start(store, config());
    fleet(&a, 40, &[]).await;
    let (r, _) = a
        .engine
        .create_rollout(request(
            "fleet=a",
            spec(OperationType::EnterMaintenance, 8, 1),
            "replicas",
        ))
        .await
        .unwrap();
    // Both drivers hear of it: `b` through the store's events, and a pause and resume
    // through it wakes `b` as well.
    b.engine.pause_rollout(r.id).await.unwrap();
    b.engine.resume_rollout(r.id).await.unwrap();
    let r = wait_rollout_of(&[&a, &b], r.id, |r| r.phase.is_terminal()).await;
    assert_eq!(r.phase, RolloutPhase::Succeeded, "{:?}", r.counts());
    assert_eq!(r.counts().succeeded, 40, "{:?}", r.counts());
    let ops = operations_by_machine(&a).await;
    assert_eq!(ops.len(), 40);
    assert!(ops.values().all(|l| l.len() == 1));
    assert!(most_in_flight(&a).await <= 8);
}
