//! Operations: one lifecycle action on one machine, with the audit record of its stages.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Actor, DomainError, MachineId, OperationId, RequestId, RolloutId, Timestamp};

/// What an operation does to a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperationType {
    /// Netboot, write the spec's image, join the target cluster, verify. MAINTENANCE only.
    Reimage,
    /// Power-cycle the machine. READY or MAINTENANCE.
    Reboot,
    /// Drain the node and take the machine aside: phase becomes MAINTENANCE.
    EnterMaintenance,
    /// Uncordon the node and return the machine to service: phase becomes READY.
    ExitMaintenance,
    /// Drain, wipe, open a repair ticket: ends with condition RMA (blocked).
    Rma,
    /// Drain, wipe, power off: ends with condition Retired (blocked).
    Retire,
    /// Drain, then reimage with the spec's (new) image. MAINTENANCE only.
    Upgrade,
    /// Apply the spec's network configuration and verify connectivity. MAINTENANCE only.
    NetReconfig,
    /// Record that a person fixed what made an operation fail: clears NeedsIntervention.
    ClearIntervention,
    /// Take back a machine that returned from RMA (or was retired by mistake): clears RMA
    /// and Retired and starts it over as FACTORY_READY.
    Readmit,
}

impl OperationType {
    /// Every operation type.
    pub const ALL: [OperationType; 10] = [
        OperationType::Reimage,
        OperationType::Reboot,
        OperationType::EnterMaintenance,
        OperationType::ExitMaintenance,
        OperationType::Rma,
        OperationType::Retire,
        OperationType::Upgrade,
        OperationType::NetReconfig,
        OperationType::ClearIntervention,
        OperationType::Readmit,
    ];

    /// The name as the API writes it, e.g. `ENTER_MAINTENANCE`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationType::Reimage => "REIMAGE",
            OperationType::Reboot => "REBOOT",
            OperationType::EnterMaintenance => "ENTER_MAINTENANCE",
            OperationType::ExitMaintenance => "EXIT_MAINTENANCE",
            OperationType::Rma => "RMA",
            OperationType::Retire => "RETIRE",
            OperationType::Upgrade => "UPGRADE",
            OperationType::NetReconfig => "NET_RECONFIG",
            OperationType::ClearIntervention => "CLEAR_INTERVENTION",
            OperationType::Readmit => "READMIT",
        }
    }
}

impl fmt::Display for OperationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OperationType {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OperationType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| DomainError::invalid("operation type", s, "unknown operation type"))
    }
}

/// Where an operation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperationPhase {
    /// Admitted, not yet picked up by an executor.
    Pending,
    /// An executor is running its stages.
    Running,
    /// Every stage succeeded and its effects were applied.
    Succeeded,
    /// A stage failed after its retries; the machine needs intervention.
    Failed,
    /// An operator canceled it.
    Canceled,
}

impl OperationPhase {
    /// Every phase.
    pub const ALL: [OperationPhase; 5] = [
        OperationPhase::Pending,
        OperationPhase::Running,
        OperationPhase::Succeeded,
        OperationPhase::Failed,
        OperationPhase::Canceled,
    ];

    /// Pending or running: the operation holds its machine.
    pub fn is_active(self) -> bool {
        matches!(self, OperationPhase::Pending | OperationPhase::Running)
    }

    /// The name as the API writes it, e.g. `SUCCEEDED`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationPhase::Pending => "PENDING",
            OperationPhase::Running => "RUNNING",
            OperationPhase::Succeeded => "SUCCEEDED",
            OperationPhase::Failed => "FAILED",
            OperationPhase::Canceled => "CANCELED",
        }
    }
}

impl fmt::Display for OperationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OperationPhase {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OperationPhase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| DomainError::invalid("operation phase", s, "unknown operation phase"))
    }
}

/// How a stage went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StageOutcome {
    /// Started and not yet ended (or interrupted, until the operation resumes).
    Running,
    /// Done.
    Succeeded,
    /// Failed after its retries; the operation failed with it.
    Failed,
    /// Stopped by a cancel.
    Canceled,
}

