//! Rollouts: one kind of work over many machines, batch after batch, within a failure
//! budget.
//!
//! A [`Rollout`] holds the machines it targets, fixed when it was created, and what has
//! happened to each. [`Rollout::advance`] is its whole policy: given the time and the
//! machines' effective states, it says which operations to start now, skips the machines
//! that are not fit when their turn comes, opens the next batch after the soak time, and
//! moves the rollout's phase. Each start carries a request id derived from the rollout and
//! the step, so that a start asked for twice (after a crash, by two replicas) is one
//! operation. The caller performs the starts and reports back: [`Rollout::started`],
//! [`Rollout::refused`] and [`Rollout::ended`].
//!
//! Like the rest of the domain, nothing here reads a clock or does IO: time comes in as a
//! [`Timestamp`], which is what lets tests run a soak of an hour in no time.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::{
    Actor, DomainError, EffectiveState, Labels, MachineId, OperationId, OperationType, RequestId,
    Timestamp,
};

/// The id of a rollout: a ULID, written `ro-<ULID>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RolloutId(Ulid);

impl RolloutId {
    const PREFIX: &'static str = "ro-";

    /// An id from its parts: milliseconds since the Unix epoch and 80 random bits (the
    /// caller owns the clock and the randomness).
    pub fn from_parts(unix_millis: u64, random: u128) -> Self {
        RolloutId(Ulid::from_parts(unix_millis, random))
    }
}

impl fmt::Display for RolloutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.0)
    }
}

impl FromStr for RolloutId {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::ids::prefixed_ulid(s, Self::PREFIX, "rollout id").map(RolloutId)
    }
}

impl TryFrom<String> for RolloutId {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RolloutId> for String {
    fn from(id: RolloutId) -> String {
        id.to_string()
    }
}

/// What a rollout does to each machine: one operation, or a sequence run as one step of the
/// rollout (the machine keeps its place in flight from the first operation to the last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RolloutAction {
    /// One operation per machine.
    Operation(OperationType),
    /// Enter maintenance, reimage, exit maintenance: a machine in service comes back to
    /// service with its image written again.
    MaintenanceReimage,
}

impl RolloutAction {
    /// The operations this action runs on a machine, in order.
    pub fn steps(self) -> Vec<OperationType> {
        match self {
            RolloutAction::Operation(op) => vec![op],
            RolloutAction::MaintenanceReimage => vec![
                OperationType::EnterMaintenance,
                OperationType::Reimage,
                OperationType::ExitMaintenance,
            ],
        }
    }

    /// The operation types a rollout may run one of: the routine ones. RMA, retirement and
    /// the repairs are decisions about one machine, not a fleet.
    pub const OPERATIONS: [OperationType; 6] = [
        OperationType::Reimage,
        OperationType::Upgrade,
        OperationType::Reboot,
        OperationType::NetReconfig,
        OperationType::EnterMaintenance,
        OperationType::ExitMaintenance,
    ];
}

/// A number of machines, given as a count or as a share of the rollout's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// This many machines.
    Machines(u32),
    /// This percentage (1 to 100) of the target's machines, rounded up.
    Percent(u32),
}

impl Amount {
    /// The number of machines this is out of `total`: at least 1.
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            Amount::Machines(n) => n as usize,
            Amount::Percent(p) => (total * p as usize).div_ceil(100),
        };
        n.max(1)
    }

    fn check(self, field: &'static str) -> Result<(), DomainError> {
        match self {
            Amount::Machines(0) => Err(DomainError::invalid(
                field,
                "0",
                "must be at least 1 machine (or a percentage from 1% to 100%)",
            )),
            Amount::Percent(p) if !(1..=100).contains(&p) => Err(DomainError::invalid(
                field,
                &format!("{p}%"),
                "a percentage must be from 1% to 100%",
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Machines(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for Amount {
    type Err = DomainError;
    /// `5` or `10%`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            DomainError::invalid(
                "amount",
                s,
                "expected a number of machines (5) or a percentage (10%)",
            )
        };
        let amount = match s.trim().strip_suffix('%') {
            Some(p) => Amount::Percent(p.trim().parse().map_err(|_| bad())?),
            None => Amount::Machines(s.trim().parse().map_err(|_| bad())?),
        };
        amount.check("amount")?;
        Ok(amount)
    }
}

/// What to do with a machine that is BLOCKED, ATTENTION or BUSY when its turn comes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WhenBusy {
    /// Skip it, with the reason recorded.
    #[default]
    Skip,
    /// Leave it waiting (BUSY or ATTENTION; a BLOCKED one is skipped all the same), and start
    /// it once it is fit; its batch stays open meanwhile.
    Wait,
}

/// How a rollout runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// What it does to each machine.
    pub action: RolloutAction,
    /// The most machines with work in flight at once.
    pub max_in_flight: Amount,
    /// The failures that stop it: when this many machines failed, no new machine starts.
    pub failure_budget: Amount,
    /// A label whose values make the batches, in the values' order (one rack at a time);
    /// machines without it come last, together. `None`: one batch.
    pub batch_by: Option<String>,
    /// How long to wait after a batch ends before the next one starts.
    #[serde(with = "micros")]
    pub soak: Duration,
    /// Machines that are not fit when their turn comes.
    pub when_busy: WhenBusy,
}

