//! The in-memory backend: for unit tests and throwaway runs. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bm_domain::rules::Outcome;
use bm_domain::{
    LogLine, MacAddress, Machine, MachineEvent, MachineId, MachinePatch, Observation, Operation,
    OperationEvent, OperationId, RequestId, Rollout, RolloutId, Timestamp,
};
use tokio::sync::{broadcast, watch};

use crate::condition::ConditionCell;
use crate::logic::{self, Holding, Indexed, StoredOp, Tx};
use crate::{
    Admission, BROADCAST_CAPACITY, Claimed, EventFilter, Fence, ImportOutcome, Lease, MachineCount,
    MachineQuery, OperationQuery, Page, Recorded, Renewal, Result, RolloutQuery, Store,
    StoreCondition, StoredRollout,
};

#[derive(Default)]
struct State {
    machines: BTreeMap<MachineId, Machine>,
    macs: HashMap<MacAddress, MachineId>,
    operations: BTreeMap<OperationId, StoredOp>,
    /// The pending and running operations, so that claims never walk the history.
    active: std::collections::BTreeSet<OperationId>,
    requests: HashMap<(MachineId, RequestId), OperationId>,
    events: Vec<Arc<OperationEvent>>,
    logs: HashMap<OperationId, Vec<LogLine>>,
    machine_events: HashMap<MachineId, Vec<MachineEvent>>,
    rollouts: BTreeMap<RolloutId, StoredRollout>,
    rollout_requests: HashMap<RequestId, RolloutId>,
}

/// A [`Store`] that keeps everything in memory, behind one lock.
pub struct MemoryStore {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<OperationEvent>>,
    logs: broadcast::Sender<Arc<LogLine>>,
    /// Always ok: memory neither fills a disk nor rots.
    condition: ConditionCell,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            state: Mutex::new(State::default()),
            events: broadcast::channel(BROADCAST_CAPACITY).0,
            logs: broadcast::channel(BROADCAST_CAPACITY).0,
            condition: ConditionCell::new(StoreCondition::Ok),
        }
    }
}

impl MemoryStore {
    /// An empty store whose live subscribers may fall `capacity` events or log lines behind
    /// before they are told they lagged and read the rest back from the store
    /// ([`BROADCAST_CAPACITY`] by default): a small one makes every slow reader catch up.
    pub fn with_broadcast_capacity(capacity: usize) -> Self {
        MemoryStore {
            events: broadcast::channel(capacity.max(1)).0,
            logs: broadcast::channel(capacity.max(1)).0,
            ..Self::default()
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryStore")
    }
}

struct MemTx<'a> {
    state: &'a mut State,
    events: &'a broadcast::Sender<Arc<OperationEvent>>,
}

