//! The transactions of the store, written once for every backend.
//!
//! Each function runs inside one backend transaction ([`Tx`]) and follows one discipline:
//! **check everything, then write**. A function that returns an error has written nothing,
//! and a backend's writes fail only on IO errors. Both backends rely on this: neither rolls
//! back a single function's writes (SQLite runs a batch of them in one transaction without a
//! savepoint each, and rolls back the whole batch should one fail after writing).

use std::collections::HashMap;

use bm_domain::rules::{self, Outcome};
use bm_domain::{
    DomainError, EventKind, Labels, MacAddress, Machine, MachineEvent, MachineEventKind, MachineId,
    MachinePatch, Observation, Operation, OperationEvent, OperationId, OperationPhase, RequestId,
    Rollout, RolloutId, Timestamp, apply_observation,
};

use crate::{
    Admission, Claimed, Fence, ImportOutcome, Lease, MachineCount, Recorded, Renewal, Result,
    StoreError, StoredRollout,
};

/// An operation as stored: the record and who holds it.
#[derive(Clone, Debug)]
pub(crate) struct StoredOp {
    pub(crate) op: Operation,
    pub(crate) lease: Option<Lease>,
    /// The fencing generation: bumped at every claim, kept when the lease is cleared.
    pub(crate) generation: u64,
}

/// Who holds an operation, without its record: what a fenced write needs to know.
#[derive(Clone, Debug)]
pub(crate) struct Holding {
    pub(crate) active: bool,
    pub(crate) lease: Option<Lease>,
    pub(crate) generation: u64,
    pub(crate) cancel_requested: bool,
}

impl Holding {
    /// True when `fence` is the claim that holds the operation now: same owner AND same
    /// generation (an owner whose lease lapsed and came back to it by a later claim holds a
    /// newer generation, and its stale writes are refused all the same).
    fn held_by(&self, fence: &Fence) -> bool {
        self.active
            && self.generation == fence.generation
            && self.lease.as_ref().is_some_and(|l| l.owner == fence.owner)
    }
}

/// What the indexes of a machine (its MAC addresses, its labels) held before a write, so that
/// a backend updates only what changed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Indexed<'a> {
    /// The machine is new: index all of it.
    New,
    /// Only its status changed: the indexes are right as they are.
    Unchanged,
    /// Its spec or labels may have changed: these were indexed.
    Was {
        macs: &'a [MacAddress],
        labels: &'a Labels,
    },
}