impl RolloutSpec {
    /// Checks what the caller could get wrong.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] naming the field and what would be accepted.
    pub fn validate(&self) -> Result<(), DomainError> {
        if let RolloutAction::Operation(op) = self.action
            && !RolloutAction::OPERATIONS.contains(&op)
        {
            return Err(DomainError::invalid(
                "rollout operation",
                &op.to_string(),
                "a rollout runs REIMAGE, UPGRADE, REBOOT, NET_RECONFIG, ENTER_MAINTENANCE or EXIT_MAINTENANCE (or the maintenance-reimage sequence); RMA, retirement and repairs are done machine by machine",
            ));
        }
        self.max_in_flight.check("max in flight")?;
        self.failure_budget.check("failure budget")?;
        if let Some(key) = &self.batch_by {
            Labels::validate_key(key)?;
        }
        Ok(())
    }
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RolloutPhase {
    /// Starting machines as the limits allow.
    Running,
    /// Starting nothing new; what runs finishes.
    Paused,
    /// The failure budget is spent: starting nothing new, waiting for what runs.
    Stopping,
    /// Aborted: the running operations were asked to cancel, and are awaited.
    Aborting,
    /// Every machine was done or skipped, within the budget.
    Succeeded,
    /// The failure budget was spent.
    Failed,
    /// Aborted, and nothing runs any more.
    Aborted,
}

impl RolloutPhase {
    /// Whether the rollout has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutPhase::Succeeded | RolloutPhase::Failed | RolloutPhase::Aborted
        )
    }
}

impl RolloutPhase {
    /// The name, as stored and shown: `RUNNING`, `PAUSED`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Running => "RUNNING",
            RolloutPhase::Paused => "PAUSED",
            RolloutPhase::Stopping => "STOPPING",
            RolloutPhase::Aborting => "ABORTING",
            RolloutPhase::Succeeded => "SUCCEEDED",
            RolloutPhase::Failed => "FAILED",
            RolloutPhase::Aborted => "ABORTED",
        }
    }
}

impl fmt::Display for RolloutPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What has happened to one machine of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Progress {
    /// Its turn has not come (or it waits to be fit, with [`WhenBusy::Wait`]).
    Pending,
    /// It holds a place in flight, at `step` of the action; `operation` is that step's
    /// operation once it was started (`None`: to be started).
    Active {
        /// The index of the step in [`RolloutAction::steps`].
        step: u32,
        /// The step's operation, once started.
        operation: Option<OperationId>,
    },
    /// Every step succeeded.
    Succeeded,
    /// A step failed (or was canceled by someone); it counts against the budget.
    Failed {
        /// The step that failed.
        step: u32,
        /// Why.
        error: String,
    },
    /// Not done, and not counted as a failure: it was not fit when its turn came, the
    /// server refused its first operation, or the rollout stopped before its next step.
    Skipped {
        /// Why, for the operator.
        reason: String,
    },
    /// Its operation was canceled by the rollout's abort.
    Canceled {
        /// The step that was canceled.
        step: u32,
    },
}

impl Progress {
    /// Whether nothing more will happen to the machine in this rollout.
    pub fn is_done(&self) -> bool {
        !matches!(self, Progress::Pending | Progress::Active { .. })
    }
}

/// One machine of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutMachine {
    /// The machine.
    pub machine_id: MachineId,
    /// The index of its batch in [`Rollout::batches`].
    pub batch: u32,
    /// What has happened to it.
    pub progress: Progress,
    /// The operations the rollout started on it, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<OperationId>,
}

/// What the caller of [`Rollout::advance`] knows of a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Its effective state now.
    State(EffectiveState),
    /// It no longer exists.
    Gone,
    /// It runs (or ran) this operation, which this rollout started for its first step
    /// without recording it: it is adopted, not started again nor judged unfit.
    Started(OperationId),
    /// Not read: admission waits for the next call.
    NotRead,
}

/// An operation to start now, as [`Rollout::advance`] asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// The machine.
    pub machine_id: MachineId,
    /// The step of the action.
    pub step: u32,
    /// The operation to start.
    pub operation: OperationType,
    /// Its request id: the same for the same rollout, machine and step, so that a start
    /// asked for twice is one operation.
    pub request_id: RequestId,
}

/// How an operation of a rollout ended, as [`Rollout::ended`] is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It succeeded.
    Succeeded,
    /// It failed, with the operation's error.
    Failed(String),
    /// It was canceled (by the rollout's abort, or by someone).
    Canceled,
}

/// Counts of a rollout's machines by what happened to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutCounts {
    /// Not started yet.
    pub pending: u32,
    /// With work in flight.
    pub active: u32,
    /// Done.
    pub succeeded: u32,
    /// Failed (against the budget).
    pub failed: u32,
    /// Skipped.
    pub skipped: u32,
    /// Canceled by an abort.
    pub canceled: u32,
}

/// A rollout: its spec, its fixed machines in batches, and where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Its id.
    pub id: RolloutId,
    /// The request id it was created with (creation is idempotent by it).
    pub request_id: RequestId,
    /// How it runs.
    pub spec: RolloutSpec,
    /// Where it is.
    pub phase: RolloutPhase,
    /// The batches' label values, in order (`""`: machines without the label, or the one
    /// batch when there is no `batch_by`).
    pub batches: Vec<String>,
    /// The batch machines are started from.
    pub batch: u32,
    /// When set, the next batch waits until then (the soak after the previous one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak_until: Option<Timestamp>,
    /// Its machines, batch after batch, by id within a batch.
    pub machines: Vec<RolloutMachine>,
    /// Who created it.
    pub created_by: Actor,
    /// When it was created.
    pub create_time: Timestamp,
    /// When it last changed.
    pub update_time: Timestamp,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Timestamp>,
    /// A note from whoever created it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// What a rollout needs to know of a target machine when it is created.
#[derive(Clone, Debug)]
pub struct Target {
    /// The machine.
    pub machine_id: MachineId,
    /// Its labels, for the batches.
    pub labels: Labels,
}

