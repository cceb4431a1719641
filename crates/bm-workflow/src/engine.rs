//! The engine's front: what the adapters call. It admits and answers; the executor
//! (`executor.rs`) runs what was admitted; they share only `shared.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bm_domain::{
    EffectiveState, MacAddress, Machine, MachineEvent, MachineId, Operation, OperationId,
    OperationPhase,
};
use bm_provider::ProviderRegistry;
use bm_store::{MachineCount, Store, StoreCondition};
use tokio::sync::broadcast::error::RecvError;

use crate::api::{
    Admission, CancelRequest, ImportOutcome, ImportRequest, MachineQuery, MachineUpdate,
    NewMachine, OperationQuery, OperationRequest, Page, Scope,
};
use crate::netboot::{BootAnswer, NETBOOT_STAGE, Netboot};
use crate::policy::RetryPolicy;
use crate::shared::Inner;
use crate::sync::{PollRound, StatusPollConfig};
use crate::telemetry::{NoTelemetry, NoTraceLinks, Telemetry, TraceLinks};
use crate::{WorkflowError, executor, now};

/// Items read from the store per query while a scoped listing fills its page.
const SCOPED_READ: usize = 256;

/// Settings of an [`Engine`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This executor's id in leases; unique per process start.
    pub owner: String,
    /// The most operations running at once, over all machines.
    pub max_concurrent_operations: usize,
    /// How long a claim on an operation lasts unless renewed (renewed every third of it).
    pub lease_duration: Duration,
    /// How often the executor looks for work besides being woken (expired leases of other
    /// executors).
    pub poll_interval: Duration,
    /// Retries of failed attempts.
    pub retry: RetryPolicy,
    /// One timeout for every step attempt, replacing the built-in per-step defaults (for
    /// tests and fast fake hardware).
    pub step_timeout: Option<Duration>,
    /// How often one stage may be cut short by a server stop or crash before its operation
    /// is failed for a person to look at.
    pub max_interruptions: u32,
    /// How long a provider action gets to stop after its token fired before it is dropped.
    pub cancel_grace: Duration,
    /// How long a cancel call waits for a running operation to end, so that its answer
    /// shows the outcome.
    pub cancel_wait: Duration,
    /// Batches buffered per watcher or log reader before it is considered slow.
    pub stream_buffer: usize,
    /// Bytes of events or log lines buffered per watcher or log reader: a reader that does
    /// not read costs about this much, plus one store page; it still gets every item when
    /// it reads again (its stream catches up from the store).
    pub stream_buffer_bytes: usize,
    /// The status poll (power and health sync); off by default.
    pub status_poll: StatusPollConfig,
    /// The boot service's side: with it, `reboot-to-netboot` ends when the deploy
    /// environment checks in (see [`Netboot`]); without it, when the provider reports the
    /// power cycle done.
    pub netboot: Option<Arc<Netboot>>,
    /// Where the executor reports its work (metrics); nowhere by default.
    pub telemetry: Arc<dyn Telemetry>,
    /// How operations' spans join the trace of the request that admitted them; not at all
    /// by default.
    pub trace_links: Arc<dyn TraceLinks>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            owner: format!("bm-{}", ulid::Ulid::generate()),
            max_concurrent_operations: 512,
            lease_duration: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            step_timeout: None,
            max_interruptions: 3,
            cancel_grace: Duration::from_secs(2),
            cancel_wait: Duration::from_secs(2),
            stream_buffer: 4,
            stream_buffer_bytes: 256 * 1024,
            status_poll: StatusPollConfig::default(),
            netboot: None,
            telemetry: Arc::new(NoTelemetry),
            trace_links: Arc::new(NoTraceLinks),
        }
    }
}

/// The workflow engine. Cheap to clone; clones share one engine.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("owner", &self.inner.config.owner)
            .field("providers", &self.inner.providers)
            .finish()
    }
}