/// The primitive reads and writes of one backend transaction.
pub(crate) trait Tx {
    fn machine(&mut self, id: &MachineId) -> Result<Option<Machine>>;
    /// Writes a machine and brings its MAC address and label indexes up to date.
    fn put_machine(&mut self, m: &Machine, indexed: Indexed<'_>) -> Result<()>;
    fn mac_owner(&mut self, mac: &MacAddress) -> Result<Option<MachineId>>;
    fn operation(&mut self, id: OperationId) -> Result<Option<StoredOp>>;
    /// Who holds an operation (cheaper than reading it).
    fn holding(&mut self, id: OperationId) -> Result<Option<Holding>>;
    fn operation_by_request(
        &mut self,
        machine: &MachineId,
        request: &RequestId,
    ) -> Result<Option<Operation>>;
    /// Writes an operation (new or not), with its lease and fencing generation; the stored
    /// record's `cancel_requested` becomes the one of `op`.
    fn put_operation(
        &mut self,
        op: &Operation,
        lease: Option<&Lease>,
        generation: u64,
    ) -> Result<()>;
    /// Active operations with no lease or an expired one, oldest first.
    fn claimable(&mut self, now: Timestamp, limit: usize) -> Result<Vec<StoredOp>>;
    /// Writes claimed operations (just read by [`Tx::claimable`]) with `lease` and their new
    /// generations; a backend may write them all at once.
    fn put_claimed(&mut self, claimed: &[Claimed], lease: &Lease) -> Result<()> {
        for c in claimed {
            self.put_operation(&c.operation, Some(lease), c.fence.generation)?;
        }
        Ok(())
    }
    /// Extends to `lease.expires_at` the leases of `held` that `lease.owner` still holds at
    /// their generation; reports those with a cancel request and those no longer held.
    fn renew_leases(&mut self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<Renewal>;
    /// Clears every lease of `owner`; returns how many.
    fn release_leases(&mut self, owner: &str) -> Result<usize>;
    /// Appends an event, assigning its revision; it is published after the commit.
    fn append_event(&mut self, event: OperationEvent) -> Result<()>;

    /// Appends a machine event with the machine's next sequence number.
    fn append_machine_event(&mut self, event: MachineEvent) -> Result<()>;
    /// A rollout, locked until the commit where the backend locks rows.
    fn rollout(&mut self, id: RolloutId) -> Result<Option<StoredRollout>>;
    /// The rollout created with `request`.
    fn rollout_by_request(&mut self, request: &RequestId) -> Result<Option<StoredRollout>>;
    /// Writes a rollout at `version` (new, or over the one stored).
    fn put_rollout(&mut self, rollout: &Rollout, version: u64) -> Result<()>;
}

fn check_macs(tx: &mut impl Tx, id: &MachineId, macs: &[MacAddress]) -> Result<()> {
    for mac in macs {
        if let Some(owner) = tx.mac_owner(mac)?
            && owner != *id
        {
            return Err(StoreError::MacInUse { mac: *mac, owner });
        }
    }
    Ok(())
}

pub(crate) fn register(tx: &mut impl Tx, m: Machine) -> Result<Machine> {
    if tx.machine(&m.id)?.is_some() {
        return Err(StoreError::MachineExists(m.id));
    }
    check_macs(tx, &m.id, &m.spec.mac_addresses)?;
    tx.put_machine(&m, Indexed::New)?;
    Ok(m)
}

/// Imports rows one by one; each row is its own unit (a failed row changes nothing). With
/// `dry_run` nothing is written, and the ids and MACs of earlier rows are tracked here so
/// that later rows are judged as if they had been written.
pub(crate) fn import(
    tx: &mut impl Tx,
    rows: Vec<Machine>,
    dry_run: bool,
) -> Result<Vec<Result<ImportOutcome>>> {
    let mut planned: HashMap<MachineId, Machine> = HashMap::new();
    let mut planned_macs: HashMap<MacAddress, MachineId> = HashMap::new();
    let mut results = Vec::with_capacity(rows.len());
    for m in rows {
        let existing = match planned.get(&m.id) {
            Some(p) => Some(p.clone()),
            None => tx.machine(&m.id)?,
        };
        let result = match existing {
            Some(e) if e.spec == m.spec && e.labels == m.labels => Ok(ImportOutcome::Unchanged),
            Some(_) => Err(StoreError::ImportConflict(m.id.clone())),
            None => {
                let planned_clash = m
                    .spec
                    .mac_addresses
                    .iter()
                    .find_map(|mac| planned_macs.get(mac).map(|o| (*mac, o.clone())));
                match planned_clash {
                    Some((mac, owner)) => Err(StoreError::MacInUse { mac, owner }),
                    None => check_macs(tx, &m.id, &m.spec.mac_addresses)
                        .map(|()| ImportOutcome::Created),
                }
            }
        };
        if result.as_ref().is_ok_and(|o| *o == ImportOutcome::Created) {
            if dry_run {
                for mac in &m.spec.mac_addresses {
                    planned_macs.insert(*mac, m.id.clone());
                }
                planned.insert(m.id.clone(), m);
            } else {
                tx.put_machine(&m, Indexed::New)?;
            }
        }
        results.push(result);
    }
    Ok(results)
}

pub(crate) fn update(
    tx: &mut impl Tx,
    id: &MachineId,
    patch: &MachinePatch,
    now: Timestamp,
) -> Result<Machine> {
    let mut m = tx
        .machine(id)?
        .ok_or_else(|| StoreError::MachineNotFound(id.clone()))?;
    let (spec, labels) = patch.apply(&m)?;
    let (old_macs, old_labels) = (m.spec.mac_addresses.clone(), m.labels.clone());
    m.update(spec, labels, now)?;
    m.updated_by = patch.actor.clone();
    if m.spec.mac_addresses != old_macs {
        check_macs(tx, id, &m.spec.mac_addresses)?;
    }
    tx.put_machine(
        &m,
        Indexed::Was {
            macs: &old_macs,
            labels: &old_labels,
        },
    )?;
    Ok(m)
}

pub(crate) fn record_observation(
    tx: &mut impl Tx,
    id: &MachineId,
    observation: &Observation,
    now: Timestamp,
) -> Result<Recorded> {
    let mut m = tx
        .machine(id)?
        .ok_or_else(|| StoreError::MachineNotFound(id.clone()))?;
    if let Some(active) = m.status.active_operation_id {
        return Ok(Recorded::Busy(active));
    }
    let effect = apply_observation(&mut m, observation, now);
    if !effect.changed {
        return Ok(Recorded::Unchanged);
    }
    tx.put_machine(&m, Indexed::Unchanged)?;
    if let Some((was, is)) = effect.power_changed_outside {
        tx.append_machine_event(MachineEvent {
            sequence: 0,
            time: now,
            machine_id: m.id.clone(),
            kind: MachineEventKind::PowerChanged,
            message: format!(
                "power changed from {was} to {is} outside any operation (seen by the status poll)"
            ),
        })?;
    }
    Ok(Recorded::Changed {
        machine: Box::new(m),
        power_changed_outside: effect.power_changed_outside,
    })
}

/// A machine event from the columns both SQL backends store it in.
pub(crate) fn machine_event_row(
    machine_id: &MachineId,
    sequence: i64,
    time: i64,
    kind: &str,
    message: String,
) -> Result<MachineEvent> {
    Ok(MachineEvent {
        sequence: u64::try_from(sequence).unwrap_or_default(),
        time: Timestamp::from_unix_micros(time),
        machine_id: machine_id.clone(),
        kind: kind.parse().map_err(|e: DomainError| {
            StoreError::Corrupt(format!("machine_events of {machine_id}: {e}"))
        })?,
        message,
    })
}

/// A count of machines from the `phase` and `effective_state` columns of both SQL backends.
pub(crate) fn machine_count_row(phase: &str, state: &str, machines: i64) -> Result<MachineCount> {
    let corrupt = |e: DomainError| StoreError::Corrupt(format!("machines: {e}"));
    Ok(MachineCount {
        phase: phase.parse().map_err(corrupt)?,
        effective_state: state.parse().map_err(corrupt)?,
        machines: u64::try_from(machines).unwrap_or_default(),
    })
}

pub(crate) fn admit(tx: &mut impl Tx, op: Operation) -> Result<Admission> {
    if let Some(existing) = tx.operation_by_request(&op.machine_id, &op.request_id)? {
        if existing.op_type != op.op_type {
            return Err(StoreError::RequestIdReused {
                machine_id: op.machine_id,
                request_id: op.request_id,
                existing: existing.id,
                existing_type: existing.op_type,
            });
        }
        return Ok(Admission {
            operation: existing,
            created: false,
            left: None,
        });
    }
    let mut m = tx
        .machine(&op.machine_id)?
        .ok_or_else(|| StoreError::MachineNotFound(op.machine_id.clone()))?;
    let before = m.effective_state();
    let since = m.status.state_since;
    rules::begin(&mut m, &op, op.created_at)?;
    tx.put_operation(&op, None, 0)?;
    tx.put_machine(&m, Indexed::Unchanged)?;
    tx.append_event(OperationEvent::new(
        &op,
        EventKind::Created,
        "",
        op.created_at,
    ))?;
    let left = match since {
        Some(since) if m.effective_state() != before => Some((before, since)),
        _ => None,
    };
    Ok(Admission {
        operation: op,
        created: true,
        left,
    })
}

pub(crate) fn request_cancel(
    tx: &mut impl Tx,
    id: OperationId,
    by: bm_domain::Actor,
    now: Timestamp,
) -> Result<Operation> {
    let stored = tx.operation(id)?.ok_or(StoreError::OperationNotFound(id))?;
    let mut op = stored.op;
    let already = op.cancel_requested;
    op.request_cancel(by)?;
    if already {
        return Ok(op);
    }
    let unheld = stored.lease.as_ref().is_none_or(|l| l.expires_at < now);
    if op.phase == OperationPhase::Pending && unheld {
        // No executor has it: end it here, with its effects on the machine.
        let mut m = tx
            .machine(&op.machine_id)?
            .ok_or_else(|| StoreError::MachineNotFound(op.machine_id.clone()))?;
        let requested = OperationEvent::new(&op, EventKind::CancelRequested, "", now);
        rules::complete(
            &mut m,
            &mut op,
            Outcome::Canceled {
                disk_touched: false,
            },
            now,
        )?;
        tx.put_operation(&op, None, stored.generation)?;
        tx.put_machine(&m, Indexed::Unchanged)?;
        tx.append_event(requested)?;
        tx.append_event(phase_changed(&op, now))?;
    } else {
        tx.put_operation(&op, stored.lease.as_ref(), stored.generation)?;
        tx.append_event(OperationEvent::new(
            &op,
            EventKind::CancelRequested,
            "",
            now,
        ))?;
    }
    Ok(op)
}

fn phase_changed(op: &Operation, now: Timestamp) -> OperationEvent {
    OperationEvent::new(
        op,
        EventKind::PhaseChanged,
        op.error.clone().unwrap_or_default(),
        now,
    )
}

pub(crate) fn claim(
    tx: &mut impl Tx,
    lease: &Lease,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<Claimed>> {
    let claimable = tx.claimable(now, limit)?;
    let mut out = Vec::with_capacity(claimable.len());
    for s in claimable {
        out.push(Claimed {
            operation: s.op,
            fence: Fence {
                owner: lease.owner.clone(),
                generation: s.generation + 1,
            },
        });
    }
    tx.put_claimed(&out, lease)?;
    Ok(out)
}

fn held(tx: &mut impl Tx, fence: &Fence, id: OperationId) -> Result<Holding> {
    let holding = tx.holding(id)?.ok_or(StoreError::OperationNotFound(id))?;
    if !holding.held_by(fence) {
        return Err(StoreError::LeaseLost(id));
    }
    Ok(holding)
}

/// Carries a cancel request that came in after the executor read `op` into the copy it is
/// about to write: the flag, and who asked (read from the stored record, only then).
fn keep_cancel(tx: &mut impl Tx, op: &mut Operation, holding: &Holding) -> Result<()> {
    if holding.cancel_requested
        && op.canceled_by.is_unknown()
        && let Some(stored) = tx.operation(op.id)?
    {
        op.canceled_by = stored.op.canceled_by;
    }
    op.cancel_requested |= holding.cancel_requested;
    Ok(())
}

pub(crate) fn save_progress(
    tx: &mut impl Tx,
    fence: &Fence,
    op: &Operation,
    events: Vec<OperationEvent>,
) -> Result<bool> {
    let holding = held(tx, fence, op.id)?;
    if !op.is_active() {
        // Only `finish` ends an operation: it also clears the machine's active operation.
        return Err(DomainError::AlreadyEnded {
            operation_id: op.id,
            phase: op.phase,
        }
        .into());
    }
    let mut op = op.clone();
    keep_cancel(tx, &mut op, &holding)?;
    tx.put_operation(&op, holding.lease.as_ref(), holding.generation)?;
    for e in events {
        tx.append_event(e)?;
    }
    Ok(op.cancel_requested)
}

pub(crate) fn finish(
    tx: &mut impl Tx,
    fence: &Fence,
    mut op: Operation,
    outcome: Outcome,
    events: Vec<OperationEvent>,
    now: Timestamp,
) -> Result<(Operation, Machine)> {
    let holding = held(tx, fence, op.id)?;
    keep_cancel(tx, &mut op, &holding)?;
    let mut m = tx
        .machine(&op.machine_id)?
        .ok_or_else(|| StoreError::MachineNotFound(op.machine_id.clone()))?;
    rules::complete(&mut m, &mut op, outcome, now)?;
    tx.put_operation(&op, None, holding.generation)?;
    tx.put_machine(&m, Indexed::Unchanged)?;
    for e in events {
        tx.append_event(e)?;
    }
    tx.append_event(phase_changed(&op, now))?;
    Ok((op, m))
}

/// Stores a new rollout, or returns the one its request id created before.
pub(crate) fn create_rollout(tx: &mut impl Tx, rollout: Rollout) -> Result<(StoredRollout, bool)> {
    if let Some(found) = tx.rollout_by_request(&rollout.request_id)? {
        return Ok((found, false));
    }
    tx.put_rollout(&rollout, 1)?;
    Ok((
        StoredRollout {
            rollout,
            version: 1,
        },
        true,
    ))
}

/// Writes a rollout over the one stored at `version`; its new version.
pub(crate) fn save_rollout(tx: &mut impl Tx, rollout: Rollout, version: u64) -> Result<u64> {
    let found = tx
        .rollout(rollout.id)?
        .ok_or(StoreError::RolloutNotFound(rollout.id))?;
    if found.version != version {
        return Err(StoreError::RolloutChanged {
            id: rollout.id,
            expected: version,
            found: found.version,
        });
    }
    tx.put_rollout(&rollout, version + 1)?;
    Ok(version + 1)
}
