//! Storage for the control plane: machines, operations with their stage records, the
//! idempotency keys, events, provider log lines, and the leases by which executors claim
//! operations.
//!
//! [`Store`] is the one interface; [`SqliteStore`] is the embedded, durable default and
//! [`MemoryStore`] serves unit tests and throwaway runs. Both run the same transaction logic
//! (written once, in `logic.rs`) and pass the same conformance suite.
//!
//! # Architecture invariant
//!
//! A state change is reported (its call returns, its events are published) only after it is
//! committed. Every rule about what may change is bm-domain's: this crate applies the rules
//! atomically, it does not make them. It knows nothing of gRPC or providers.
//!
//! # Leases
//!
//! An executor works on an operation only while it holds the operation's lease (an owner id
//! and an expiry). [`Store::claim`] hands out pending operations and operations whose lease
//! expired, each with a [`Fence`]: the owner and the operation's fencing generation, a
//! counter bumped at every claim. Every write of the executor is fenced by both, so an
//! executor whose lease was taken over by another (it stalled past the expiry) can no longer
//! change anything, not even after a later claim gave the operation back to it. A renewal
//! ([`Store::renew`]) tells the executor which leases it lost. This is what lets several
//! servers share one database.
//!
//! # Storage faults
//!
//! A store reports what it can do through [`Store::condition`] ([`StoreCondition`]: ok, disk
//! full, read-only, unusable), cheap to read and to watch, for health checks. A write that
//! finds no space fails with [`StoreError::DiskFull`] and changes nothing; writes work again
//! by themselves once there is space. [`SqliteStore::open`] checks the database's integrity
//! and refuses a damaged one ([`StoreError::Damaged`]) unless asked to open it read-only
//! ([`OnDamage::ReadOnly`]); a stored record that cannot be read back is reported with its
//! table and id ([`StoreError::Corrupt`]) and skipped by listings. [`backup`] copies a live
//! SQLite store.

mod condition;
mod error;
mod logic;
mod memory;
mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use bm_domain::rules::Outcome;
use bm_domain::{
    EffectiveState, LabelSelector, LogLine, MacAddress, Machine, MachineEvent, MachineId,
    MachinePatch, Observation, Operation, OperationEvent, OperationId, OperationPhase,
    OperationType, Phase, PowerState, RequestId, Rollout, RolloutId, Timestamp,
};
use tokio::sync::{broadcast, watch};

pub use condition::StoreCondition;
pub use error::StoreError;
pub use memory::MemoryStore;
pub use postgres::{PgConfig, PgStore};
pub use sqlite::{BackupReport, OnDamage, SqliteConfig, SqliteStore, backup};

/// A database's schema version beside the one this program knows: what
/// `bm-server migrate --check` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemaStatus {
    /// The version found (0: no schema yet).
    pub found: i64,
    /// The newest version this program knows.
    pub supported: i64,
}

impl SchemaStatus {
    /// True when the database is at the version this program knows.
    pub fn is_current(&self) -> bool {
        self.found == self.supported
    }

    /// True when the database was written by a newer program (it would be refused).
    pub fn is_newer(&self) -> bool {
        self.found > self.supported
    }
}

/// Where a store is: a SQLite data directory or a PostgreSQL database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite data directory.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database URL (`postgres://USER@HOST:PORT/DB`).
    Postgres(String),
}

impl StoreUrl {
    /// A `postgres://` or `postgresql://` URL names a PostgreSQL database; anything else is
    /// a SQLite data directory (`sqlite://` in front of it is dropped).
    pub fn parse(s: &str) -> StoreUrl {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            StoreUrl::Postgres(s.to_owned())
        } else {
            StoreUrl::Sqlite(s.strip_prefix("sqlite://").unwrap_or(s).into())
        }
    }
}

/// The schema version of the store at `url` beside the one this program knows, read without
/// changing anything: for `bm-server migrate --check`.
///
/// # Errors
///
/// A backend error (the store cannot be reached or read).
pub fn schema_status(url: &StoreUrl) -> Result<SchemaStatus> {
    match url {
        StoreUrl::Sqlite(dir) => SqliteStore::schema_status(dir),
        StoreUrl::Postgres(url) => PgStore::schema_status(url),
    }
}

/// The result type of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How many events and log lines a subscriber may fall behind before it is told it lagged
/// (it then reads the missed ones back from the store).
pub const BROADCAST_CAPACITY: usize = 1 << 14;