impl Rollout {
    /// A new rollout over `targets` (the machines its target selected, now), in batches by
    /// the spec's label.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] if the spec is invalid or there is no machine to roll over.
    pub fn new(
        id: RolloutId,
        request_id: RequestId,
        spec: RolloutSpec,
        targets: Vec<Target>,
        created_by: Actor,
        now: Timestamp,
        note: String,
    ) -> Result<Self, DomainError> {
        spec.validate()?;
        if targets.is_empty() {
            return Err(DomainError::invalid(
                "rollout target",
                "",
                "selects no machine: check the label selector, phase, state and machine ids",
            ));
        }
        // Batch value -> machines; machines without the label sort last ("" would sort
        // first, so they are kept apart).
        let mut by_value: BTreeMap<String, Vec<MachineId>> = BTreeMap::new();
        let mut unlabeled = Vec::new();
        for t in targets {
            match spec.batch_by.as_deref().map(|key| t.labels.get(key)) {
                Some(Some(value)) => by_value
                    .entry(value.to_owned())
                    .or_default()
                    .push(t.machine_id),
                Some(None) | None => unlabeled.push(t.machine_id),
            }
        }
        let mut batches = Vec::new();
        let mut machines = Vec::new();
        let mut add = |value: String, mut ids: Vec<MachineId>| {
            ids.sort();
            ids.dedup();
            let batch = batches.len() as u32;
            batches.push(value);
            machines.extend(ids.into_iter().map(|machine_id| RolloutMachine {
                machine_id,
                batch,
                progress: Progress::Pending,
                operations: Vec::new(),
            }));
        };
        for (value, ids) in by_value {
            add(value, ids);
        }
        if !unlabeled.is_empty() {
            add(String::new(), unlabeled);
        }
        Ok(Rollout {
            id,
            request_id,
            spec,
            phase: RolloutPhase::Running,
            batches,
            batch: 0,
            soak_until: None,
            machines,
            created_by,
            create_time: now,
            update_time: now,
            end_time: None,
            note,
        })
    }

    /// The machines by what happened to them.
    pub fn counts(&self) -> RolloutCounts {
        let mut c = RolloutCounts::default();
        for m in &self.machines {
            match m.progress {
                Progress::Pending => c.pending += 1,
                Progress::Active { .. } => c.active += 1,
                Progress::Succeeded => c.succeeded += 1,
                Progress::Failed { .. } => c.failed += 1,
                Progress::Skipped { .. } => c.skipped += 1,
                Progress::Canceled { .. } => c.canceled += 1,
            }
        }
        c
    }

