//! The API tests' server: `bm_server::serve` in this process, on an ephemeral port, over an
//! engine with instant fake hardware and a store the test chooses, stopped by a oneshot.
//! Tests that need a process (the CLI, SIGTERM, SIGKILL) use `support::Server` instead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bm_domain::rules::Outcome;
use bm_domain::{
    LogLine, Machine, MachineId, MachinePatch, Operation, OperationEvent, OperationId, Timestamp,
};
use bm_provider::ProviderRegistry;
use bm_provider_fake::{FakeConfig, FakeProvider, Timing};
use bm_server::{Deps, ServeError};
use bm_store::{
    Admission, EventFilter, ImportOutcome, Lease, MachineQuery, MemoryStore, OperationQuery, Page,
    SqliteConfig, SqliteStore, Store, StoreError,
};
use bm_workflow::{Engine, EngineConfig};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::support::{Clients, connect};

/// A server running in this process.
pub(crate) struct InProcess {
    /// The address it listens on.
    pub(crate) addr: String,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<Result<(), ServeError>>>,
    /// Kept until the server is gone.
    _dir: Option<tempfile::TempDir>,
}

impl InProcess {
    /// A server over a new SQLite store in a temporary directory, as the binary runs by
    /// default.
    pub(crate) async fn start() -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("data")))
            .expect("opening the store");
        InProcess::serve(Arc::new(store), Some(dir), None, insecure()).await
    }

    /// A server with its own store that authenticates with `auth`.
    pub(crate) async fn start_with_auth(auth: bm_server::Auth) -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("data")))
            .expect("opening the store");
        InProcess::serve(Arc::new(store), Some(dir), None, Arc::new(auth)).await
    }

    /// A server with its own store, over TLS.
    pub(crate) async fn start_tls(tls: Arc<bm_server::Tls>) -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("data")))
            .expect("opening the store");
        InProcess::serve(Arc::new(store), Some(dir), Some(tls), insecure()).await
    }

    /// A server over `store`.
    pub(crate) async fn with_store(store: Arc<dyn Store>) -> InProcess {
        InProcess::serve(store, None, None, insecure()).await
    }

    async fn serve(
        store: Arc<dyn Store>,
        dir: Option<tempfile::TempDir>,
        tls: Option<Arc<bm_server::Tls>>,
        auth: Arc<bm_server::Auth>,
    ) -> InProcess {
        let mut providers = ProviderRegistry::new();
        providers.register(Arc::new(FakeProvider::new(FakeConfig {
            timing: Timing::Instant,
            ..FakeConfig::default()
        })));
        let engine = Engine::new(store, providers, EngineConfig::default());
        engine.start();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("local address").to_string();
        let (shutdown, signal) = oneshot::channel::<()>();
        let deps = Deps {
            engine,
            shutdown_grace: Duration::from_secs(5),
            limits: bm_server::Limits::default(),
            tls,
            auth,
            metrics: None,
            traced: false,
        };
        let served = tokio::spawn(bm_server::serve(
            listener,
            async {
                // A dropped sender is a stop too.
                let _ = signal.await;
            },
            deps,
        ));
        InProcess {
            addr,
            shutdown: Some(shutdown),
            served: Some(served),
            _dir: dir,
        }
    }

    pub(crate) async fn clients(&self) -> Clients {
        connect(&self.addr).await
    }

    /// A channel to it, for clients `Clients` does not hold (health).
    pub(crate) async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .expect("address")
            .connect()
            .await
            .expect("connecting")
    }

    /// Stops the server as a signal would, and returns what `serve` returned.
    pub(crate) async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = self.served.take().expect("served");
        tokio::time::timeout(Duration::from_secs(15), served)
            .await
            .expect("serve did not return within 15 s of its shutdown signal")
            .expect("serve panicked")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A memory store whose client-facing writes (register, import, update, admit, cancel)
/// fail with an injected storage error while one is set; everything else works.
pub(crate) struct FaultyStore {
    inner: MemoryStore,
    fault: Mutex<Option<fn() -> StoreError>>,
}

impl FaultyStore {
    pub(crate) fn new() -> FaultyStore {
        FaultyStore {
            inner: MemoryStore::new(),
            fault: Mutex::new(None),
        }
    }

    /// From now on, those writes fail with `fault()`; `None` heals the store.
    pub(crate) fn set_fault(&self, fault: Option<fn() -> StoreError>) {
        *self.fault.lock().unwrap() = fault;
    }

