//! The rules of the lifecycle: which operation may start on which machine, and what an
//! operation does to its machine when it ends.
//!
//! Admission, in order of precedence:
//!
//! 1. A **blocked** machine (RMA or Retired) admits nothing but [`OperationType::Readmit`].
//! 2. A machine with an **active operation** admits nothing: one operation per machine.
//! 3. [`OperationType::Readmit`] needs a blocked machine, [`OperationType::ClearIntervention`]
//!    a machine that needs intervention.
//! 4. A machine that **needs intervention** admits only what helps a person find and fix
//!    the cause: clear-intervention, reboot, enter-maintenance, RMA, retire (and readmit,
//!    which starts the machine over).
//! 5. Exit from maintenance is refused while `Provisioned` is false (a reimage stopped while
//!    writing the disk): such a machine must not return to production.
//! 6. Each type has the **phases** it runs in ([`allowed_phases`]): reimage, upgrade and
//!    network reconfiguration only in MAINTENANCE; reboot in READY and MAINTENANCE;
//!    enter-maintenance from FACTORY_READY or READY; exit-maintenance from MAINTENANCE.
//!
//! Effects when an operation ends ([`complete`]):
//!
//! - **Succeeded**: the type's effect ([`Outcome::Succeeded`]), and a previous
//!   `OperationCanceled` is cleared.
//! - **Failed** after its retries: `NeedsIntervention` is set, the phase does not change.
//! - **Canceled**: `OperationCanceled` is set, not `NeedsIntervention`, the phase does not
//!   change.
//! - Failed or canceled after a stage that writes the disk had started: `Provisioned` and
//!   `InCustomerCluster` become false, because the disk no longer holds a known image.
//! - Whatever the outcome, the last power reading of the status poll (`PoweredOn`) is marked
//!   as taken before the operation: the next reading is not a change outside an operation.
//!
//! The decisions where the specification is silent are written down in
//! `docs/lifecycle.md`.

use crate::{
    ConditionType, DomainError, Machine, Operation, OperationPhase, OperationType, Phase,
    StageOutcome, Timestamp,
};

/// How an operation ended, as the executor saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every stage succeeded.
    Succeeded,
    /// A stage failed after its retries, or the operation could not safely go on.
    Failed {
        /// What went wrong, for people.
        error: String,
        /// A stage that writes the machine's disk had started.
        disk_touched: bool,
        /// The failure was that the machine could not be reached.
        unreachable: bool,
    },
    /// An operator canceled it.
    Canceled {
        /// A stage that writes the machine's disk had started.
        disk_touched: bool,
    },
}

/// The phases in which an operation type may start.
pub fn allowed_phases(op: OperationType) -> &'static [Phase] {
    use OperationType as T;
    use Phase as P;
    match op {
        T::Reimage | T::Upgrade | T::NetReconfig | T::ExitMaintenance => &[P::Maintenance],
        T::Reboot => &[P::Ready, P::Maintenance],
        T::EnterMaintenance => &[P::FactoryReady, P::Ready],
        T::Rma | T::Retire | T::ClearIntervention | T::Readmit => &Phase::ALL,
    }
}

/// Whether an operation type may start on a machine that needs intervention: those that
/// help a person diagnose or take the machine out of service, and readmit (a machine that
/// failed, was sent to RMA and came back repaired starts over).
pub fn allowed_on_attention(op: OperationType) -> bool {
    use OperationType as T;
    matches!(
        op,
        T::ClearIntervention | T::Reboot | T::EnterMaintenance | T::Rma | T::Retire | T::Readmit
    )
}

fn blocking_cause(machine: &Machine) -> Option<String> {
    let cause = ConditionType::BLOCKING
        .iter()
        .filter(|t| machine.status.conditions.is_true(t))
        .map(|t| format!("{t}=true"))
        .collect::<Vec<_>>()
        .join(", ");
    (!cause.is_empty()).then_some(cause)
}

