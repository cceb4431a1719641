//! A store that holds the executor at one exact point: right after it committed the start of
//! a given stage, before it can call the provider. Tests use it to put a stop or a cancel in
//! that window without depending on timing.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bm_domain::rules::Outcome;
use bm_domain::{
    EventKind, LogLine, Machine, MachineId, MachinePatch, Operation, OperationEvent, OperationId,
    Timestamp,
};
use bm_store::{
    Admission, EventFilter, ImportOutcome, Lease, MachineQuery, OperationQuery, Page, Recorded,
    Result, Store,
};
use tokio::sync::{broadcast, oneshot};

/// The test's side of a hold: `committed` fires once the stage's start is committed (the
/// executor is then held inside that write); sending on `release` lets it return.
pub(crate) struct Hold {
    pub(crate) committed: oneshot::Receiver<()>,
    pub(crate) release: oneshot::Sender<()>,
}

struct Armed {
    stage: &'static str,
    committed: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// Delegates everything to the store inside; once armed, holds the first `save_progress`
/// that commits a `StageStarted` event of the armed stage.
pub(crate) struct HoldingStore {
    inner: Arc<dyn Store>,
    armed: Mutex<Option<Armed>>,
}

impl HoldingStore {
    /// A store that delegates to `inner` and holds nothing until armed.
    pub(crate) fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(HoldingStore {
            inner,
            armed: Mutex::new(None),
        })
    }

    /// Holds the executor after the next committed start of `stage`.
    pub(crate) fn hold_after_start_of(&self, stage: &'static str) -> Hold {
        let (committed_tx, committed_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Armed {
            stage,
            committed: committed_tx,
            release: release_rx,
        });
        Hold {
            committed: committed_rx,
            release: release_tx,
        }
    }

    /// Takes the hold if these events start its stage.
    fn take_hold(&self, events: &[OperationEvent]) -> Option<Armed> {
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        let starts = armed.as_ref().is_some_and(|a| {
            events
                .iter()
                .any(|e| e.kind == EventKind::StageStarted && e.stage == a.stage)
        });
        if starts { armed.take() } else { None }
    }
}

#[async_trait]
impl Store for HoldingStore {
    async fn save_progress(
        &self,
        fence: &bm_store::Fence,
        operation: &Operation,
        events: Vec<OperationEvent>,
    ) -> Result<bool> {
        let hold = self.take_hold(&events);
        let canceled = self.inner.save_progress(fence, operation, events).await?;
        if let Some(hold) = hold {
            let _ = hold.committed.send(());
            // A dropped sender (the test gave up) lets the executor go on as well.
            let _ = hold.release.await;
        }
        Ok(canceled)
    }

    async fn register_machine(&self, machine: Machine) -> Result<Machine> {
        self.inner.register_machine(machine).await
    }

    async fn import_machines(
        &self,
        machines: Vec<Machine>,
        dry_run: bool,
    ) -> Result<Vec<Result<ImportOutcome>>> {
        self.inner.import_machines(machines, dry_run).await
    }

    async fn get_machine(&self, id: &MachineId) -> Result<Machine> {
        self.inner.get_machine(id).await
    }

    async fn unclaimed_operations(&self) -> Result<u64> {
        self.inner.unclaimed_operations().await
    }

    async fn machine_counts(&self) -> Result<Vec<bm_store::MachineCount>> {
        self.inner.machine_counts().await
    }

    async fn list_machines(&self, query: &MachineQuery) -> Result<Page<Machine>> {
        self.inner.list_machines(query).await
    }

    async fn update_machine(
        &self,
        id: &MachineId,
        patch: &MachinePatch,
        now: Timestamp,
    ) -> Result<Machine> {
        self.inner.update_machine(id, patch, now).await
    }

    async fn machine_events(
        &self,
        id: &MachineId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<bm_domain::MachineEvent>> {
        self.inner.machine_events(id, after, limit).await
    }

    async fn machine_by_mac(&self, mac: &bm_domain::MacAddress) -> Result<Option<Machine>> {
        self.inner.machine_by_mac(mac).await
    }

    async fn record_observation(
        &self,
        id: &MachineId,
        observation: &bm_domain::Observation,
        now: Timestamp,
    ) -> Result<Recorded> {
        self.inner.record_observation(id, observation, now).await
    }

    async fn admit(&self, operation: Operation) -> Result<Admission> {
        self.inner.admit(operation).await
    }

    async fn get_operation(&self, id: OperationId) -> Result<Operation> {
        self.inner.get_operation(id).await
    }

    async fn list_operations(&self, query: &OperationQuery) -> Result<Page<Operation>> {
        self.inner.list_operations(query).await
    }

    async fn create_rollout(
        &self,
        rollout: bm_domain::Rollout,
    ) -> bm_store::Result<(bm_store::StoredRollout, bool)> {
        self.inner.create_rollout(rollout).await
    }

    async fn get_rollout(
        &self,
        id: bm_domain::RolloutId,
    ) -> bm_store::Result<bm_store::StoredRollout> {
        self.inner.get_rollout(id).await
    }

    async fn rollout_by_request(
        &self,
        request: &bm_domain::RequestId,
    ) -> bm_store::Result<Option<bm_store::StoredRollout>> {
        self.inner.rollout_by_request(request).await
    }

    async fn list_rollouts(
        &self,
        query: &bm_store::RolloutQuery,
    ) -> bm_store::Result<Page<bm_store::StoredRollout>> {
        self.inner.list_rollouts(query).await
    }

    async fn save_rollout(
        &self,
        rollout: bm_domain::Rollout,
        version: u64,
    ) -> bm_store::Result<u64> {
        self.inner.save_rollout(rollout, version).await
    }

    async fn request_cancel(
        &self,
        id: OperationId,
        by: bm_domain::Actor,
        now: Timestamp,
    ) -> Result<Operation> {
        self.inner.request_cancel(id, by, now).await
    }

    async fn claim(
        &self,
        lease: &Lease,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<bm_store::Claimed>> {
        self.inner.claim(lease, now, limit).await
    }

    async fn renew(&self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<bm_store::Renewal> {
        self.inner.renew(lease, held).await
    }

    async fn release(&self, owner: &str) -> Result<usize> {
        self.inner.release(owner).await
    }

    async fn finish(
        &self,
        fence: &bm_store::Fence,
        operation: Operation,
        outcome: Outcome,
        events: Vec<OperationEvent>,
        now: Timestamp,
    ) -> Result<(Operation, Machine)> {
        self.inner
            .finish(fence, operation, outcome, events, now)
            .await
    }

    async fn events_after(
        &self,
        after: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<OperationEvent>> {
        self.inner.events_after(after, filter, limit).await
    }

    async fn last_revision(&self) -> Result<u64> {
        self.inner.last_revision().await
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<OperationEvent>> {
        self.inner.subscribe_events()
    }

    fn append_log(&self, line: LogLine) {
        self.inner.append_log(line);
    }

    async fn logs_after(
        &self,
        operation: OperationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>> {
        self.inner.logs_after(operation, after, limit).await
    }

    async fn last_log_sequence(&self, operation: OperationId) -> Result<u64> {
        self.inner.last_log_sequence(operation).await
    }

    fn subscribe_logs(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.inner.subscribe_logs()
    }

    fn watch_condition(&self) -> tokio::sync::watch::Receiver<bm_store::StoreCondition> {
        self.inner.watch_condition()
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}
