//! Rollouts: the engine's driver of bm-domain's [`Rollout`] policy.
//!
//! A rollout is created with its target resolved to a fixed list of machines, then moved on
//! by one task of the engine: whenever an operation ends, a rollout is created, paused,
//! resumed or aborted, and when a soak ends. Each pass over an active rollout
//!
//! 1. reads the operations it has in flight, and tells the rollout how those that ended,
//!    ended (nothing relies on having seen an event: a restart loses nothing);
//! 2. cancels them, if it was aborted;
//! 3. reads the states of the machines whose turn may come, asks the rollout which
//!    operations to start, and submits them as ordinary operations, each with a request id
//!    derived from the rollout and the step (a start submitted twice, after a crash or by
//!    two replicas, is one operation), tagged with the rollout's id;
//! 4. writes the rollout back over the version it read. Another writer (a replica, a pause)
//!    got there first: the pass starts again from what is stored, which its submissions,
//!    being idempotent, cannot upset.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bm_domain::{
    Actor, EffectiveState, Ended, LabelSelector, MachineId, OperationId, OperationPhase, Phase,
    RequestId, Rollout, RolloutId, RolloutPhase, RolloutSpec, Seen, Target,
};
use bm_store::{RolloutQuery, StoreError, StoredRollout};
use futures::StreamExt;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::api::{MachineQuery, OperationRequest, Page, Scope};
use crate::{Engine, ErrorKind, WorkflowError, now};

/// The machines a rollout is over, chosen when it is created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutTarget {
    /// Only machines whose labels match.
    pub selector: LabelSelector,
    /// Only machines in this phase.
    pub phase: Option<Phase>,
    /// Only machines in this effective state.
    pub effective_state: Option<EffectiveState>,
    /// These machines (each must exist), further filtered by the above; empty: every
    /// machine the above select.
    pub machine_ids: Vec<MachineId>,
}

impl RolloutTarget {
    fn is_everything(&self) -> bool {
        self.selector.is_empty()
            && self.phase.is_none()
            && self.effective_state.is_none()
            && self.machine_ids.is_empty()
    }

    fn matches(&self, m: &bm_domain::Machine) -> bool {
        self.selector.matches(&m.labels)
            && self.phase.is_none_or(|p| p == m.status.phase)
            && self
                .effective_state
                .is_none_or(|s| s == m.effective_state())
    }
}

/// A request to create a rollout.
#[derive(Clone, Debug)]
pub struct RolloutRequest {
    /// Its machines.
    pub target: RolloutTarget,
    /// How it runs.
    pub spec: RolloutSpec,
    /// The client's idempotency key: the same one again returns the rollout it created.
    pub request_id: RequestId,
    /// A note for the audit trail, also on each of its operations.
    pub note: String,
    /// Who asks; its operations are requested in that name.
    pub requested_by: Actor,
    /// The machines the caller may act on: the target is resolved within them.
    pub scope: Scope,
}

/// Machines read per page while a target is resolved.
const TARGET_PAGE: usize = 1000;
/// Machines whose state is read ahead of their turn, above the free places in flight.
const READ_AHEAD: usize = 32;
/// Writes of one change tried again when another writer got there first.
const CAS_TRIES: usize = 16;
/// Reads of machines or operations a pass has under way at once.
const READS_AT_ONCE: usize = 64;
/// Operations a pass submits at once (each waits for a commit; commits take many).
const SUBMITS_AT_ONCE: usize = 256;

