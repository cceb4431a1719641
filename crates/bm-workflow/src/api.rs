//! The engine's own request and outcome types: what the adapters pass in and get back.
//!
//! They are the engine's, not the store's, so that an adapter depends on the engine alone and
//! the store behind it can change (another backend, other query shapes) without the adapters
//! noticing. Each mutation takes one request struct rather than a list of arguments, so that
//! what every mutation will carry later (who asked for it) is one more field.
//! The engine converts them to and from the store's types (the `pub(crate)` functions here).

use bm_domain::{
    Actor, EffectiveState, LabelSelector, Labels, MachineId, MachinePatch, MachineSpec, Operation,
    OperationEvent, OperationId, OperationPhase, OperationType, Phase, RequestId,
};

/// A machine to register: it starts in FACTORY_READY with no conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMachine {
    /// Its id.
    pub id: MachineId,
    /// What it is and how to reach it.
    pub spec: MachineSpec,
    /// Its labels.
    pub labels: Labels,
    /// Who registers it; stored as the machine's `updated_by` (registration is its first
    /// change).
    pub registered_by: Actor,
}

/// A batch of machines to register, each on its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportRequest {
    /// The machines, in the order their results come back.
    pub machines: Vec<NewMachine>,
    /// Check only: nothing is written, and the results say what the import would do.
    pub dry_run: bool,
}

/// What an import did (or, in a dry run, would do) with one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The machine was registered.
    Created,
    /// The machine existed with the same spec and labels; nothing changed.
    Unchanged,
}

/// A change of a machine's spec and labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineUpdate {
    /// The machine.
    pub id: MachineId,
    /// The fields to change; the others keep the value they have when the change is written.
    pub patch: MachinePatch,
}

/// Which machines to list (ordered by id), and where to start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineQuery {
    /// Start after this id (the last id of the previous page).
    pub after: Option<MachineId>,
    /// The most machines to return.
    pub limit: usize,
    /// Only this phase.
    pub phase: Option<Phase>,
    /// Only this effective state.
    pub effective_state: Option<EffectiveState>,
    /// Only machines whose labels match.
    pub selector: LabelSelector,
    /// Only the machines the caller may see.
    pub scope: Scope,
}

/// The machines a caller may see or act on: all of them, or those whose labels match any
/// of a list of selectors (a principal's scoped grants).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every machine.
    #[default]
    All,
    /// The machines any of these selectors matches; none when the list is empty.
    AnyOf(Vec<LabelSelector>),
}

impl Scope {
    /// True when a machine with `labels` is in the scope.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Scope::All => true,
            Scope::AnyOf(selectors) => selectors.iter().any(|s| s.matches(labels)),
        }
    }

    /// True for [`Scope::All`].
    pub fn is_all(&self) -> bool {
        matches!(self, Scope::All)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::All => f.write_str("all machines"),
            Scope::AnyOf(s) if s.is_empty() => f.write_str("no machine"),
            Scope::AnyOf(s) => {
                let parts: Vec<String> = s.iter().map(ToString::to_string).collect();
                f.write_str(&parts.join(" or "))
            }
        }
    }
}

/// Which operations to list (newest first), and where to start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationQuery {
    /// Start before this id (the last id of the previous page).
    pub before: Option<OperationId>,
    /// The most operations to return.
    pub limit: usize,
    /// Only this machine's.
    pub machine_id: Option<MachineId>,
    /// Only this type.
    pub op_type: Option<OperationType>,
    /// Only this phase.
    pub phase: Option<OperationPhase>,
    /// Only operations of the machines the caller may see.
    pub scope: Scope,
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in listing order.
    pub items: Vec<T>,
    /// True when more items match after the last one.
    pub more: bool,
}

/// A request to start an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperationRequest {
    /// The machine.
    pub machine_id: MachineId,
    /// What to do.
    pub op_type: OperationType,
    /// The client's idempotency key.
    pub request_id: RequestId,
    /// A note for the audit trail.
    pub note: String,
    /// Who asks; stored as the operation's `requested_by`.
    pub requested_by: Actor,
}

/// What [`crate::Engine::submit`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The operation: the new one, or the one the request id was first used for.
    pub operation: Operation,
    /// False when the request id had been used before and nothing was created.
    pub created: bool,
}

/// A request to cancel an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelRequest {
    /// The operation.
    pub operation_id: OperationId,
    /// Who asks; stored as the operation's `canceled_by` (by the first request).
    pub requested_by: Actor,
}

