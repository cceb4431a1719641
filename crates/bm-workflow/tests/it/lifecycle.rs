//! The lifecycle of spec 000, step by step, and its FAQ.

use bm_domain::{
    ConditionType, DomainError, EffectiveState, EventKind, OperationPhase, OperationType, Phase,
    StageOutcome,
};
use bm_provider_fake::{
    Action, LABEL_FAIL_ACTION, LABEL_FAIL_KIND, LABEL_FAIL_TIMES, LABEL_HANG_ACTION,
};
use bm_workflow::{MachineUpdate, NewMachine, OperationQuery, WorkflowError};

use crate::harness::{config, memory, start};

fn domain(e: &WorkflowError) -> &DomainError {
    e.as_domain()
        .unwrap_or_else(|| panic!("not a domain error: {e}"))
}

/// Step 3: imported machines are FACTORY_READY / NEW.
#[tokio::test]
async fn imported_machines_are_new() {
    let h = memory();
    let m = h.machine("machine-1", &[]).await;
    assert_eq!(m.status.phase, Phase::FactoryReady);
    assert_eq!(m.effective_state(), EffectiveState::New);
}

/// Steps 5-6: enter maintenance, reimage with the five internal steps, stay in
/// MAINTENANCE with Provisioned and InCustomerCluster, exit to READY.
#[tokio::test]
async fn maintenance_reimage_exit() {
    let h = memory();
    h.machine("machine-1", &[]).await;
    let enter = h
        .run("machine-1", OperationType::EnterMaintenance, "enter")
        .await;
    assert_eq!(enter.phase, OperationPhase::Succeeded);
    assert_eq!(
        h.get("machine-1").await.effective_state(),
        EffectiveState::MaintenanceIdle
    );

    let op = h
        .submit("machine-1", OperationType::Reimage, "reimage")
        .await
        .unwrap();
    assert_eq!(op.phase, OperationPhase::Pending);
    let op = h.wait_end(op.id).await;
    assert_eq!(op.phase, OperationPhase::Succeeded, "{:?}", op.error);
    let stages: Vec<_> = op
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.outcome, s.attempts))
        .collect();
    let ok = StageOutcome::Succeeded;
    assert_eq!(
        stages,
        [
            ("set-netboot", ok, 1),
            ("reboot-to-netboot", ok, 1),
            ("repave-image", ok, 1),
            ("join-cluster", ok, 1),
            ("verify-in-cluster", ok, 1)
        ]
    );
    assert_eq!(op.current_stage, "verify-in-cluster");
    assert!(op.started_at.is_some() && op.finished_at >= op.started_at);

    let m = h.get("machine-1").await;
    assert_eq!(
        m.status.phase,
        Phase::Maintenance,
        "a reimage leaves the machine in maintenance"
    );
    assert!(m.status.conditions.is_true(&ConditionType::Provisioned));
    assert!(
        m.status
            .conditions
            .is_true(&ConditionType::InCustomerCluster)
    );
    assert_eq!(m.status.active_operation_id, None);

    // The events tell the story in order.
    let kinds: Vec<_> = h
        .events_of(op.id)
        .await
        .iter()
        .map(|e| (e.kind, e.stage.clone()))
        .collect();
    assert_eq!(kinds.first().unwrap().0, EventKind::Created);
    assert_eq!(kinds[1].0, EventKind::PhaseChanged);
    assert_eq!(
        kinds
            .iter()
            .filter(|(k, _)| *k == EventKind::StageSucceeded)
            .count(),
        5
    );
    assert_eq!(kinds.last().unwrap().0, EventKind::PhaseChanged);

    // The provider was driven once per action, and logged as it went.
    for a in [
        Action::SetNetboot,
        Action::PowerCycle,
        Action::Repave,
        Action::MintJoinToken,
        Action::JoinCluster,
        Action::VerifyInCluster,
    ] {
        assert_eq!(h.fake.calls("machine-1", a), 1, "{a:?}");
    }
    h.store.flush().await.unwrap();
    let logs = h.store.logs_after(op.id, 0, 1000).await.unwrap();
    assert!(
        logs.iter()
            .any(|l| l.tag == "repave" && l.stage == "repave-image")
    );
    assert_eq!(
        logs.iter().map(|l| l.sequence).collect::<Vec<_>>(),
        (1..=logs.len() as u64).collect::<Vec<_>>()
    );

    let exit = h
        .run("machine-1", OperationType::ExitMaintenance, "exit")
        .await;
    assert_eq!(exit.phase, OperationPhase::Succeeded);
    let m = h.get("machine-1").await;
    assert_eq!(
        (m.status.phase, m.effective_state()),
        (Phase::Ready, EffectiveState::Idle)
    );
}