impl Engine {
    /// Creates a rollout over the machines its target selects now (in the caller's
    /// scope), and sets it going. Idempotent by request id: the same one again returns the
    /// rollout it created, and `false`.
    ///
    /// # Errors
    ///
    /// An invalid spec, a target that selects nothing (or everything without saying so),
    /// a named machine that does not exist, a store failure.
    pub async fn create_rollout(
        &self,
        req: RolloutRequest,
    ) -> Result<(Rollout, bool), WorkflowError> {
        if self.is_shutting_down() {
            return Err(WorkflowError::ShuttingDown);
        }
        req.spec.validate()?;
        if req.note.len() > bm_domain::Operation::MAX_NOTE {
            return Err(bm_domain::DomainError::invalid(
                "note",
                &req.note,
                format!("must be at most {} bytes", bm_domain::Operation::MAX_NOTE),
            )
            .into());
        }
        if req.target.is_everything() {
            return Err(bm_domain::DomainError::invalid(
                "rollout target",
                "",
                "is empty: give a label selector, a phase, an effective state or machine ids (for the whole fleet, a selector such as `!decommissioned` says so on purpose)",
            )
            .into());
        }
        // A request id used before: that rollout, without resolving the target again (its
        // machines may have changed since), if it is this caller's and the same request.
        if let Some(found) = self.inner.store.rollout_by_request(&req.request_id).await? {
            let r = found.rollout;
            if r.created_by.name != req.requested_by.name
                || r.spec != req.spec
                || r.note != req.note
            {
                return Err(bm_domain::DomainError::invalid(
                    "request id",
                    req.request_id.as_str(),
                    format!(
                        "was used for another rollout ({}); use a new request id",
                        r.id
                    ),
                )
                .into());
            }
            return Ok((r, false));
        }
        let targets = self.resolve(&req.target, &req.scope).await?;
        let t = now();
        let id = self.inner.new_ulid(t);
        let rollout = Rollout::new(
            RolloutId::from_parts(id.timestamp_ms(), id.random()),
            req.request_id,
            req.spec,
            targets,
            req.requested_by,
            t,
            req.note,
        )?;
        let (stored, created) = self.inner.store.create_rollout(rollout).await?;
        if created {
            self.inner.rollout_written();
            tracing::info!(
                rollout = %stored.rollout.id,
                machines = stored.rollout.machines.len(),
                batches = stored.rollout.batches.len(),
                "rollout created"
            );
            self.inner.rollouts.notify_one();
        }
        Ok((stored.rollout, created))
    }

    /// The machines of `target` within `scope`, with their labels.
    async fn resolve(
        &self,
        target: &RolloutTarget,
        scope: &Scope,
    ) -> Result<Vec<Target>, WorkflowError> {
        let mut out = Vec::new();
        if !target.machine_ids.is_empty() {
            for id in &target.machine_ids {
                let m = self.get_machine(id).await?;
                if !scope.matches(&m.labels) {
                    return Err(WorkflowError::machine_not_found(id.clone()));
                }
                if target.matches(&m) {
                    out.push(Target {
                        machine_id: m.id,
                        labels: m.labels,
                    });
                }
            }
            return Ok(out);
        }
        let mut q = MachineQuery {
            after: None,
            limit: TARGET_PAGE,
            phase: target.phase,
            effective_state: target.effective_state,
            selector: target.selector.clone(),
            scope: scope.clone(),
        };
        loop {
            let Page { items, more } = self.list_machines(&q).await?;
            q.after = items.last().map(|m| m.id.clone());
            out.extend(items.into_iter().map(|m| Target {
                machine_id: m.id,
                labels: m.labels,
            }));
            if !more {
                return Ok(out);
            }
        }
    }