/// Which events to watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this machine's.
    pub machine_id: Option<MachineId>,
    /// Only this operation's.
    pub operation_id: Option<OperationId>,
}

impl EventFilter {
    /// True when `event` passes the filter.
    pub fn matches(&self, event: &OperationEvent) -> bool {
        self.machine_id
            .as_ref()
            .is_none_or(|m| *m == event.machine_id)
            && self.operation_id.is_none_or(|o| o == event.operation_id)
    }

    pub(crate) fn to_store(&self) -> bm_store::EventFilter {
        bm_store::EventFilter {
            machine_id: self.machine_id.clone(),
            operation_id: self.operation_id,
        }
    }
}

impl MachineQuery {
    pub(crate) fn to_store(&self) -> bm_store::MachineQuery {
        bm_store::MachineQuery {
            after: self.after.clone(),
            limit: self.limit,
            phase: self.phase,
            effective_state: self.effective_state,
            selector: self.selector.clone(),
        }
    }
}

impl OperationQuery {
    pub(crate) fn to_store(&self) -> bm_store::OperationQuery {
        bm_store::OperationQuery {
            before: self.before,
            limit: self.limit,
            machine_id: self.machine_id.clone(),
            op_type: self.op_type,
            phase: self.phase,
        }
    }
}

impl<T> Page<T> {
    pub(crate) fn from_store(page: bm_store::Page<T>) -> Self {
        Page {
            items: page.items,
            more: page.more,
        }
    }
}

impl ImportOutcome {
    pub(crate) fn from_store(outcome: bm_store::ImportOutcome) -> Self {
        match outcome {
            bm_store::ImportOutcome::Created => ImportOutcome::Created,
            bm_store::ImportOutcome::Unchanged => ImportOutcome::Unchanged,
        }
    }
}

impl Admission {
    pub(crate) fn from_store(admission: bm_store::Admission) -> Self {
        Admission {
            operation: admission.operation,
            created: admission.created,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_domain::{EventKind, Timestamp};

    fn event(machine: &str, op: OperationId) -> OperationEvent {
        OperationEvent {
            revision: 1,
            time: Timestamp::EPOCH,
            operation_id: op,
            machine_id: MachineId::new(machine).unwrap(),
            operation_type: OperationType::Reboot,
            kind: EventKind::Created,
            phase: OperationPhase::Pending,
            stage: String::new(),
            attempt: 0,
            message: String::new(),
        }
    }

    #[test]
    fn an_event_filter_means_the_same_to_the_engine_and_the_store() {
        let (a, b) = (OperationId::from_parts(1, 1), OperationId::from_parts(2, 2));
        let m1 = MachineId::new("m-1").unwrap();
        let filters = [
            EventFilter::default(),
            EventFilter {
                machine_id: Some(m1.clone()),
                operation_id: None,
            },
            EventFilter {
                machine_id: None,
                operation_id: Some(a),
            },
            EventFilter {
                machine_id: Some(m1),
                operation_id: Some(b),
            },
        ];
        let events = [event("m-1", a), event("m-1", b), event("m-2", a)];
        let mut matched = 0;
        for f in &filters {
            for e in &events {
                assert_eq!(f.matches(e), f.to_store().matches(e), "{f:?} on {e:?}");
                matched += usize::from(f.matches(e));
            }
        }
        // Everything, m-1's two, a's two, and the one of m-1 and b.
        assert_eq!(matched, 3 + 2 + 2 + 1);
    }

    #[test]
    fn queries_keep_every_field_on_their_way_to_the_store() {
        let q = MachineQuery {
            after: Some(MachineId::new("m-1").unwrap()),
            limit: 7,
            phase: Some(Phase::Maintenance),
            effective_state: Some(EffectiveState::Busy),
            selector: "rack=r1".parse().unwrap(),
            scope: Scope::All,
        };
        let s = q.to_store();
        assert_eq!(
            (s.after, s.limit, s.phase, s.effective_state, s.selector),
            (q.after, 7, q.phase, q.effective_state, q.selector)
        );
        let q = OperationQuery {
            before: Some(OperationId::from_parts(3, 3)),
            limit: 9,
            machine_id: Some(MachineId::new("m-2").unwrap()),
            op_type: Some(OperationType::Upgrade),
            phase: Some(OperationPhase::Failed),
            scope: Scope::All,
        };
        let s = q.to_store();
        assert_eq!(
            (s.before, s.limit, s.machine_id, s.op_type, s.phase),
            (q.before, 9, q.machine_id.clone(), q.op_type, q.phase)
        );
    }
}
