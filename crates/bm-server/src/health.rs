//! Health follows the store: gRPC health reports NOT_SERVING when the store is unusable.
//!
//! | store condition | `""` and the API services | `bm-store-writes` |
//! |---|---|---|
//! | ok | SERVING | SERVING |
//! | disk full | SERVING (reads work; writes answer UNAVAILABLE) | NOT_SERVING |
//! | read-only | SERVING (reads work; writes answer FAILED_PRECONDITION) | NOT_SERVING |
//! | unusable | NOT_SERVING | NOT_SERVING |
//! | unreachable (PostgreSQL: its database is down, failing over or out of disk) | NOT_SERVING | NOT_SERVING |
//!
//! The store logs every change of its condition; `bm-store-writes` lets a probe tell a server
//! that serves reads only from one that serves everything.

use bm_proto::v1::machine_service_server::MachineServiceServer;
use bm_proto::v1::operation_service_server::OperationServiceServer;
use bm_proto::v1::rollout_service_server::RolloutServiceServer;
use bm_workflow::{Engine, StoreCondition};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::machines::Machines;
use crate::operations::Operations;
use crate::rollouts::Rollouts;

/// The health service name that is SERVING only while the store takes writes.
pub(crate) const STORE_WRITES: &str = "bm-store-writes";

/// Sets the health statuses for `condition`.
async fn apply(health: &HealthReporter, condition: &StoreCondition) {
    let status = |up: bool| {
        if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let serving = status(condition.serves_reads());
    health.set_service_status("", serving).await;
    health
        .set_service_status(
            <MachineServiceServer<Machines> as tonic::server::NamedService>::NAME,
            serving,
        )
        .await;
    health
        .set_service_status(
            <OperationServiceServer<Operations> as tonic::server::NamedService>::NAME,
            serving,
        )
        .await;
    health
        .set_service_status(
            <RolloutServiceServer<Rollouts> as tonic::server::NamedService>::NAME,
            serving,
        )
        .await;
    health
        .set_service_status(STORE_WRITES, status(condition.takes_writes()))
        .await;
}

/// Sets the health statuses for the store's condition now.
pub(crate) async fn apply_current(health: &HealthReporter, engine: &Engine) {
    let now = engine.store_condition().borrow().clone();
    apply(health, &now).await;
}

/// Keeps the health statuses in step with the store's condition until the engine shuts down
/// (the shutdown sets NOT_SERVING itself).
pub(crate) async fn follow_store(health: HealthReporter, engine: Engine) {
    let mut condition = engine.store_condition();
    loop {
        let now = condition.borrow_and_update().clone();
        if engine.is_shutting_down() {
            return;
        }
        apply(&health, &now).await;
        if condition.changed().await.is_err() {
            return;
        }
    }
}
