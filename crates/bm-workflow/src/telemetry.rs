//! What the engine tells about its work as it happens, for metrics: an adapter implements
//! [`Telemetry`] (bm-server turns it into Prometheus metrics) and gives it to the engine in
//! [`crate::EngineConfig::telemetry`]. For traces, the engine's `tracing` spans (an
//! operation's run, each stage attempt, each provider call) are linked to the request that
//! admitted the operation through [`TraceLinks`]. The engine calls it from its executor, inline and
//! often (once per stage attempt), so an implementation must be cheap and must not block.
//!
//! Each replica reports the work it ran itself, so that summing over replicas counts each
//! end once: the replica that ran the operation reports its end, the one that took the
//! cancel of a pending operation reports that one. A start is reported when a run first
//! moves the operation to RUNNING, not when it resumes one; a replica that crashed before
//! it committed that start leaves it to be started, and reported, again.

use std::time::Duration;

use bm_domain::{EffectiveState, OperationPhase, OperationType};
use bm_provider::ErrorKind;

/// How one attempt of a stage ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// The stage succeeded.
    Succeeded,
    /// It failed and the stage runs again.
    Retrying,
    /// It failed and the stage failed for good.
    Failed,
    /// An operator's cancel or a server stop ended it.
    Stopped,
}

impl AttemptOutcome {
    /// The name metrics use, e.g. `retrying`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::Retrying => "retrying",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Stopped => "stopped",
        }
    }
}

/// One attempt of a stage: the provider action(s) of its step.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    /// The operation's type.
    pub operation_type: OperationType,
    /// The stage, e.g. `repave-image`.
    pub stage: &'static str,
    /// The provider that ran it (the machine's `spec.provider`).
    pub provider: &'a str,
    /// How long the provider took.
    pub took: Duration,
    /// The provider's error kind when it failed.
    pub error: Option<ErrorKind>,
    /// What became of the stage.
    pub outcome: AttemptOutcome,
}

/// Receives what the engine does. Every method does nothing by default.
pub trait Telemetry: Send + Sync + std::fmt::Debug + 'static {
    /// An operation started running (not when it resumes after a restart).
    fn operation_started(&self, operation_type: OperationType) {
        let _ = operation_type;
    }

    /// An operation ended in `phase`, `took` after it was admitted (queueing included).
    fn operation_ended(
        &self,
        operation_type: OperationType,
        phase: OperationPhase,
        took: Duration,
    ) {
        let _ = (operation_type, phase, took);
    }

    /// A stage ended (succeeded or failed for good), `took` from its first attempt's start.
    fn stage_ended(
        &self,
        operation_type: OperationType,
        stage: &'static str,
        succeeded: bool,
        took: Duration,
    ) {
        let _ = (operation_type, stage, succeeded, took);
    }

    /// An attempt of a stage ended.
    fn attempt(&self, attempt: &Attempt<'_>) {
        let _ = attempt;
    }

    /// A provider call outside a stage: the status poll's `observe`, `disarm-netboot` after
    /// a failed operation. `error` is the error's kind when it failed (a timeout is
    /// `Unavailable`).
    fn provider_call(
        &self,
        provider: &str,
        action: &'static str,
        took: Duration,
        error: Option<ErrorKind>,
    ) {
        let _ = (provider, action, took, error);
    }

    /// A machine left `state` after `stayed` in it: as an operation ended, BUSY (since its
    /// operation was admitted), ATTENTION or BLOCKED (since the condition that holds it
    /// became true, see [`bm_domain::Machine::held_since`]); as an operation was admitted,
    /// NEW, IDLE or MAINTENANCE_IDLE (since the machine entered it, its `state_since`; not
    /// reported for a record from before that was kept).
    fn state_left(&self, state: EffectiveState, stayed: Duration) {
        let _ = (state, stayed);
    }
}

/// Telemetry that goes nowhere: the default.
#[derive(Debug, Default)]
pub struct NoTelemetry;

impl Telemetry for NoTelemetry {}

/// Links an operation's spans to the trace of the request that admitted it, across
/// processes: at admission the engine stores [`TraceLinks::capture`] with the operation
/// (its `trace_parent`), and every run of it, also one that resumes it after a restart or
/// on another replica, makes its `operation` span a child of that context with
/// [`TraceLinks::adopt`]. bm-server implements it with OpenTelemetry; the engine knows only
/// the opaque string.
pub trait TraceLinks: Send + Sync + std::fmt::Debug + 'static {
    /// The trace context of the current span (the request's), serialized to be stored;
    /// `None` when nothing is traced.
    fn capture(&self) -> Option<String> {
        None
    }

    /// Makes `span` a child of the context `parent` that [`TraceLinks::capture`] gave, and
    /// tells whether that trace is exported (sampled): only then does the engine make the
    /// spans below it (stage attempts, provider calls), which would otherwise cost for
    /// nothing.
    fn adopt(&self, span: &tracing::Span, parent: &str) -> bool {
        let _ = (span, parent);
        false
    }
}

/// No trace links: the default; operations keep no trace context.
#[derive(Debug, Default)]
pub struct NoTraceLinks;

impl TraceLinks for NoTraceLinks {}