    /// The most machines in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.spec.max_in_flight.of(self.machines.len())
    }

    /// The failures that stop the rollout.
    pub fn failure_limit(&self) -> usize {
        self.spec.failure_budget.of(self.machines.len())
    }

    /// The request id of `step` on `machine`: derived from the rollout, so the same every
    /// time it is asked for.
    pub fn request_id(&self, step: u32) -> RequestId {
        // "ro-", 26 base-32 digits, "." and a number: short, and in the request ids' alphabet.
        RequestId::derived(format!("{}.{step}", self.id))
    }

    /// Moves the rollout on at `now`: which operations to start, given what the caller saw
    /// of each machine ([`Seen`]; admission stops at the first machine it has not read, until
    /// the next call). Machines that are not fit
    /// when their turn comes are skipped (or left waiting, by the spec), the next batch
    /// opens when the current one is done and has soaked, and the phase ends when nothing
    /// is left to do. The caller starts what is returned and reports each with
    /// [`Rollout::started`] or [`Rollout::refused`]; asking again before that returns the
    /// same starts, with the same request ids.
    pub fn advance(&mut self, now: Timestamp, state_of: impl Fn(&MachineId) -> Seen) -> Vec<Start> {
        if self.phase.is_terminal() {
            return Vec::new();
        }
        let steps = self.spec.action.steps();
        let mut starts = Vec::new();
        // Machines in flight whose next step is to be started.
        for i in 0..self.machines.len() {
            let Progress::Active {
                step,
                operation: None,
            } = self.machines[i].progress
            else {
                continue;
            };
            match self.phase {
                RolloutPhase::Running => starts.push(self.start(i, step, &steps)),
                // Held: it starts on resume.
                RolloutPhase::Paused => {}
                RolloutPhase::Stopping | RolloutPhase::Aborting => {
                    let why = if self.phase == RolloutPhase::Stopping {
                        "the failure budget was spent"
                    } else {
                        "the rollout was aborted"
                    };
                    self.machines[i].progress = Progress::Skipped {
                        reason: format!(
                            "{why} before its step {} ({})",
                            step + 1,
                            steps[step as usize]
                        ),
                    };
                }
                RolloutPhase::Succeeded | RolloutPhase::Failed | RolloutPhase::Aborted => {}
            }
        }
        if self.phase == RolloutPhase::Running {
            self.admit(now, &state_of, &steps, &mut starts);
        }
        self.settle(now);
        starts
    }

    /// Admits pending machines of the current batch while there is room, moving to the next
    /// batch when the current one is done and soaked.
    fn admit(
        &mut self,
        now: Timestamp,
        state_of: &impl Fn(&MachineId) -> Seen,
        steps: &[OperationType],
        starts: &mut Vec<Start>,
    ) {
        let max = self.max_in_flight();
        loop {
            if self.soak_until.is_some_and(|until| now < until) {
                return;
            }
            let mut active = self.counts().active as usize;
            for i in 0..self.machines.len() {
                if active >= max {
                    break;
                }
                let m = &self.machines[i];
                if m.batch != self.batch || m.progress != Progress::Pending {
                    continue;
                }
                match state_of(&m.machine_id) {
                    // Machines start in order: none after one whose state is not known.
                    Seen::NotRead => return,
                    Seen::Gone => {
                        self.machines[i].progress = Progress::Skipped {
                            reason: "the machine no longer exists".into(),
                        };
                    }
                    // Started before, and the record of it lost (a crash, a write that
                    // lost to another): it is this rollout's, in flight.
                    Seen::Started(op) => {
                        let m = &mut self.machines[i];
                        m.progress = Progress::Active {
                            step: 0,
                            operation: Some(op),
                        };
                        if !m.operations.contains(&op) {
                            m.operations.push(op);
                        }
                        active += 1;
                    }
                    // A blocked machine stays blocked until a person acts: never waited for.
                    Seen::State(s @ EffectiveState::Blocked) => {
                        self.machines[i].progress = Progress::Skipped {
                            reason: format!("it was {s} when its turn came"),
                        };
                    }
                    Seen::State(s @ (EffectiveState::Attention | EffectiveState::Busy)) => {
                        if self.spec.when_busy == WhenBusy::Skip {
                            self.machines[i].progress = Progress::Skipped {
                                reason: format!("it was {s} when its turn came"),
                            };
                        }
                    }
                    Seen::State(_) => {
                        starts.push(self.start(i, 0, steps));
                        active += 1;
                    }
                }
            }
            let batch_done = self
                .machines
                .iter()
                .filter(|m| m.batch == self.batch)
                .all(|m| m.progress.is_done());
            if !batch_done || self.batch as usize + 1 >= self.batches.len() {
                return;
            }
            match self.soak_until {
                None if !self.spec.soak.is_zero() => {
                    self.soak_until = Some(now.saturating_add(self.spec.soak));
                }
                _ => {
                    self.soak_until = None;
                    self.batch += 1;
                }
            }
        }
    }

    /// Machine `i` goes in flight at `step`, to be started.
    fn start(&mut self, i: usize, step: u32, steps: &[OperationType]) -> Start {
        self.machines[i].progress = Progress::Active {
            step,
            operation: None,
        };
        Start {
            machine_id: self.machines[i].machine_id.clone(),
            step,
            operation: steps[step as usize],
            request_id: self.request_id(step),
        }
    }

    /// Ends the phase when nothing is left to do.
    fn settle(&mut self, now: Timestamp) {
        let c = self.counts();
        let end = match self.phase {
            RolloutPhase::Stopping if c.active == 0 => Some(RolloutPhase::Failed),
            RolloutPhase::Aborting if c.active == 0 => Some(RolloutPhase::Aborted),
            RolloutPhase::Running | RolloutPhase::Paused if c.active == 0 && c.pending == 0 => {
                Some(RolloutPhase::Succeeded)
            }
            _ => None,
        };
        if let Some(phase) = end {
            self.phase = phase;
            self.end_time = Some(now);
            self.soak_until = None;
        }
    }

    fn active_index(&self, machine: &MachineId, step: u32) -> Option<usize> {
        self.machines.iter().position(|m| {
            m.machine_id == *machine
                && matches!(m.progress, Progress::Active { step: s, .. } if s == step)
        })
    }

    /// `operation` was started (or found, by its request id) for `step` on `machine`. Also
    /// for a machine still pending at step 0: a start that a copy of the rollout made, and
    /// another copy (the one stored when that one's write lost) did not record.
    pub fn started(&mut self, machine: &MachineId, step: u32, operation: OperationId) {
        let pending = || {
            self.machines
                .iter()
                .position(|m| m.machine_id == *machine && m.progress == Progress::Pending)
                .filter(|_| step == 0)
        };
        if let Some(i) = self.active_index(machine, step).or_else(pending) {
            let m = &mut self.machines[i];
            m.progress = Progress::Active {
                step,
                operation: Some(operation),
            };
            if !m.operations.contains(&operation) {
                m.operations.push(operation);
            }
        }
    }

    /// The server refused to start `step` on `machine` (its rules: a wrong phase, a
    /// machine taken by someone else meanwhile). A first step refused is a skip; a later
    /// one is a failure, since the machine was already changed.
    pub fn refused(&mut self, machine: &MachineId, step: u32, reason: String) {
        if let Some(i) = self.active_index(machine, step) {
            self.machines[i].progress = if step == 0 {
                Progress::Skipped {
                    reason: format!("refused: {reason}"),
                }
            } else {
                Progress::Failed {
                    step,
                    error: format!("refused: {reason}"),
                }
            };
            self.spend_budget();
        }
    }

    /// `operation`, one of this rollout's, ended. Returns whether it was one of its
    /// running operations.
    pub fn ended(&mut self, operation: OperationId, how: Ended) -> bool {
        let steps = self.spec.action.steps().len() as u32;
        let Some(m) = self.machines.iter_mut().find(
            |m| matches!(m.progress, Progress::Active { operation: Some(o), .. } if o == operation),
        ) else {
            return false;
        };
        let Progress::Active { step, .. } = m.progress else {
            return false;
        };
        m.progress = match how {
            Ended::Succeeded if step + 1 < steps => Progress::Active {
                step: step + 1,
                operation: None,
            },
            Ended::Succeeded => Progress::Succeeded,
            Ended::Failed(error) => Progress::Failed { step, error },
            Ended::Canceled if self.phase == RolloutPhase::Aborting => Progress::Canceled { step },
            Ended::Canceled => Progress::Failed {
                step,
                error: "its operation was canceled".into(),
            },
        };
        self.spend_budget();
        true
    }

    /// Stops admitting once the failures reach the budget.
    fn spend_budget(&mut self) {
        let failed = self.counts().failed as usize;
        if failed >= self.failure_limit()
            && matches!(self.phase, RolloutPhase::Running | RolloutPhase::Paused)
        {
            self.phase = RolloutPhase::Stopping;
        }
    }

    /// The machines that failed, with their errors.
    pub fn failures(&self) -> impl Iterator<Item = (&MachineId, &str)> {
        self.machines.iter().filter_map(|m| match &m.progress {
            Progress::Failed { error, .. } => Some((&m.machine_id, error.as_str())),
            _ => None,
        })
    }

    /// The operations of the rollout that are running.
    pub fn running(&self) -> impl Iterator<Item = OperationId> + '_ {
        self.machines.iter().filter_map(|m| match m.progress {
            Progress::Active { operation, .. } => operation,
            _ => None,
        })
    }

    fn refuse(&self, action: &'static str) -> DomainError {
        DomainError::RolloutState {
            rollout_id: self.id,
            phase: self.phase,
            action,
        }
    }

    /// Pauses: nothing new starts (neither a machine nor a machine's next step); what runs
    /// finishes. Pausing a paused rollout does nothing.
    ///
    /// # Errors
    ///
    /// [`DomainError::RolloutState`] unless it is running or paused.
    pub fn pause(&mut self, now: Timestamp) -> Result<(), DomainError> {
        match self.phase {
            RolloutPhase::Running | RolloutPhase::Paused => {
                self.phase = RolloutPhase::Paused;
                self.update_time = now;
                Ok(())
            }
            _ => Err(self.refuse("paused")),
        }
    }

    /// Resumes a paused rollout. Resuming a running one does nothing.
    ///
    /// # Errors
    ///
    /// [`DomainError::RolloutState`] unless it is running or paused.
    pub fn resume(&mut self, now: Timestamp) -> Result<(), DomainError> {
        match self.phase {
            RolloutPhase::Running | RolloutPhase::Paused => {
                self.phase = RolloutPhase::Running;
                self.update_time = now;
                Ok(())
            }
            _ => Err(self.refuse("resumed")),
        }
    }

    /// Aborts: nothing new starts, and the caller cancels the running operations (those of
    /// [`Rollout::running`]). Aborting an aborting rollout does nothing.
    ///
    /// # Errors
    ///
    /// [`DomainError::RolloutState`] if it has ended.
    pub fn abort(&mut self, now: Timestamp) -> Result<(), DomainError> {
        if self.phase.is_terminal() {
            return Err(self.refuse("aborted"));
        }
        self.phase = RolloutPhase::Aborting;
        self.update_time = now;
        Ok(())
    }

    /// The machines whose turn may come at the next [`Rollout::advance`], in order: the
    /// pending ones of the current batch (none while paused, stopping or soaking). The caller
    /// reads their states, as many as it likes, from the first.
    pub fn next_up(&self) -> impl Iterator<Item = &MachineId> + '_ {
        let open = self.phase == RolloutPhase::Running && self.soak_until.is_none();
        self.machines
            .iter()
            .filter(move |m| open && m.batch == self.batch && m.progress == Progress::Pending)
            .map(|m| &m.machine_id)
    }

    /// When [`Rollout::advance`] should be called again if nothing else happens: at the end
    /// of a soak.
    pub fn wake_at(&self) -> Option<Timestamp> {
        if self.phase == RolloutPhase::Running {
            self.soak_until
        } else {
            None
        }
    }
}