/// Which machines to list, and where to start.
#[derive(Clone, Debug, Default)]
pub struct MachineQuery {
    /// Start after this id (the last id of the previous page).
    pub after: Option<MachineId>,
    /// The most machines to return.
    pub limit: usize,
    /// Only this phase.
    pub phase: Option<Phase>,
    /// Only this effective state.
    pub effective_state: Option<EffectiveState>,
    /// Only machines whose labels match.
    pub selector: LabelSelector,
}

/// Which operations to list (newest first), and where to start.
#[derive(Clone, Debug, Default)]
pub struct OperationQuery {
    /// Start before this id (the last id of the previous page).
    pub before: Option<OperationId>,
    /// The most operations to return.
    pub limit: usize,
    /// Only this machine's.
    pub machine_id: Option<MachineId>,
    /// Only this type.
    pub op_type: Option<OperationType>,
    /// Only this phase.
    pub phase: Option<OperationPhase>,
}

/// Told of every commit of a durable store's writer thread (for metrics): how many writes
/// and log lines it carried, how long it took from its first statement to the end of the
/// commit, and whether it committed. Called on the writer thread: it must be cheap.
pub trait CommitObserver: Send + Sync + std::fmt::Debug + 'static {
    /// One batch ended.
    fn batch(&self, size: usize, took: std::time::Duration, committed: bool);
}

/// How many machines are in one phase and effective state ([`Store::machine_counts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MachineCount {
    /// The phase.
    pub phase: Phase,
    /// The effective state.
    pub effective_state: EffectiveState,
    /// How many machines.
    pub machines: u64,
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in listing order.
    pub items: Vec<T>,
    /// True when more items match after the last one.
    pub more: bool,
}

/// A rollout as stored, with its version: a write names the version it read, and is
/// refused if the rollout changed since ([`Store::save_rollout`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRollout {
    /// The rollout.
    pub rollout: Rollout,
    /// Its version: 1 when created, one more at each write.
    pub version: u64,
}

/// What [`Store::list_rollouts`] lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutQuery {
    /// Start before this id (the last id of the previous page).
    pub before: Option<RolloutId>,
    /// The most rollouts to return.
    pub limit: usize,
    /// Only those that have not ended.
    pub active_only: bool,
}

/// What an import did with one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The machine was registered.
    Created,
    /// The machine existed with the same spec and labels.
    Unchanged,
}

/// The result of [`Store::admit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The operation: the new one, or the one the request id was first used for.
    pub operation: Operation,
    /// False when the request id had been used before and nothing was created.
    pub created: bool,
    /// The effective state the machine left when the operation was created, and since
    /// when it had been in it; `None` when nothing was created, the state did not change,
    /// or the machine's record did not know when it entered it.
    pub left: Option<(bm_domain::EffectiveState, bm_domain::Timestamp)>,
}

/// Which events to read or watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this machine's.
    pub machine_id: Option<MachineId>,
    /// Only this operation's.
    pub operation_id: Option<OperationId>,
}

impl EventFilter {
    /// True when `event` passes the filter.
    pub fn matches(&self, event: &OperationEvent) -> bool {
        self.machine_id
            .as_ref()
            .is_none_or(|m| *m == event.machine_id)
            && self.operation_id.is_none_or(|o| o == event.operation_id)
    }
}

/// What [`Store::record_observation`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The reading changed the machine's conditions; the machine as committed, and the power
    /// change outside an operation it revealed, if any (`(before, now)`), which was also
    /// recorded as a [`MachineEvent`] in the same transaction.
    Changed {
        /// The machine as committed.
        machine: Box<Machine>,
        /// The power state changed with no operation in between.
        power_changed_outside: Option<(PowerState, PowerState)>,
    },
    /// The reading is what the machine's conditions already said: nothing was written.
    Unchanged,
    /// An operation of the machine is active (admitted after the reading started): the
    /// reading was dropped, the operation owns the machine.
    Busy(OperationId),
}

/// A claim on operations: who holds it and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The executor's id, unique per process start.
    pub owner: String,
    /// When the claim lapses unless renewed.
    pub expires_at: Timestamp,
}

/// The token an executor's writes on one operation carry: who claimed it, and the claim's
/// fencing generation. A write whose fence is not the operation's current claim is refused
/// with [`StoreError::LeaseLost`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The executor's id (the [`Lease::owner`] of the claim).
    pub owner: String,
    /// The operation's generation at the claim.
    pub generation: u64,
}

/// An operation handed out by [`Store::claim`], with the fence its writes must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// The operation as stored.
    pub operation: Operation,
    /// The claim's fence.
    pub fence: Fence,
}