impl Tx for MemTx<'_> {
    fn machine(&mut self, id: &MachineId) -> Result<Option<Machine>> {
        Ok(self.state.machines.get(id).cloned())
    }

    fn put_machine(&mut self, m: &Machine, indexed: Indexed<'_>) -> Result<()> {
        // Labels are not indexed here: a list reads every machine anyway.
        let old_macs = match indexed {
            Indexed::New => Some(&[][..]),
            Indexed::Unchanged => None,
            Indexed::Was { macs, .. } => (macs != m.spec.mac_addresses.as_slice()).then_some(macs),
        };
        if let Some(old) = old_macs {
            for mac in old {
                self.state.macs.remove(mac);
            }
            for mac in &m.spec.mac_addresses {
                self.state.macs.insert(*mac, m.id.clone());
            }
        }
        self.state.machines.insert(m.id.clone(), m.clone());
        Ok(())
    }

    fn mac_owner(&mut self, mac: &MacAddress) -> Result<Option<MachineId>> {
        Ok(self.state.macs.get(mac).cloned())
    }

    fn operation(&mut self, id: OperationId) -> Result<Option<StoredOp>> {
        Ok(self.state.operations.get(&id).cloned())
    }

    fn holding(&mut self, id: OperationId) -> Result<Option<Holding>> {
        Ok(self.state.operations.get(&id).map(|s| Holding {
            active: s.op.is_active(),
            lease: s.lease.clone(),
            generation: s.generation,
            cancel_requested: s.op.cancel_requested,
        }))
    }

    fn operation_by_request(
        &mut self,
        machine: &MachineId,
        request: &RequestId,
    ) -> Result<Option<Operation>> {
        let key = (machine.clone(), request.clone());
        Ok(self
            .state
            .requests
            .get(&key)
            .and_then(|id| self.state.operations.get(id))
            .map(|s| s.op.clone()))
    }

    fn put_operation(
        &mut self,
        op: &Operation,
        lease: Option<&Lease>,
        generation: u64,
    ) -> Result<()> {
        if op.is_active() {
            self.state.active.insert(op.id);
        } else {
            self.state.active.remove(&op.id);
        }
        self.state
            .requests
            .insert((op.machine_id.clone(), op.request_id.clone()), op.id);
        self.state.operations.insert(
            op.id,
            StoredOp {
                op: op.clone(),
                lease: lease.cloned(),
                generation,
            },
        );
        Ok(())
    }

    fn claimable(&mut self, now: Timestamp, limit: usize) -> Result<Vec<StoredOp>> {
        let state = &self.state;
        Ok(state
            .active
            .iter()
            .filter_map(|id| state.operations.get(id))
            .filter(|s| s.lease.as_ref().is_none_or(|l| l.expires_at < now))
            .take(limit)
            .cloned()
            .collect())
    }

    fn renew_leases(&mut self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<Renewal> {
        let mut renewal = Renewal::default();
        for &(id, generation) in held {
            let Some(s) = self.state.operations.get_mut(&id) else {
                renewal.lost.push(id);
                continue;
            };
            match &mut s.lease {
                Some(l)
                    if l.owner == lease.owner && s.generation == generation && s.op.is_active() =>
                {
                    l.expires_at = lease.expires_at;
                    if s.op.cancel_requested {
                        renewal.canceled.push(id);
                    }
                }
                _ => renewal.lost.push(id),
            }
        }
        Ok(renewal)
    }

    fn release_leases(&mut self, owner: &str) -> Result<usize> {
        let mut n = 0;
        for s in self.state.operations.values_mut() {
            if s.lease.as_ref().is_some_and(|l| l.owner == owner) {
                s.lease = None;
                n += 1;
            }
        }
        Ok(n)
    }

    fn append_machine_event(&mut self, mut event: MachineEvent) -> Result<()> {
        let events = self
            .state
            .machine_events
            .entry(event.machine_id.clone())
            .or_default();
        event.sequence = events.len() as u64 + 1;
        events.push(event);
        Ok(())
    }

    fn rollout(&mut self, id: RolloutId) -> Result<Option<StoredRollout>> {
        Ok(self.state.rollouts.get(&id).cloned())
    }

    fn rollout_by_request(&mut self, request: &RequestId) -> Result<Option<StoredRollout>> {
        Ok(self
            .state
            .rollout_requests
            .get(request)
            .and_then(|id| self.state.rollouts.get(id))
            .cloned())
    }

    fn put_rollout(&mut self, rollout: &Rollout, version: u64) -> Result<()> {
        self.state
            .rollout_requests
            .insert(rollout.request_id.clone(), rollout.id);
        self.state.rollouts.insert(
            rollout.id,
            StoredRollout {
                rollout: rollout.clone(),
                version,
            },
        );
        Ok(())
    }

    fn append_event(&mut self, mut event: OperationEvent) -> Result<()> {
        event.revision = self.state.events.len() as u64 + 1;
        let event = Arc::new(event);
        self.state.events.push(event.clone());
        // Published under the lock, so subscribers see revision order; nothing to roll
        // back, as logic functions write only after every check passed.
        let _ = self.events.send(event);
        Ok(())
    }
}