/// Step 5: the API rejects reimage on READY (and on FACTORY_READY).
#[tokio::test]
async fn reimage_is_rejected_outside_maintenance() {
    let h = memory();
    h.machine("machine-1", &[]).await;
    let e = h
        .submit("machine-1", OperationType::Reimage, "r")
        .await
        .unwrap_err();
    assert!(
        matches!(
            domain(&e),
            DomainError::WrongPhase {
                phase: Phase::FactoryReady,
                ..
            }
        ),
        "{e}"
    );
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    h.run("machine-1", OperationType::ExitMaintenance, "x")
        .await;
    let e = h
        .submit("machine-1", OperationType::Reimage, "r2")
        .await
        .unwrap_err();
    assert!(
        matches!(
            domain(&e),
            DomainError::WrongPhase {
                phase: Phase::Ready,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(h.fake.total_calls(Action::SetNetboot), 0);
}

/// Step 7: the same request id returns the same operation and runs nothing again.
#[tokio::test]
async fn retried_request_returns_the_same_operation() {
    let h = memory();
    h.machine("machine-2", &[]).await;
    h.run("machine-2", OperationType::EnterMaintenance, "enter")
        .await;
    let first = h
        .run("machine-2", OperationType::Reimage, "demo-idempotent-123")
        .await;
    let again = h
        .submit("machine-2", OperationType::Reimage, "demo-idempotent-123")
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(again.phase, OperationPhase::Succeeded);
    assert_eq!(
        h.fake.calls("machine-2", Action::Repave),
        1,
        "no step ran again"
    );
    // The same key for another type is refused rather than silently mapped.
    let e = h
        .submit("machine-2", OperationType::Reboot, "demo-idempotent-123")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already used"), "{e}");
}

/// Step 8: reboot is one step and works on READY without maintenance.
#[tokio::test]
async fn reboot_on_ready() {
    let h = memory();
    h.machine("machine-1", &[]).await;
    let e = h
        .submit("machine-1", OperationType::Reboot, "r0")
        .await
        .unwrap_err();
    assert!(
        matches!(domain(&e), DomainError::WrongPhase { .. }),
        "not on FACTORY_READY: {e}"
    );
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    h.run("machine-1", OperationType::ExitMaintenance, "x")
        .await;
    let op = h.run("machine-1", OperationType::Reboot, "r1").await;
    assert_eq!(op.phase, OperationPhase::Succeeded);
    assert_eq!(op.stages.len(), 1);
    assert_eq!(op.stages[0].name, "reboot");
    let m = h.get("machine-1").await;
    assert_eq!(m.status.phase, Phase::Ready);
    assert!(m.status.conditions.is_true(&ConditionType::Reachable));
}

/// Step 9: a cancel reaches the running provider action and ends the operation CANCELED
/// with OperationCanceled (not NeedsIntervention), in its phase.
///
/// Paused time: the cancel's answer must come from the operation's end, not from its
/// `cancel_wait` timer, and only virtual time is measured, so a busy machine cannot fail it.
#[tokio::test(start_paused = true)]
async fn cancel_mid_step() {
    let h = memory();
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "repave")])
        .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h
        .submit("machine-1", OperationType::Reimage, "r")
        .await
        .unwrap();
    h.wait_stage(op.id, "repave-image").await;
    let started = tokio::time::Instant::now();
    let canceled = h.cancel(op.id).await.unwrap();
    assert_eq!(
        canceled.phase,
        OperationPhase::Canceled,
        "cancel waits for the end"
    );
    // A cancel that gave up waiting would have let its `cancel_wait` timer run out.
    let waited = started.elapsed();
    assert!(waited < config().cancel_wait, "{waited:?}");
    assert_eq!(
        canceled.stages.last().unwrap().outcome,
        StageOutcome::Canceled
    );
    let m = h.get("machine-1").await;
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
    assert_eq!(m.effective_state(), EffectiveState::MaintenanceIdle);
    // The repave had started: the disk is no longer known to hold an image.
    assert!(!m.status.conditions.is_true(&ConditionType::Provisioned));
    assert_eq!(
        h.fake.calls("machine-1", Action::JoinCluster),
        0,
        "nothing ran after the cancel"
    );
    // Canceling what has ended is a clear error.
    let e = h.cancel(op.id).await.unwrap_err();
    assert!(
        matches!(
            domain(&e),
            DomainError::AlreadyEnded {
                phase: OperationPhase::Canceled,
                ..
            }
        ),
        "{e}"
    );
}

