//! The one error type of the domain: bad input, or an operation the rules refuse.

use crate::{
    MachineId, OperationId, OperationPhase, OperationType, Phase, RolloutId, RolloutPhase,
};

/// Why the domain refused a value or an operation.
///
/// The variants split in two families that callers map differently: [`DomainError::Invalid`]
/// is bad input (the request can be fixed by the caller), every other variant is a rule of
/// the state model refusing an operation in the machine's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A value does not have the required syntax.
    #[error("invalid {field} {value}: {reason}")]
    Invalid {
        /// Which field or kind of value, e.g. `machine id`.
        field: &'static str,
        /// The offending value as a [`crate::Snippet`]: quoted, escaped, cut if long.
        value: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// The machine is RMA or Retired: nothing but re-admission runs on it.
    #[error(
        "machine {machine_id} is blocked ({cause}): {op} is refused, only readmit can run on a blocked machine"
    )]
    Blocked {
        /// The machine.
        machine_id: MachineId,
        /// The refused operation.
        op: OperationType,
        /// The conditions that block it, e.g. `RMA=true`.
        cause: String,
    },
    /// The machine already has an active operation.
    #[error(
        "machine {machine_id} already has an active operation {active}: wait for it to end or cancel it"
    )]
    Busy {
        /// The machine.
        machine_id: MachineId,
        /// The operation that is pending or running on it.
        active: OperationId,
    },
    /// The operation is not allowed in the machine's phase.
    #[error("{op} is not allowed on machine {machine_id} in phase {phase}: {hint}")]
    WrongPhase {
        /// The machine.
        machine_id: MachineId,
        /// The refused operation.
        op: OperationType,
        /// The machine's phase.
        phase: Phase,
        /// What the operator can do instead.
        hint: String,
    },
    /// The machine needs intervention and the operation is not one that helps with that.
    #[error(
        "machine {machine_id} needs intervention: {op} is refused until the cause is fixed and the condition cleared with CLEAR_INTERVENTION (allowed meanwhile: {allowed})"
    )]
    NeedsIntervention {
        /// The machine.
        machine_id: MachineId,
        /// The refused operation.
        op: OperationType,
        /// The operation types that may still start, from the rules.
        allowed: String,
    },
    /// The spec cannot change while an operation is active: every operation works from one
    /// spec from start to end.
    #[error(
        "the spec of machine {machine_id} cannot change while operation {active} is active: wait for it to end or cancel it (labels can change)"
    )]
    SpecLocked {
        /// The machine.
        machine_id: MachineId,
        /// The operation that is pending or running on it.
        active: OperationId,
    },
    /// The operation has already ended, so it can no longer be started or canceled.
    #[error("operation {operation_id} has already ended ({phase})")]
    AlreadyEnded {
        /// The operation.
        operation_id: OperationId,
        /// How it ended.
        phase: OperationPhase,
    },
    /// The rollout is in a phase where it cannot be paused, resumed or aborted.
    #[error("rollout {rollout_id} is {phase}: it cannot be {action}")]
    RolloutState {
        /// The rollout.
        rollout_id: RolloutId,
        /// Its phase.
        phase: RolloutPhase,
        /// What was asked: `paused`, `resumed`, `aborted`.
        action: &'static str,
    },
    /// The operation has nothing to do on this machine.
    #[error("{op} does not apply to machine {machine_id}: {reason}")]
    NotApplicable {
        /// The machine.
        machine_id: MachineId,
        /// The refused operation.
        op: OperationType,
        /// Why there is nothing to do.
        reason: String,
    },
}

impl DomainError {
    /// An [`DomainError::Invalid`] error. The value is kept as its [`crate::snippet`], so
    /// an error never echoes a megabyte of input or a control character back.
    pub fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> Self {
        DomainError::Invalid {
            field,
            value: crate::snippet(value).to_string(),
            reason: reason.into(),
        }
    }

    /// True for bad input, false for a refusal by the state model's rules.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, DomainError::Invalid { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_shortened() {
        let e = DomainError::invalid("machine id", &"x".repeat(1000), "too long");
        let msg = e.to_string();
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.contains("… (1000 bytes)"), "{msg}");
        let e = DomainError::invalid("machine id", "a\nb", "bad");
        assert_eq!(e.to_string(), r#"invalid machine id "a\nb": bad"#);
        assert!(e.is_invalid_input());
    }
}
