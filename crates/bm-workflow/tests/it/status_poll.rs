//! The status poll (power and health sync) against the fake provider: what it records, what
//! it skips, and how it tells a power change outside an operation from one across an
//! operation.

use std::sync::Arc;
use std::time::Duration;

use bm_domain::{ConditionType, MachinePatch, OperationType, REASON_POWER_CHANGED_OUTSIDE};
use bm_provider_fake::{Action, LABEL_BMC, LABEL_HANG_ACTION, LABEL_HEALTH, LABEL_POWER};
use bm_store::MemoryStore;
use bm_workflow::{EngineConfig, MachineUpdate, PollRound, StatusPollConfig};

use crate::harness::{Harness, config, id, memory, start};

async fn set_label(h: &Harness, machine: &str, key: &str, value: &str) {
    h.engine
        .update_machine(MachineUpdate {
            id: id(machine),
            patch: MachinePatch {
                set_labels: [(key.to_owned(), value.to_owned())].into(),
                ..MachinePatch::default()
            },
        })
        .await
        .unwrap();
}

fn condition(m: &bm_domain::Machine, t: ConditionType) -> (bool, String) {
    let c = m
        .status
        .conditions
        .get(&t)
        .unwrap_or_else(|| panic!("{} has no {t}", m.id));
    (c.status, c.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_records_reachable_degraded_and_power_and_skips_busy_and_blocked_machines() {
    let h = memory();
    h.machine("fine", &[]).await;
    h.machine("warm", &[(LABEL_HEALTH, "warning")]).await;
    h.machine("burnt", &[(LABEL_HEALTH, "critical")]).await;
    h.machine("gone", &[(LABEL_BMC, "unreachable")]).await;
    h.machine("busy", &[(LABEL_HANG_ACTION, "drain")]).await;
    h.machine("returned", &[]).await;
    let rma = h.run("returned", OperationType::Rma, "rma").await;
    assert_eq!(rma.phase, bm_domain::OperationPhase::Succeeded);
    let busy = h
        .submit("busy", OperationType::EnterMaintenance, "e")
        .await
        .unwrap();
    h.wait_stage(busy.id, "drain").await;

    let round = h.engine.poll_status_once().await.unwrap();
    assert_eq!(
        round,
        PollRound {
            polled: 4,
            changed: 4,
            unreachable: 1,
            degraded: 2,
            busy: 1,
            blocked: 1,
            ..PollRound::default()
        }
    );
    let fine = h.get("fine").await;
    assert_eq!(
        condition(&fine, ConditionType::Reachable),
        (true, "BmcAnswered".into())
    );
    assert_eq!(
        condition(&fine, ConditionType::Degraded),
        (false, "HealthOK".into())
    );
    assert_eq!(
        condition(&fine, ConditionType::PoweredOn),
        (true, "Observed".into())
    );
    assert_eq!(
        condition(&h.get("warm").await, ConditionType::Degraded),
        (true, "HealthWarning".into())
    );
    assert_eq!(
        condition(&h.get("burnt").await, ConditionType::Degraded),
        (true, "HealthCritical".into())
    );
    let gone = h.get("gone").await;
    assert_eq!(
        condition(&gone, ConditionType::Reachable),
        (false, "BmcUnreachable".into())
    );
    assert!(
        gone.status
            .conditions
            .get(&ConditionType::Reachable)
            .unwrap()
            .message
            .contains("did not answer"),
        "{gone:?}"
    );
    // Neither the busy nor the blocked machine's BMC was read, nor their records touched.
    assert_eq!(h.fake.calls("busy", Action::Observe), 0);
    assert_eq!(h.fake.calls("returned", Action::Observe), 0);
    assert!(
        h.get("busy")
            .await
            .status
            .conditions
            .get(&ConditionType::Reachable)
            .is_none()
    );

    // Nothing changed since: the next round reads every BMC again and writes nothing.
    let again = h.engine.poll_status_once().await.unwrap();
    assert_eq!((again.polled, again.changed), (4, 0), "{again:?}");
    assert_eq!(h.fake.calls("fine", Action::Observe), 2);
    h.cancel(busy.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_change_between_rounds_is_reported_unless_an_operation_ran_in_between() {
    let h = memory();
    h.machine("m", &[]).await;
    h.engine.poll_status_once().await.unwrap();
    assert!(
        h.get("m")
            .await
            .status
            .conditions
            .is_true(&ConditionType::PoweredOn)
    );

    // Someone holds the power button.
    set_label(&h, "m", LABEL_POWER, "off").await;
    let round = h.engine.poll_status_once().await.unwrap();
    assert_eq!(round.power_changed_outside, 1, "{round:?}");
    let off = h.get("m").await;
    assert_eq!(
        condition(&off, ConditionType::PoweredOn),
        (false, REASON_POWER_CHANGED_OUTSIDE.into())
    );

    // An operation runs; the power is on afterwards: not a change outside an operation.
    h.run("m", OperationType::EnterMaintenance, "e").await;
    set_label(&h, "m", LABEL_POWER, "on").await;
    let round = h.engine.poll_status_once().await.unwrap();
    assert_eq!(
        (round.changed, round.power_changed_outside),
        (1, 0),
        "{round:?}"
    );
    assert_eq!(
        condition(&h.get("m").await, ConditionType::PoweredOn),
        (true, "Observed".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_engine_polls_by_itself() {
    let h = start(
        Arc::new(MemoryStore::new()),
        EngineConfig {
            status_poll: StatusPollConfig {
                interval: Some(Duration::from_secs(1)),
                ..StatusPollConfig::default()
            },
            ..config()
        },
    );
    h.machine("gone", &[(LABEL_BMC, "unreachable")]).await;
    // No event tells of a machine's conditions: look until the poll has been by (rounds
    // come every second; the machine is read in the first round after it was registered).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = h.get("gone").await;
        if let Some(r) = m.status.conditions.get(&ConditionType::Reachable) {
            assert!(!r.status, "{r:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poll did not read the machine within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.fake.calls("gone", Action::Observe) >= 1);
}