/// The audit record of one stage of an operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The stage's name, e.g. `repave-image`.
    pub name: String,
    /// How it went.
    pub outcome: StageOutcome,
    /// How many of its attempts reached the provider (first run, retries and resumptions).
    /// An attempt whose start was committed but which a stop or a cancel overtook before the
    /// provider was called is taken back (see [`Operation::withdraw_attempt`]), so a stage
    /// can show 0.
    pub attempts: u32,
    /// How many of those attempts were cut short by a crash of the server (or a stop that
    /// could not wait for them).
    pub interruptions: u32,
    /// The server stopped gracefully while this stage ran; the next start runs it again
    /// without counting an interruption.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
    /// When it first started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// The error of its last failed attempt.
    pub last_error: Option<String>,
}

/// One lifecycle action on one machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Its id (a ULID: ids sort by creation time).
    pub id: OperationId,
    /// The machine it acts on.
    pub machine_id: MachineId,
    /// What it does.
    #[serde(rename = "type")]
    pub op_type: OperationType,
    /// Where it is in its life.
    pub phase: OperationPhase,
    /// The client's idempotency key, unique per machine.
    pub request_id: RequestId,
    /// A free-form note from the operator for the audit trail (e.g. a ticket number).
    pub note: String,
    /// The stage running now, or the last one that ran; empty before the first.
    pub current_stage: String,
    /// The stages that have started, in order.
    pub stages: Vec<StageRecord>,
    /// When it was admitted.
    pub created_at: Timestamp,
    /// When an executor first started it.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// Why it failed or was canceled.
    pub error: Option<String>,
    /// An operator asked to cancel it; the executor stops at the next opportunity.
    pub cancel_requested: bool,
    /// Who asked for it. Records from before the audit trail read as unknown.
    #[serde(default, skip_serializing_if = "Actor::is_unknown")]
    pub requested_by: Actor,
    /// Who first asked to cancel it; unknown when nobody did (or before the audit trail).
    #[serde(default, skip_serializing_if = "Actor::is_unknown")]
    pub canceled_by: Actor,
    /// The trace context of the request that admitted it (a W3C `traceparent`), when the
    /// server exports traces: every run of the operation, also one that resumes it after a
    /// restart, is traced as a child of that request. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    /// The rollout that started it, when one did (its request id is then derived from the
    /// rollout's). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<RolloutId>,
}

impl Operation {
    /// The longest accepted note, in bytes.
    pub const MAX_NOTE: usize = 1024;

    /// A new, pending operation.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] if the note is too long.
    pub fn new(
        id: OperationId,
        machine_id: MachineId,
        op_type: OperationType,
        request_id: RequestId,
        note: String,
        now: Timestamp,
    ) -> Result<Self, DomainError> {
        if note.len() > Self::MAX_NOTE {
            return Err(DomainError::invalid(
                "note",
                &note,
                format!("must be at most {} bytes", Self::MAX_NOTE),
            ));
        }
        Ok(Operation {
            id,
            machine_id,
            op_type,
            phase: OperationPhase::Pending,
            request_id,
            note,
            current_stage: String::new(),
            stages: Vec::new(),
            created_at: now,
            started_at: None,
            finished_at: None,
            error: None,
            cancel_requested: false,
            requested_by: Actor::default(),
            canceled_by: Actor::default(),
            trace_parent: None,
            rollout_id: None,
        })
    }

    /// The trace id of [`Operation::trace_parent`] (its 32 hex digits), when it has a
    /// well-formed one that is sampled (exported: a tracing backend has it).
    pub fn trace_id(&self) -> Option<&str> {
        // version "-" trace-id "-" parent-id "-" flags (W3C Trace Context, level 1)
        let mut parts = self.trace_parent.as_deref()?.split('-');
        let (_version, id) = (parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        let parent = parts.next()?;
        let flags = parts.next()?;
        let sampled = hex(flags, 2) && u8::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1);
        (hex(id, 32) && id.bytes().any(|b| b != b'0') && hex(parent, 16) && sampled).then_some(id)
    }

    /// Pending or running.
    pub fn is_active(&self) -> bool {
        self.phase.is_active()
    }

    /// The error for an attempt to act on an operation that has ended.
    fn ended_error(&self) -> DomainError {
        DomainError::AlreadyEnded {
            operation_id: self.id,
            phase: self.phase,
        }
    }