/// A page of `map`'s values, newest (highest key) first, before `before`: those `select`
/// keeps, at most `limit`, and whether more follow.
fn newest_first<K: Ord + Copy, V, T>(
    map: &BTreeMap<K, V>,
    before: Option<K>,
    limit: usize,
    select: impl Fn(&V) -> Option<T>,
) -> Page<T> {
    let end = match before {
        Some(before) => std::ops::Bound::Excluded(before),
        None => std::ops::Bound::Unbounded,
    };
    let mut items: Vec<T> = map
        .range((std::ops::Bound::Unbounded, end))
        .rev()
        .filter_map(|(_, v)| select(v))
        .take(limit + 1)
        .collect();
    let more = items.len() > limit;
    items.truncate(limit);
    Page { items, more }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-written transaction (logic
        // functions write only after every check), so the state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tx<T>(&self, f: impl FnOnce(&mut MemTx<'_>) -> Result<T>) -> Result<T> {
        let mut state = self.lock();
        f(&mut MemTx {
            state: &mut state,
            events: &self.events,
        })
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn register_machine(&self, machine: Machine) -> Result<Machine> {
        self.tx(|tx| logic::register(tx, machine))
    }

    async fn import_machines(
        &self,
        machines: Vec<Machine>,
        dry_run: bool,
    ) -> Result<Vec<Result<ImportOutcome>>> {
        self.tx(|tx| logic::import(tx, machines, dry_run))
    }

    async fn get_machine(&self, id: &MachineId) -> Result<Machine> {
        self.lock()
            .machines
            .get(id)
            .cloned()
            .ok_or_else(|| crate::StoreError::MachineNotFound(id.clone()))
    }

    async fn machine_events(
        &self,
        id: &MachineId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MachineEvent>> {
        let state = self.lock();
        Ok(state
            .machine_events
            .get(id)
            .map_or_else(Vec::new, |events| {
                events
                    .iter()
                    .filter(|e| e.sequence > after)
                    .take(limit)
                    .cloned()
                    .collect()
            }))
    }

    async fn machine_by_mac(&self, mac: &MacAddress) -> Result<Option<Machine>> {
        let state = self.lock();
        Ok(state
            .macs
            .get(mac)
            .and_then(|id| state.machines.get(id))
            .cloned())
    }

    async fn unclaimed_operations(&self) -> Result<u64> {
        let state = self.lock();
        Ok(state
            .active
            .iter()
            .filter(|id| state.operations.get(id).is_some_and(|o| o.lease.is_none()))
            .count() as u64)
    }

    async fn machine_counts(&self) -> Result<Vec<MachineCount>> {
        let state = self.lock();
        let mut counts = std::collections::BTreeMap::<_, u64>::new();
        for m in state.machines.values() {
            *counts
                .entry((m.status.phase, m.effective_state()))
                .or_default() += 1;
        }
        Ok(counts
            .into_iter()
            .map(|((phase, effective_state), machines)| MachineCount {
                phase,
                effective_state,
                machines,
            })
            .collect())
    }

    async fn list_machines(&self, q: &MachineQuery) -> Result<Page<Machine>> {
        let state = self.lock();
        let start = match &q.after {
            Some(after) => std::ops::Bound::Excluded(after.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let mut items: Vec<Machine> = state
            .machines
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, m)| m)
            .filter(|m| q.phase.is_none_or(|p| p == m.status.phase))
            .filter(|m| q.effective_state.is_none_or(|s| s == m.effective_state()))
            .filter(|m| q.selector.matches(&m.labels))
            .take(q.limit + 1)
            .cloned()
            .collect();
        let more = items.len() > q.limit;
        items.truncate(q.limit);
        Ok(Page { items, more })
    }

    async fn update_machine(
        &self,
        id: &MachineId,
        patch: &MachinePatch,
        now: Timestamp,
    ) -> Result<Machine> {
        self.tx(|tx| logic::update(tx, id, patch, now))
    }

    async fn record_observation(
        &self,
        id: &MachineId,
        observation: &Observation,
        now: Timestamp,
    ) -> Result<Recorded> {
        self.tx(|tx| logic::record_observation(tx, id, observation, now))
    }

    async fn admit(&self, operation: Operation) -> Result<Admission> {
        self.tx(|tx| logic::admit(tx, operation))
    }

    async fn get_operation(&self, id: OperationId) -> Result<Operation> {
        self.lock()
            .operations
            .get(&id)
            .map(|s| s.op.clone())
            .ok_or(crate::StoreError::OperationNotFound(id))
    }

    async fn list_operations(&self, q: &OperationQuery) -> Result<Page<Operation>> {
        let state = self.lock();
        Ok(newest_first(&state.operations, q.before, q.limit, |s| {
            let o = &s.op;
            (q.machine_id.as_ref().is_none_or(|m| *m == o.machine_id)
                && q.op_type.is_none_or(|t| t == o.op_type)
                && q.phase.is_none_or(|p| p == o.phase))
            .then(|| o.clone())
        }))
    }

    async fn create_rollout(&self, rollout: Rollout) -> Result<(StoredRollout, bool)> {
        self.tx(|tx| logic::create_rollout(tx, rollout))
    }

    async fn get_rollout(&self, id: RolloutId) -> Result<StoredRollout> {
        self.lock()
            .rollouts
            .get(&id)
            .cloned()
            .ok_or(crate::StoreError::RolloutNotFound(id))
    }

    async fn rollout_by_request(&self, request: &RequestId) -> Result<Option<StoredRollout>> {
        self.tx(|tx| tx.rollout_by_request(request))
    }

    async fn list_rollouts(&self, q: &RolloutQuery) -> Result<Page<StoredRollout>> {
        let state = self.lock();
        Ok(newest_first(&state.rollouts, q.before, q.limit, |s| {
            (!q.active_only || !s.rollout.phase.is_terminal()).then(|| s.clone())
        }))
    }

    async fn save_rollout(&self, rollout: Rollout, version: u64) -> Result<u64> {
        self.tx(|tx| logic::save_rollout(tx, rollout, version))
    }

    async fn request_cancel(
        &self,
        id: OperationId,
        by: bm_domain::Actor,
        now: Timestamp,
    ) -> Result<Operation> {
        self.tx(|tx| logic::request_cancel(tx, id, by, now))
    }

    async fn claim(&self, lease: &Lease, now: Timestamp, limit: usize) -> Result<Vec<Claimed>> {
        self.tx(|tx| logic::claim(tx, lease, now, limit))
    }

    async fn renew(&self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<Renewal> {
        self.tx(|tx| tx.renew_leases(lease, held))
    }

    async fn release(&self, owner: &str) -> Result<usize> {
        self.tx(|tx| tx.release_leases(owner))
    }

    async fn save_progress(
        &self,
        fence: &Fence,
        operation: &Operation,
        events: Vec<OperationEvent>,
    ) -> Result<bool> {
        self.tx(|tx| logic::save_progress(tx, fence, operation, events))
    }

    async fn finish(
        &self,
        fence: &Fence,
        operation: Operation,
        outcome: Outcome,
        events: Vec<OperationEvent>,
        now: Timestamp,
    ) -> Result<(Operation, Machine)> {
        self.tx(|tx| logic::finish(tx, fence, operation, outcome, events, now))
    }

    async fn events_after(
        &self,
        after: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<OperationEvent>> {
        let state = self.lock();
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(state.events.len());
        Ok(state.events[start..]
            .iter()
            .filter(|e| filter.matches(e))
            .take(limit)
            .map(|e| (**e).clone())
            .collect())
    }

    async fn last_revision(&self) -> Result<u64> {
        Ok(self.lock().events.len() as u64)
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<OperationEvent>> {
        self.events.subscribe()
    }

    fn append_log(&self, line: LogLine) {
        let mut state = self.lock();
        let lines = state.logs.entry(line.operation_id).or_default();
        if lines.last().is_some_and(|l| l.sequence >= line.sequence) {
            return;
        }
        lines.push(line.clone());
        let _ = self.logs.send(Arc::new(line));
    }

    async fn logs_after(
        &self,
        operation: OperationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>> {
        let state = self.lock();
        Ok(state
            .logs
            .get(&operation)
            .map(|lines| {
                lines
                    .iter()
                    .filter(|l| l.sequence > after)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn last_log_sequence(&self, operation: OperationId) -> Result<u64> {
        Ok(self
            .lock()
            .logs
            .get(&operation)
            .and_then(|l| l.last())
            .map_or(0, |l| l.sequence))
    }

    fn subscribe_logs(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.logs.subscribe()
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn watch_condition(&self) -> watch::Receiver<StoreCondition> {
        self.condition.watch()
    }
}
