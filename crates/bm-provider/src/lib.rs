//! The [`Provider`] trait: every hardware action the workflow engine needs, behind one
//! interface, so that a fleet can mix providers (a fake one for demos and tests, Redfish BMCs,
//! SSH into the deploy ramdisk, ...) and a new one is a new crate.
//!
//! # API boundary
//!
//! Provider crates depend on this crate and on `bm-domain` only. Adding one needs no change
//! in `bm-proto` or `bm-workflow`: the binary that wires the server registers it in a
//! [`ProviderRegistry`] under the name machines use in `spec.provider`.

mod error;
mod log;
mod registry;

use std::time::SystemTime;

use async_trait::async_trait;
pub use bm_domain::{Health, Observation, PowerState};
use bm_domain::{Machine, OperationId};
use tokio_util::sync::CancellationToken;

pub use error::{ErrorKind, ProviderError};
pub use log::LogSink;
pub use registry::{ProviderRegistry, UnknownProvider};

/// Everything an action gets besides its own arguments.
#[derive(Clone, Copy, Debug)]
pub struct ActionContext<'a> {
    /// The machine to act on (its spec says how to reach it).
    pub machine: &'a Machine,
    /// The operation the action is part of, e.g. to make a ticket idempotent.
    pub operation_id: OperationId,
    /// Fires when the action must stop: the operation was canceled, its step timed out or the
    /// server is shutting down.
    pub cancel: &'a CancellationToken,
    /// Where the action reports progress, line by line, as it happens.
    pub log: &'a LogSink,
}

/// What [`Provider::observe`] gets: the machine, and a token that fires when the poll must
/// stop (the server is shutting down or an operation of the machine was admitted).
#[derive(Clone, Copy, Debug)]
pub struct ObserveContext<'a> {
    /// The machine to read.
    pub machine: &'a Machine,
    /// Fires when the reading must stop.
    pub cancel: &'a CancellationToken,
}

/// Something that learns, outside the BMC, that a machine booted: the deploy environment
/// checking in with a netboot service. A provider that cannot see a warm reset in the
/// power state (many BMCs report On throughout one) takes a check-in after the reset as
/// proof of the reboot.
///
/// The binary that wires the server hands one to the providers that accept it; none is
/// needed: without it, a provider proves reboots by what the hardware reports, or fails
/// the step as unverified.
#[async_trait]
pub trait BootWitness: Send + Sync + 'static {
    /// Whether the machine's deploy environment checked in after `since`. Must answer at
    /// once (it is polled), never block.
    async fn checked_in_since(&self, machine: &bm_domain::MachineId, since: SystemTime) -> bool;
}

/// Something that learns of every request a provider sends to a machine's management
/// controller (a Redfish BMC), for metrics per controller: which BMCs are slow or failing.
/// The binary that wires the server hands one to the providers that accept it; it is
/// called inline, once per request, so it must be cheap and must not block.
pub trait RequestObserver: Send + Sync + std::fmt::Debug + 'static {
    /// A request of `provider` to `host` (`host:port`) ended after `took` (from when it was
    /// sent, not counting its wait for a free slot) with the HTTP `status`, or without an
    /// answer (`None`: refused, timed out or canceled).
    fn request(&self, provider: &str, host: &str, took: std::time::Duration, status: Option<u16>);
}

/// A power action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PowerAction {
    /// Power on.
    On,
    /// Power off (hard).
    Off,
    /// Power off then on: a reboot that works whatever the OS is doing.
    Cycle,
}

/// A secret that lets a machine join a cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(pub String);

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// A notice to people outside the control plane, e.g. a repair ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// What kind of notice.
    pub kind: NoticeKind,
    /// One line for the ticket's title.
    pub summary: String,
}

/// The kinds of [`Notice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// Open a return-merchandise-authorization (repair) ticket.
    RmaTicket,
}