    /// Marks the operation running (an executor picked it up). Starting a running
    /// operation again, as a resumption does, keeps its first start time.
    ///
    /// # Errors
    ///
    /// [`DomainError::AlreadyEnded`] if it has ended.
    pub fn start(&mut self, now: Timestamp) -> Result<(), DomainError> {
        if !self.is_active() {
            return Err(self.ended_error());
        }
        self.phase = OperationPhase::Running;
        self.started_at.get_or_insert(now);
        Ok(())
    }

    /// Records that `by` asked for a cancel; asking again changes nothing (the first
    /// asker stays its `canceled_by`).
    ///
    /// # Errors
    ///
    /// [`DomainError::AlreadyEnded`] if it has ended: there is nothing left to cancel.
    pub fn request_cancel(&mut self, by: Actor) -> Result<(), DomainError> {
        if !self.is_active() {
            return Err(self.ended_error());
        }
        if !self.cancel_requested {
            self.canceled_by = by;
        }
        self.cancel_requested = true;
        Ok(())
    }

    /// Records the start of an attempt at a stage. A stage that is already the last one
    /// and has not succeeded (a retry, or a resumption after an interruption) counts
    /// another attempt on the same record.
    pub fn begin_stage(&mut self, name: &str, now: Timestamp) {
        self.current_stage = name.to_owned();
        match self.stages.last_mut() {
            Some(last) if last.name == name && last.outcome != StageOutcome::Succeeded => {
                if last.attempts == 0 {
                    // Its only start was taken back: this is its first real start.
                    last.started_at = now;
                }
                last.attempts += 1;
                last.outcome = StageOutcome::Running;
                last.finished_at = None;
                last.released = false;
            }
            _ => self.stages.push(StageRecord {
                name: name.to_owned(),
                outcome: StageOutcome::Running,
                attempts: 1,
                interruptions: 0,
                released: false,
                started_at: now,
                finished_at: None,
                last_error: None,
            }),
        }
    }

    /// The stage that was running when its executor stopped, if any, after counting the
    /// interruption on its record, and whether a crash cut it off: a stage released by a
    /// graceful stop is not counted as interrupted, one cut off by a crash is.
    pub fn mark_interrupted(&mut self) -> Option<(&StageRecord, bool)> {
        let last = self.stages.last_mut()?;
        if last.outcome != StageOutcome::Running {
            return None;
        }
        let crashed = !last.released;
        if crashed {
            last.interruptions += 1;
        } else {
            last.released = false;
        }
        Some((last, crashed))
    }

    /// Takes back the start of the running stage's current attempt: its start was recorded
    /// but the executor stopped (a shutdown or a cancel) before the provider was called, so
    /// the attempt does not count. The record stays (its start was reported) and the next
    /// [`Operation::begin_stage`] counts the attempt that does run.
    pub fn withdraw_attempt(&mut self) {
        if let Some(last) = self.stages.last_mut()
            && last.outcome == StageOutcome::Running
        {
            last.attempts = last.attempts.saturating_sub(1);
        }
    }

    /// Records that a graceful stop of the server cut the running stage short; the next
    /// start runs it again without counting an interruption.
    pub fn release_stage(&mut self) {
        if let Some(last) = self.stages.last_mut()
            && last.outcome == StageOutcome::Running
        {
            last.released = true;
        }
    }

    /// Records a failed attempt of the current stage that will be retried.
    pub fn stage_attempt_failed(&mut self, error: &str) {
        if let Some(last) = self.stages.last_mut() {
            last.last_error = Some(error.to_owned());
        }
    }

