//! What observers see of operations: events (with a global revision) and provider log
//! lines (with a sequence number per operation).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{
    DomainError, MachineId, Operation, OperationId, OperationPhase, OperationType, Timestamp,
};

/// What an [`OperationEvent`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// The operation was admitted.
    Created,
    /// The operation's phase changed (to the event's `phase`).
    PhaseChanged,
    /// An attempt of a stage started.
    StageStarted,
    /// A stage succeeded.
    StageSucceeded,
    /// A stage failed for good.
    StageFailed,
    /// An attempt of a stage failed and the stage will run again.
    StageRetrying,
    /// An operator asked to cancel the operation.
    CancelRequested,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 7] = [
        EventKind::Created,
        EventKind::PhaseChanged,
        EventKind::StageStarted,
        EventKind::StageSucceeded,
        EventKind::StageFailed,
        EventKind::StageRetrying,
        EventKind::CancelRequested,
    ];

    /// The name as the API and the store write it, e.g. `STAGE_STARTED`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "CREATED",
            EventKind::PhaseChanged => "PHASE_CHANGED",
            EventKind::StageStarted => "STAGE_STARTED",
            EventKind::StageSucceeded => "STAGE_SUCCEEDED",
            EventKind::StageFailed => "STAGE_FAILED",
            EventKind::StageRetrying => "STAGE_RETRYING",
            EventKind::CancelRequested => "CANCEL_REQUESTED",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DomainError::invalid("event kind", s, "unknown event kind"))
    }
}

/// One event in the life of an operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationEvent {
    /// Position in the server-wide sequence of events, assigned by the store when the event
    /// is committed; 0 until then.
    pub revision: u64,
    /// When it happened.
    pub time: Timestamp,
    /// The operation.
    pub operation_id: OperationId,
    /// Its machine.
    pub machine_id: MachineId,
    /// Its type.
    pub operation_type: OperationType,
    /// What happened.
    pub kind: EventKind,
    /// The operation's phase after the event.
    pub phase: OperationPhase,
    /// The stage concerned, for stage events.
    pub stage: String,
    /// The attempt of the stage (from 1), for stage events.
    pub attempt: u32,
    /// A detail: an error, or why the phase changed.
    pub message: String,
}

impl OperationEvent {
    /// An event about `op` as it is now, not yet committed (revision 0). Stage events take
    /// the stage and attempt from the operation's last stage record.
    pub fn new(
        op: &Operation,
        kind: EventKind,
        message: impl Into<String>,
        now: Timestamp,
    ) -> Self {
        let stage_event = matches!(
            kind,
            EventKind::StageStarted
                | EventKind::StageSucceeded
                | EventKind::StageFailed
                | EventKind::StageRetrying
        );
        let (stage, attempt) = match op.stages.last() {
            Some(s) if stage_event => (s.name.clone(), s.attempts),
            _ => (String::new(), 0),
        };
        OperationEvent {
            revision: 0,
            time: now,
            operation_id: op.id,
            machine_id: op.machine_id.clone(),
            operation_type: op.op_type,
            kind,
            phase: op.phase,
            stage,
            attempt,
            message: message.into(),
        }
    }

    /// True for the last event of an operation: its phase changed to a terminal one.
    pub fn is_terminal(&self) -> bool {
        self.kind == EventKind::PhaseChanged && !self.phase.is_active()
    }
}

/// One line a provider logged while an operation ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The operation.
    pub operation_id: OperationId,
    /// The line's number within its operation, from 1, increasing (a line lost to a failure
    /// of the storage leaves a gap).
    pub sequence: u64,
    /// When it was logged.
    pub time: Timestamp,
    /// The stage that was running.
    pub stage: String,
    /// The provider's tag for its action, e.g. `repave`.
    pub tag: String,
    /// The text.
    pub message: String,
}

/// What a [`MachineEvent`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MachineEventKind {
    /// The machine's power state changed with no operation in between (seen by the status
    /// poll): someone at the console, a power failure, a BMC watchdog.
    PowerChanged,
}

impl MachineEventKind {
    /// Every kind.
    pub const ALL: [MachineEventKind; 1] = [MachineEventKind::PowerChanged];

    /// The name as the API and the store write it, e.g. `POWER_CHANGED`.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineEventKind::PowerChanged => "POWER_CHANGED",
        }
    }
}

impl fmt::Display for MachineEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MachineEventKind {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MachineEventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DomainError::invalid("machine event kind", s, "unknown kind"))
    }
}

/// Something that happened to a machine outside any operation, recorded for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineEvent {
    /// Its number among the machine's events, from 1, assigned by the store when it is
    /// committed; 0 until then.
    pub sequence: u64,
    /// When it was seen.
    pub time: Timestamp,
    /// The machine.
    pub machine_id: MachineId,
    /// What happened.
    pub kind: MachineEventKind,
    /// For people: what was seen.
    pub message: String,
}