    /// Changes whenever this engine writes a rollout (creates it, moves it on, pauses,
    /// resumes or aborts it): a follower reads the rollouts it follows again then. Writes
    /// by other replicas sharing the store are not seen here; a follower that must see them
    /// also reads again every few seconds.
    pub fn rollout_writes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.rollout_writes.subscribe()
    }

    /// A rollout as it is now.
    ///
    /// # Errors
    ///
    /// Not found, a store failure.
    pub async fn get_rollout(&self, id: RolloutId) -> Result<Rollout, WorkflowError> {
        Ok(self.inner.store.get_rollout(id).await?.rollout)
    }

    /// Rollouts, newest first.
    ///
    /// # Errors
    ///
    /// A store failure.
    pub async fn list_rollouts(
        &self,
        query: &RolloutQuery,
    ) -> Result<Page<Rollout>, WorkflowError> {
        let page = self.inner.store.list_rollouts(query).await?;
        Ok(Page {
            items: page.items.into_iter().map(|s| s.rollout).collect(),
            more: page.more,
        })
    }

    /// Pauses a rollout: nothing new starts; what runs finishes.
    ///
    /// # Errors
    ///
    /// Not found, or a rollout that is neither running nor paused.
    pub async fn pause_rollout(&self, id: RolloutId) -> Result<Rollout, WorkflowError> {
        self.change_rollout(id, |r| r.pause(now())).await
    }

    /// Resumes a paused rollout.
    ///
    /// # Errors
    ///
    /// Not found, or a rollout that is neither running nor paused.
    pub async fn resume_rollout(&self, id: RolloutId) -> Result<Rollout, WorkflowError> {
        self.change_rollout(id, |r| r.resume(now())).await
    }

    /// Aborts a rollout: nothing new starts, and its running operations are canceled.
    ///
    /// # Errors
    ///
    /// Not found, or a rollout that has ended.
    pub async fn abort_rollout(&self, id: RolloutId) -> Result<Rollout, WorkflowError> {
        self.change_rollout(id, |r| r.abort(now())).await
    }

    /// Applies `change` to the stored rollout (again, over what another writer wrote, if
    /// one got there first), then lets the driver act on it.
    async fn change_rollout(
        &self,
        id: RolloutId,
        change: impl Fn(&mut Rollout) -> Result<(), bm_domain::DomainError>,
    ) -> Result<Rollout, WorkflowError> {
        let store = &self.inner.store;
        let mut tries = 0;
        loop {
            let StoredRollout {
                mut rollout,
                version,
            } = store.get_rollout(id).await?;
            change(&mut rollout)?;
            match store.save_rollout(rollout.clone(), version).await {
                Ok(_) => {
                    self.inner.rollout_written();
                    self.inner.rollouts.notify_one();
                    return Ok(rollout);
                }
                // The driver wrote it meanwhile: the change again, over what it wrote.
                Err(e @ StoreError::RolloutChanged { .. }) => {
                    tries += 1;
                    if tries == CAS_TRIES {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// How long the driver lets ends gather before a pass.
const COALESCE: Duration = Duration::from_millis(50);

/// Every how often a pass reads every operation the rollouts have in flight, whatever the
/// events said (a safety net: the events tell of every end, from every replica).
const FULL_PASS: Duration = Duration::from_secs(10);

/// The driver's task: a pass over every active rollout whenever something may have moved
/// one on (an operation ended, a rollout was changed), and at the end of the next soak.
pub(crate) async fn run(engine: Engine) {
    let inner = &engine.inner;
    let mut events = inner.store.subscribe_events();
    // The first pass reads everything: what ended while no driver ran.
    let mut ended: Option<HashSet<OperationId>> = None;
    let mut last_full = tokio::time::Instant::now();
    loop {
        if last_full.elapsed() >= FULL_PASS {
            ended = None;
        }
        if ended.is_none() {
            last_full = tokio::time::Instant::now();
        }
        // Without an active rollout, operation ends are nobody's business here: only a
        // rollout created (or, from a replica, the next full pass) wakes the driver.
        let (wake_at, active) = match pass(&engine, ended.as_ref()).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "a pass over the rollouts failed; trying again shortly");
                (Some(now().saturating_add(Duration::from_secs(1))), true)
            }
        };
        let mut seen = HashSet::new();
        let mut full = false;
        let until = wake_at
            .map(|at| {
                at.to_system_time()
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            })
            .unwrap_or(FULL_PASS)
            .min(FULL_PASS);
        let deadline = tokio::time::sleep(until);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = inner.shutdown.cancelled() => return,
                () = inner.rollouts.notified() => break,
                () = &mut deadline => break,
                e = events.recv() => match e {
                    Ok(e) if e.is_terminal() && active => {
                        seen.insert(e.operation_id);
                        break;
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => {
                        full = true;
                        break;
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
        // What ends together is handled in one pass (and a pass writes the whole rollout).
        tokio::time::sleep(COALESCE).await;
        loop {
            match events.try_recv() {
                Ok(e) if e.is_terminal() => {
                    seen.insert(e.operation_id);
                }
                Ok(_) => {}
                Err(TryRecvError::Lagged(_)) => full = true,
                Err(_) => break,
            }
        }
        ended = (!full).then_some(seen);
    }
}

/// One pass over the active rollouts; when the next one is due, if any is soaking, and
/// whether any was active. Of the operations in flight, only those in `ended` are read (all
/// when `None`).
async fn pass(
    engine: &Engine,
    ended: Option<&HashSet<OperationId>>,
) -> Result<(Option<bm_domain::Timestamp>, bool), WorkflowError> {
    let store = &engine.inner.store;
    let mut q = RolloutQuery {
        before: None,
        limit: 100,
        active_only: true,
    };
    let mut wake: Option<bm_domain::Timestamp> = None;
    let mut active = false;
    loop {
        let page = store.list_rollouts(&q).await?;
        active |= !page.items.is_empty();
        q.before = page.items.last().map(|s| s.rollout.id);
        for stored in page.items {
            let id = stored.rollout.id;
            match drive(engine, stored, ended).await {
                Ok(Some(at)) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(rollout = %id, error = %e, "could not move the rollout on")
                }
            }
            if engine.is_shutting_down() {
                return Ok((None, active));
            }
        }
        if !page.more {
            return Ok((wake, active));
        }
    }
}

/// Moves one rollout on, from `stored`; when it is next due by the clock.
async fn drive(
    engine: &Engine,
    mut stored: StoredRollout,
    ended: Option<&HashSet<OperationId>>,
) -> Result<Option<bm_domain::Timestamp>, WorkflowError> {
    let store = &engine.inner.store;
    let mut ended = ended;
    // What this pass started: kept over a write that loses to another writer, so that the
    // rollout as that one left it learns of them too.
    let mut submitted: Vec<(MachineId, u32, OperationId)> = Vec::new();
    for _ in 0..CAS_TRIES {
        let StoredRollout {
            mut rollout,
            version,
        } = stored;
        let before = rollout.clone();
        for (m, step, op) in &submitted {
            rollout.started(m, *step, *op);
        }
        let to_cancel = settle_ended(engine, &mut rollout, ended).await?;
        if rollout.phase == RolloutPhase::Aborting {
            for op in to_cancel {
                cancel(engine, op, &rollout.created_by);
            }
        }
        start_due(engine, &mut rollout, &mut submitted).await?;
        if rollout == before {
            return Ok(rollout.wake_at());
        }
        rollout.update_time = now();
        match store.save_rollout(rollout.clone(), version).await {
            Ok(_) => {
                engine.inner.rollout_written();
                if rollout.phase.is_terminal() && !before.phase.is_terminal() {
                    let c = rollout.counts();
                    tracing::info!(
                        rollout = %rollout.id,
                        phase = %rollout.phase,
                        succeeded = c.succeeded,
                        failed = c.failed,
                        skipped = c.skipped,
                        "rollout ended"
                    );
                }
                return Ok(rollout.wake_at());
            }
            // Someone wrote it meanwhile (a pause, an abort, a replica): again, from what is
            // stored, with what this pass started, reading every operation in flight.
            Err(StoreError::RolloutChanged { .. }) => {
                stored = store.get_rollout(rollout.id).await?;
                ended = None;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(now()))
}

/// Tells the rollout how its operations in flight that ended, ended (of those in `ended`,
/// or all); returns those still running whose cancel nobody asked for yet.
async fn settle_ended(
    engine: &Engine,
    rollout: &mut Rollout,
    ended: Option<&HashSet<OperationId>>,
) -> Result<Vec<OperationId>, WorkflowError> {
    let aborting = rollout.phase == RolloutPhase::Aborting;
    let mut running = Vec::new();
    let read: Vec<OperationId> = rollout
        .running()
        .filter(|op| aborting || ended.is_none_or(|e| e.contains(op)))
        .collect();
    // Read at once, a bounded number at a time: a thousand in flight is a thousand reads.
    let ops: Vec<(OperationId, Result<bm_domain::Operation, WorkflowError>)> =
        futures::stream::iter(read)
            .map(|id| {
                let engine = engine.clone();
                async move { (id, engine.get_operation(id).await) }
            })
            .buffered(READS_AT_ONCE)
            .collect()
            .await;
    for (op_id, op) in ops {
        let op = match op {
            Ok(op) => op,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                rollout.ended(op_id, Ended::Failed("its operation was lost".into()));
                continue;
            }
            Err(e) => return Err(e),
        };
        match how(&op) {
            Some(how) => {
                rollout.ended(op_id, how);
            }
            None if !op.cancel_requested => running.push(op_id),
            None => {}
        }
    }
    Ok(running)
}

/// Asks to cancel a rollout's operation for its abort, without waiting for it to end (its
/// end wakes the driver); one that ended meanwhile is left alone.
fn cancel(engine: &Engine, op: OperationId, by: &Actor) {
    let req = crate::api::CancelRequest {
        operation_id: op,
        requested_by: by.clone(),
    };
    let engine = engine.clone();
    engine.inner.tasks.clone().spawn(async move {
        if let Err(e) = engine.cancel(req).await
            && e.kind() != ErrorKind::WrongState
        {
            tracing::warn!(operation = %op, error = %e, "could not cancel a rollout's operation");
        }
    });
}

/// How an operation that ended, ended, for the rollout.
fn how(op: &bm_domain::Operation) -> Option<Ended> {
    match op.phase {
        OperationPhase::Pending | OperationPhase::Running => None,
        OperationPhase::Succeeded => Some(Ended::Succeeded),
        OperationPhase::Failed => Some(Ended::Failed(
            op.error.clone().unwrap_or_else(|| "failed".into()),
        )),
        OperationPhase::Canceled => Some(Ended::Canceled),
    }
}

/// What the driver sees of a machine whose turn may come: its state, or, when it is not
/// fit, the operation this rollout started on it and did not record (then adopted), with
/// the operation if it has ended already.
async fn look(
    engine: &Engine,
    rollout: RolloutId,
    first: &RequestId,
    id: &MachineId,
) -> Result<(Seen, Option<bm_domain::Operation>), WorkflowError> {
    let m = match engine.get_machine(id).await {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((Seen::Gone, None)),
        Err(e) => return Err(e),
    };
    let state = m.effective_state();
    if matches!(
        state,
        EffectiveState::Idle | EffectiveState::MaintenanceIdle | EffectiveState::New
    ) {
        return Ok((Seen::State(state), None));
    }
    // Busy, or left in ATTENTION or BLOCKED: by this rollout's own first operation?
    let recent = engine
        .list_operations(&crate::api::OperationQuery {
            limit: 8,
            machine_id: Some(id.clone()),
            ..crate::api::OperationQuery::default()
        })
        .await?;
    match recent
        .items
        .into_iter()
        .find(|o| o.rollout_id == Some(rollout) && o.request_id == *first)
    {
        Some(op) => Ok((Seen::Started(op.id), Some(op))),
        None => Ok((Seen::State(state), None)),
    }
}

/// Starts what is due: reads what it needs of the machines whose turn may come (a chunk at
/// a time), asks the rollout, and submits its starts, recording each in `submitted`. A
/// failure to submit that the rules did not decide (a shutdown, the store) stops the
/// starts of this pass; what was started is kept, and the rest is asked for again at the
/// next pass, with the same request ids.
async fn start_due(
    engine: &Engine,
    rollout: &mut Rollout,
    submitted: &mut Vec<(MachineId, u32, OperationId)>,
) -> Result<(), WorkflowError> {
    let mut seen: HashMap<MachineId, Seen> = HashMap::new();
    loop {
        let batch = rollout.batch;
        let room = rollout
            .max_in_flight()
            .saturating_sub(rollout.counts().active as usize);
        let wanted: Vec<MachineId> = rollout
            .next_up()
            .filter(|m| !seen.contains_key(*m))
            .take(room + READ_AHEAD)
            .cloned()
            .collect();
        // Operations adopted that have ended already: no event will tell of them.
        let mut over: Vec<(OperationId, Ended)> = Vec::new();
        let (rid, first) = (rollout.id, rollout.request_id(0));
        let looks: Vec<_> = futures::stream::iter(wanted.clone())
            .map(|id| {
                let (engine, first) = (engine.clone(), first.clone());
                async move {
                    let looked = look(&engine, rid, &first, &id).await;
                    (id, looked)
                }
            })
            .buffered(READS_AT_ONCE)
            .collect()
            .await;
        for (id, looked) in looks {
            let (s, op) = looked?;
            if let Some(op) = &op
                && let Some(how) = how(op)
            {
                over.push((op.id, how));
            }
            seen.insert(id.clone(), s);
        }
        let missed = std::cell::Cell::new(false);
        let starts = rollout.advance(now(), |m| {
            seen.get(m).copied().unwrap_or_else(|| {
                missed.set(true);
                Seen::NotRead
            })
        });
        for (op, how) in over {
            rollout.ended(op, how);
        }
        // Submitted at once, a bounded number at a time (each waits for a commit of the
        // store, which takes many together), and recorded in order.
        let note = note(rollout);
        let by = rollout.created_by.clone();
        let id = rollout.id;
        let results: Vec<_> = futures::stream::iter(starts)
            .map(|s| {
                let req = OperationRequest {
                    machine_id: s.machine_id.clone(),
                    op_type: s.operation,
                    request_id: s.request_id.clone(),
                    note: note.clone(),
                    requested_by: by.clone(),
                };
                let engine = engine.clone();
                async move { (s, engine.submit_for(req, Some(id)).await) }
            })
            .buffered(SUBMITS_AT_ONCE)
            .collect()
            .await;
        let mut stopped = false;
        for (s, result) in results {
            // The state read before the start is stale now.
            seen.remove(&s.machine_id);
            match result {
                Ok(admission) => {
                    let op = admission.operation;
                    rollout.started(&s.machine_id, s.step, op.id);
                    submitted.push((s.machine_id.clone(), s.step, op.id));
                    // Submitted before, and ended since: no event will tell of it.
                    if let Some(how) = how(&op) {
                        rollout.ended(op.id, how);
                    }
                }
                // The rules refuse it (a wrong phase, a machine taken meanwhile): recorded.
                Err(e) if matches!(e.kind(), ErrorKind::WrongState | ErrorKind::NotFound) => {
                    rollout.refused(&s.machine_id, s.step, e.to_string());
                }
                Err(e) => {
                    tracing::warn!(rollout = %rollout.id, machine = %s.machine_id, error = %e, "could not start a rollout's operation; it is asked for again at the next pass");
                    stopped = true;
                }
            }
        }
        if stopped {
            return Ok(());
        }
        // Again when admission stopped at a machine not read yet, or a new batch opened.
        let again = rollout.batch != batch || (missed.get() && !wanted.is_empty());
        if !again {
            return Ok(());
        }
    }
}

/// The note of a rollout's operations.
fn note(rollout: &Rollout) -> String {
    let mut n = format!("rollout {}", rollout.id);
    if !rollout.note.is_empty() {
        n.push_str(": ");
        n.push_str(&rollout.note);
    }
    // The rollout's note fits an operation's (checked at creation) with the prefix cut off.
    if n.len() > bm_domain::Operation::MAX_NOTE {
        let mut cut = bm_domain::Operation::MAX_NOTE;
        while !n.is_char_boundary(cut) {
            cut -= 1;
        }
        n.truncate(cut);
    }
    n
}