/// What [`Store::renew`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Renewed operations an operator asked to cancel.
    pub canceled: Vec<OperationId>,
    /// Operations whose lease the executor no longer holds at its generation (another claimed
    /// them after the lease lapsed, or they ended): it must stop them and write nothing more.
    pub lost: Vec<OperationId>,
}

/// Storage of the control plane. See the crate documentation for its guarantees.
///
/// Reads see every write that returned before them. Writes are atomic: a call that returns
/// an error changed nothing.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Registers a new machine.
    ///
    /// # Errors
    ///
    /// [`StoreError::MachineExists`], [`StoreError::MacInUse`].
    async fn register_machine(&self, machine: Machine) -> Result<Machine>;

    /// Registers a batch of machines, each row on its own: a machine that exists with the
    /// same spec and labels is [`ImportOutcome::Unchanged`], with different ones
    /// [`StoreError::ImportConflict`]. With `dry_run` nothing is written, and the results are
    /// what the import would do.
    async fn import_machines(
        &self,
        machines: Vec<Machine>,
        dry_run: bool,
    ) -> Result<Vec<Result<ImportOutcome>>>;

    /// Reads one machine.
    ///
    /// # Errors
    ///
    /// [`StoreError::MachineNotFound`].
    async fn get_machine(&self, id: &MachineId) -> Result<Machine>;

    /// The machine that has `mac` among its MAC addresses, if any (MACs are unique across
    /// machines): how a machine that network-boots is recognised.
    async fn machine_by_mac(&self, mac: &MacAddress) -> Result<Option<Machine>>;

    /// Lists machines ordered by id.
    async fn list_machines(&self, query: &MachineQuery) -> Result<Page<Machine>>;

    /// How many machines are in each phase and effective state (pairs with none are left
    /// out), from the `phase` and `effective_state` columns: no document is decoded, but
    /// the machines table is scanned (about 10 ms per 100,000 machines on SQLite).
    async fn machine_counts(&self) -> Result<Vec<MachineCount>>;

    /// How many operations wait for an executor: pending, or running without a lease (to
    /// resume), from the index claims use: cheap enough for every metrics scrape. Held ones
    /// whose lease expired are not counted.
    async fn unclaimed_operations(&self) -> Result<u64>;

    /// Applies a patch to a machine's spec and labels, to the record as it is in the write
    /// transaction (see [`MachinePatch`] and [`Machine::update`]).
    ///
    /// # Errors
    ///
    /// [`StoreError::MachineNotFound`], [`StoreError::MacInUse`], and the domain's refusals.
    async fn update_machine(
        &self,
        id: &MachineId,
        patch: &MachinePatch,
        now: Timestamp,
    ) -> Result<Machine>;

    /// Records a status poll's reading of a machine's BMC ([`bm_domain::apply_observation`]),
    /// unless an operation of the machine is active: the check and the write are one
    /// transaction, so a reading never overwrites what a running operation owns. Writes only
    /// when a condition changed.
    ///
    /// # Errors
    ///
    /// [`StoreError::MachineNotFound`].
    async fn record_observation(
        &self,
        id: &MachineId,
        observation: &Observation,
        now: Timestamp,
    ) -> Result<Recorded>;

    /// A machine's events (what happened to it outside operations, e.g. a power change the
    /// status poll saw) with a sequence above `after`, oldest first, at most `limit`.
    async fn machine_events(
        &self,
        id: &MachineId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MachineEvent>>;

    /// Admits a new pending operation, atomically: if the machine already has an operation
    /// with this request id, that one is returned and nothing is created; otherwise the
    /// domain's admission rules decide, and the operation, the machine's active operation,
    /// the idempotency key and a `Created` event are written together.
    ///
    /// # Errors
    ///
    /// [`StoreError::MachineNotFound`], [`StoreError::RequestIdReused`] (same key, another
    /// type), and the domain's refusals (e.g. a second active operation).
    async fn admit(&self, operation: Operation) -> Result<Admission>;

    /// Reads one operation.
    ///
    /// # Errors
    ///
    /// [`StoreError::OperationNotFound`].
    async fn get_operation(&self, id: OperationId) -> Result<Operation>;

    /// Lists operations, newest first.
    async fn list_operations(&self, query: &OperationQuery) -> Result<Page<Operation>>;

    /// Asks to cancel an operation. A pending operation that no executor holds ends
    /// CANCELED at once (with its effects on the machine); otherwise the request is recorded
    /// and the executor that holds it sees it on its next write or lease renewal.
    ///
    /// # Errors
    ///
    /// [`StoreError::OperationNotFound`]; the domain's `AlreadyEnded` if it has ended.
    async fn request_cancel(
        &self,
        id: OperationId,
        by: bm_domain::Actor,
        now: Timestamp,
    ) -> Result<Operation>;

    /// Claims up to `limit` operations for `lease.owner`, oldest first: pending ones and
    /// active ones whose lease has expired (their executor died). Each claim bumps the
    /// operation's fencing generation. Returns them as stored, with their fences.
    async fn claim(&self, lease: &Lease, now: Timestamp, limit: usize) -> Result<Vec<Claimed>>;

    /// Extends to `lease.expires_at` the leases `lease.owner` holds on `held` (the operations
    /// it is running, with the generation of its claim; a lease it holds on anything else is
    /// left to expire, so that the operation is taken up again). Reports those an operator
    /// asked to cancel, and those it no longer holds at that generation.
    async fn renew(&self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<Renewal>;

    /// Gives up every lease `owner` holds (on shutdown), so that the next claim takes the
    /// operations up at once. Returns how many were released.
    async fn release(&self, owner: &str) -> Result<usize>;

    /// Writes an executor's progress on an active operation it holds, with its events.
    /// Returns whether an operator has asked to cancel it (the stored flag is kept).
    ///
    /// # Errors
    ///
    /// [`StoreError::LeaseLost`] if `fence` is not the operation's current claim.
    async fn save_progress(
        &self,
        fence: &Fence,
        operation: &Operation,
        events: Vec<OperationEvent>,
    ) -> Result<bool>;

    /// Ends an operation held under `fence`: in one transaction, writes `events`, applies
    /// the domain's effects of `outcome` to the operation and its machine, releases the lease
    /// and appends the final `PhaseChanged` event. Returns both records as committed.
    ///
    /// # Errors
    ///
    /// [`StoreError::LeaseLost`] if `fence` is not the operation's current claim.
    async fn finish(
        &self,
        fence: &Fence,
        operation: Operation,
        outcome: Outcome,
        events: Vec<OperationEvent>,
        now: Timestamp,
    ) -> Result<(Operation, Machine)>;

    /// Stores a new rollout at version 1. A request id used before returns the rollout it
    /// created instead (and `false`): creating a rollout is idempotent.
    async fn create_rollout(&self, rollout: Rollout) -> Result<(StoredRollout, bool)>;

    /// A rollout and its version.
    ///
    /// # Errors
    ///
    /// [`StoreError::RolloutNotFound`].
    async fn get_rollout(&self, id: RolloutId) -> Result<StoredRollout>;

    /// The rollout created with `request`, if any.
    async fn rollout_by_request(&self, request: &RequestId) -> Result<Option<StoredRollout>>;

    /// Rollouts, newest first.
    async fn list_rollouts(&self, query: &RolloutQuery) -> Result<Page<StoredRollout>>;

    /// Writes `rollout` if it is still at `version` (compare and swap), and returns its new
    /// version: two drivers of one rollout (two replicas) never overwrite each other.
    ///
    /// # Errors
    ///
    /// [`StoreError::RolloutChanged`] if it was written since `version`;
    /// [`StoreError::RolloutNotFound`].
    async fn save_rollout(&self, rollout: Rollout, version: u64) -> Result<u64>;

    /// Committed events with a revision above `after`, in revision order, at most `limit`.
    async fn events_after(
        &self,
        after: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<OperationEvent>>;

    /// The revision of the last committed event (0 if none).
    async fn last_revision(&self) -> Result<u64>;

    /// Every event from now on, as it is committed, in revision order.
    fn subscribe_events(&self) -> broadcast::Receiver<Arc<OperationEvent>>;

    /// Queues a provider log line for writing; never blocks. Lines are committed in the
    /// order they were appended, and no later than any write called after this.
    fn append_log(&self, line: LogLine);

    /// Committed log lines of an operation with a sequence above `after`, at most `limit`.
    async fn logs_after(
        &self,
        operation: OperationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>>;

    /// The highest committed log sequence of an operation (0 if none).
    async fn last_log_sequence(&self, operation: OperationId) -> Result<u64>;

    /// Every log line from now on, as it is committed.
    fn subscribe_logs(&self) -> broadcast::Receiver<Arc<LogLine>>;

    /// Waits until every write and log line queued before this call is committed.
    async fn flush(&self) -> Result<()>;

    /// What the store can do now (ok, disk full, read-only, unusable). Cheap and never
    /// blocks: health checks call it.
    fn condition(&self) -> StoreCondition {
        self.watch_condition().borrow().clone()
    }

    /// The condition now and every change of it.
    fn watch_condition(&self) -> watch::Receiver<StoreCondition>;
}