/// A [`Duration`] stored as microseconds.
mod micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_micros)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, VecDeque};

    use proptest::prelude::*;

    use super::*;

    const T0: Timestamp = Timestamp::from_unix_micros(1_700_000_000_000_000);

    fn id(i: usize) -> MachineId {
        MachineId::new(format!("m-{i:03}")).unwrap()
    }

    fn spec(action: RolloutAction, in_flight: u32, budget: u32) -> RolloutSpec {
        RolloutSpec {
            action,
            max_in_flight: Amount::Machines(in_flight),
            failure_budget: Amount::Machines(budget),
            batch_by: None,
            soak: Duration::ZERO,
            when_busy: WhenBusy::Skip,
        }
    }

    fn rollout(
        spec: RolloutSpec,
        n: usize,
        rack: impl Fn(usize) -> Option<&'static str>,
    ) -> Rollout {
        let targets = (0..n)
            .map(|i| Target {
                machine_id: id(i),
                labels: match rack(i) {
                    Some(r) => Labels::from_pairs([("rack", r)]).unwrap(),
                    None => Labels::default(),
                },
            })
            .collect();
        Rollout::new(
            RolloutId::from_parts(1, 7),
            RequestId::new("create").unwrap(),
            spec,
            targets,
            Actor::new("op", "test"),
            T0,
            String::new(),
        )
        .unwrap()
    }

    /// A driver that plays the engine: starts what `advance` asks (an operation id per
    /// start), ends running operations in the order `pick` chooses, failing the machines
    /// in `failing`, and records what it saw.
    struct Sim {
        r: Rollout,
        now: Timestamp,
        next_op: u64,
        running: VecDeque<(OperationId, MachineId)>,
        started: Vec<(MachineId, u32, RequestId)>,
        max_seen: usize,
        failing: BTreeSet<MachineId>,
        states: BTreeMap<MachineId, EffectiveState>,
    }

    impl Sim {
        fn new(r: Rollout) -> Self {
            Sim {
                r,
                now: T0,
                next_op: 1,
                running: VecDeque::new(),
                started: Vec::new(),
                max_seen: 0,
                failing: BTreeSet::new(),
                states: BTreeMap::new(),
            }
        }

        fn advance(&mut self) {
            let states = self.states.clone();
            let starts = self.r.advance(self.now, |m| {
                Seen::State(states.get(m).copied().unwrap_or(EffectiveState::Idle))
            });
            for s in starts {
                let op = OperationId::from_parts(1, u128::from(self.next_op));
                self.next_op += 1;
                self.started
                    .push((s.machine_id.clone(), s.step, s.request_id.clone()));
                self.r.started(&s.machine_id, s.step, op);
                self.running.push_back((op, s.machine_id));
            }
            self.max_seen = self.max_seen.max(self.running.len());
            assert!(self.running.len() <= self.r.max_in_flight());
        }

        /// Ends the `k`-th running operation.
        fn end(&mut self, k: usize) {
            let (op, m) = self.running.remove(k).unwrap();
            let how = if self.failing.contains(&m) {
                Ended::Failed("injected".into())
            } else {
                Ended::Succeeded
            };
            assert!(self.r.ended(op, how));
            self.advance();
        }

        fn run(&mut self, mut pick: impl FnMut(usize) -> usize) {
            self.advance();
            while !self.running.is_empty() {
                let k = pick(self.running.len());
                self.end(k);
            }
        }
    }

    #[test]
    fn the_failure_budget_stops_new_machines_and_leaves_the_rest_untouched() {
        let mut sim = Sim::new(rollout(
            spec(RolloutAction::Operation(OperationType::Reboot), 3, 5),
            50,
            |_| None,
        ));
        sim.failing = [3, 7, 11, 15, 19, 23].into_iter().map(id).collect();
        sim.run(|_| 0);
        let r = &sim.r;
        assert_eq!(r.phase, RolloutPhase::Failed);
        let c = r.counts();
        assert!(c.failed == 5 || c.failed == 6, "{c:?}");
        assert_eq!(c.active, 0);
        // Nothing started after the budget was spent: the started machines are a prefix,
        // and the others were never touched.
        let started: BTreeSet<_> = sim.started.iter().map(|(m, ..)| m.clone()).collect();
        let last = started.iter().max().unwrap().clone();
        assert!(last <= id(23 + 2), "started up to {last}");
        for m in &r.machines {
            if !started.contains(&m.machine_id) {
                assert_eq!(m.progress, Progress::Pending, "{}", m.machine_id);
                assert!(m.operations.is_empty());
            }
        }
        assert_eq!(c.pending as usize, 50 - started.len());
        assert_eq!(r.failures().count(), c.failed as usize);
        assert!(r.end_time.is_some());
    }

    #[test]
    fn within_the_budget_a_rollout_succeeds_with_its_failures_listed() {
        let mut sim = Sim::new(rollout(
            spec(RolloutAction::Operation(OperationType::Reboot), 2, 2),
            5,
            |_| None,
        ));
        sim.failing = [id(1)].into();
        sim.run(|_| 0);
        assert_eq!(sim.r.phase, RolloutPhase::Succeeded);
        assert_eq!(
            sim.r.failures().map(|(m, _)| m.clone()).collect::<Vec<_>>(),
            vec![id(1)]
        );
        assert_eq!(sim.r.counts().succeeded, 4);
    }

    proptest! {
        /// Whatever order operations end in, and whatever the limits, no more than the most
        /// in flight run at once, no machine starts a step twice, and the counts add up.
        #[test]
        fn max_in_flight_holds_and_the_counts_add_up(
            n in 1usize..60,
            in_flight in 1u32..10,
            budget in 1u32..10,
            fail_mask in any::<u64>(),
            picks in proptest::collection::vec(any::<usize>(), 200),
            sequence in any::<bool>(),
        ) {
            let action = if sequence { RolloutAction::MaintenanceReimage } else { RolloutAction::Operation(OperationType::Reimage) };
            let mut sim = Sim::new(rollout(spec(action, in_flight, budget), n, |_| None));
            sim.failing = (0..n).filter(|i| fail_mask & (1 << (i % 64)) != 0).map(id).collect();
            let mut picks = picks.into_iter().cycle();
            sim.run(|len| picks.next().unwrap_or(0) % len);
            prop_assert!(sim.max_seen <= in_flight as usize);
            let mut seen = BTreeSet::new();
            for (m, step, request) in &sim.started {
                prop_assert!(seen.insert((m.clone(), *step)), "{m} step {step} started twice");
                prop_assert_eq!(request.as_str(), format!("{}.{step}", sim.r.id));
            }
            let c = sim.r.counts();
            prop_assert_eq!((c.pending + c.active + c.succeeded + c.failed + c.skipped + c.canceled) as usize, n);
            prop_assert!(sim.r.phase.is_terminal());
            prop_assert_eq!(c.active, 0);
            if sim.r.phase == RolloutPhase::Failed {
                prop_assert!(c.failed >= budget);
            } else {
                prop_assert!(c.failed < budget);
                prop_assert_eq!(c.pending, 0);
            }
        }
    }

    #[test]
    fn a_pause_lets_running_operations_finish_and_starts_nothing_until_resumed() {
        let mut sim = Sim::new(rollout(
            spec(RolloutAction::Operation(OperationType::Reboot), 3, 5),
            10,
            |_| None,
        ));
        sim.advance();
        assert_eq!(sim.running.len(), 3);
        sim.r.pause(T0).unwrap();
        sim.end(0);
        sim.end(0);
        sim.end(0);
        assert!(sim.running.is_empty());
        assert_eq!(sim.started.len(), 3);
        assert_eq!(sim.r.phase, RolloutPhase::Paused);
        sim.advance();
        assert_eq!(sim.started.len(), 3, "nothing starts while paused");
        sim.r.resume(T0).unwrap();
        sim.run(|_| 0);
        assert_eq!(sim.r.phase, RolloutPhase::Succeeded);
        assert_eq!(sim.started.len(), 10);
    }

    #[test]
    fn a_pause_holds_a_machine_between_the_steps_of_a_sequence() {
        let mut sim = Sim::new(rollout(
            spec(RolloutAction::MaintenanceReimage, 1, 1),
            2,
            |_| None,
        ));
        sim.advance();
        sim.r.pause(T0).unwrap();
        sim.end(0); // enter-maintenance succeeded
        assert_eq!(
            sim.r.machines[0].progress,
            Progress::Active {
                step: 1,
                operation: None
            }
        );
        assert!(sim.running.is_empty(), "the reimage waits for the resume");
        sim.r.resume(T0).unwrap();
        sim.run(|_| 0);
        let steps: Vec<_> = sim
            .started
            .iter()
            .map(|(m, s, _)| (m.clone(), *s))
            .collect();
        assert_eq!(
            steps,
            vec![
                (id(0), 0),
                (id(0), 1),
                (id(0), 2),
                (id(1), 0),
                (id(1), 1),
                (id(1), 2)
            ]
        );
        assert_eq!(sim.r.phase, RolloutPhase::Succeeded);
    }

    #[test]
    fn a_start_asked_for_again_after_a_crash_has_the_same_request_id() {
        let mut r = rollout(
            spec(RolloutAction::Operation(OperationType::Reboot), 2, 1),
            4,
            |_| None,
        );
        let first = r.advance(T0, |_| Seen::State(EffectiveState::Idle));
        assert_eq!(first.len(), 2);
        // The process dies before it records the starts; the stored rollout is read back.
        let stored: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(stored, r);
        let mut again = stored;
        let second = again.advance(T0, |_| Seen::State(EffectiveState::Idle));
        assert_eq!(first, second);
    }

    #[test]
    fn batches_go_rack_by_rack_and_the_next_waits_for_the_soak() {
        let mut s = spec(RolloutAction::Operation(OperationType::Reboot), 10, 5);
        s.batch_by = Some("rack".into());
        s.soak = Duration::from_secs(3600);
        let racks = |i: usize| [Some("r2"), Some("r1"), None][i % 3];
        let mut sim = Sim::new(rollout(s, 9, racks));
        assert_eq!(
            sim.r.batches,
            vec!["r1".to_owned(), "r2".into(), String::new()]
        );
        sim.advance();
        let racks_started = |sim: &Sim| -> Vec<u32> {
            sim.started
                .iter()
                .map(|(m, ..)| {
                    sim.r
                        .machines
                        .iter()
                        .find(|x| x.machine_id == *m)
                        .unwrap()
                        .batch
                })
                .collect()
        };
        assert_eq!(
            racks_started(&sim),
            vec![0, 0, 0],
            "only rack r1, though 10 may fly"
        );
        while !sim.running.is_empty() {
            sim.end(0);
        }
        assert_eq!(sim.started.len(), 3, "r2 waits for the soak");
        let until = T0.saturating_add(Duration::from_secs(3600));
        assert_eq!(sim.r.wake_at(), Some(until));
        sim.now = Timestamp::from_unix_micros(until.as_unix_micros() - 1);
        sim.advance();
        assert_eq!(sim.started.len(), 3, "one microsecond early");
        sim.now = until;
        sim.advance();
        assert_eq!(racks_started(&sim), vec![0, 0, 0, 1, 1, 1]);
        while !sim.running.is_empty() {
            sim.end(0);
        }
        sim.now = sim.now.saturating_add(Duration::from_secs(3600));
        sim.run(|_| 0);
        assert_eq!(racks_started(&sim), vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(sim.r.phase, RolloutPhase::Succeeded);
    }

    #[test]
    fn machines_that_are_not_fit_are_skipped_with_a_reason_or_waited_for() {
        let mut sim = Sim::new(rollout(
            spec(RolloutAction::Operation(OperationType::Reboot), 5, 5),
            4,
            |_| None,
        ));
        sim.states.insert(id(1), EffectiveState::Attention);
        sim.states.insert(id(2), EffectiveState::Busy);
        sim.run(|_| 0);
        assert_eq!(sim.r.phase, RolloutPhase::Succeeded);
        assert_eq!(
            sim.r.machines[1].progress,
            Progress::Skipped {
                reason: "it was ATTENTION when its turn came".into()
            }
        );
        assert!(
            matches!(&sim.r.machines[2].progress, Progress::Skipped { reason } if reason.contains("BUSY"))
        );
        assert_eq!(sim.started.len(), 2);

        let mut s = spec(RolloutAction::Operation(OperationType::Reboot), 5, 5);
        s.when_busy = WhenBusy::Wait;
        let mut sim = Sim::new(rollout(s, 2, |_| None));
        sim.states.insert(id(1), EffectiveState::Busy);
        sim.run(|_| 0);
        assert_eq!(sim.r.phase, RolloutPhase::Running, "it waits for m-001");
        assert_eq!(sim.r.machines[1].progress, Progress::Pending);
        sim.states.insert(id(1), EffectiveState::Idle);
        sim.run(|_| 0);
        assert_eq!(sim.r.phase, RolloutPhase::Succeeded);
        assert_eq!(sim.started.len(), 2);
    }

    #[test]
    fn the_budget_spent_mid_sequence_stops_the_next_steps() {
        let mut sim = Sim::new(rollout(
            spec(RolloutAction::MaintenanceReimage, 2, 1),
            3,
            |_| None,
        ));
        sim.failing = [id(0)].into();
        sim.advance();
        sim.end(1); // m-001 entered maintenance: its reimage is next
        sim.end(0); // m-000 failed: the budget (1) is spent
        assert_eq!(sim.r.phase, RolloutPhase::Stopping);
        // m-001's reimage had been started before the failure; it finishes, and its exit
        // from maintenance is not started.
        sim.run(|_| 0);
        assert_eq!(sim.r.phase, RolloutPhase::Failed);
        assert!(
            matches!(&sim.r.machines[1].progress, Progress::Skipped { reason } if reason.contains("before its step 3 (EXIT_MAINTENANCE)")),
            "{:?}",
            sim.r.machines[1].progress
        );
        assert_eq!(sim.r.machines[2].progress, Progress::Pending);
    }

    #[test]
    fn an_abort_cancels_what_runs_and_starts_nothing_more() {
        let mut sim = Sim::new(rollout(
            spec(RolloutAction::Operation(OperationType::Reimage), 2, 5),
            5,
            |_| None,
        ));
        sim.advance();
        sim.r.abort(T0).unwrap();
        let running: Vec<_> = sim.r.running().collect();
        assert_eq!(running.len(), 2);
        for op in running {
            assert!(sim.r.ended(op, Ended::Canceled));
        }
        sim.running.clear();
        sim.advance();
        assert_eq!(sim.r.phase, RolloutPhase::Aborted);
        let c = sim.r.counts();
        assert_eq!((c.canceled, c.pending, c.failed), (2, 3, 0));
        assert!(matches!(
            sim.r.pause(T0),
            Err(DomainError::RolloutState { .. })
        ));
        assert!(sim.r.abort(T0).is_err());
    }

    #[test]
    fn a_refused_first_step_is_a_skip_and_a_refused_later_step_a_failure() {
        let mut r = rollout(spec(RolloutAction::MaintenanceReimage, 2, 5), 2, |_| None);
        let starts = r.advance(T0, |_| Seen::State(EffectiveState::Idle));
        r.refused(&starts[0].machine_id, 0, "READY is not allowed".into());
        assert!(
            matches!(&r.machines[0].progress, Progress::Skipped { reason } if reason == "refused: READY is not allowed")
        );
        let op = OperationId::from_parts(1, 1);
        r.started(&starts[1].machine_id, 0, op);
        assert!(r.ended(op, Ended::Succeeded));
        let next = r.advance(T0, |_| Seen::State(EffectiveState::MaintenanceIdle));
        assert_eq!(next[0].step, 1);
        r.refused(&next[0].machine_id, 1, "busy".into());
        assert_eq!(r.counts().failed, 1);
    }

    #[test]
    fn admission_waits_at_the_first_machine_not_read_and_skips_the_gone() {
        let mut r = rollout(
            spec(RolloutAction::Operation(OperationType::Reboot), 10, 5),
            5,
            |_| None,
        );
        assert_eq!(r.next_up().count(), 5);
        let read: BTreeMap<_, _> = [
            (id(0), Seen::State(EffectiveState::Idle)),
            (id(1), Seen::Gone),
        ]
        .into();
        let starts = r.advance(T0, |m| read.get(m).copied().unwrap_or(Seen::NotRead));
        assert_eq!(starts.len(), 1);
        assert!(
            matches!(&r.machines[1].progress, Progress::Skipped { reason } if reason.contains("no longer exists"))
        );
        assert_eq!(
            r.next_up().cloned().collect::<Vec<_>>(),
            vec![id(2), id(3), id(4)]
        );
        assert_eq!(r.phase, RolloutPhase::Running);
        // m-000's start was not reported as done: it is asked for again, with the others.
        let starts = r.advance(T0, |_| Seen::State(EffectiveState::Idle));
        let ids: Vec<_> = starts.iter().map(|s| s.machine_id.clone()).collect();
        assert_eq!(ids, vec![id(0), id(2), id(3), id(4)]);
        r.pause(T0).unwrap();
        assert_eq!(r.next_up().count(), 0);
    }

    #[test]
    fn a_lost_start_is_adopted_and_a_blocked_machine_is_never_waited_for() {
        let mut s = spec(RolloutAction::Operation(OperationType::Reboot), 1, 5);
        s.when_busy = WhenBusy::Wait;
        let mut r = rollout(s, 3, |_| None);
        let op = OperationId::from_parts(1, 9);
        let seen: BTreeMap<_, _> = [
            (id(0), Seen::Started(op)),
            (id(1), Seen::State(EffectiveState::Blocked)),
            (id(2), Seen::State(EffectiveState::Idle)),
        ]
        .into();
        // m-000 runs the rollout's own operation: adopted, it fills the one place in flight.
        let starts = r.advance(T0, |m| seen[m]);
        assert!(starts.is_empty(), "{starts:?}");
        assert_eq!(
            r.machines[0].progress,
            Progress::Active {
                step: 0,
                operation: Some(op)
            }
        );
        assert_eq!(r.running().collect::<Vec<_>>(), vec![op]);
        assert!(r.ended(op, Ended::Succeeded));
        let starts = r.advance(T0, |m| seen[m]);
        assert!(
            matches!(&r.machines[1].progress, Progress::Skipped { reason } if reason.contains("BLOCKED"))
        );
        assert_eq!(starts.len(), 1);
        assert_eq!(starts[0].machine_id, id(2));
    }

    #[test]
    fn amounts_and_specs_say_what_is_wrong() {
        assert_eq!("5".parse::<Amount>().unwrap(), Amount::Machines(5));
        assert_eq!("10%".parse::<Amount>().unwrap(), Amount::Percent(10));
        assert_eq!(Amount::Percent(10).of(10_000), 1_000);
        assert_eq!(Amount::Percent(10).of(5), 1);
        assert_eq!(Amount::Percent(34).of(3), 2);
        for bad in ["0", "0%", "101%", "x", "-1", ""] {
            assert!(
                bad.parse::<Amount>().unwrap_err().is_invalid_input(),
                "{bad}"
            );
        }
        let mut s = spec(RolloutAction::Operation(OperationType::Rma), 1, 1);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("machine by machine")
        );
        s.action = RolloutAction::Operation(OperationType::Reboot);
        s.batch_by = Some("no spaces".into());
        assert!(s.validate().is_err());
        let e = Rollout::new(
            RolloutId::from_parts(1, 1),
            RequestId::new("r").unwrap(),
            spec(RolloutAction::Operation(OperationType::Reboot), 1, 1),
            Vec::new(),
            Actor::new("a", "b"),
            T0,
            String::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("selects no machine"), "{e}");
        let rid: RolloutId = "ro-01JD3F5Q2W8Y4ZP0N7R6T9V3KM".parse().unwrap();
        assert_eq!(rid.to_string(), "ro-01JD3F5Q2W8Y4ZP0N7R6T9V3KM");
        assert!(
            "ro-81JD3F5Q2W8Y4ZP0N7R6T9V3KM"
                .parse::<RolloutId>()
                .is_err()
        );
    }
}
