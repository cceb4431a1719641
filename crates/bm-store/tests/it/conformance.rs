//! One async function per behaviour of the `Store` trait; `main.rs` runs each against every
//! backend.

use std::collections::BTreeSet;
use std::sync::Arc;

use bm_domain::rules::Outcome;
use bm_domain::{
    ConditionType, DomainError, EffectiveState, EventKind, Health, Labels, LogLine,
    MachineEventKind, MachinePatch, Observation, OperationEvent, OperationId, OperationPhase,
    OperationType, Phase, PowerState,
};
use bm_store::{
    EventFilter, Fence, ImportOutcome, Lease, MachineQuery, OperationQuery, Recorded, Renewal,
    Store, StoreError,
};

use crate::fixtures::{machine, maintenance_machine, mid, op, t};

type S = Arc<dyn Store>;

fn lease(owner: &str, until: i64) -> Lease {
    Lease {
        owner: owner.into(),
        expires_at: t(until),
    }
}

pub(crate) async fn register_get_and_conflicts(s: S) {
    let m = s.register_machine(machine("machine-1", 1)).await.unwrap();
    assert_eq!(s.get_machine(&m.id).await.unwrap(), m);
    let dup = s
        .register_machine(machine("machine-1", 2))
        .await
        .unwrap_err();
    assert!(matches!(dup, StoreError::MachineExists(_)), "{dup}");
    let mac_clash = s
        .register_machine(machine("machine-2", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(&mac_clash, StoreError::MacInUse { owner, .. } if owner.as_str() == "machine-1"),
        "{mac_clash}"
    );
    // The refused machine was not half-written.
    assert!(matches!(
        s.get_machine(&mid("machine-2")).await,
        Err(StoreError::MachineNotFound(_))
    ));
}

pub(crate) async fn list_machines_pages_and_filters(s: S) {
    for n in 1..=25u8 {
        let mut m = machine(&format!("m-{n:02}"), n);
        if n.is_multiple_of(5) {
            m.status.phase = Phase::Maintenance;
        }
        s.register_machine(m).await.unwrap();
    }
    // Pages of 10 cover every machine once, in id order.
    let mut seen = Vec::new();
    let mut q = MachineQuery {
        limit: 10,
        ..MachineQuery::default()
    };
    loop {
        let page = s.list_machines(&q).await.unwrap();
        seen.extend(page.items.iter().map(|m| m.id.to_string()));
        if !page.more {
            break;
        }
        q.after = Some(page.items.last().unwrap().id.clone());
    }
    let want: Vec<String> = (1..=25).map(|n| format!("m-{n:02}")).collect();
    assert_eq!(seen, want);

    let count = |q: MachineQuery| {
        let s = s.clone();
        async move {
            let page = s
                .list_machines(&MachineQuery { limit: 100, ..q })
                .await
                .unwrap();
            page.items.len()
        }
    };
    let phase = MachineQuery {
        phase: Some(Phase::Maintenance),
        ..MachineQuery::default()
    };
    assert_eq!(count(phase).await, 5);
    let state = MachineQuery {
        effective_state: Some(EffectiveState::New),
        ..MachineQuery::default()
    };
    assert_eq!(count(state).await, 20);
    let selector = MachineQuery {
        selector: "rack=r2".parse().unwrap(),
        ..MachineQuery::default()
    };
    assert_eq!(count(selector).await, 12);
    // A sparse selector with a small page still reports that more match.
    let page = s
        .list_machines(&MachineQuery {
            limit: 2,
            selector: "rack=r2".parse().unwrap(),
            phase: Some(Phase::FactoryReady),
            ..MachineQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 2);
    assert!(page.more);
    assert!(
        page.items
            .iter()
            .all(|m| m.labels.get("rack") == Some("r2"))
    );
}

/// Ids of every machine matching `selector` (and `phase`), read in pages of `page`.
async fn select(s: &S, selector: &str, phase: Option<Phase>, page: usize) -> Vec<String> {
    let mut q = MachineQuery {
        limit: page,
        phase,
        selector: selector.parse().unwrap(),
        ..MachineQuery::default()
    };
    let mut ids = Vec::new();
    loop {
        let p = s.list_machines(&q).await.unwrap();
        assert!(p.items.len() <= page);
        ids.extend(p.items.iter().map(|m| m.id.to_string()));
        if !p.more {
            return ids;
        }
        q.after = Some(p.items.last().unwrap().id.clone());
    }
}

pub(crate) async fn selectors_match_labels_through_every_page(s: S) {
    // 60 machines: rack r0-r2 by n % 3, zone a/b by n % 2, gpu on every fifth, none on
    // m-00; their ids sort in registration order.
    let labels = |n: u8| {
        let mut l = Vec::new();
        if n > 0 {
            l.push(("rack", format!("r{}", n % 3)));
            l.push((
                "zone",
                if n.is_multiple_of(2) { "a" } else { "b" }.to_owned(),
            ));
        }
        if n.is_multiple_of(5) {
            l.push(("gpu", String::new()));
        }
        Labels::from_pairs(l).unwrap()
    };
    for n in 0..60u8 {
        let mut m = machine(&format!("m-{n:02}"), n);
        m.labels = labels(n);
        if n.is_multiple_of(4) {
            m.status.phase = Phase::Maintenance;
        }
        s.register_machine(m).await.unwrap();
    }
    let want = |f: &dyn Fn(u8) -> bool| -> Vec<String> {
        (0..60u8)
            .filter(|n| f(*n))
            .map(|n| format!("m-{n:02}"))
            .collect()
    };
    let cases: Vec<(&str, Option<Phase>, Vec<String>)> = vec![
        ("rack=r1", None, want(&|n| n > 0 && n % 3 == 1)),
        (
            "rack==r1,zone=a",
            None,
            want(&|n| n > 0 && n % 3 == 1 && n.is_multiple_of(2)),
        ),
        ("rack in (r0,r2)", None, want(&|n| n > 0 && n % 3 != 1)),
        (
            "rack in (r0,r2,r9),zone!=a",
            None,
            want(&|n| n > 0 && n % 3 != 1 && n % 2 == 1),
        ),
        ("gpu", None, want(&|n| n.is_multiple_of(5))),
        ("gpu,!rack", None, want(&|n| n == 0)),
        ("gpu=", None, want(&|n| n.is_multiple_of(5))),
        ("rack notin (r1),zone", None, want(&|n| n > 0 && n % 3 != 1)),
        ("!rack", None, want(&|n| n == 0)),
        ("rack!=r1", None, want(&|n| n == 0 || n % 3 != 1)),
        (
            "rack=r1",
            Some(Phase::Maintenance),
            want(&|n| n > 0 && n % 3 == 1 && n.is_multiple_of(4)),
        ),
        ("rack=r7", None, vec![]),
        ("nokey", None, vec![]),
    ];
    for (selector, phase, expected) in cases {
        for page in [1, 7, 100] {
            assert_eq!(
                select(&s, selector, phase, page).await,
                expected,
                "{selector} {phase:?} in pages of {page}"
            );
        }
    }
    // Changing labels moves a machine between selections; an unchanged label stays.
    let patch = MachinePatch {
        set_labels: [("rack".to_owned(), "r7".to_owned())].into(),
        remove_labels: vec!["gpu".into()],
        ..MachinePatch::default()
    };
    s.update_machine(&mid("m-10"), &patch, t(1)).await.unwrap();
    assert_eq!(select(&s, "rack=r7", None, 10).await, ["m-10"]);
    assert!(
        !select(&s, "rack=r1", None, 100)
            .await
            .contains(&"m-10".to_owned())
    );
    assert!(
        !select(&s, "gpu", None, 100)
            .await
            .contains(&"m-10".to_owned())
    );
    assert!(
        select(&s, "zone=a", None, 100)
            .await
            .contains(&"m-10".to_owned())
    );
    let replace = MachinePatch {
        labels: Some(Labels::from_pairs([("zone", "c")]).unwrap()),
        ..MachinePatch::default()
    };
    s.update_machine(&mid("m-10"), &replace, t(2))
        .await
        .unwrap();
    assert!(
        select(&s, "rack", None, 100)
            .await
            .iter()
            .all(|id| id != "m-10")
    );
    assert_eq!(select(&s, "zone=c", None, 100).await, ["m-10"]);
    // Status changes (an operation) keep the machine selectable.
    s.admit(op("m-20", OperationType::Reboot, "r-1"))
        .await
        .unwrap();
    assert!(
        select(&s, "gpu", None, 100)
            .await
            .contains(&"m-20".to_owned())
    );
}

pub(crate) async fn import_reports_each_row(s: S) {
    s.register_machine(machine("existing", 1)).await.unwrap();
    let mut changed = machine("changed", 2);
    s.register_machine(changed.clone()).await.unwrap();
    changed.spec.image = "other".into();
    let rows = vec![
        machine("new-1", 3),
        machine("existing", 1),
        changed,
        machine("clash", 3), // the MAC of new-1, written just before
        machine("new-2", 4),
    ];
    let results = s.import_machines(rows, false).await.unwrap();
    assert!(matches!(results[0], Ok(ImportOutcome::Created)));
    assert!(matches!(results[1], Ok(ImportOutcome::Unchanged)));
    assert!(
        matches!(results[2], Err(StoreError::ImportConflict(_))),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(&results[3], Err(StoreError::MacInUse { owner, .. }) if owner.as_str() == "new-1")
    );
    assert!(matches!(results[4], Ok(ImportOutcome::Created)));
    assert!(s.get_machine(&mid("new-2")).await.is_ok());
    assert!(s.get_machine(&mid("clash")).await.is_err());
    assert_eq!(
        s.get_machine(&mid("changed")).await.unwrap().spec.image,
        "ubuntu-24.04"
    );
}

pub(crate) async fn import_dry_run_writes_nothing(s: S) {
    let rows = vec![machine("a", 1), machine("b", 1), machine("a", 1)];
    let results = s.import_machines(rows.clone(), true).await.unwrap();
    assert!(matches!(results[0], Ok(ImportOutcome::Created)));
    assert!(
        matches!(results[1], Err(StoreError::MacInUse { .. })),
        "{:?}",
        results[1]
    );
    assert!(matches!(results[2], Ok(ImportOutcome::Unchanged)));
    let all = s
        .list_machines(&MachineQuery {
            limit: 10,
            ..MachineQuery::default()
        })
        .await
        .unwrap();
    assert!(all.items.is_empty(), "a dry run wrote {:?}", all.items);
    // The real import agrees with the dry run.
    let real = s.import_machines(rows, false).await.unwrap();
    assert_eq!(
        format!("{results:?}").replace("Unchanged", "x"),
        format!("{real:?}").replace("Unchanged", "x")
    );
}

pub(crate) async fn update_spec_labels_and_macs(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    s.register_machine(machine("m-2", 2)).await.unwrap();
    let macs: Vec<bm_domain::MacAddress> = vec!["02:00:00:00:00:09".parse().unwrap()];
    let labels = Labels::from_pairs([("rack", "r9")]).unwrap();
    let patch = MachinePatch {
        mac_addresses: Some(macs.clone()),
        labels: Some(labels.clone()),
        ..MachinePatch::default()
    };
    let m = s.update_machine(&mid("m-1"), &patch, t(5)).await.unwrap();
    assert_eq!(
        (m.spec.mac_addresses.clone(), m.labels.clone(), m.updated_at),
        (macs.clone(), labels, t(5))
    );
    assert_eq!(
        m.spec.image, "ubuntu-24.04",
        "fields the patch does not name are kept"
    );
    // The old MAC is free, the new one taken.
    s.register_machine(machine("m-3", 1)).await.unwrap();
    let clash = MachinePatch {
        mac_addresses: Some(macs),
        ..MachinePatch::default()
    };
    let err = s
        .update_machine(&mid("m-2"), &clash, t(6))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::MacInUse { .. }), "{err}");
    // Two patches of different fields both land.
    let image = MachinePatch {
        image: Some("ubuntu-26.04".into()),
        ..MachinePatch::default()
    };
    let cluster = MachinePatch {
        target_cluster: Some("east".into()),
        ..MachinePatch::default()
    };
    let m2 = mid("m-2");
    let (a, b) = tokio::join!(
        s.update_machine(&m2, &image, t(7)),
        s.update_machine(&m2, &cluster, t(7))
    );
    a.unwrap();
    b.unwrap();
    let m2 = s.get_machine(&mid("m-2")).await.unwrap();
    assert_eq!(
        (m2.spec.image.as_str(), m2.spec.target_cluster.as_str()),
        ("ubuntu-26.04", "east")
    );
    // The spec is locked while an operation is active; labels are not.
    s.admit(op("m-1", OperationType::Reboot, "r-1"))
        .await
        .unwrap();
    let err = s
        .update_machine(&mid("m-1"), &image, t(8))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Domain(DomainError::SpecLocked { .. })),
        "{err}"
    );
    let set = MachinePatch {
        set_labels: [("zone".to_owned(), "a".to_owned())].into(),
        remove_labels: vec!["rack".into()],
        ..MachinePatch::default()
    };
    let m = s.update_machine(&mid("m-1"), &set, t(9)).await.unwrap();
    assert_eq!(m.labels, Labels::from_pairs([("zone", "a")]).unwrap());
    assert!(
        m.status.active_operation_id.is_some(),
        "an update never touches status"
    );
    let missing = s
        .update_machine(&mid("nope"), &set, t(10))
        .await
        .unwrap_err();
    assert!(matches!(missing, StoreError::MachineNotFound(_)));
}