/// The hardware actions of the lifecycle, for the machines of one kind.
///
/// # Guarantees
///
/// What every implementation must keep; the engine relies on each point:
///
/// - **Idempotent.** Running an action again after it succeeded, failed halfway or was cut
///   off by a crash leaves the machine as one successful run would. The engine re-runs the
///   interrupted step when it resumes an operation after a restart.
/// - **Cancellable.** When `ctx.cancel` fires the action stops within 100 ms (and stops
///   whatever it started remotely, such as an SSH command) and returns
///   [`ProviderError::canceled`].
/// - **Non-blocking.** An action never blocks the async runtime: blocking IO goes to
///   `spawn_blocking` or a dedicated thread.
/// - **Honest errors.** An error says whether a retry can help
///   ([`ProviderError::is_retryable`]) and, in words a person can act on, what went wrong.
/// - **Streams progress.** Progress goes to `ctx.log` as it happens, never buffered to the
///   end; lines never contain secrets.
///
/// # Assumptions
///
/// What an implementation may rely on:
///
/// - At most one action runs on a machine at a time (the engine runs one operation per
///   machine and its steps in sequence).
/// - Actions for different machines run concurrently; an implementation limits its own
///   concurrency towards shared resources (a BMC, an image server) if it must.
/// - `ctx.machine.spec` does not change while an operation runs.
/// - The engine applies per-step timeouts and retries: an action makes one attempt (with
///   whatever internal polling it needs) and reports the result.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The name machines use in `spec.provider`, e.g. `redfish`.
    fn name(&self) -> &str;

    /// Checks that a machine's spec has what this provider needs (e.g. a BMC endpoint),
    /// before the machine is registered.
    ///
    /// # Errors
    ///
    /// A [`ProviderError`] of kind [`ErrorKind::Permanent`] that says what is missing.
    fn validate(&self, machine: &Machine) -> Result<(), ProviderError> {
        let _ = machine;
        Ok(())
    }

    /// Applies a power action and returns once the hardware reports the resulting state.
    async fn power(&self, ctx: ActionContext<'_>, action: PowerAction)
    -> Result<(), ProviderError>;

    /// Reads the power state.
    async fn power_state(&self, ctx: ActionContext<'_>) -> Result<PowerState, ProviderError>;

    /// Reads what the status poll records, outside any operation: the power state and the
    /// health the BMC reports, in one cheap request where the hardware allows it (the poll
    /// reads every machine every few minutes). `Ok(None)` when this provider has nothing to
    /// observe: the poll then leaves the machine's conditions as they are.
    ///
    /// Makes one attempt (the poll retries at its next round) and keeps the provider's own
    /// limits towards shared resources (e.g. concurrent requests per BMC).
    ///
    /// # Errors
    ///
    /// Whatever kept the BMC from answering; the poll records the machine as not
    /// `Reachable` with the error's message.
    async fn observe(&self, ctx: ObserveContext<'_>) -> Result<Option<Observation>, ProviderError> {
        let _ = ctx;
        Ok(None)
    }

    /// Makes the next boot (only the next) a network boot.
    async fn set_netboot(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError>;

    /// Undoes what [`Provider::set_netboot`] armed (a one-time boot override, virtual media)
    /// so that the machine's next boot is from its disk again. The engine calls it when an
    /// operation that ran `set_netboot` ends failed or canceled, or is given up: otherwise
    /// the operator's next reboot would network-boot the machine into the deploy
    /// environment. Idempotent; succeeds at once when nothing is armed.
    ///
    /// The default does nothing: a provider whose netboot leaves nothing armed keeps it.
    ///
    /// # Errors
    ///
    /// Whatever kept the override from being disarmed; the engine records it on the machine.
    async fn disarm_netboot(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let _ = ctx;
        Ok(())
    }

    /// Writes `spec.image` to the machine's disk and sets up its bootloader (from the deploy
    /// ramdisk the machine netbooted into).
    async fn repave(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError>;

    /// Mints a token that lets the machine join `spec.target_cluster`.
    async fn mint_join_token(&self, ctx: ActionContext<'_>) -> Result<JoinToken, ProviderError>;

    /// Joins the machine to `spec.target_cluster` with `token`. The node joins cordoned
    /// (unschedulable): the machine is still in maintenance, and exit-maintenance uncordons
    /// it.
    async fn join_cluster(
        &self,
        ctx: ActionContext<'_>,
        token: &JoinToken,
    ) -> Result<(), ProviderError>;

    /// Checks that the machine's node is Ready in its cluster.
    async fn verify_in_cluster(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError>;

    /// Cordons the node and evicts its workloads; succeeds at once if the machine is in no
    /// cluster.
    async fn drain(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError>;

    /// Makes the node schedulable again; succeeds at once if the machine is in no cluster.
    async fn uncordon(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError>;

    /// Erases the machine's disks.
    async fn wipe_disks(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError>;

    /// Sends a notice (opens a ticket) and returns its reference. Running it again for the
    /// same operation must not open a second ticket.
    async fn notify(
        &self,
        ctx: ActionContext<'_>,
        notice: &Notice,
    ) -> Result<String, ProviderError>;

    /// Applies `spec.network_config` to the machine.
    async fn apply_network_config(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError>;

    /// Checks that the machine is reachable on its configured network.
    async fn verify_connectivity(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError>;
}