/// A pending operation (no executor running) is canceled at once.
#[tokio::test]
async fn cancel_pending() {
    let store: std::sync::Arc<dyn bm_store::Store> =
        std::sync::Arc::new(bm_store::MemoryStore::new());
    let h = start(store.clone(), config());
    h.machine("machine-1", &[]).await;
    h.engine.shutdown(std::time::Duration::from_secs(1)).await;
    // A second engine that admits but never runs.
    let idle = bm_workflow::Engine::new(store, h.engine.providers().clone(), config());
    let op = idle
        .submit(bm_workflow::OperationRequest {
            machine_id: crate::harness::id("machine-1"),
            op_type: OperationType::EnterMaintenance,
            request_id: bm_domain::RequestId::new("r").unwrap(),
            note: String::new(),
            requested_by: bm_domain::Actor::new("test", "token"),
        })
        .await
        .unwrap()
        .operation;
    let canceled = idle
        .cancel(bm_workflow::CancelRequest {
            operation_id: op.id,
            requested_by: bm_domain::Actor::default(),
        })
        .await
        .unwrap();
    assert_eq!(canceled.phase, OperationPhase::Canceled);
    assert!(canceled.stages.is_empty());
    assert_eq!(
        idle.get_machine(&crate::harness::id("machine-1"))
            .await
            .unwrap()
            .status
            .phase,
        Phase::FactoryReady
    );
}

/// FAQ: a step that fails after all retries fails the operation, sets NeedsIntervention,
/// keeps the phase; the effective state becomes ATTENTION.
#[tokio::test]
async fn failure_after_retries_needs_intervention() {
    let h = memory();
    h.machine("machine-1", &[(LABEL_FAIL_ACTION, "repave")])
        .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h.run("machine-1", OperationType::Reimage, "r").await;
    assert_eq!(op.phase, OperationPhase::Failed);
    assert!(
        op.error.as_deref().unwrap().contains("repave-image"),
        "{:?}",
        op.error
    );
    let last = op.stages.last().unwrap();
    assert_eq!(
        (last.name.as_str(), last.outcome, last.attempts),
        ("repave-image", StageOutcome::Failed, 3)
    );
    assert_eq!(
        h.fake.calls("machine-1", Action::Repave),
        3,
        "max_attempts attempts"
    );
    let m = h.get("machine-1").await;
    assert_eq!(m.effective_state(), EffectiveState::Attention);
    assert_eq!(m.status.phase, Phase::Maintenance);
    let events = h.events_of(op.id).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::StageRetrying)
            .count(),
        2
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::StageFailed)
            .count(),
        1
    );

    // Reimage is held until a person clears the condition; then it can run again.
    let e = h
        .submit("machine-1", OperationType::Reimage, "r2")
        .await
        .unwrap_err();
    assert!(
        matches!(domain(&e), DomainError::NeedsIntervention { .. }),
        "{e}"
    );
    let clear = h
        .run("machine-1", OperationType::ClearIntervention, "fixed")
        .await;
    assert_eq!(clear.phase, OperationPhase::Succeeded);
    assert!(clear.stages.is_empty(), "bookkeeping: no hardware step");
    assert_eq!(
        h.get("machine-1").await.effective_state(),
        EffectiveState::MaintenanceIdle
    );
}

