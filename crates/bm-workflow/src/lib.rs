//! The workflow engine: it turns an admitted operation into provider actions, step by step,
//! and never loses track of one.
//!
//! [`Engine`] is the one entry point for the adapters: it registers and updates machines
//! (checking them against their provider), admits operations (idempotently), cancels them,
//! runs them in its executor, and serves the event and log streams that observers follow.
//!
//! # Architecture invariant
//!
//! The engine knows nothing of gRPC: it speaks bm-domain types, its own request and outcome
//! types, and its own errors, each with an [`ErrorKind`]; an adapter needs nothing of the
//! store but the `Arc<dyn Store>` it wires in. Plans and step kinds are private: the outside
//! sees operation types, phases and stage names only.
//! Providers are reached through the [`bm_provider::Provider`] trait alone, looked up by the
//! name in a machine's spec.
//!
//! # Guarantees of the executor
//!
//! - **One execution per operation.** An operation runs only while this engine holds its
//!   lease in the store; every write is fenced by the lease's owner and generation, and a
//!   run whose lease another claim superseded stops and writes nothing more.
//! - **Durable progress.** Every stage start and end is committed (with its event) before the
//!   next provider action; a restart resumes at the stage that was running, which runs again
//!   (steps are idempotent), and never re-runs a stage that had succeeded.
//! - **Nothing stays stuck.** On shutdown the running operations are interrupted and their
//!   leases released, so the next start takes them up at once; after a crash the next start
//!   does the same (the SQLite store releases dead leases when it opens; elsewhere leases
//!   expire). A stage interrupted too often, or one that cannot safely run twice, ends its
//!   operation FAILED with NeedsIntervention and a reason that says so.
//! - **Prompt cancel.** A cancel reaches the running provider action's cancellation token
//!   at once and the operation ends CANCELED within a second.
//! - **Isolation.** Operations of different machines run concurrently up to a global limit;
//!   a slow machine holds up only itself.
//!
//! # Assumptions
//!
//! - Providers keep the guarantees documented on [`bm_provider::Provider`] (idempotent,
//!   cancellable, non-blocking actions).
//! - Clocks of the replicas sharing a store agree to well within a lease duration.

mod api;
mod engine;
mod error;
mod executor;
mod netboot;
mod plan;
mod policy;
mod rollouts;
mod shared;
mod steps;
mod stream;
mod sync;
mod telemetry;

pub use api::{
    Admission, CancelRequest, EventFilter, ImportOutcome, ImportRequest, MachineQuery,
    MachineUpdate, NewMachine, OperationQuery, OperationRequest, Page, Scope,
};
pub use bm_store::{CommitObserver, MachineCount, RolloutQuery, StoreCondition};
pub use engine::{Engine, EngineConfig};
pub use error::{ErrorKind, ResumePoint, WorkflowError};
pub use netboot::{BootAnswer, CheckIn, CheckInError, NETBOOT_STAGE, Netboot, NetbootConfig};
pub use plan::{describe, stage_names};
pub use policy::{Decision, RetryPolicy, decide};
pub use rollouts::{RolloutRequest, RolloutTarget};
pub use stream::{Batch, EventBatch, LogBatch, StreamStats};
pub use sync::{PollRound, StatusPollConfig};
pub use telemetry::{Attempt, AttemptOutcome, NoTelemetry, NoTraceLinks, Telemetry, TraceLinks};

/// The `tracing` target of the spans that exist for traces only (a stage attempt, a
/// provider call; bm-server's gRPC call): the log output leaves it out, so that they cost
/// nothing unless traces are exported. The `operation` span is in the executor's own target
/// (its fields give every log line of a run its operation).
pub const TRACE_TARGET: &str = "bm_trace";

/// The current time, read once per use.
pub(crate) fn now() -> bm_domain::Timestamp {
    bm_domain::Timestamp::from_system_time(std::time::SystemTime::now())
}