impl Engine {
    /// An engine over `store` and `providers`. It admits operations at once; it runs them
    /// once [`Engine::start`] was called.
    pub fn new(store: Arc<dyn Store>, providers: ProviderRegistry, config: EngineConfig) -> Self {
        Engine {
            inner: Arc::new(Inner::new(store, providers, config)),
        }
    }

    /// Starts the executor: it claims pending operations (and those a stopped executor left
    /// behind) and runs them. Must be called within a Tokio runtime. On a read-only store it
    /// runs nothing: operations stay as they are until the store is restored.
    pub fn start(&self) {
        if let StoreCondition::ReadOnly(why) = self.inner.store.condition() {
            tracing::warn!(reason = %why, "the store is read-only: the executor does not run");
            return;
        }
        executor::start(&self.inner);
        self.inner.tasks.spawn(crate::rollouts::run(self.clone()));
        if let Some(interval) = self.inner.config.status_poll.interval {
            self.inner
                .tasks
                .spawn(crate::sync::run(self.inner.clone(), interval));
        }
    }

    /// What a machine that network-boots with `mac` is told to do: the deploy environment,
    /// with a one-time token, while an operation of it is in `reboot-to-netboot` and the
    /// engine has a [`Netboot`]; the local disk otherwise (and for a MAC no machine has).
    ///
    /// # Errors
    ///
    /// A store failure.
    pub async fn netboot_answer(&self, mac: &MacAddress) -> Result<BootAnswer, WorkflowError> {
        let store = &self.inner.store;
        let Some(machine) = store.machine_by_mac(mac).await? else {
            return Ok(BootAnswer::LocalDisk {
                machine_id: None,
                why: format!("no machine has the MAC {mac}"),
            });
        };
        let local = |why: String| {
            Ok(BootAnswer::LocalDisk {
                machine_id: Some(machine.id.clone()),
                why,
            })
        };
        let Some(netboot) = &self.inner.config.netboot else {
            return local("this server does not serve network boots".into());
        };
        let Some(op_id) = machine.status.active_operation_id else {
            return local("no operation of the machine is running".into());
        };
        let op = store.get_operation(op_id).await?;
        if op.phase != OperationPhase::Running || op.current_stage != NETBOOT_STAGE {
            return local(format!(
                "its operation {op_id} is not in {NETBOOT_STAGE} (stage {:?})",
                op.current_stage
            ));
        }
        let token = netboot.ticket(&machine.id, op_id, std::time::SystemTime::now());
        Ok(BootAnswer::Deploy {
            machine_id: machine.id,
            operation_id: op_id,
            token,
        })
    }

    /// Runs one round of the status poll now: reads the BMC of every machine that has no
    /// active operation and is not blocked, and records what each said (see
    /// [`StatusPollConfig`]), as fast as its concurrency allows. For tests, benchmarks and
    /// tools; a started engine with an interval runs rounds by itself.
    ///
    /// # Errors
    ///
    /// A store failure while listing the machines (a reading that cannot be recorded is
    /// counted in [`PollRound::failed`]).
    pub async fn poll_status_once(&self) -> Result<PollRound, WorkflowError> {
        crate::sync::round(&self.inner, None, 0).await
    }

