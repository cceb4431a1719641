//! The executor: claims operations from the store and runs their plans against the
//! providers, reconcile-style (see the crate documentation for its guarantees).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bm_domain::rules::Outcome;
use bm_domain::{
    EffectiveState, EventKind, LogLine, Machine, Operation, OperationEvent, OperationId,
    OperationPhase, Timestamp,
};
use bm_provider::{ActionContext, ErrorKind, LogSink, Provider, ProviderError};
use bm_store::{Claimed, StoreError};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::now;
use crate::plan::{ResumePolicy, StepKind, completed_prefix, plan};
use crate::policy::{Decision, decide};
use crate::shared::{Claim, Inner, Running};
use crate::steps;
use crate::telemetry::{Attempt, AttemptOutcome};

/// Starts the executor's tasks: the dispatcher, the lease renewal, and the listener for
/// cancels asked through other servers.
pub(crate) fn start(inner: &Arc<Inner>) {
    inner.tasks.spawn(dispatch(inner.clone()));
    inner.tasks.spawn(renew_leases(inner.clone()));
    inner.tasks.spawn(cancel_when_asked(inner.clone()));
}

/// Stops an operation running here as soon as its cancel request is committed, whichever
/// server sharing the store took the request: the store's event feed carries the
/// `CancelRequested` event. (The lease renewal finds it too, but only every third of a
/// lease; an event missed because this listener lagged behind is left to the renewal.)
async fn cancel_when_asked(inner: Arc<Inner>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut events = inner.store.subscribe_events();
    loop {
        let event = tokio::select! {
            () = inner.shutdown.cancelled() => return,
            r = events.recv() => r,
        };
        match event {
            Ok(e) if e.kind == EventKind::CancelRequested => {
                if let Some(r) = inner.running().get(&e.operation_id) {
                    r.token.cancel();
                }
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// Claims work whenever woken (new operation, freed capacity) or every poll interval.
async fn dispatch(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if inner.shutdown.is_cancelled() {
            return;
        }
        let free = inner
            .config
            .max_concurrent_operations
            .saturating_sub(inner.running().len());
        let mut more = false;
        if free > 0 {
            let lease = inner.lease();
            match inner.store.claim(&lease, now(), free).await {
                Ok(claims) => {
                    backoff = Duration::from_millis(50);
                    more = claims.len() == free;
                    for claim in claims {
                        // A claim during shutdown: the leases are released with the others.
                        if inner.shutdown.is_cancelled() {
                            break;
                        }
                        // Its lease lapsed while it ran here (renewals failed, the store was
                        // unreachable for a while, or the clock jumped). If nobody claimed it
                        // in between, the run goes on under this claim. Otherwise that run
                        // is stale: it stops and writes nothing more, and the new claim is
                        // not run beside it: its lease expires, and the operation is taken
                        // up again from what is stored.
                        if let Some(old) = inner.running().get(&claim.operation.id) {
                            if !old.claim.adopt(&claim.fence, lease.expires_at) {
                                tracing::warn!(operation_id = %claim.operation.id, "lease lapsed while the operation ran here and another claimed it meanwhile; stopping that run, the operation is taken up again when the new lease expires");
                                old.lose();
                            }
                            continue;
                        }
                        spawn_operation(&inner, claim, lease.expires_at);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not claim operations; retrying");
                    tokio::select! {
                        () = inner.shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        if more {
            continue;
        }
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(inner.config.poll_interval) => {}
        }
    }
}

/// Removes a running operation's entry and wakes the dispatcher, however its task ends
/// (a panic included), so that the slot is never lost.
struct Slot {
    inner: Arc<Inner>,
    id: OperationId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inner.running().remove(&self.id);
        self.inner.wake.notify_one();
    }
}

fn spawn_operation(inner: &Arc<Inner>, claim: Claimed, expires: Timestamp) {
    let Claimed {
        operation: op,
        fence,
    } = claim;
    // Fires on an operator's cancel or a lost lease; a shutdown is the engine's own token.
    let token = CancellationToken::new();
    let claim = Arc::new(Claim::new(&fence, expires, inner.store.clone()));
    inner.running().insert(
        op.id,
        Running {
            token: token.clone(),
            claim: claim.clone(),
        },
    );
    let span = tracing::info_span!(
        "operation",
        operation_id = %op.id,
        machine_id = %op.machine_id,
        r#type = %op.op_type,
        phase = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // Each run of the operation (a resumed one too) is a child of the request's span; its
    // stage and provider spans exist only when that trace is exported.
    let traced = op
        .trace_parent
        .as_ref()
        .is_some_and(|parent| inner.config.trace_links.adopt(&span, parent));
    let slot = Slot {
        inner: inner.clone(),
        id: op.id,
    };
    inner.tasks.spawn(
        async move {
            let inner = slot.inner.clone();
            let id = op.id;
            let log_seq = Arc::new(AtomicU64::new(0));
            let runner = Runner {
                inner: inner.clone(),
                op,
                claim: claim.clone(),
                token,
                events: Vec::new(),
                log_seq: log_seq.clone(),
                cut_short: AtomicBool::new(false),
                state_at_start: None,
                traced,
            };
            // A panic (in a provider, say) must not leave the operation RUNNING with nobody
            // running it: it ends FAILED, for a person to look at.
            let result = std::panic::AssertUnwindSafe(runner.execute())
                .catch_unwind()
                .await;
            match result {
                Ok(Ok(phase)) => {
                    let span = tracing::Span::current();
                    span.record("phase", tracing::field::display(phase));
                    if phase != OperationPhase::Succeeded {
                        span.record("otel.status_code", "ERROR");
                    }
                    tracing::info!(phase = %phase, "operation ended")
                }
                Ok(Err(Stop::Interrupted)) => {
                    tracing::info!("operation interrupted by shutdown; it resumes at the next start")
                }
                Ok(Err(Stop::LeaseLost)) => {
                    tracing::warn!("lease lost: another executor took the operation over")
                }
                Ok(Err(Stop::Abandoned(e))) => {
                    tracing::Span::current().record("otel.status_code", "ERROR");
                    tracing::error!(error = %e, "operation abandoned; it is taken up again when its lease expires")
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    let span = tracing::Span::current();
                    span.record("phase", tracing::field::display(OperationPhase::Failed));
                    span.record("otel.status_code", "ERROR");
                    tracing::error!(panic = %what, "the operation's executor panicked; failing it");
                    fail_after_panic(&inner, &claim, log_seq, id, &what).await;
                }
            }
            drop(slot);
        }
        .instrument(span),
    );
}

/// Ends an operation whose runner panicked: FAILED with NeedsIntervention, after disarming
/// the netboot override if it had armed one (as every other exit path does; its log lines
/// continue the run's numbering, `log_seq`).
async fn fail_after_panic(
    inner: &Arc<Inner>,
    claim: &Arc<Claim>,
    log_seq: Arc<AtomicU64>,
    id: OperationId,
    what: &str,
) {
    let store = &inner.store;
    let fence = claim.fence();
    let result = async {
        let op = store.get_operation(id).await?;
        let failed = Outcome::Failed {
            error: format!(
                "internal error in stage {}: the executor panicked ({what}); see the server log",
                if op.current_stage.is_empty() {
                    "-"
                } else {
                    &op.current_stage
                }
            ),
            disk_touched: disk_touched(&op),
            unreachable: false,
        };
        let runner = Runner {
            inner: inner.clone(),
            op: op.clone(),
            claim: claim.clone(),
            token: CancellationToken::new(),
            events: Vec::new(),
            log_seq,
            cut_short: AtomicBool::new(false),
            state_at_start: None,
            traced: false,
        };
        let outcome = runner.disarm_netboot(failed).await;
        store.finish(&fence, op, outcome, Vec::new(), now()).await
    }
    .await;
    match result {
        Ok((op, _)) => report_end(inner, &op),
        Err(e) => {
            tracing::error!(error = %e, operation_id = %id, "could not fail the operation; it is taken up again when its lease expires");
        }
    }
}

/// Tells the telemetry that `op` ended (from its admission to its end).
pub(crate) fn report_end(inner: &Inner, op: &Operation) {
    let took = op
        .finished_at
        .unwrap_or_else(now)
        .duration_since(op.created_at);
    inner
        .config
        .telemetry
        .operation_ended(op.op_type, op.phase, took);
}

/// Renews the leases of the operations running here every third of their duration, stops
/// those an operator canceled through another server sharing the store, and stops for good
/// those whose lease another claim superseded (this executor stalled past its lease): their
/// provider action is canceled and they write nothing more. A lease this executor holds on
/// anything else (an operation it gave up on) is left to expire, so that the operation is
/// taken up again.
async fn renew_leases(inner: Arc<Inner>) {
    let every = inner.config.lease_duration / 3;
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let held: Vec<(OperationId, u64)> = inner
            .running()
            .iter()
            .map(|(id, r)| (*id, r.claim.generation()))
            .collect();
        if held.is_empty() {
            continue;
        }
        let lease = inner.lease();
        match inner.store.renew(&lease, &held).await {
            Ok(renewal) => {
                let running = inner.running();
                // Judged against the generation that was sent: a claim adopted meanwhile
                // is not the one the answer is about.
                for (id, generation) in &held {
                    let Some(r) = running
                        .get(id)
                        .filter(|r| r.claim.generation() == *generation)
                    else {
                        continue;
                    };
                    if renewal.lost.contains(id) {
                        tracing::warn!(operation_id = %id, "lease lost to another claim; stopping the operation's provider action, writing nothing more for it");
                        r.lose();
                    } else {
                        r.claim.renewed(lease.expires_at);
                        if renewal.canceled.contains(id) {
                            r.token.cancel();
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew leases"),
        }
    }
}

/// Why a run stopped without ending its operation.
enum Stop {
    /// The engine is shutting down.
    Interrupted,
    /// Another executor holds the operation now.
    LeaseLost,
    /// A store error that retrying cannot fix.
    Abandoned(String),
}

enum Flow {
    Next,
    Ended(OperationPhase),
}

/// Whether a stage that writes the machine's disk has reached the provider.
fn disk_touched(op: &Operation) -> bool {
    op.stages
        .iter()
        .any(|s| s.attempts > 0 && StepKind::from_name(&s.name).is_some_and(StepKind::touches_disk))
}

struct Runner {
    inner: Arc<Inner>,
    op: Operation,
    /// The claim this run holds: every write carries its fence.
    claim: Arc<Claim>,
    /// Fires on an operator's cancel, and when the lease is lost.
    token: CancellationToken,
    /// Events to commit with the next write.
    events: Vec<OperationEvent>,
    log_seq: Arc<AtomicU64>,
    /// A step that is not safe to run twice was cut short by a shutdown: the next start
    /// must treat it as a crash, not as a graceful release.
    cut_short: AtomicBool,
    /// The machine's effective state when this run started and since when it held (for
    /// the time-in-state telemetry), when its record says.
    state_at_start: Option<(EffectiveState, Timestamp)>,
    /// Whether the run's trace is exported: its stage attempts and provider calls get
    /// spans (see [`crate::TraceLinks::adopt`]).
    traced: bool,
}

impl Runner {
    fn shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// An operator's cancel or a shutdown.
    fn stopping(&self) -> bool {
        self.token.is_cancelled() || self.shutting_down()
    }

    async fn stopped(&self) {
        tokio::select! {
            () = self.token.cancelled() => {}
            () = self.inner.shutdown.cancelled() => {}
        }
    }

    async fn execute(mut self) -> Result<OperationPhase, Stop> {
        let machine = {
            let store = self.inner.store.clone();
            let id = self.op.machine_id.clone();
            self.retry_store(|| store.get_machine(&id)).await?
        };
        let last_seq = {
            let store = self.inner.store.clone();
            let id = self.op.id;
            self.retry_store(|| store.last_log_sequence(id)).await?
        };
        self.log_seq.store(last_seq, Ordering::Relaxed);
        let state = machine.effective_state();
        self.state_at_start = match state {
            EffectiveState::Busy => Some(self.op.created_at),
            _ => machine.held_since(),
        }
        .map(|since| (state, since));
        let steps = plan(self.op.op_type);
        let t = now();

        if self.op.phase == OperationPhase::Running {
            let max = self.inner.config.max_interruptions;
            // A stage released by a graceful stop ran to a safe point; one without the mark
            // was cut off by a crash.
            if let Some((stage, crashed)) = self.op.mark_interrupted() {
                let (name, n) = (stage.name.clone(), stage.interruptions);
                tracing::info!(stage = %name, interruptions = n, "resuming an interrupted stage");
                // Either refusal below ends the stage here, without an attempt.
                let refused = |runner: &Self| {
                    if let Some(step) = StepKind::from_name(&name) {
                        runner.stage_ended(step, false);
                    }
                };
                if n > max {
                    refused(&self);
                    return self
                        .fail(format!(
                            "stage {name} was interrupted {n} times by server crashes; check the machine before running it again"
                        ))
                        .await;
                }
                if crashed
                    && StepKind::from_name(&name).map(StepKind::resume_policy)
                        == Some(ResumePolicy::FailForIntervention)
                {
                    refused(&self);
                    return self
                        .fail(format!(
                            "stage {name} was interrupted by a server crash and is not safe to run again blindly: check the machine's network and console, then clear the intervention and run the operation again"
                        ))
                        .await;
                }
            }
            self.events.push(OperationEvent::new(
                &self.op,
                EventKind::PhaseChanged,
                "resumed after a server restart",
                t,
            ));
        } else if self.op.start(t).is_ok() {
            self.inner
                .config
                .telemetry
                .operation_started(self.op.op_type);
            self.events.push(OperationEvent::new(
                &self.op,
                EventKind::PhaseChanged,
                "",
                t,
            ));
        }

        let Some(done) = completed_prefix(steps, &self.op) else {
            return self
                .fail(
                    "the stages recorded for this operation do not match its plan (the server was upgraded while it ran); run it again".into(),
                )
                .await;
        };
        if self.op.cancel_requested {
            return self.end_stopped().await;
        }
        let provider = match self.inner.providers.get(&machine.spec.provider) {
            Ok(p) => p.clone(),
            Err(e) => return self.fail(e.to_string()).await,
        };
        for &step in &steps[done..] {
            if let Flow::Ended(phase) = self.run_step(step, provider.as_ref(), &machine).await? {
                return Ok(phase);
            }
        }
        self.finish(Outcome::Succeeded).await
    }

    /// Runs one step to success, retrying per the policy; ends the operation if the step
    /// fails for good or the operation is canceled.
    async fn run_step(
        &mut self,
        step: StepKind,
        provider: &dyn Provider,
        machine: &Machine,
    ) -> Result<Flow, Stop> {
        // Failed attempts in this run: the retry budget starts over when an operation
        // resumes after a restart (crash loops have their own limit).
        let mut failures = 0u32;
        let mut first_failure: Option<tokio::time::Instant> = None;
        loop {
            if self.stopping() {
                return self.end_stopped().await.map(Flow::Ended);
            }
            let t = now();
            self.op.begin_stage(step.name(), t);
            self.events.push(OperationEvent::new(
                &self.op,
                EventKind::StageStarted,
                "",
                t,
            ));
            self.save().await?;
            // A run another replica took over (this one stalled) never calls the provider.
            self.confirm_lease().await?;
            // The last point where a stop keeps the provider from being called: the attempt
            // whose start was just committed never ran, so it must not count (otherwise the
            // resumption counts a second attempt of a step that ran once). Past this check
            // the provider is entered first, whatever arrives meanwhile (see `attempt`).
            if self.stopping() {
                self.op.withdraw_attempt();
                return self.end_stopped().await.map(Flow::Ended);
            }
            let began = tokio::time::Instant::now();
            let span = if !self.traced {
                tracing::Span::none()
            } else {
                tracing::info_span!(
                target: crate::TRACE_TARGET,
                "stage",
                otel.name = %format_args!("stage {}", step.name()),
                stage = step.name(),
                attempt = self.op.stages.last().map_or(1, |s| s.attempts),
                error = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                )
            };
            let result = self
                .attempt(step, provider, machine)
                .instrument(span.clone())
                .await;
            if let Err(e) = &result {
                span.record("error", tracing::field::display(e));
                span.record("otel.status_code", "ERROR");
            }
            drop(span);
            let report = |outcome, error: Option<&ProviderError>| {
                self.inner.config.telemetry.attempt(&Attempt {
                    operation_type: self.op.op_type,
                    stage: step.name(),
                    provider: &machine.spec.provider,
                    took: began.elapsed(),
                    error: error.map(ProviderError::kind),
                    outcome,
                });
            };
            let error = match result {
                Ok(()) => {
                    report(AttemptOutcome::Succeeded, None);
                    self.stage_ended(step, true);
                    let t = now();
                    self.op
                        .end_stage(bm_domain::StageOutcome::Succeeded, None, t);
                    self.events.push(OperationEvent::new(
                        &self.op,
                        EventKind::StageSucceeded,
                        "",
                        t,
                    ));
                    return Ok(Flow::Next);
                }
                Err(e) if self.stopping() => {
                    report(AttemptOutcome::Stopped, Some(&e));
                    return self.end_stopped().await.map(Flow::Ended);
                }
                Err(e) => e,
            };
            failures += 1;
            let failing_for = first_failure
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed();
            let message = error.to_string();
            match decide(
                &self.inner.config.retry,
                failures,
                failing_for,
                &error,
                rand::random::<f64>(),
            ) {
                Decision::Retry { after } => {
                    report(AttemptOutcome::Retrying, Some(&error));
                    tracing::warn!(stage = step.name(), failures, error = %message, "attempt failed; retrying in {after:?}");
                    self.op.stage_attempt_failed(&message);
                    self.events.push(OperationEvent::new(
                        &self.op,
                        EventKind::StageRetrying,
                        format!("{message} (retrying in {} ms)", after.as_millis()),
                        now(),
                    ));
                    self.save().await?;
                    tokio::select! {
                        () = tokio::time::sleep(after) => {}
                        () = self.stopped() => return self.end_stopped().await.map(Flow::Ended),
                    }
                }
                Decision::GiveUp => {
                    report(AttemptOutcome::Failed, Some(&error));
                    self.stage_ended(step, false);
                    tracing::warn!(stage = step.name(), failures, error = %message, "stage failed");
                    self.events.push(OperationEvent::new(
                        &self.op,
                        EventKind::StageFailed,
                        message.clone(),
                        now(),
                    ));
                    let outcome = Outcome::Failed {
                        error: format!("{}: {message}", step.name()),
                        disk_touched: disk_touched(&self.op),
                        unreachable: error.kind() == ErrorKind::Unreachable,
                    };
                    return self.finish(outcome).await.map(Flow::Ended);
                }
            }
        }
    }

    /// Tells the telemetry that the stage of `step` ended, timed from its first start.
    fn stage_ended(&self, step: StepKind, succeeded: bool) {
        let Some(stage) = self.op.stages.iter().rev().find(|s| s.name == step.name()) else {
            return;
        };
        let took = now().duration_since(stage.started_at);
        self.inner
            .config
            .telemetry
            .stage_ended(self.op.op_type, step.name(), succeeded, took);
    }

    /// One attempt of a step, bounded by its timeout, stopped by a cancel or a shutdown.
    async fn attempt(
        &self,
        step: StepKind,
        provider: &dyn Provider,
        machine: &Machine,
    ) -> Result<(), ProviderError> {
        let attempt_token = self.token.child_token();
        let log = self.log_sink(step.name());
        let ctx = ActionContext {
            machine,
            operation_id: self.op.id,
            cancel: &attempt_token,
            log: &log,
        };
        let timeout = self
            .inner
            .config
            .step_timeout
            .unwrap_or_else(|| step.default_timeout());
        let grace = self.inner.config.cancel_grace;
        let netboot = self.inner.config.netboot.as_deref();
        let action = steps::run(step, provider, ctx, &self.op, netboot, self.traced);
        tokio::pin!(action);
        let result = tokio::select! {
            // The action is polled first, so it is always entered: the caller decided that
            // this attempt runs (and counts); a stop that came since is handled below, as a
            // stop during the action.
            biased;
            r = &mut action => r,
            () = tokio::time::sleep(timeout) => {
                attempt_token.cancel();
                let _ = tokio::time::timeout(grace, &mut action).await;
                Err(ProviderError::transient(format!(
                    "{} timed out after {} s",
                    step.name(),
                    timeout.as_secs_f64()
                )))
            }
            () = self.token.cancelled() => {
                // The attempt's token is a child: the provider sees the cancel. Give it a
                // moment to stop what it started remotely, then drop it.
                let _ = tokio::time::timeout(grace, &mut action).await;
                Err(ProviderError::canceled())
            }
            () = self.inner.shutdown.cancelled() => {
                if step.resume_policy() == ResumePolicy::FailForIntervention {
                    // Cutting this step short is what makes it unsafe to resume: let it
                    // finish within the grace period.
                    match tokio::time::timeout(grace, &mut action).await {
                        Ok(r) => r,
                        Err(_) => {
                            attempt_token.cancel();
                            self.cut_short.store(true, Ordering::Relaxed);
                            Err(ProviderError::canceled())
                        }
                    }
                } else {
                    attempt_token.cancel();
                    let _ = tokio::time::timeout(grace, &mut action).await;
                    Err(ProviderError::canceled())
                }
            }
        };
        attempt_token.cancel();
        result
    }

    fn log_sink(&self, stage: &'static str) -> LogSink {
        let seq = self.log_seq.clone();
        let claim = self.claim.clone();
        let operation_id = self.op.id;
        LogSink::new(move |tag, message| {
            // A run whose claim was superseded writes nothing more, log lines included:
            // the new holder numbers its own. Past the lease's expiry (this process
            // stalled, or the store was unreachable) lines wait for a renewal that confirms
            // the claim (see `Claim::log`).
            if claim.is_lost() {
                return;
            }
            claim.log(LogLine {
                operation_id,
                sequence: seq.fetch_add(1, Ordering::Relaxed) + 1,
                time: now(),
                stage: stage.to_owned(),
                tag: tag.to_owned(),
                message: message.to_owned(),
            });
        })
    }

    /// Before a provider call: if the lease is past its expiry as this executor knows it
    /// (this process stalled, or renewals failed), asks the store whether the claim still
    /// holds, so that a run another replica took over never touches the hardware again.
    async fn confirm_lease(&self) -> Result<(), Stop> {
        if self.claim.is_current() {
            return Ok(());
        }
        if self.claim.is_lost() {
            return Err(Stop::LeaseLost);
        }
        let lease = self.inner.lease();
        let held = [(self.op.id, self.claim.generation())];
        let store = &self.inner.store;
        let renewal = self.retry_store(|| store.renew(&lease, &held)).await?;
        if renewal.lost.contains(&self.op.id) {
            tracing::warn!(
                "lease lost while this server stalled: another took the operation over; writing nothing more for it"
            );
            self.claim.mark_lost();
            return Err(Stop::LeaseLost);
        }
        self.claim.renewed(lease.expires_at);
        if renewal.canceled.contains(&self.op.id) {
            self.token.cancel();
        }
        Ok(())
    }

    /// Stopping: a shutdown interrupts (and records that the stage was released, so the
    /// next start does not count it as a crash), an operator's cancel ends the operation.
    async fn end_stopped(&mut self) -> Result<OperationPhase, Stop> {
        if self.claim.is_lost() {
            return Err(Stop::LeaseLost);
        }
        if self.shutting_down() && !self.token.is_cancelled() && !self.op.cancel_requested {
            if !self.cut_short.load(Ordering::Relaxed) {
                self.op.release_stage();
            }
            // Also commits a stage that succeeded just before the stop (its success waits
            // for the next stage's start otherwise), so it never runs again. Best effort: a
            // store that is closing loses only this, and the stage counts as cut off.
            let _ = self.save().await;
            return Err(Stop::Interrupted);
        }
        let outcome = Outcome::Canceled {
            disk_touched: disk_touched(&self.op),
        };
        self.finish(outcome).await
    }

    async fn fail(&mut self, error: String) -> Result<OperationPhase, Stop> {
        tracing::warn!(error = %error, "failing operation");
        let outcome = Outcome::Failed {
            error,
            disk_touched: disk_touched(&self.op),
            unreachable: false,
        };
        self.finish(outcome).await
    }

    /// Commits progress with the pending events; a cancel requested meanwhile fires the
    /// operation's token.
    async fn save(&mut self) -> Result<(), Stop> {
        let events = std::mem::take(&mut self.events);
        let (store, claim, op) = (&self.inner.store, &self.claim, &self.op);
        let canceled = self
            .retry_store(|| {
                let events = events.clone();
                async move { store.save_progress(&claim.fence(), op, events).await }
            })
            .await?;
        if canceled {
            self.token.cancel();
        }
        Ok(())
    }

    async fn finish(&mut self, outcome: Outcome) -> Result<OperationPhase, Stop> {
        let outcome = self.disarm_netboot(outcome).await;
        let events = std::mem::take(&mut self.events);
        let (store, claim, op) = (
            self.inner.store.clone(),
            self.claim.clone(),
            self.op.clone(),
        );
        let (op, machine) = self
            .retry_store(|| {
                let (store, fence) = (store.clone(), claim.fence());
                let (op, outcome, events) = (op.clone(), outcome.clone(), events.clone());
                async move { store.finish(&fence, op, outcome, events, now()).await }
            })
            .await?;
        report_end(&self.inner, &op);
        let telemetry = &self.inner.config.telemetry;
        if let Some((before, since)) = self.state_at_start
            && machine.effective_state() != before
        {
            let at = op.finished_at.unwrap_or_else(now);
            telemetry.state_left(before, at.duration_since(since));
        }
        Ok(op.phase)
    }

    /// An operation that ran `set-netboot` and ends failed or canceled (or is given up) must
    /// not leave the machine armed to network-boot: the provider disarms it (its lines go
    /// to the operation's log under the stage `disarm-netboot`). When that fails too, the
    /// outcome says so, so that the machine's record does: a failure's error names it, and
    /// a cancel becomes a failure (NeedsIntervention), since a person must disarm it.
    async fn disarm_netboot(&self, outcome: Outcome) -> Outcome {
        let armed = self
            .op
            .stages
            .iter()
            .any(|s| s.name == StepKind::SetNetboot.name() && s.attempts > 0);
        if matches!(outcome, Outcome::Succeeded) || !armed {
            return outcome;
        }
        // A run that lost its lease must not touch the BMC: the operation is another
        // server's now (which may have armed the override again), and this run's final
        // write is refused anyway.
        if self.confirm_lease().await.is_err() {
            return outcome;
        }
        let error = match self.try_disarm_netboot().await {
            Ok(()) => return outcome,
            Err(e) => e,
        };
        tracing::warn!(error = %error, "could not disarm the netboot override");
        let what = format!(
            "the netboot override could not be disarmed ({error}): disarm it on the BMC before the machine boots again, or it network-boots into the deploy environment"
        );
        match outcome {
            Outcome::Failed {
                error,
                disk_touched,
                unreachable,
            } => Outcome::Failed {
                error: format!("{error}; and {what}"),
                disk_touched,
                unreachable,
            },
            Outcome::Canceled { disk_touched } => Outcome::Failed {
                error: format!("canceled by an operator, but {what}"),
                disk_touched,
                unreachable: false,
            },
            Outcome::Succeeded => Outcome::Succeeded,
        }
    }

    /// Calls the provider's `disarm_netboot`, retrying per the policy; stopped only by a
    /// shutdown (an operator's cancel is what brought it here) or a lost lease. A provider
    /// that panics is a failure to disarm, not retried.
    async fn try_disarm_netboot(&self) -> Result<(), String> {
        let machine = self
            .inner
            .store
            .get_machine(&self.op.machine_id)
            .await
            .map_err(|e| format!("the machine could not be read: {e}"))?;
        let provider = self
            .inner
            .providers
            .get(&machine.spec.provider)
            .map_err(|e| e.to_string())?
            .clone();
        let log = self.log_sink("disarm-netboot");
        let timeout = self
            .inner
            .config
            .step_timeout
            .unwrap_or_else(|| StepKind::SetNetboot.default_timeout());
        let mut failures = 0u32;
        let first_failure = tokio::time::Instant::now();
        loop {
            if self.claim.is_lost() {
                return Err("the lease was lost to another server".into());
            }
            let cancel = self.inner.shutdown.child_token();
            let ctx = ActionContext {
                machine: &machine,
                operation_id: self.op.id,
                cancel: &cancel,
                log: &log,
            };
            let call = std::panic::AssertUnwindSafe(provider.disarm_netboot(ctx)).catch_unwind();
            let began = tokio::time::Instant::now();
            let result = tokio::time::timeout(timeout, call).await;
            self.inner.config.telemetry.provider_call(
                &machine.spec.provider,
                "disarm-netboot",
                began.elapsed(),
                match &result {
                    Ok(Ok(Ok(()))) => None,
                    Ok(Ok(Err(e))) => Some(e.kind()),
                    Ok(Err(_)) => Some(ErrorKind::Permanent),
                    Err(_) => Some(ErrorKind::Unavailable),
                },
            );
            let error = match result {
                Ok(Ok(Ok(()))) => return Ok(()),
                Ok(Ok(Err(e))) => e,
                Ok(Err(_)) => return Err("the provider panicked".into()),
                Err(_) => ProviderError::transient(format!(
                    "disarm-netboot timed out after {} s",
                    timeout.as_secs_f64()
                )),
            };
            cancel.cancel();
            failures += 1;
            log.line("disarm-netboot", format!("failed: {error}"));
            match decide(
                &self.inner.config.retry,
                failures,
                first_failure.elapsed(),
                &error,
                rand::random::<f64>(),
            ) {
                Decision::Retry { after } => {
                    tokio::select! {
                        () = tokio::time::sleep(after) => {}
                        () = self.inner.shutdown.cancelled() => return Err(error.to_string()),
                    }
                }
                Decision::GiveUp => return Err(error.to_string()),
            }
        }
    }

    /// Runs a store call, retrying failures of the storage itself (a full disk, a locked
    /// file) with backoff until it works or the engine stops; the write was atomic, so a
    /// retry is safe.
    #[allow(
        clippy::unneeded_struct_pattern,
        reason = "`DiskFull { .. }` matches the variant whatever fields it gets"
    )]
    async fn retry_store<T, F, Fut>(&self, mut call: F) -> Result<T, Stop>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(StoreError::LeaseLost(_)) => return Err(Stop::LeaseLost),
                Err(StoreError::Closed) => return Err(Stop::Interrupted),
                Err(e) if e.is_transient() => {
                    tracing::error!(error = %e, source = ?std::error::Error::source(&e), "store write failed; retrying");
                    tokio::select! {
                        () = self.inner.shutdown.cancelled() => return Err(Stop::Interrupted),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(Stop::Abandoned(e.to_string())),
            }
        }
    }
}
