//! Admission and transition rules under random sequences of operations and outcomes.

use bm_domain::rules::{self, Outcome};
use bm_domain::{
    ConditionType, DomainError, EffectiveState, Machine, Operation, OperationId, OperationPhase,
    OperationType, Phase, RequestId, Timestamp,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Begin(OperationType),
    Complete(Outcome),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => Just(Outcome::Succeeded),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(disk_touched, unreachable)| Outcome::Failed {
            error: "boom".into(),
            disk_touched,
            unreachable,
        }),
        1 => any::<bool>().prop_map(|disk_touched| Outcome::Canceled { disk_touched }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        super::strategies::op_type().prop_map(Step::Begin),
        outcome().prop_map(Step::Complete),
    ]
}

fn new_op(m: &Machine, t: OperationType, n: u64, now: Timestamp) -> Operation {
    Operation::new(
        OperationId::from_parts(n, u128::from(n)),
        m.id.clone(),
        t,
        RequestId::new(format!("req-{n}")).unwrap(),
        String::new(),
        now,
    )
    .unwrap()
}

/// The phase a successful operation leaves behind.
fn phase_after_success(t: OperationType, before: Phase) -> Phase {
    match t {
        OperationType::EnterMaintenance => Phase::Maintenance,
        OperationType::ExitMaintenance => Phase::Ready,
        OperationType::Readmit => Phase::FactoryReady,
        _ => before,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Drives one machine through random admissions and completions and checks every rule
    /// and invariant after each step.
    #[test]
    fn random_lifecycles_keep_invariants(
        start in super::strategies::machine(),
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let mut m = start;
        // A machine generated with an active operation holds it: complete it first.
        let mut active: Option<Operation> = m.status.active_operation_id.map(|id| {
            let mut op = new_op(&m, OperationType::Reboot, 0, m.created_at);
            op.id = id;
            op
        });
        let mut clock = m.updated_at.as_unix_micros();
        for (n, step) in steps.into_iter().enumerate() {
            clock += 1_000;
            let now = Timestamp::from_unix_micros(clock);
            let before = m.clone();
            match step {
                Step::Begin(t) => {
                    let op = new_op(&m, t, n as u64 + 1, now);
                    let blocked = before.effective_state() == EffectiveState::Blocked;
                    match rules::begin(&mut m, &op, now) {
                        Ok(()) => {
                            prop_assert!(active.is_none(), "admitted a second active operation");
                            prop_assert!(!blocked || t == OperationType::Readmit, "{t} admitted while blocked");
                            prop_assert_eq!(m.status.active_operation_id, Some(op.id));
                            prop_assert_eq!(m.effective_state() == EffectiveState::Busy,
                                !blocked && !before.status.conditions.is_true(&ConditionType::NeedsIntervention));
                            prop_assert!(rules::allowed_phases(t).contains(&m.status.phase));
                            active = Some(op);
                        }
                        Err(e) => {
                            prop_assert!(!e.is_invalid_input());
                            prop_assert_eq!(&m, &before, "a refusal changed the machine");
                            if blocked && t != OperationType::Readmit {
                                prop_assert!(matches!(e, DomainError::Blocked { .. }), "{}", e);
                            } else if let Some(a) = &active {
                                prop_assert!(matches!(e, DomainError::Busy { active: id, .. } if id == a.id), "{}", e);
                            }
                        }
                    }
                }
                Step::Complete(outcome) => {
                    let Some(mut op) = active.take() else {
                        continue;
                    };
                    op.start(now).unwrap();
                    op.begin_stage("some-stage", now);
                    rules::complete(&mut m, &mut op, outcome.clone(), now).unwrap();
                    prop_assert!(m.status.active_operation_id.is_none());
                    prop_assert!(op.finished_at.is_some());
                    let c = &m.status.conditions;
                    match &outcome {
                        Outcome::Succeeded => {
                            prop_assert_eq!(op.phase, OperationPhase::Succeeded);
                            prop_assert_eq!(m.status.phase, phase_after_success(op.op_type, before.status.phase));
                            prop_assert!(!c.is_true(&ConditionType::OperationCanceled));
                        }
                        Outcome::Failed { .. } => {
                            prop_assert_eq!(op.phase, OperationPhase::Failed);
                            prop_assert_eq!(m.status.phase, before.status.phase);
                            prop_assert!(c.is_true(&ConditionType::NeedsIntervention));
                            prop_assert!(matches!(
                                m.effective_state(),
                                EffectiveState::Attention | EffectiveState::Blocked
                            ));
                        }
                        Outcome::Canceled { .. } => {
                            prop_assert_eq!(op.phase, OperationPhase::Canceled);
                            prop_assert_eq!(m.status.phase, before.status.phase);
                            prop_assert!(c.is_true(&ConditionType::OperationCanceled));
                            prop_assert_eq!(
                                c.is_true(&ConditionType::NeedsIntervention),
                                before.status.conditions.is_true(&ConditionType::NeedsIntervention)
                            );
                        }
                    }
                }
            }
            // Transition times move only with a status change.
            for cond in m.status.conditions.iter() {
                if let Some(old) = before.status.conditions.get(&cond.type_) {
                    if old.status == cond.status {
                        prop_assert_eq!(old.last_transition_time, cond.last_transition_time);
                    } else {
                        prop_assert_eq!(cond.last_transition_time, now);
                    }
                }
            }
            prop_assert_eq!(m.status.active_operation_id.is_some(), active.is_some());
        }
    }

    /// On a blocked machine every type but readmit is refused, whatever else holds.
    #[test]
    fn blocked_machines_refuse_all_but_readmit(mut m in super::strategies::machine(), rma in any::<bool>(), t in super::strategies::op_type()) {
        let cond = if rma { ConditionType::Rma } else { ConditionType::Retired };
        m.status.conditions.set(cond, true, "Test", "", Timestamp::EPOCH);
        prop_assert_eq!(m.effective_state(), EffectiveState::Blocked);
        let result = rules::admit(&m, t);
        if t == OperationType::Readmit {
            prop_assert_eq!(result.is_ok(), m.status.active_operation_id.is_none());
        } else {
            prop_assert!(matches!(result, Err(DomainError::Blocked { .. })), "{:?}", result);
        }
    }

    /// A machine with an active operation admits nothing.
    #[test]
    fn busy_machines_admit_nothing(mut m in super::strategies::machine(), id in super::strategies::operation_id(), t in super::strategies::op_type()) {
        m.status.active_operation_id = Some(id);
        prop_assert!(rules::admit(&m, t).is_err());
    }
}
