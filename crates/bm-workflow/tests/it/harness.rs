//! A started engine over a store and an instant fake provider, and helpers that wait for
//! events (never for time).

use std::sync::Arc;
use std::time::Duration;

use bm_domain::{
    Labels, Machine, MachineId, MachineSpec, Operation, OperationEvent, OperationId, OperationType,
    RequestId,
};
use bm_provider::ProviderRegistry;
use bm_provider_fake::{FakeConfig, FakeProvider, Timing};
use bm_store::{MemoryStore, Store};
use bm_workflow::{
    CancelRequest, Engine, EngineConfig, EventFilter, MachineQuery, NewMachine, OperationRequest,
    RetryPolicy, WorkflowError,
};

pub(crate) struct Harness {
    pub(crate) engine: Engine,
    pub(crate) fake: Arc<FakeProvider>,
    pub(crate) store: Arc<dyn Store>,
}

pub(crate) fn config() -> EngineConfig {
    EngineConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            unavailable_budget: Duration::from_millis(20),
        },
        poll_interval: Duration::from_millis(100),
        ..EngineConfig::default()
    }
}

pub(crate) fn start(store: Arc<dyn Store>, config: EngineConfig) -> Harness {
    let fake = Arc::new(FakeProvider::new(FakeConfig {
        timing: Timing::Instant,
        ..FakeConfig::default()
    }));
    start_with(store, config, fake)
}

pub(crate) fn start_with(
    store: Arc<dyn Store>,
    config: EngineConfig,
    fake: Arc<FakeProvider>,
) -> Harness {
    let mut providers = ProviderRegistry::new();
    providers.register(fake.clone());
    let engine = Engine::new(store.clone(), providers, config);
    engine.start();
    Harness {
        engine,
        fake,
        store,
    }
}

pub(crate) fn memory() -> Harness {
    start(Arc::new(MemoryStore::new()), config())
}

pub(crate) fn id(s: &str) -> MachineId {
    MachineId::new(s).unwrap()
}

impl Harness {
    pub(crate) async fn machine(&self, name: &str, labels: &[(&str, &str)]) -> Machine {
        let n = self
            .engine
            .list_machines(&MachineQuery {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .items
            .len() as u32
            + 1;
        self.engine
            .register_machine(NewMachine {
                id: id(name),
                spec: MachineSpec {
                    provider: "fake".into(),
                    mac_addresses: vec![
                        format!("02:00:00:00:{:02x}:{:02x}", n >> 8, n & 0xff)
                            .parse()
                            .unwrap(),
                    ],
                    ssh_endpoint: format!("root@10.0.{}.{}:22", n >> 8, n & 0xff),
                    image: "ubuntu-24.04".into(),
                    target_cluster: "prod".into(),
                    ..MachineSpec::default()
                },
                labels: Labels::from_pairs(labels.iter().copied()).unwrap(),
                registered_by: bm_domain::Actor::new("harness", "test"),
            })
            .await
            .unwrap()
    }

    pub(crate) async fn submit(
        &self,
        machine: &str,
        t: OperationType,
        request: &str,
    ) -> Result<Operation, WorkflowError> {
        self.engine
            .submit(OperationRequest {
                machine_id: id(machine),
                op_type: t,
                request_id: RequestId::new(request).unwrap(),
                note: String::new(),
                requested_by: bm_domain::Actor::new("test", "token"),
            })
            .await
            .map(|a| a.operation)
    }

    pub(crate) async fn cancel(&self, op: OperationId) -> Result<Operation, WorkflowError> {
        self.engine
            .cancel(CancelRequest {
                operation_id: op,
                requested_by: bm_domain::Actor::default(),
            })
            .await
    }

    /// Submits and waits for the end.
    pub(crate) async fn run(&self, machine: &str, t: OperationType, request: &str) -> Operation {
        let op = self
            .submit(machine, t, request)
            .await
            .unwrap_or_else(|e| panic!("{t} on {machine}: {e}"));
        self.wait_end(op.id).await
    }

    /// Waits for an operation's last event and returns the operation as stored.
    pub(crate) async fn wait_end(&self, op: OperationId) -> Operation {
        let events = self.events_of(op).await;
        assert!(
            events.last().is_some_and(|e| e.is_terminal()),
            "stream ended without a terminal event"
        );
        self.engine.get_operation(op).await.unwrap()
    }

    /// Every event of an operation, from the first, until its stream ends.
    pub(crate) async fn events_of(&self, op: OperationId) -> Vec<OperationEvent> {
        let filter = EventFilter {
            operation_id: Some(op),
            machine_id: None,
        };
        let mut rx = self.engine.watch(filter, Some(0)).await.unwrap();
        let mut out = Vec::new();
        let collect = async {
            while let Some(batch) = rx.recv().await {
                out.extend(batch.unwrap().iter().map(|e| (**e).clone()));
            }
        };
        tokio::time::timeout(Duration::from_secs(20), collect)
            .await
            .expect("operation did not end within 20 s");
        out
    }

    /// Waits until the operation has logged a line containing `needle` (the provider is
    /// inside its action).
    pub(crate) async fn wait_log(&self, op: OperationId, needle: &str) {
        let mut rx = self.engine.logs(op, 0).await.unwrap();
        let wait = async {
            while let Some(batch) = rx.recv().await {
                if batch.unwrap().iter().any(|l| l.message.contains(needle)) {
                    return;
                }
            }
            panic!("operation ended before logging {needle:?}");
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("{needle:?} was not logged within 20 s"));
    }

    /// Waits until the operation has started `stage`.
    pub(crate) async fn wait_stage(&self, op: OperationId, stage: &str) {
        let filter = EventFilter {
            operation_id: Some(op),
            machine_id: None,
        };
        let mut rx = self.engine.watch(filter, Some(0)).await.unwrap();
        let wait = async {
            while let Some(batch) = rx.recv().await {
                if batch
                    .unwrap()
                    .iter()
                    .any(|e| e.kind == bm_domain::EventKind::StageStarted && e.stage == stage)
                {
                    return;
                }
            }
            panic!("operation ended before stage {stage} started");
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("stage {stage} did not start within 20 s"));
    }

    pub(crate) async fn get(&self, machine: &str) -> Machine {
        self.engine.get_machine(&id(machine)).await.unwrap()
    }
}