pub(crate) async fn admission_is_idempotent(s: S) {
    let registered = s
        .register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    let first = s
        .admit(op("m-1", OperationType::Reimage, "req-1"))
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.operation.phase, OperationPhase::Pending);
    let m = s.get_machine(&mid("m-1")).await.unwrap();
    assert_eq!(m.status.active_operation_id, Some(first.operation.id));
    assert_eq!(m.effective_state(), EffectiveState::Busy);
    // The machine left MAINTENANCE_IDLE, where it had been since it was registered, and
    // is BUSY since the admission.
    let since = registered
        .status
        .state_since
        .expect("kept from the registration");
    assert_eq!(first.left, Some((EffectiveState::MaintenanceIdle, since)));
    assert_eq!(m.status.state_since, Some(first.operation.created_at));

    let again = s
        .admit(op("m-1", OperationType::Reimage, "req-1"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.operation, first.operation);
    assert_eq!(again.left, None);

    let other_type = s
        .admit(op("m-1", OperationType::Reboot, "req-1"))
        .await
        .unwrap_err();
    assert!(
        matches!(other_type, StoreError::RequestIdReused { existing, .. } if existing == first.operation.id)
    );

    let busy = s
        .admit(op("m-1", OperationType::Reboot, "req-2"))
        .await
        .unwrap_err();
    assert!(
        matches!(&busy, StoreError::Domain(DomainError::Busy { active, .. }) if *active == first.operation.id),
        "{busy}"
    );
    assert!(busy.to_string().contains(&first.operation.id.to_string()));

    let missing = s
        .admit(op("nope", OperationType::Reboot, "req-3"))
        .await
        .unwrap_err();
    assert!(matches!(missing, StoreError::MachineNotFound(_)));

    // Exactly one Created event.
    let events = s
        .events_after(0, &EventFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::Created);
    assert_eq!(events[0].operation_id, first.operation.id);
}