    /// Ends the current stage with `outcome`.
    pub fn end_stage(&mut self, outcome: StageOutcome, error: Option<&str>, now: Timestamp) {
        if let Some(last) = self.stages.last_mut()
            && last.outcome == StageOutcome::Running
        {
            last.outcome = outcome;
            last.finished_at = Some(now);
            if let Some(e) = error {
                last.last_error = Some(e.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Operation {
        Operation::new(
            OperationId::from_parts(1, 1),
            MachineId::new("m-1").unwrap(),
            OperationType::Reimage,
            RequestId::new("r-1").unwrap(),
            String::new(),
            Timestamp::EPOCH,
        )
        .unwrap()
    }

    #[test]
    fn the_trace_id_is_read_from_a_well_formed_trace_parent_only() {
        let mut o = op();
        assert_eq!(o.trace_id(), None);
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        for (parent, expected) in [
            (format!("00-{id}-00f067aa0ba902b7-01"), Some(id)),
            (format!("00-{id}-00f067aa0ba902b7-03"), Some(id)),
            // Not sampled: no backend has it.
            (format!("00-{id}-00f067aa0ba902b7-00"), None),
            (format!("00-{id}-00f067aa0ba902b7"), None),
            (format!("00-{id}-00f067aa0ba902-01"), None),
            (format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)), None),
            (format!("00-{}x-00f067aa0ba902b7-01", &id[1..]), None),
            (String::new(), None),
        ] {
            o.trace_parent = Some(parent.clone());
            assert_eq!(o.trace_id(), expected, "{parent}");
        }
    }

    #[test]
    fn retries_and_resumptions_count_on_one_record() {
        let mut o = op();
        let t = Timestamp::from_unix_micros;
        o.start(t(1)).unwrap();
        o.begin_stage("set-netboot", t(1));
        o.end_stage(StageOutcome::Succeeded, None, t(2));
        o.begin_stage("repave-image", t(3));
        o.stage_attempt_failed("disk busy");
        o.begin_stage("repave-image", t(4));
        assert_eq!(
            o.mark_interrupted()
                .map(|(s, crashed)| (s.interruptions, crashed)),
            Some((1, true))
        );
        o.begin_stage("repave-image", t(5));
        o.end_stage(StageOutcome::Succeeded, None, t(6));
        assert_eq!(o.stages.len(), 2);
        let r = &o.stages[1];
        assert_eq!((r.attempts, r.interruptions), (3, 1));
        assert_eq!(r.started_at, t(3));
        assert_eq!(r.last_error.as_deref(), Some("disk busy"));
        assert_eq!(
            o.stages
                .iter()
                .filter(|s| s.outcome == StageOutcome::Succeeded)
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["set-netboot", "repave-image"]
        );
        assert!(o.mark_interrupted().is_none());
    }

    #[test]
    fn a_withdrawn_attempt_does_not_count() {
        let mut o = op();
        let t = Timestamp::from_unix_micros;
        o.start(t(1)).unwrap();
        // The first start of a stage is taken back: a stop came before the provider ran.
        o.begin_stage("set-netboot", t(1));
        o.withdraw_attempt();
        o.release_stage();
        assert_eq!(o.stages[0].attempts, 0);
        assert_eq!(
            o.mark_interrupted()
                .map(|(s, crashed)| (s.interruptions, crashed)),
            Some((0, false)),
            "a released stage is no crash"
        );
        o.begin_stage("set-netboot", t(5));
        let r = &o.stages[0];
        assert_eq!((r.attempts, r.interruptions), (1, 0));
        assert_eq!(r.started_at, t(5), "it first ran at the resumption");
        // A later attempt taken back leaves the earlier ones and the first start alone.
        o.stage_attempt_failed("timeout");
        o.begin_stage("set-netboot", t(7));
        o.withdraw_attempt();
        assert_eq!((o.stages[0].attempts, o.stages[0].started_at), (1, t(5)));
        // Only a running stage has an attempt to take back.
        o.end_stage(StageOutcome::Succeeded, None, t(8));
        o.withdraw_attempt();
        assert_eq!(o.stages[0].attempts, 1);
    }

    #[test]
    fn ended_operations_refuse_cancel_and_start() {
        let mut o = op();
        o.request_cancel(Actor::new("alice", "token")).unwrap();
        o.request_cancel(Actor::new("bob", "token")).unwrap();
        assert_eq!(o.canceled_by, Actor::new("alice", "token"));
        o.phase = OperationPhase::Succeeded;
        let err = o.request_cancel(Actor::default()).unwrap_err().to_string();
        assert!(
            err.contains("already ended") && err.contains("SUCCEEDED"),
            "{err}"
        );
        assert!(o.start(Timestamp::EPOCH).is_err());
    }

    #[test]
    fn notes_are_bounded() {
        let o = op();
        let long = "n".repeat(Operation::MAX_NOTE + 1);
        assert!(
            Operation::new(
                o.id,
                o.machine_id,
                o.op_type,
                o.request_id,
                long,
                Timestamp::EPOCH
            )
            .is_err()
        );
    }
}