/// A transient failure that clears within the retries does not fail the operation.
#[tokio::test]
async fn transient_failures_are_retried() {
    let h = memory();
    h.machine(
        "machine-1",
        &[(LABEL_FAIL_ACTION, "set-netboot"), (LABEL_FAIL_TIMES, "2")],
    )
    .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h.run("machine-1", OperationType::Reimage, "r").await;
    assert_eq!(op.phase, OperationPhase::Succeeded);
    assert_eq!(op.stages[0].attempts, 3);
    assert!(
        op.stages[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("injected")
    );
}

/// A permanent error is not retried; an unreachable machine is marked so.
#[tokio::test]
async fn permanent_and_unreachable_failures() {
    let h = memory();
    h.machine(
        "perm",
        &[(LABEL_FAIL_ACTION, "drain"), (LABEL_FAIL_KIND, "permanent")],
    )
    .await;
    let op = h.run("perm", OperationType::EnterMaintenance, "e").await;
    assert_eq!(op.phase, OperationPhase::Failed);
    assert_eq!(h.fake.calls("perm", Action::Drain), 1);

    h.machine(
        "gone",
        &[
            (LABEL_FAIL_ACTION, "power-cycle"),
            (LABEL_FAIL_KIND, "unreachable"),
        ],
    )
    .await;
    h.run("gone", OperationType::EnterMaintenance, "e").await;
    let op = h.run("gone", OperationType::Reboot, "r").await;
    assert_eq!(op.phase, OperationPhase::Failed);
    let m = h.get("gone").await;
    assert!(!m.status.conditions.is_true(&ConditionType::Reachable));
    assert!(m.status.conditions.get(&ConditionType::Reachable).is_some());
}

/// A step that never answers is cut off by its timeout and retried.
#[tokio::test]
async fn step_timeouts() {
    let h = start(
        std::sync::Arc::new(bm_store::MemoryStore::new()),
        bm_workflow::EngineConfig {
            step_timeout: Some(std::time::Duration::from_millis(50)),
            ..config()
        },
    );
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "drain")])
        .await;
    let op = h
        .run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    assert_eq!(op.phase, OperationPhase::Failed);
    assert!(
        op.error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        op.error
    );
    assert_eq!(h.fake.calls("machine-1", Action::Drain), 3);
}

/// RMA ends BLOCKED; only readmit runs then, and it starts the machine over.
#[tokio::test]
async fn rma_blocks_and_readmit_starts_over() {
    let h = memory();
    h.machine("machine-5", &[]).await;
    let op = h.run("machine-5", OperationType::Rma, "rma").await;
    assert_eq!(op.phase, OperationPhase::Succeeded);
    assert_eq!(
        op.stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["drain", "wipe", "notify"]
    );
    let m = h.get("machine-5").await;
    assert_eq!(m.effective_state(), EffectiveState::Blocked);
    assert!(m.status.conditions.is_true(&ConditionType::Rma));
    for t in [
        OperationType::Reboot,
        OperationType::EnterMaintenance,
        OperationType::Rma,
        OperationType::Retire,
    ] {
        let e = h.submit("machine-5", t, &format!("{t}")).await.unwrap_err();
        assert!(
            matches!(domain(&e), DomainError::Blocked { .. }),
            "{t}: {e}"
        );
    }
    h.run("machine-5", OperationType::Readmit, "back").await;
    let m = h.get("machine-5").await;
    assert_eq!(
        (m.status.phase, m.effective_state()),
        (Phase::FactoryReady, EffectiveState::New)
    );
}

/// FAQ: every operation is recorded, newest first.
#[tokio::test]
async fn history_newest_first() {
    let h = memory();
    h.machine("machine-1", &[]).await;
    let a = h
        .run("machine-1", OperationType::EnterMaintenance, "a")
        .await;
    let b = h.run("machine-1", OperationType::Reimage, "b").await;
    let c = h
        .run("machine-1", OperationType::ExitMaintenance, "c")
        .await;
    let page = h
        .engine
        .list_operations(&OperationQuery {
            limit: 10,
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|o| o.id).collect::<Vec<_>>(),
        [c.id, b.id, a.id]
    );
}