pub(crate) async fn concurrent_identical_requests_create_one_operation(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.admit(op("m-1", OperationType::Reimage, "same")).await })
        })
        .collect();
    let mut created = 0;
    let mut ids = BTreeSet::new();
    for t in tasks {
        let a = t.await.unwrap().unwrap();
        created += usize::from(a.created);
        ids.insert(a.operation.id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    let all = s
        .list_operations(&OperationQuery {
            limit: 1000,
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(all.items.len(), 1);
}

pub(crate) async fn concurrent_different_requests_admit_one(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.admit(op("m-1", OperationType::Reimage, &format!("r-{i}")))
                    .await
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(a) => admitted.push(a.operation.id),
            Err(StoreError::Domain(DomainError::Busy { active, .. })) => refused.push(active),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(admitted.len(), 1);
    assert_eq!(refused.len(), 99);
    assert!(
        refused.iter().all(|id| *id == admitted[0]),
        "every refusal names the admitted operation"
    );
}

pub(crate) async fn leases_fence_writes(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    let a = s
        .admit(op("m-1", OperationType::Reimage, "r"))
        .await
        .unwrap()
        .operation;
    let claimed = s.claim(&lease("exec-a", 100), t(0), 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.operation.id).collect::<Vec<_>>(),
        [a.id]
    );
    let fence_a = claimed[0].fence.clone();
    assert_eq!(fence_a.owner, "exec-a");
    // Held: nobody else gets it before the lease expires.
    assert!(
        s.claim(&lease("exec-b", 100), t(50), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Renewal extends it past the time it would have expired.
    assert_eq!(
        s.renew(&lease("exec-a", 300), &[(a.id, fence_a.generation)])
            .await
            .unwrap(),
        Renewal::default()
    );
    assert!(
        s.claim(&lease("exec-b", 400), t(200), 10)
            .await
            .unwrap()
            .is_empty()
    );

    let mut running = a.clone();
    running.start(t(1)).unwrap();
    running.begin_stage("set-netboot", t(1));
    let ev = OperationEvent::new(&running, EventKind::StageStarted, "", t(1));
    assert!(!s.save_progress(&fence_a, &running, vec![ev]).await.unwrap());
    let not_held = Fence {
        owner: "exec-b".into(),
        generation: fence_a.generation,
    };
    assert!(matches!(
        s.save_progress(&not_held, &running, vec![]).await,
        Err(StoreError::LeaseLost(_))
    ));

    // Expired: exec-b takes over, exec-a's writes are refused from then on.
    let taken = s.claim(&lease("exec-b", 1000), t(301), 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].operation.phase, OperationPhase::Running);
    assert_eq!(
        taken[0].operation.stages.len(),
        1,
        "progress survives the hand-over"
    );
    assert!(taken[0].fence.generation > fence_a.generation);
    assert!(matches!(
        s.save_progress(&fence_a, &running, vec![]).await,
        Err(StoreError::LeaseLost(_))
    ));
    assert!(matches!(
        s.finish(
            &fence_a,
            running.clone(),
            Outcome::Succeeded,
            vec![],
            t(302)
        )
        .await,
        Err(StoreError::LeaseLost(_))
    ));
    // Its renewal tells it so, and extends nothing.
    assert_eq!(
        s.renew(&lease("exec-a", 5000), &[(a.id, fence_a.generation)])
            .await
            .unwrap()
            .lost,
        [a.id]
    );
    // Release hands it back at once.
    assert_eq!(s.release("exec-b").await.unwrap(), 1);
    assert_eq!(
        s.claim(&lease("exec-c", 2000), t(303), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// The lease of an operation lapses and the same owner claims it again: the first claim's
/// writes are still refused, only the newest claim may write.
pub(crate) async fn a_lease_that_came_back_fences_the_stale_claim(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    let a = s
        .admit(op("m-1", OperationType::Reimage, "r"))
        .await
        .unwrap()
        .operation;
    let first = s
        .claim(&lease("exec", 100), t(0), 10)
        .await
        .unwrap()
        .remove(0);
    let second = s
        .claim(&lease("exec", 300), t(101), 10)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(second.operation.id, a.id);
    assert_eq!(first.fence.owner, second.fence.owner);
    assert!(second.fence.generation > first.fence.generation);

    let mut stale = first.operation.clone();
    stale.start(t(1)).unwrap();
    assert!(matches!(
        s.save_progress(&first.fence, &stale, vec![]).await,
        Err(StoreError::LeaseLost(_))
    ));
    assert!(matches!(
        s.finish(&first.fence, stale, Outcome::Succeeded, vec![], t(102))
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    let renewal = s
        .renew(
            &lease("exec", 400),
            &[
                (a.id, first.fence.generation),
                (a.id, second.fence.generation),
            ],
        )
        .await
        .unwrap();
    assert_eq!(renewal.lost, [a.id], "only the stale claim is lost");
    // Nothing the stale claim tried was written; the current one writes.
    let stored = s.get_operation(a.id).await.unwrap();
    assert_eq!(stored.phase, OperationPhase::Pending);
    let mut current = second.operation;
    current.start(t(103)).unwrap();
    s.save_progress(&second.fence, &current, vec![])
        .await
        .unwrap();
    assert_eq!(
        s.get_operation(a.id).await.unwrap().phase,
        OperationPhase::Running
    );
    // A release and a new claim bump the generation again: it never goes back.
    assert_eq!(s.release("exec").await.unwrap(), 1);
    let third = s
        .claim(&lease("exec", 500), t(104), 10)
        .await
        .unwrap()
        .remove(0);
    assert!(third.fence.generation > second.fence.generation);
}

pub(crate) async fn cancel_of_a_pending_operation_ends_it(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    let a = s
        .admit(op("m-1", OperationType::Reimage, "r"))
        .await
        .unwrap()
        .operation;
    let canceled = s
        .request_cancel(a.id, bm_domain::Actor::default(), t(10))
        .await
        .unwrap();
    assert_eq!(canceled.phase, OperationPhase::Canceled);
    assert!(canceled.cancel_requested);
    let m = s.get_machine(&mid("m-1")).await.unwrap();
    assert_eq!(m.status.active_operation_id, None);
    assert!(
        m.status
            .conditions
            .is_true(&ConditionType::OperationCanceled)
    );
    assert!(
        !m.status
            .conditions
            .is_true(&ConditionType::NeedsIntervention)
    );
    assert_eq!(m.status.phase, Phase::Maintenance);
    // Nothing is left to claim, and a second cancel is a clear error.
    assert!(
        s.claim(&lease("x", 100), t(11), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let err = s
        .request_cancel(a.id, bm_domain::Actor::default(), t(12))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Domain(DomainError::AlreadyEnded {
                phase: OperationPhase::Canceled,
                ..
            })
        ),
        "{err}"
    );
    let kinds: Vec<EventKind> = s
        .events_after(0, &EventFilter::default(), 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::CancelRequested,
            EventKind::PhaseChanged
        ]
    );
    let missing = s
        .request_cancel(
            OperationId::from_parts(1, 1),
            bm_domain::Actor::default(),
            t(13),
        )
        .await
        .unwrap_err();
    assert!(matches!(missing, StoreError::OperationNotFound(_)));
}

pub(crate) async fn cancel_of_a_held_operation_is_seen_by_its_executor(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    let a = s
        .admit(op("m-1", OperationType::Reimage, "r"))
        .await
        .unwrap()
        .operation;
    let claimed = s
        .claim(&lease("exec", 1000), t(0), 1)
        .await
        .unwrap()
        .remove(0);
    let (mut running, fence) = (claimed.operation, claimed.fence);
    running.start(t(1)).unwrap();
    s.save_progress(&fence, &running, vec![]).await.unwrap();

    let requested = s
        .request_cancel(a.id, bm_domain::Actor::default(), t(2))
        .await
        .unwrap();
    assert_eq!(
        requested.phase,
        OperationPhase::Running,
        "the executor ends it, not the store"
    );
    assert!(requested.cancel_requested);
    assert_eq!(
        s.renew(&lease("exec", 2000), &[(a.id, fence.generation)])
            .await
            .unwrap()
            .canceled,
        [a.id]
    );
    // The executor's copy does not know yet; its write keeps the request and reports it.
    assert!(!running.cancel_requested);
    assert!(s.save_progress(&fence, &running, vec![]).await.unwrap());
    assert!(s.get_operation(a.id).await.unwrap().cancel_requested);
    // Asking twice changes nothing more.
    s.request_cancel(a.id, bm_domain::Actor::default(), t(3))
        .await
        .unwrap();
    let cancel_events = s
        .events_after(0, &EventFilter::default(), 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventKind::CancelRequested)
        .count();
    assert_eq!(cancel_events, 1);

    let (done, m) = s
        .finish(
            &fence,
            running,
            Outcome::Canceled {
                disk_touched: false,
            },
            vec![],
            t(4),
        )
        .await
        .unwrap();
    assert_eq!(done.phase, OperationPhase::Canceled);
    assert!(
        m.status
            .conditions
            .is_true(&ConditionType::OperationCanceled)
    );
    assert_eq!(m.status.active_operation_id, None);
}

pub(crate) async fn finish_applies_effects_and_events(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    s.admit(op("m-1", OperationType::Reimage, "r"))
        .await
        .unwrap();
    let claimed = s
        .claim(&lease("exec", 1000), t(0), 1)
        .await
        .unwrap()
        .remove(0);
    let (mut o, fence) = (claimed.operation, claimed.fence);
    o.start(t(1)).unwrap();
    o.begin_stage("verify-in-cluster", t(1));
    s.save_progress(
        &fence,
        &o,
        vec![OperationEvent::new(&o, EventKind::StageStarted, "", t(1))],
    )
    .await
    .unwrap();
    let succeeded = OperationEvent::new(&o, EventKind::StageSucceeded, "", t(2));
    let (done, m) = s
        .finish(&fence, o, Outcome::Succeeded, vec![succeeded], t(2))
        .await
        .unwrap();
    assert_eq!(done.phase, OperationPhase::Succeeded);
    assert_eq!(done.finished_at, Some(t(2)));
    assert!(m.status.conditions.is_true(&ConditionType::Provisioned));
    assert!(
        m.status
            .conditions
            .is_true(&ConditionType::InCustomerCluster)
    );
    assert_eq!(m.effective_state(), EffectiveState::MaintenanceIdle);
    // What finish returned is what is stored.
    assert_eq!(s.get_machine(&m.id).await.unwrap(), m);
    assert_eq!(s.get_operation(done.id).await.unwrap(), done);
    // Nothing left to claim; the lease was released with the end.
    assert!(
        s.claim(&lease("other", 1000), t(3), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let events = s
        .events_after(0, &EventFilter::default(), 100)
        .await
        .unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::StageStarted,
            EventKind::StageSucceeded,
            EventKind::PhaseChanged
        ]
    );
    assert!(events.last().unwrap().is_terminal());
    assert_eq!(events.last().unwrap().phase, OperationPhase::Succeeded);
}

pub(crate) async fn list_operations_newest_first(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    s.register_machine(maintenance_machine("m-2", 2))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..6i64 {
        let machine = if i % 2 == 0 { "m-1" } else { "m-2" };
        let a = s
            .admit(op(machine, OperationType::Reboot, &format!("r-{i}")))
            .await
            .unwrap()
            .operation;
        ids.push(a.id);
        s.request_cancel(a.id, bm_domain::Actor::default(), t(100 + i))
            .await
            .unwrap();
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut q = OperationQuery {
        limit: 4,
        ..OperationQuery::default()
    };
    loop {
        let page = s.list_operations(&q).await.unwrap();
        seen.extend(page.items.iter().map(|o| o.id));
        if !page.more {
            break;
        }
        q.before = Some(page.items.last().unwrap().id);
    }
    assert_eq!(seen, ids);
    let m1 = s
        .list_operations(&OperationQuery {
            limit: 10,
            machine_id: Some(mid("m-1")),
            phase: Some(OperationPhase::Canceled),
            op_type: Some(OperationType::Reboot),
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(m1.items.len(), 3);
    assert!(m1.items.iter().all(|o| o.machine_id.as_str() == "m-1"));
    let none = s
        .list_operations(&OperationQuery {
            limit: 10,
            op_type: Some(OperationType::Reimage),
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    assert!(none.items.is_empty() && !none.more);
}

pub(crate) async fn events_replay_and_live_agree(s: S) {
    s.register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    s.register_machine(maintenance_machine("m-2", 2))
        .await
        .unwrap();
    let mut live = s.subscribe_events();
    for i in 0..10i64 {
        let machine = if i % 2 == 0 { "m-1" } else { "m-2" };
        let a = s
            .admit(op(machine, OperationType::Reboot, &format!("r-{i}")))
            .await
            .unwrap()
            .operation;
        s.request_cancel(a.id, bm_domain::Actor::default(), t(i))
            .await
            .unwrap();
    }
    let stored = s
        .events_after(0, &EventFilter::default(), 1000)
        .await
        .unwrap();
    assert_eq!(stored.len(), 30);
    let revisions: Vec<u64> = stored.iter().map(|e| e.revision).collect();
    assert_eq!(
        revisions,
        (1..=30).collect::<Vec<_>>(),
        "revisions count up without gaps"
    );
    assert_eq!(s.last_revision().await.unwrap(), 30);
    for e in &stored {
        let got = live.recv().await.unwrap();
        assert_eq!(*got, *e, "live and stored agree, in order");
    }
    // Resuming after a revision and filtering.
    let after = s
        .events_after(27, &EventFilter::default(), 1000)
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [28, 29, 30]
    );
    let m2 = EventFilter {
        machine_id: Some(mid("m-2")),
        operation_id: None,
    };
    let only = s.events_after(0, &m2, 1000).await.unwrap();
    assert_eq!(only.len(), 15);
    assert!(only.iter().all(|e| e.machine_id.as_str() == "m-2"));
    let one_op = EventFilter {
        machine_id: None,
        operation_id: Some(stored[0].operation_id),
    };
    assert_eq!(s.events_after(0, &one_op, 1000).await.unwrap().len(), 3);
    let limited = s.events_after(0, &EventFilter::default(), 5).await.unwrap();
    assert_eq!(limited.len(), 5);
}

pub(crate) async fn logs_replay_and_live(s: S) {
    let id = OperationId::from_parts(5, 5);
    let mut live = s.subscribe_logs();
    for seq in 1..=5u64 {
        s.append_log(LogLine {
            operation_id: id,
            sequence: seq,
            time: t(seq as i64),
            stage: "repave-image".into(),
            tag: "repave".into(),
            message: format!("line {seq}"),
        });
    }
    // A duplicate (a resumed executor re-sending a line) is ignored.
    s.append_log(LogLine {
        operation_id: id,
        sequence: 5,
        time: t(9),
        stage: "x".into(),
        tag: "x".into(),
        message: "dup".into(),
    });
    s.flush().await.unwrap();
    let lines = s.logs_after(id, 0, 100).await.unwrap();
    assert_eq!(
        lines.iter().map(|l| l.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(lines[4].message, "line 5");
    assert_eq!(s.logs_after(id, 3, 100).await.unwrap().len(), 2);
    assert_eq!(s.logs_after(id, 0, 2).await.unwrap().len(), 2);
    assert_eq!(s.last_log_sequence(id).await.unwrap(), 5);
    assert_eq!(
        s.last_log_sequence(OperationId::from_parts(6, 6))
            .await
            .unwrap(),
        0
    );
    for want in &lines {
        assert_eq!(*live.recv().await.unwrap(), *want);
    }
    assert!(live.try_recv().is_err(), "the duplicate is not published");
}

pub(crate) async fn observations_are_written_when_they_change_something_and_never_under_an_operation(
    s: S,
) {
    let answered = |power, health| Observation::Answered {
        power: Some(power),
        health: Some(health),
        detail: String::new(),
    };
    let m = s.register_machine(machine("m-1", 1)).await.unwrap();
    let first = s
        .record_observation(&m.id, &answered(PowerState::On, Health::Warning), t(1))
        .await
        .unwrap();
    let Recorded::Changed { machine: seen, .. } = first else {
        panic!("a first reading changes the conditions: {first:?}");
    };
    assert!(seen.status.conditions.is_true(&ConditionType::Reachable));
    assert!(seen.status.conditions.is_true(&ConditionType::Degraded));
    assert_eq!(
        s.get_machine(&m.id).await.unwrap(),
        *seen,
        "what it returned is stored"
    );

    // The same reading again writes nothing.
    let again = s
        .record_observation(&m.id, &answered(PowerState::On, Health::Warning), t(2))
        .await
        .unwrap();
    assert_eq!(again, Recorded::Unchanged);
    assert_eq!(s.get_machine(&m.id).await.unwrap(), *seen);

    // Off with no operation in between: a change outside an operation.
    let off = s
        .record_observation(&m.id, &answered(PowerState::Off, Health::Ok), t(3))
        .await
        .unwrap();
    let Recorded::Changed {
        machine: off_machine,
        power_changed_outside,
    } = off
    else {
        panic!("{off:?}");
    };
    assert_eq!(
        power_changed_outside,
        Some((PowerState::On, PowerState::Off))
    );
    assert!(
        !off_machine
            .status
            .conditions
            .is_true(&ConditionType::Degraded)
    );
    // ... recorded as an event of the machine, in the same transaction.
    let events = s.machine_events(&m.id, 0, 10).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].sequence, events[0].time, events[0].kind),
        (1, t(3), MachineEventKind::PowerChanged)
    );
    assert!(events[0].message.contains("from On to Off"), "{events:?}");
    // Back on: a second event; reading after the first returns it alone.
    s.record_observation(&m.id, &answered(PowerState::On, Health::Ok), t(4))
        .await
        .unwrap();
    let after = s.machine_events(&m.id, 1, 10).await.unwrap();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].sequence, 2);
    assert!(after[0].message.contains("from Off to On"), "{after:?}");
    assert!(
        s.machine_events(&mid("m-404"), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // While an operation is active the reading is dropped: the operation owns the machine.
    let admitted = s
        .admit(op("m-1", OperationType::EnterMaintenance, "r"))
        .await
        .unwrap();
    let busy = s
        .record_observation(&m.id, &Observation::Unreachable("no answer".into()), t(5))
        .await
        .unwrap();
    assert_eq!(busy, Recorded::Busy(admitted.operation.id));
    let stored = s.get_machine(&m.id).await.unwrap();
    assert!(stored.status.conditions.is_true(&ConditionType::Reachable));
    assert!(stored.status.conditions.is_true(&ConditionType::PoweredOn));

    let missing = s
        .record_observation(&mid("m-404"), &Observation::Unreachable("x".into()), t(6))
        .await
        .unwrap_err();
    assert!(
        matches!(missing, StoreError::MachineNotFound(_)),
        "{missing}"
    );
}

/// Issue 15: counts by phase and effective state follow the machines (a new one, one in
/// maintenance, one busy under an admitted operation, one that failed); an admitted
/// operation waits for an executor until it is claimed.
pub(crate) async fn machines_are_counted_by_phase_and_effective_state(s: S) {
    use bm_store::MachineCount;
    let count = |phase, effective_state, machines| MachineCount {
        phase,
        effective_state,
        machines,
    };
    assert_eq!(s.machine_counts().await.unwrap(), vec![]);
    s.register_machine(machine("m-1", 1)).await.unwrap();
    s.register_machine(machine("m-2", 2)).await.unwrap();
    for (id, n) in [("m-3", 3), ("m-4", 4)] {
        s.register_machine(maintenance_machine(id, n))
            .await
            .unwrap();
    }
    assert_eq!(
        s.machine_counts().await.unwrap(),
        vec![
            count(Phase::FactoryReady, EffectiveState::New, 2),
            count(Phase::Maintenance, EffectiveState::MaintenanceIdle, 2),
        ]
    );
    assert_eq!(s.unclaimed_operations().await.unwrap(), 0);
    s.admit(op("m-4", OperationType::Reimage, "r"))
        .await
        .unwrap();
    assert_eq!(s.unclaimed_operations().await.unwrap(), 1);
    let claimed = s
        .claim(&lease("exec", 1000), t(0), 1)
        .await
        .unwrap()
        .remove(0);
    let (mut o, fence) = (claimed.operation, claimed.fence);
    o.start(t(1)).unwrap();
    o.begin_stage("repave-image", t(1));
    s.save_progress(&fence, &o, vec![]).await.unwrap();
    assert_eq!(s.unclaimed_operations().await.unwrap(), 0, "claimed");
    assert_eq!(
        s.machine_counts().await.unwrap(),
        vec![
            count(Phase::FactoryReady, EffectiveState::New, 2),
            count(Phase::Maintenance, EffectiveState::Busy, 1),
            count(Phase::Maintenance, EffectiveState::MaintenanceIdle, 1),
        ]
    );
    let failed = Outcome::Failed {
        error: "disk".into(),
        disk_touched: true,
        unreachable: false,
    };
    s.finish(&fence, o, failed, vec![], t(2)).await.unwrap();
    assert_eq!(
        s.machine_counts().await.unwrap(),
        vec![
            count(Phase::FactoryReady, EffectiveState::New, 2),
            count(Phase::Maintenance, EffectiveState::Attention, 1),
            count(Phase::Maintenance, EffectiveState::MaintenanceIdle, 1),
        ]
    );
}

pub(crate) async fn a_machine_is_found_by_any_of_its_macs(s: S) {
    let m = s.register_machine(machine("m-1", 1)).await.unwrap();
    s.register_machine(machine("m-2", 2)).await.unwrap();
    for mac in &m.spec.mac_addresses {
        let found = s.machine_by_mac(mac).await.unwrap();
        assert_eq!(found.as_ref(), Some(&m), "{mac}");
    }
    let unknown: bm_domain::MacAddress = "02:ff:ff:ff:ff:ff".parse().unwrap();
    assert_eq!(s.machine_by_mac(&unknown).await.unwrap(), None);
    // A MAC given up by an update belongs to nobody any more.
    let old = m.spec.mac_addresses[0];
    let new: bm_domain::MacAddress = "02:aa:aa:aa:aa:aa".parse().unwrap();
    s.update_machine(
        &m.id,
        &MachinePatch {
            mac_addresses: Some(vec![new]),
            ..MachinePatch::default()
        },
        t(1),
    )
    .await
    .unwrap();
    assert_eq!(s.machine_by_mac(&old).await.unwrap(), None);
    assert_eq!(
        s.machine_by_mac(&new).await.unwrap().map(|m| m.id),
        Some(m.id)
    );
}

/// A rollout of `machines` machines created with `request`.
fn rollout(id: u128, request: &str, machines: usize) -> bm_domain::Rollout {
    use bm_domain::{Amount, RolloutAction, RolloutSpec, Target, WhenBusy};
    bm_domain::Rollout::new(
        bm_domain::RolloutId::from_parts(1_800_000_000_000, id),
        bm_domain::RequestId::new(request).unwrap(),
        RolloutSpec {
            action: RolloutAction::Operation(OperationType::Reboot),
            max_in_flight: Amount::Machines(2),
            failure_budget: Amount::Percent(10),
            batch_by: Some("rack".into()),
            soak: std::time::Duration::from_secs(60),
            when_busy: WhenBusy::Skip,
        },
        (0..machines)
            .map(|i| Target {
                machine_id: mid(&format!("m-{i}")),
                labels: Labels::from_pairs([("rack", if i % 2 == 0 { "r1" } else { "r2" })])
                    .unwrap(),
            })
            .collect(),
        bm_domain::Actor::new("alice", "token"),
        t(0),
        "roll the kernel".into(),
    )
    .unwrap()
}

pub(crate) async fn rollouts_are_created_once_and_written_by_version(s: S) {
    let r = rollout(1, "create-1", 4);
    let (stored, created) = s.create_rollout(r.clone()).await.unwrap();
    assert!(created);
    assert_eq!((stored.rollout.clone(), stored.version), (r.clone(), 1));
    // The same request id again: the first rollout, nothing new.
    let (again, created) = s.create_rollout(rollout(2, "create-1", 9)).await.unwrap();
    assert!(!created);
    assert_eq!(again, stored);
    let request = |r: &str| bm_domain::RequestId::new(r).unwrap();
    assert_eq!(
        s.rollout_by_request(&request("create-1")).await.unwrap(),
        Some(stored.clone())
    );
    assert_eq!(s.rollout_by_request(&request("never")).await.unwrap(), None);
    assert!(matches!(
        s.get_rollout(rollout(2, "x", 1).id).await,
        Err(StoreError::RolloutNotFound(_))
    ));

    // A write names the version it read; a stale one is refused and changes nothing.
    let mut next = r.clone();
    next.pause(t(5)).unwrap();
    assert_eq!(s.save_rollout(next.clone(), 1).await.unwrap(), 2);
    let mut stale = r.clone();
    stale.abort(t(6)).unwrap();
    let e = s.save_rollout(stale, 1).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::RolloutChanged {
                expected: 1,
                found: 2,
                ..
            }
        ),
        "{e}"
    );
    let now = s.get_rollout(r.id).await.unwrap();
    assert_eq!((now.rollout, now.version), (next, 2));
    let e = s
        .save_rollout(rollout(3, "never-created", 1), 1)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::RolloutNotFound(_)), "{e}");
}

pub(crate) async fn rollouts_list_newest_first_and_by_activity(s: S) {
    for i in 1..=5u128 {
        let mut r = rollout(i, &format!("list-{i}"), 2);
        if i % 2 == 0 {
            r.abort(t(1)).unwrap();
            r.advance(t(2), |_| bm_domain::Seen::NotRead);
            assert!(r.phase.is_terminal());
        }
        s.create_rollout(r).await.unwrap();
    }
    let ids = |page: &bm_store::Page<bm_store::StoredRollout>| {
        page.items
            .iter()
            .map(|s| s.rollout.request_id.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    let q = |before, active_only| bm_store::RolloutQuery {
        before,
        limit: 2,
        active_only,
    };
    let first = s.list_rollouts(&q(None, false)).await.unwrap();
    assert_eq!(ids(&first), ["list-5", "list-4"]);
    assert!(first.more);
    let second = s
        .list_rollouts(&q(Some(first.items[1].rollout.id), false))
        .await
        .unwrap();
    assert_eq!(ids(&second), ["list-3", "list-2"]);
    let active = s
        .list_rollouts(&bm_store::RolloutQuery {
            limit: 10,
            ..q(None, true)
        })
        .await
        .unwrap();
    assert_eq!(ids(&active), ["list-5", "list-3", "list-1"]);
    assert!(!active.more);
}

pub(crate) async fn concurrent_writes_of_a_rollout_keep_one(s: S) {
    let r = rollout(1, "race", 2);
    // Creations with one request id at once make one rollout.
    let creates: Vec<_> = (0..4)
        .map(|i| {
            let (s, r) = (s.clone(), rollout(10 + i, "race", 2));
            tokio::spawn(async move { s.create_rollout(r).await.unwrap() })
        })
        .collect();
    let mut created = Vec::new();
    for c in creates {
        created.push(c.await.unwrap());
    }
    assert_eq!(created.iter().filter(|(_, c)| *c).count(), 1);
    let id = created[0].0.rollout.id;
    assert!(created.iter().all(|(s, _)| s.rollout.id == id));
    // Writes at one version at once: one wins, the others are told to read again.
    let writes: Vec<_> = (0..4)
        .map(|i| {
            let s = s.clone();
            let mut r = r.clone();
            r.id = id;
            r.note = format!("writer {i}");
            tokio::spawn(async move { s.save_rollout(r, 1).await })
        })
        .collect();
    let mut results = Vec::new();
    for w in writes {
        results.push(w.await.unwrap());
    }
    let won = results.iter().filter(|r| matches!(r, Ok(2))).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(2) | Err(StoreError::RolloutChanged { .. }))),
        "{results:?}"
    );
    assert_eq!(s.get_rollout(id).await.unwrap().version, 2);
}