    fn check(&self) -> bm_store::Result<()> {
        match *self.fault.lock().unwrap() {
            Some(fault) => Err(fault()),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn register_machine(&self, machine: Machine) -> bm_store::Result<Machine> {
        self.check()?;
        self.inner.register_machine(machine).await
    }

    async fn import_machines(
        &self,
        machines: Vec<Machine>,
        dry_run: bool,
    ) -> bm_store::Result<Vec<bm_store::Result<ImportOutcome>>> {
        self.check()?;
        self.inner.import_machines(machines, dry_run).await
    }

    async fn get_machine(&self, id: &MachineId) -> bm_store::Result<Machine> {
        self.inner.get_machine(id).await
    }

    async fn unclaimed_operations(&self) -> bm_store::Result<u64> {
        self.inner.unclaimed_operations().await
    }

    async fn machine_counts(&self) -> bm_store::Result<Vec<bm_store::MachineCount>> {
        self.inner.machine_counts().await
    }

    async fn list_machines(&self, query: &MachineQuery) -> bm_store::Result<Page<Machine>> {
        self.inner.list_machines(query).await
    }

    async fn update_machine(
        &self,
        id: &MachineId,
        patch: &MachinePatch,
        now: Timestamp,
    ) -> bm_store::Result<Machine> {
        self.check()?;
        self.inner.update_machine(id, patch, now).await
    }

    async fn machine_events(
        &self,
        id: &MachineId,
        after: u64,
        limit: usize,
    ) -> bm_store::Result<Vec<bm_domain::MachineEvent>> {
        self.check()?;
        self.inner.machine_events(id, after, limit).await
    }

    async fn machine_by_mac(
        &self,
        mac: &bm_domain::MacAddress,
    ) -> bm_store::Result<Option<Machine>> {
        self.check()?;
        self.inner.machine_by_mac(mac).await
    }

    async fn record_observation(
        &self,
        id: &MachineId,
        observation: &bm_domain::Observation,
        now: Timestamp,
    ) -> bm_store::Result<bm_store::Recorded> {
        self.check()?;
        self.inner.record_observation(id, observation, now).await
    }

    async fn admit(&self, operation: Operation) -> bm_store::Result<Admission> {
        self.check()?;
        self.inner.admit(operation).await
    }

    async fn get_operation(&self, id: OperationId) -> bm_store::Result<Operation> {
        self.inner.get_operation(id).await
    }

    async fn list_operations(&self, query: &OperationQuery) -> bm_store::Result<Page<Operation>> {
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
    ) -> bm_store::Result<Operation> {
        self.check()?;
        self.inner.request_cancel(id, by, now).await
    }

    async fn claim(
        &self,
        lease: &Lease,
        now: Timestamp,
        limit: usize,
    ) -> bm_store::Result<Vec<bm_store::Claimed>> {
        self.inner.claim(lease, now, limit).await
    }

    async fn renew(
        &self,
        lease: &Lease,
        held: &[(OperationId, u64)],
    ) -> bm_store::Result<bm_store::Renewal> {
        self.inner.renew(lease, held).await
    }

    async fn release(&self, owner: &str) -> bm_store::Result<usize> {
        self.inner.release(owner).await
    }

    async fn save_progress(
        &self,
        fence: &bm_store::Fence,
        operation: &Operation,
        events: Vec<OperationEvent>,
    ) -> bm_store::Result<bool> {
        self.inner.save_progress(fence, operation, events).await
    }

    async fn finish(
        &self,
        fence: &bm_store::Fence,
        operation: Operation,
        outcome: Outcome,
        events: Vec<OperationEvent>,
        now: Timestamp,
    ) -> bm_store::Result<(Operation, Machine)> {
        self.inner
            .finish(fence, operation, outcome, events, now)
            .await
    }

    async fn events_after(
        &self,
        after: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> bm_store::Result<Vec<OperationEvent>> {
        self.inner.events_after(after, filter, limit).await
    }

    async fn last_revision(&self) -> bm_store::Result<u64> {
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
    ) -> bm_store::Result<Vec<LogLine>> {
        self.inner.logs_after(operation, after, limit).await
    }

    async fn last_log_sequence(&self, operation: OperationId) -> bm_store::Result<u64> {
        self.inner.last_log_sequence(operation).await
    }

    fn watch_condition(&self) -> tokio::sync::watch::Receiver<bm_store::StoreCondition> {
        self.inner.watch_condition()
    }

    fn subscribe_logs(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.inner.subscribe_logs()
    }

    async fn flush(&self) -> bm_store::Result<()> {
        self.inner.flush().await
    }
}

/// No authentication: the API tests are about the API, `auth.rs` about who may call it.
fn insecure() -> Arc<bm_server::Auth> {
    Arc::new(bm_server::Auth::insecure())
}