/// The spec cannot change under a running operation.
#[tokio::test]
async fn spec_is_locked_while_running() {
    let h = memory();
    let m = h
        .machine("machine-1", &[(LABEL_HANG_ACTION, "drain")])
        .await;
    let op = h
        .submit("machine-1", OperationType::EnterMaintenance, "e")
        .await
        .unwrap();
    h.wait_stage(op.id, "drain").await;
    let mut spec = m.spec.clone();
    spec.image = "other".into();
    let e = h
        .engine
        .update_machine(MachineUpdate {
            id: m.id.clone(),
            patch: bm_domain::MachinePatch {
                image: Some(spec.image.clone()),
                ..Default::default()
            },
        })
        .await
        .unwrap_err();
    assert!(matches!(domain(&e), DomainError::SpecLocked { .. }), "{e}");
    h.cancel(op.id).await.unwrap();
}

/// Unknown providers are refused at registration with the list of known ones.
#[tokio::test]
async fn unknown_provider_is_refused() {
    let h = memory();
    let e = h
        .engine
        .register_machine(NewMachine {
            id: crate::harness::id("m"),
            spec: bm_domain::MachineSpec {
                provider: "ipmi".into(),
                ..Default::default()
            },
            labels: bm_domain::Labels::default(),
            registered_by: bm_domain::Actor::default(),
        })
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("unknown provider \"ipmi\": this server has fake"),
        "{e}"
    );
}

/// A panic in a provider (a bug in a provider crate) fails the operation for a person to
/// look at; it never leaves it RUNNING with nobody running it, and the executor's slot is
/// freed: with one slot, a second operation still runs.
#[tokio::test]
async fn a_panicking_provider_fails_its_operation() {
    let h = start(
        std::sync::Arc::new(bm_store::MemoryStore::new()),
        bm_workflow::EngineConfig {
            max_concurrent_operations: 1,
            ..config()
        },
    );
    h.machine(
        "m-1",
        &[(LABEL_FAIL_ACTION, "drain"), (LABEL_FAIL_KIND, "panic")],
    )
    .await;
    // Retire is allowed on a machine that needs intervention, so the second one is admitted.
    for request in ["a", "b"] {
        let done = h.run("m-1", OperationType::Retire, request).await;
        assert_eq!(done.phase, OperationPhase::Failed);
        assert!(
            done.error
                .as_deref()
                .unwrap()
                .contains("injected panic of drain"),
            "{:?}",
            done.error
        );
    }
    assert_eq!(h.engine.running_operations(), 0, "the slot was freed");
    assert_eq!(
        h.get("m-1").await.effective_state(),
        EffectiveState::Attention
    );
}

/// Issue 13: an operation that armed a netboot and then failed or was canceled disarms it,
/// so that the operator's next reboot does not network-boot the machine; the log says so.
#[tokio::test]
async fn a_failed_or_canceled_reimage_disarms_the_netboot() {
    let h = memory();
    h.machine(
        "machine-1",
        &[
            (LABEL_FAIL_ACTION, "power-cycle"),
            (LABEL_FAIL_KIND, "permanent"),
        ],
    )
    .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h.run("machine-1", OperationType::Reimage, "r").await;
    assert_eq!(op.phase, OperationPhase::Failed);
    assert_eq!(h.fake.calls("machine-1", Action::DisarmNetboot), 1);
    h.wait_log(op.id, "Boot override: disabled").await;

    // Canceled while it reboots into the deploy environment.
    h.machine("machine-2", &[(LABEL_HANG_ACTION, "power-cycle")])
        .await;
    h.run("machine-2", OperationType::EnterMaintenance, "e")
        .await;
    let op = h
        .submit("machine-2", OperationType::Reimage, "r")
        .await
        .unwrap();
    h.wait_stage(op.id, "reboot-to-netboot").await;
    h.cancel(op.id).await.unwrap();
    let op = h.wait_end(op.id).await;
    assert_eq!(op.phase, OperationPhase::Canceled);
    assert_eq!(h.fake.calls("machine-2", Action::DisarmNetboot), 1);

    // An operation that never armed one has nothing to disarm.
    h.machine(
        "machine-3",
        &[(LABEL_FAIL_ACTION, "drain"), (LABEL_FAIL_KIND, "permanent")],
    )
    .await;
    let op = h
        .run("machine-3", OperationType::EnterMaintenance, "e")
        .await;
    assert_eq!(op.phase, OperationPhase::Failed);
    assert_eq!(h.fake.calls("machine-3", Action::DisarmNetboot), 0);
}