    /// Stops the engine: no new work is claimed, running operations are interrupted at
    /// once (their current stage runs again at the next start), their leases are released,
    /// and open streams end. Waits up to `grace` for the tasks.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.shutdown.cancel();
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("executor tasks did not stop within {grace:?}");
        }
        match inner.store.release(&inner.config.owner).await {
            Ok(n) if n > 0 => tracing::info!(
                operations = n,
                "released leases; they resume at the next start"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "could not release leases; they resume when they expire")
            }
        }
        if let Err(e) = inner.store.flush().await {
            tracing::error!(error = %e, "could not flush the store");
        }
    }

    /// True once [`Engine::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// The store's condition (ok, disk full, read-only, unusable) and its changes, for
    /// health checks: `borrow()` reads it without blocking.
    pub fn store_condition(&self) -> tokio::sync::watch::Receiver<StoreCondition> {
        self.inner.store.watch_condition()
    }

    /// The providers.
    pub fn providers(&self) -> &ProviderRegistry {
        &self.inner.providers
    }

    /// How many events a watcher may fall behind the live ones before it reads the missed
    /// ones back from the store: a cache of recently sent events needs no more entries.
    pub fn live_event_window(&self) -> usize {
        bm_store::BROADCAST_CAPACITY
    }

    /// How many operations this executor runs now.
    pub fn running_operations(&self) -> usize {
        self.inner.running().len()
    }

    fn check_provider(&self, m: &Machine) -> Result<(), WorkflowError> {
        let provider = self.inner.providers.get(&m.spec.provider)?;
        provider
            .validate(m)
            .map_err(|e| WorkflowError::ProviderRejected {
                machine_id: m.id.to_string(),
                provider: m.spec.provider.clone(),
                message: e.message().to_owned(),
            })
    }

    /// Registers a machine in FACTORY_READY.
    ///
    /// # Errors
    ///
    /// An invalid spec, an unknown provider or one that refuses the spec, an id or MAC
    /// address already taken.
    pub async fn register_machine(&self, new: NewMachine) -> Result<Machine, WorkflowError> {
        let mut m = Machine::register(new.id, new.spec, new.labels, now())?;
        m.updated_by = new.registered_by;
        self.check_provider(&m)?;
        Ok(self.inner.store.register_machine(m).await?)
    }

    /// Imports machines, each on its own: a machine that exists with the same spec and
    /// labels is [`ImportOutcome::Unchanged`]; one that fails validation or conflicts is
    /// reported and the others still go in. The results come in the order of the request,
    /// one per machine.
    ///
    /// # Errors
    ///
    /// Only a failure of the store as a whole; row errors are in the results.
    pub async fn import_machines(
        &self,
        req: ImportRequest,
    ) -> Result<Vec<Result<ImportOutcome, WorkflowError>>, WorkflowError> {
        let t = now();
        let mut results: Vec<Option<Result<ImportOutcome, WorkflowError>>> =
            Vec::with_capacity(req.machines.len());
        let mut valid = Vec::new();
        for NewMachine {
            id,
            spec,
            labels,
            registered_by,
        } in req.machines
        {
            match Machine::register(id, spec, labels, t)
                .map(|mut m| {
                    m.updated_by = registered_by;
                    m
                })
                .map_err(WorkflowError::from)
                .and_then(|m| self.check_provider(&m).map(|()| m))
            {
                Ok(m) => {
                    valid.push(m);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut stored = self
            .inner
            .store
            .import_machines(valid, req.dry_run)
            .await?
            .into_iter();
        Ok(results
            .into_iter()
            .map(|r| match r {
                Some(err) => err,
                None => stored
                    .next()
                    .map(|r| {
                        r.map(ImportOutcome::from_store)
                            .map_err(WorkflowError::from)
                    })
                    .unwrap_or_else(|| {
                        Err(WorkflowError::Internal(
                            "the store returned fewer import results than rows".into(),
                        ))
                    }),
            })
            .collect())
    }

    /// Reads a machine.
    ///
    /// # Errors
    ///
    /// Not found, or a store failure.
    pub async fn get_machine(&self, id: &MachineId) -> Result<Machine, WorkflowError> {
        Ok(self.inner.store.get_machine(id).await?)
    }

    /// How many machines are in each phase and effective state (for metrics: no machine
    /// document is decoded, see [`bm_store::Store::machine_counts`]).
    ///
    /// # Errors
    ///
    /// A store failure.
    pub async fn machine_counts(&self) -> Result<Vec<MachineCount>, WorkflowError> {
        Ok(self.inner.store.machine_counts().await?)
    }

    /// How many operations wait for an executor (of any replica): pending, or running
    /// without a lease, to resume.
    ///
    /// # Errors
    ///
    /// A store failure.
    pub async fn queued_operations(&self) -> Result<u64, WorkflowError> {
        Ok(self.inner.store.unclaimed_operations().await?)
    }

    /// A machine's events (what happened to it outside operations), oldest first, with a
    /// sequence above `after`, at most `limit`.
    ///
    /// # Errors
    ///
    /// A store failure.
    pub async fn machine_events(
        &self,
        id: &MachineId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MachineEvent>, WorkflowError> {
        Ok(self.inner.store.machine_events(id, after, limit).await?)
    }

    /// Lists machines.
    ///
    /// # Errors
    ///
    /// A store failure.
    pub async fn list_machines(
        &self,
        query: &MachineQuery,
    ) -> Result<Page<Machine>, WorkflowError> {
        let store = &self.inner.store;
        let mut q = query.to_store();
        let selectors = match &query.scope {
            Scope::All => return Ok(Page::from_store(store.list_machines(&q).await?)),
            Scope::AnyOf(selectors) => selectors,
        };
        match selectors.as_slice() {
            [] => {
                return Ok(Page {
                    items: Vec::new(),
                    more: false,
                });
            }
            // One scope: the store applies both selectors (through its label index).
            [one] => {
                q.selector = q.selector.and(one);
                return Ok(Page::from_store(store.list_machines(&q).await?));
            }
            _ => {}
        }
        // Several: the store cannot OR selectors, so pages of the caller's selector are read
        // until the page is full of machines in scope and one more in scope shows there is
        // a next page.
        q.limit = query.limit.max(SCOPED_READ);
        let mut items = Vec::new();
        loop {
            let page = store.list_machines(&q).await?;
            let last = page.items.last().map(|m| m.id.clone());
            for m in page.items {
                if !query.scope.matches(&m.labels) {
                    continue;
                }
                if items.len() == query.limit {
                    return Ok(Page { items, more: true });
                }
                items.push(m);
            }
            match last {
                Some(last) if page.more => q.after = Some(last),
                _ => return Ok(Page { items, more: false }),
            }
        }
    }

    /// True when machine `id` exists and is in `scope`.
    ///
    /// # Errors
    ///
    /// A store failure.
    pub async fn machine_in_scope(
        &self,
        id: &MachineId,
        scope: &Scope,
    ) -> Result<bool, WorkflowError> {
        match self.inner.store.get_machine(id).await {
            Ok(m) => Ok(scope.matches(&m.labels)),
            Err(bm_store::StoreError::MachineNotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies a patch to a machine's spec and labels (to the record as it is when written,
    /// so that concurrent patches of different fields both land).
    ///
    /// # Errors
    ///
    /// Not found, an invalid spec, a provider that refuses it, a spec change during an
    /// operation, a MAC address already taken.
    pub async fn update_machine(&self, update: MachineUpdate) -> Result<Machine, WorkflowError> {
        let MachineUpdate { id, patch } = update;
        if patch.touches_spec() {
            let mut probe = self.inner.store.get_machine(&id).await?;
            if let (Some(spec), _) = patch.apply(&probe)? {
                probe.spec = spec;
                self.check_provider(&probe)?;
            }
        }
        Ok(self.inner.store.update_machine(&id, &patch, now()).await?)
    }

    /// Admits an operation, idempotently on `(machine_id, request_id)`, and wakes the
    /// executor. The returned operation is pending (or, for a repeated request, as it is
    /// now).
    ///
    /// # Errors
    ///
    /// Not found, the domain's refusals (wrong phase, blocked, busy, ...), a request id
    /// reused for another type, a note too long, or shutdown.
    pub async fn submit(&self, req: OperationRequest) -> Result<Admission, WorkflowError> {
        self.submit_for(req, None).await
    }

    /// [`Engine::submit`], for `rollout` when one asks (the operation records it).
    pub(crate) async fn submit_for(
        &self,
        req: OperationRequest,
        rollout: Option<bm_domain::RolloutId>,
    ) -> Result<Admission, WorkflowError> {
        if self.is_shutting_down() {
            return Err(WorkflowError::ShuttingDown);
        }
        let t = now();
        let id = self.inner.new_ulid(t);
        let mut op = Operation::new(
            OperationId::from_ulid(id),
            req.machine_id,
            req.op_type,
            req.request_id,
            req.note,
            t,
        )?;
        op.requested_by = req.requested_by;
        op.trace_parent = self.inner.config.trace_links.capture();
        op.rollout_id = rollout;
        let stored = self.inner.store.admit(op).await?;
        // The idle states end with an admission; the others are reported as the operation
        // ends (BUSY, and ATTENTION or BLOCKED that an admitted operation may leave).
        if let Some((state, since)) = stored.left
            && matches!(
                state,
                EffectiveState::New | EffectiveState::Idle | EffectiveState::MaintenanceIdle
            )
        {
            let stayed = stored.operation.created_at.duration_since(since);
            self.inner.config.telemetry.state_left(state, stayed);
        }
        let admission = Admission::from_store(stored);
        if admission.created {
            self.inner.wake.notify_one();
        }
        Ok(admission)
    }

    /// Cancels an operation. A pending one ends at once; a running one is stopped (its
    /// provider action's token fires) and this call waits briefly for it to end, so the
    /// answer normally shows it CANCELED.
    ///
    /// # Errors
    ///
    /// Not found, or already ended.
    pub async fn cancel(&self, req: CancelRequest) -> Result<Operation, WorkflowError> {
        let id = req.operation_id;
        let store = &self.inner.store;
        let mut events = store.subscribe_events();
        let at = now();
        let op = store
            .request_cancel(id, req.requested_by.clone(), at)
            .await?;
        if !op.is_active() {
            // A pending operation is ended by the cancel itself (its end is this call's
            // time), not by an executor: the telemetry hears of it from here.
            if op.finished_at == Some(at) {
                executor::report_end(&self.inner, &op);
            }
            return Ok(op);
        }
        if let Some(running) = self.inner.running().get(&id) {
            running.token.cancel();
        }
        let wait = tokio::time::sleep(self.inner.config.cancel_wait);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                r = events.recv() => match r {
                    Ok(e) if e.operation_id == id && e.is_terminal() => break,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => {
                        if !store.get_operation(id).await?.is_active() {
                            break;
                        }
                    }
                    Err(RecvError::Closed) => break,
                },
                () = &mut wait => break,
            }
        }
        Ok(store.get_operation(id).await?)
    }

    /// Reads an operation.
    ///
    /// # Errors
    ///
    /// Not found, or a store failure.
    pub async fn get_operation(&self, id: OperationId) -> Result<Operation, WorkflowError> {
        Ok(self.inner.store.get_operation(id).await?)
    }

    /// Lists operations, newest first.
    ///
    /// # Errors
    ///
    /// A store failure.
    pub async fn list_operations(
        &self,
        query: &OperationQuery,
    ) -> Result<Page<Operation>, WorkflowError> {
        let store = &self.inner.store;
        let mut q = query.to_store();
        if query.scope.is_all() {
            return Ok(Page::from_store(store.list_operations(&q).await?));
        }
        // Operations carry their machine's id, not its labels: each machine is read once
        // per call (its labels as they are now), and pages are read until this page is
        // full and one more operation in scope shows there is a next page.
        q.limit = query.limit.max(SCOPED_READ);
        let mut visible: HashMap<MachineId, bool> = HashMap::new();
        let mut items = Vec::new();
        loop {
            let page = store.list_operations(&q).await?;
            let last = page.items.last().map(|o| o.id);
            for op in page.items {
                let shown = match visible.get(&op.machine_id) {
                    Some(v) => *v,
                    None => {
                        let v = self.machine_in_scope(&op.machine_id, &query.scope).await?;
                        visible.insert(op.machine_id.clone(), v);
                        v
                    }
                };
                if !shown {
                    continue;
                }
                if items.len() == query.limit {
                    return Ok(Page { items, more: true });
                }
                items.push(op);
            }
            match last {
                Some(last) if page.more => q.before = Some(last),
                _ => return Ok(Page { items, more: false }),
            }
        }
    }
}