/// Whether `op` may start on `machine` now.
///
/// # Errors
///
/// The [`DomainError`] of the first rule that refuses it (see the module documentation).
pub fn admit(machine: &Machine, op: OperationType) -> Result<(), DomainError> {
    let machine_id = || machine.id.clone();
    let blocked = blocking_cause(machine);
    if let Some(cause) = &blocked
        && op != OperationType::Readmit
    {
        return Err(DomainError::Blocked {
            machine_id: machine_id(),
            op,
            cause: cause.clone(),
        });
    }
    if let Some(active) = machine.status.active_operation_id {
        return Err(DomainError::Busy {
            machine_id: machine_id(),
            active,
        });
    }
    let needs_intervention = machine
        .status
        .conditions
        .is_true(&ConditionType::NeedsIntervention);
    let not_applicable = |reason: &str| DomainError::NotApplicable {
        machine_id: machine_id(),
        op,
        reason: reason.to_owned(),
    };
    match op {
        OperationType::Readmit if blocked.is_none() => {
            return Err(not_applicable(
                "it is not blocked (neither RMA nor Retired is true)",
            ));
        }
        OperationType::ClearIntervention if !needs_intervention => {
            return Err(not_applicable("it does not need intervention"));
        }
        _ => {}
    }
    if needs_intervention && !allowed_on_attention(op) {
        return Err(DomainError::NeedsIntervention {
            machine_id: machine_id(),
            op,
            // The clearing is named on its own; readmission needs a blocked machine, and a
            // blocked one was refused above.
            allowed: OperationType::ALL
                .into_iter()
                .filter(|t| {
                    allowed_on_attention(*t)
                        && !matches!(t, OperationType::ClearIntervention | OperationType::Readmit)
                })
                .map(OperationType::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    if op == OperationType::ExitMaintenance
        && machine
            .status
            .conditions
            .get(&ConditionType::Provisioned)
            .is_some_and(|c| !c.status)
    {
        return Err(not_applicable(
            "its disk does not hold a complete image (Provisioned=false): reimage it before it returns to production",
        ));
    }
    let phase = machine.status.phase;
    if !allowed_phases(op).contains(&phase) {
        let hint = match (op, phase) {
            (OperationType::EnterMaintenance, Phase::Maintenance) => {
                "the machine is already in maintenance".to_owned()
            }
            (OperationType::ExitMaintenance, _) => "the machine is not in maintenance".to_owned(),
            _ => format!(
                "{op} runs only in {}; enter maintenance first",
                allowed_phases(op)
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        };
        return Err(DomainError::WrongPhase {
            machine_id: machine_id(),
            op,
            phase,
            hint,
        });
    }
    Ok(())
}

/// Admits `op` on `machine` and makes it the machine's active operation.
///
/// # Errors
///
/// As [`admit`]; [`DomainError::NotApplicable`] if `op` is for another machine or is not
/// pending.
pub fn begin(machine: &mut Machine, op: &Operation, now: Timestamp) -> Result<(), DomainError> {
    if op.machine_id != machine.id || op.phase != OperationPhase::Pending {
        return Err(DomainError::NotApplicable {
            machine_id: machine.id.clone(),
            op: op.op_type,
            reason: format!(
                "operation {} is not a pending operation of this machine",
                op.id
            ),
        });
    }
    admit(machine, op.op_type)?;
    let before = machine.effective_state();
    machine.status.active_operation_id = Some(op.id);
    machine.track_state(before, now);
    machine.updated_at = now;
    Ok(())
}

/// Ends `op`, the active operation of `machine`, and applies its effects to the machine.
///
/// # Errors
///
/// [`DomainError::AlreadyEnded`] if `op` has ended, [`DomainError::NotApplicable`] if it
/// is not the machine's active operation. Nothing is changed on error.
pub fn complete(
    machine: &mut Machine,
    op: &mut Operation,
    outcome: Outcome,
    now: Timestamp,
) -> Result<(), DomainError> {
    if !op.is_active() {
        return Err(DomainError::AlreadyEnded {
            operation_id: op.id,
            phase: op.phase,
        });
    }
    if machine.status.active_operation_id != Some(op.id) || op.machine_id != machine.id {
        return Err(DomainError::NotApplicable {
            machine_id: machine.id.clone(),
            op: op.op_type,
            reason: format!("operation {} is not its active operation", op.id),
        });
    }
    let before = machine.effective_state();
    let (t, id) = (op.op_type, op.id);
    let stage = if op.current_stage.is_empty() {
        "before its first stage".to_owned()
    } else {
        format!("in {}", op.current_stage)
    };
    let conditions = &mut machine.status.conditions;
    match &outcome {
        Outcome::Succeeded => {
            op.end_stage(StageOutcome::Succeeded, None, now);
            op.phase = OperationPhase::Succeeded;
            op.error = None;
            apply_success(machine, op, now);
        }
        Outcome::Failed {
            error,
            disk_touched,
            unreachable,
        } => {
            op.end_stage(StageOutcome::Failed, Some(error), now);
            op.phase = OperationPhase::Failed;
            op.error = Some(error.clone());
            conditions.set(
                ConditionType::NeedsIntervention,
                true,
                "OperationFailed",
                format!("{t} {id} failed {stage}: {error}"),
                now,
            );
            if *unreachable {
                conditions.set(
                    ConditionType::Reachable,
                    false,
                    "Unreachable",
                    format!("{t} {id} could not reach the machine {stage}"),
                    now,
                );
            }
            if *disk_touched {
                mark_disk_unknown(machine, t, id, now);
            }
        }
        Outcome::Canceled { disk_touched } => {
            op.end_stage(StageOutcome::Canceled, None, now);
            op.phase = OperationPhase::Canceled;
            op.error = Some(format!("canceled by an operator {stage}"));
            conditions.set(
                ConditionType::OperationCanceled,
                true,
                "Canceled",
                format!("{t} {id} was canceled {stage}"),
                now,
            );
            if *disk_touched {
                mark_disk_unknown(machine, t, id, now);
            }
        }
    }
    // Any operation may have changed the power (a reboot, a retire); what the status poll
    // sees next is not a change outside an operation.
    crate::observe::power_seen_before_operation(machine, &format!("{t} {id}"), now);
    op.finished_at = Some(now);
    machine.status.active_operation_id = None;
    machine.track_state(before, now);
    machine.updated_at = now;
    Ok(())
}

fn mark_disk_unknown(
    machine: &mut Machine,
    t: OperationType,
    id: crate::OperationId,
    now: Timestamp,
) {
    let c = &mut machine.status.conditions;
    let msg = format!("{t} {id} stopped while writing the disk; reimage to provision it again");
    // Known now, whatever was known before: the disk holds no complete image.
    c.set(
        ConditionType::Provisioned,
        false,
        "ImageIncomplete",
        msg.clone(),
        now,
    );
    c.clear(
        &ConditionType::InCustomerCluster,
        "ImageIncomplete",
        msg,
        now,
    );
}

fn apply_success(machine: &mut Machine, op: &Operation, now: Timestamp) {
    use ConditionType as C;
    let (t, id) = (op.op_type, op.id);
    let spec = &machine.spec;
    let status = &mut machine.status;
    let c = &mut status.conditions;
    match t {
        OperationType::Reimage | OperationType::Upgrade => {
            let reason = if t == OperationType::Reimage {
                "Reimaged"
            } else {
                "Upgraded"
            };
            c.set(
                C::Provisioned,
                true,
                reason,
                format!("image {} written by {id}", spec.image),
                now,
            );
            c.set(
                C::InCustomerCluster,
                true,
                "JoinedCluster",
                format!("node of cluster {} since {id}", spec.target_cluster),
                now,
            );
            c.set(C::Reachable, true, reason, format!("verified by {id}"), now);
        }
        OperationType::Reboot | OperationType::NetReconfig => {
            let reason = if t == OperationType::Reboot {
                "Rebooted"
            } else {
                "NetworkReconfigured"
            };
            c.set(C::Reachable, true, reason, format!("verified by {id}"), now);
        }
        OperationType::EnterMaintenance => status.phase = Phase::Maintenance,
        OperationType::ExitMaintenance => status.phase = Phase::Ready,
        OperationType::Rma | OperationType::Retire => {
            let (cond, reason) = if t == OperationType::Rma {
                (C::Rma, "RmaOpened")
            } else {
                (C::Retired, "Retired")
            };
            c.set(cond, true, reason, format!("by {id}"), now);
            let msg = format!("disks wiped by {id}");
            c.clear(&C::Provisioned, "Wiped", msg.clone(), now);
            c.clear(&C::InCustomerCluster, "Wiped", msg, now);
        }
        OperationType::ClearIntervention => {
            let note = if op.note.is_empty() {
                String::new()
            } else {
                format!(": {}", op.note)
            };
            c.set(
                C::NeedsIntervention,
                false,
                "MarkedFixed",
                format!("cleared by {id}{note}"),
                now,
            );
        }
        OperationType::Readmit => {
            let msg = format!("readmitted by {id}");
            for cond in [
                C::Rma,
                C::Retired,
                C::NeedsIntervention,
                C::Provisioned,
                C::InCustomerCluster,
            ] {
                c.clear(&cond, "Readmitted", msg.clone(), now);
            }
            status.phase = Phase::FactoryReady;
        }
    }
    status.conditions.clear(
        &C::OperationCanceled,
        "Succeeded",
        format!("{t} {id} succeeded"),
        now,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EffectiveState, Labels, MachineId, MachineSpec, OperationId, RequestId};

    fn machine(phase: Phase) -> Machine {
        let mut m = Machine::register(
            MachineId::new("machine-1").unwrap(),
            MachineSpec {
                provider: "fake".into(),
                image: "ubuntu-24.04".into(),
                target_cluster: "prod".into(),
                ..MachineSpec::default()
            },
            Labels::default(),
            Timestamp::EPOCH,
        )
        .unwrap();
        m.status.phase = phase;
        m
    }

    fn op(m: &Machine, t: OperationType, n: u128) -> Operation {
        Operation::new(
            OperationId::from_parts(1, n),
            m.id.clone(),
            t,
            RequestId::new(format!("r-{n}")).unwrap(),
            String::new(),
            Timestamp::EPOCH,
        )
        .unwrap()
    }

    fn run(m: &mut Machine, t: OperationType, outcome: Outcome) -> Operation {
        let mut o = op(m, t, 7);
        begin(m, &o, Timestamp::EPOCH).unwrap_or_else(|e| panic!("{t}: {e}"));
        o.start(Timestamp::EPOCH).unwrap();
        complete(m, &mut o, outcome, Timestamp::from_unix_micros(5)).unwrap();
        o
    }

    #[test]
    fn the_rules_keep_when_the_machine_entered_its_effective_state() {
        let t = Timestamp::from_unix_micros;
        let mut m = machine(Phase::Maintenance);
        m.status.state_since = Some(t(1));
        assert_eq!(m.effective_state(), EffectiveState::MaintenanceIdle);
        let mut o = op(&m, OperationType::Reimage, 9);
        begin(&mut m, &o, t(10)).unwrap();
        assert_eq!(m.effective_state(), EffectiveState::Busy);
        assert_eq!(m.status.state_since, Some(t(10)));
        o.start(t(11)).unwrap();
        complete(
            &mut m,
            &mut o,
            Outcome::Failed {
                error: "disk".into(),
                disk_touched: false,
                unreachable: false,
            },
            t(20),
        )
        .unwrap();
        assert_eq!(m.effective_state(), EffectiveState::Attention);
        assert_eq!(m.status.state_since, Some(t(20)));
        // A rule that leaves the state as it was keeps the time.
        m.track_state(EffectiveState::Attention, t(30));
        assert_eq!(m.status.state_since, Some(t(20)));
    }

    #[test]
    fn reimage_is_refused_on_ready_with_a_hint() {
        let m = machine(Phase::Ready);
        let err = admit(&m, OperationType::Reimage).unwrap_err();
        assert!(matches!(err, DomainError::WrongPhase { .. }));
        assert!(err.to_string().contains("enter maintenance first"), "{err}");
    }

    #[test]
    fn second_active_operation_names_the_first() {
        let mut m = machine(Phase::Ready);
        let first = op(&m, OperationType::Reboot, 1);
        begin(&mut m, &first, Timestamp::EPOCH).unwrap();
        assert_eq!(m.effective_state(), EffectiveState::Busy);
        let err = admit(&m, OperationType::EnterMaintenance).unwrap_err();
        assert!(err.to_string().contains(&first.id.to_string()), "{err}");
    }

    #[test]
    fn reimage_success_provisions_and_keeps_maintenance() {
        let mut m = machine(Phase::Maintenance);
        let o = run(&mut m, OperationType::Reimage, Outcome::Succeeded);
        assert_eq!(o.phase, OperationPhase::Succeeded);
        assert_eq!(m.status.phase, Phase::Maintenance);
        assert!(m.status.conditions.is_true(&ConditionType::Provisioned));
        assert!(
            m.status
                .conditions
                .is_true(&ConditionType::InCustomerCluster)
        );
        assert_eq!(m.effective_state(), EffectiveState::MaintenanceIdle);
    }

    #[test]
    fn failure_needs_intervention_and_keeps_phase() {
        let mut m = machine(Phase::Maintenance);
        let o = run(
            &mut m,
            OperationType::Reimage,
            Outcome::Failed {
                error: "disk on fire".into(),
                disk_touched: false,
                unreachable: true,
            },
        );
        assert_eq!(o.phase, OperationPhase::Failed);
        assert_eq!(m.status.phase, Phase::Maintenance);
        assert_eq!(m.effective_state(), EffectiveState::Attention);
        assert!(!m.status.conditions.is_true(&ConditionType::Reachable));
        let cond = m
            .status
            .conditions
            .get(&ConditionType::NeedsIntervention)
            .unwrap();
        assert!(cond.message.contains("disk on fire"), "{}", cond.message);
        // Only remedies are admitted now, and reimage is not one of them.
        match admit(&m, OperationType::Reimage) {
            Err(DomainError::NeedsIntervention { allowed, .. }) => assert_eq!(
                allowed, "REBOOT, ENTER_MAINTENANCE, RMA, RETIRE",
                "the remedies the rules admit"
            ),
            other => panic!("{other:?}"),
        }
        assert!(admit(&m, OperationType::Reboot).is_ok());
        run(&mut m, OperationType::ClearIntervention, Outcome::Succeeded);
        assert_eq!(m.effective_state(), EffectiveState::MaintenanceIdle);
    }

    #[test]
    fn cancel_is_not_a_failure() {
        let mut m = machine(Phase::Maintenance);
        run(&mut m, OperationType::Reimage, Outcome::Succeeded);
        let o = run(
            &mut m,
            OperationType::Reimage,
            Outcome::Canceled { disk_touched: true },
        );
        assert_eq!(o.phase, OperationPhase::Canceled);
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
        assert!(!m.status.conditions.is_true(&ConditionType::Provisioned));
        assert_eq!(m.effective_state(), EffectiveState::MaintenanceIdle);
        run(&mut m, OperationType::Reboot, Outcome::Succeeded);
        assert!(
            !m.status
                .conditions
                .is_true(&ConditionType::OperationCanceled)
        );
    }

    #[test]
    fn rma_blocks_until_readmitted() {
        let mut m = machine(Phase::Ready);
        run(&mut m, OperationType::Rma, Outcome::Succeeded);
        assert_eq!(m.effective_state(), EffectiveState::Blocked);
        let err = admit(&m, OperationType::Reboot).unwrap_err();
        assert!(err.to_string().contains("RMA=true"), "{err}");
        run(&mut m, OperationType::Readmit, Outcome::Succeeded);
        assert_eq!(m.status.phase, Phase::FactoryReady);
        assert_eq!(m.effective_state(), EffectiveState::New);
        assert!(matches!(
            admit(&m, OperationType::Readmit),
            Err(DomainError::NotApplicable { .. })
        ));
    }

    #[test]
    fn maintenance_round_trip() {
        let mut m = machine(Phase::FactoryReady);
        assert!(admit(&m, OperationType::ExitMaintenance).is_err());
        run(&mut m, OperationType::EnterMaintenance, Outcome::Succeeded);
        assert_eq!(m.status.phase, Phase::Maintenance);
        let err = admit(&m, OperationType::EnterMaintenance).unwrap_err();
        assert!(err.to_string().contains("already in maintenance"), "{err}");
        run(&mut m, OperationType::ExitMaintenance, Outcome::Succeeded);
        assert_eq!(m.status.phase, Phase::Ready);
    }

    #[test]
    fn a_half_written_disk_cannot_return_to_production() {
        let mut m = machine(Phase::Maintenance);
        // A never-provisioned machine can leave maintenance (it may come pre-imaged)...
        assert!(admit(&m, OperationType::ExitMaintenance).is_ok());
        // ...but not once a reimage stopped while writing its disk.
        run(
            &mut m,
            OperationType::Reimage,
            Outcome::Canceled { disk_touched: true },
        );
        let err = admit(&m, OperationType::ExitMaintenance).unwrap_err();
        assert!(err.to_string().contains("Provisioned=false"), "{err}");
        run(&mut m, OperationType::Reimage, Outcome::Succeeded);
        assert!(admit(&m, OperationType::ExitMaintenance).is_ok());
    }

    #[test]
    fn complete_refuses_stale_operations() {
        let mut m = machine(Phase::Ready);
        let mut o = run(&mut m, OperationType::Reboot, Outcome::Succeeded);
        let before = m.clone();
        assert!(matches!(
            complete(&mut m, &mut o, Outcome::Succeeded, Timestamp::EPOCH),
            Err(DomainError::AlreadyEnded { .. })
        ));
        let mut other = op(&m, OperationType::Reboot, 9);
        assert!(complete(&mut m, &mut other, Outcome::Succeeded, Timestamp::EPOCH).is_err());
        assert_eq!(m, before);
    }
}