/// The executor panicking after the override was armed (a provider bug) still disarms it.
#[tokio::test]
async fn a_reimage_whose_executor_panicked_disarms_the_netboot() {
    let h = memory();
    h.machine(
        "machine-1",
        &[(LABEL_FAIL_ACTION, "repave"), (LABEL_FAIL_KIND, "panic")],
    )
    .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h.run("machine-1", OperationType::Reimage, "r").await;
    assert_eq!(op.phase, OperationPhase::Failed);
    let error = op.error.clone().unwrap_or_default();
    assert!(error.contains("injected panic of repave"), "{error}");
    assert_eq!(h.fake.calls("machine-1", Action::DisarmNetboot), 1);
    h.wait_log(op.id, "Boot override: disabled").await;
}

/// When the override cannot be disarmed, the machine's record says so: a canceled reimage
/// ends FAILED (NeedsIntervention) with a message that says what to do.
#[tokio::test]
async fn a_netboot_that_cannot_be_disarmed_is_on_the_machine_record() {
    let h = memory();
    h.machine(
        "machine-1",
        &[
            (LABEL_HANG_ACTION, "repave"),
            (LABEL_FAIL_ACTION, "disarm-netboot"),
            (LABEL_FAIL_KIND, "permanent"),
        ],
    )
    .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h
        .submit("machine-1", OperationType::Reimage, "r")
        .await
        .unwrap();
    h.wait_stage(op.id, "repave-image").await;
    h.cancel(op.id).await.unwrap();
    let op = h.wait_end(op.id).await;
    assert_eq!(op.phase, OperationPhase::Failed);
    let error = op.error.unwrap_or_default();
    assert!(
        error.contains("canceled by an operator, but the netboot override could not be disarmed"),
        "{error}"
    );
    let m = h.get("machine-1").await;
    assert_eq!(m.effective_state(), EffectiveState::Attention);
    let c = m
        .status
        .conditions
        .get(&ConditionType::NeedsIntervention)
        .unwrap();
    assert!(c.message.contains("disarm it on the BMC"), "{}", c.message);
}

/// Issue 13: a BMC that is unavailable for a while (rebooting, updating its firmware) is
/// retried past `max_attempts`, within the budget; a transient error is not.
#[tokio::test]
async fn an_unavailable_bmc_is_retried_within_the_budget() {
    let h = start(
        std::sync::Arc::new(bm_store::MemoryStore::new()),
        bm_workflow::EngineConfig {
            retry: bm_workflow::RetryPolicy {
                unavailable_budget: std::time::Duration::from_secs(600),
                ..config().retry
            },
            ..config()
        },
    );
    let labels = |kind| {
        [
            (LABEL_FAIL_ACTION, "power-cycle"),
            (LABEL_FAIL_TIMES, "5"),
            (LABEL_FAIL_KIND, kind),
        ]
    };
    h.machine("busy-bmc", &labels("unavailable")).await;
    h.machine("flaky", &labels("transient")).await;
    h.run("busy-bmc", OperationType::EnterMaintenance, "e")
        .await;
    h.run("flaky", OperationType::EnterMaintenance, "e").await;
    let op = h.run("busy-bmc", OperationType::Reboot, "r").await;
    assert_eq!(op.phase, OperationPhase::Succeeded, "{:?}", op.error);
    assert_eq!(h.fake.calls("busy-bmc", Action::PowerCycle), 6);
    let op = h.run("flaky", OperationType::Reboot, "r").await;
    assert_eq!(op.phase, OperationPhase::Failed);
    assert_eq!(h.fake.calls("flaky", Action::PowerCycle), 3);
}
