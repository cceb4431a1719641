//! The status poll (power and health sync): every machine's BMC is read every few minutes,
//! outside operations, and what it says becomes the machine's `Reachable`, `Degraded` and
//! `PoweredOn` conditions (see [`bm_domain::apply_observation`]).
//!
//! A round lists the fleet page by page and reads each machine through its provider's
//! [`Provider::observe`](bm_provider::Provider::observe), at most
//! [`StatusPollConfig::concurrency`] at once, with the starts spread evenly over the interval
//! (from the fleet size of the previous round; the first round is not spread, so that a
//! fresh start learns the fleet's state at once). The next round starts one interval,
//! jittered by ±20%, after the previous one started (or at once, if the previous one took
//! longer). Machines with an active operation are skipped, and the store drops a reading
//! when an operation was admitted while it ran (the check and the write are one
//! transaction). Blocked machines (RMA, Retired) are skipped: their BMC is often unplugged,
//! and an alarm about it would be noise.

use std::sync::Arc;
use std::time::Duration;

use bm_domain::{ConditionType, Machine, Observation};
use bm_provider::{ErrorKind, ObserveContext};
use bm_store::{MachineQuery, Recorded};
use rand::Rng;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::WorkflowError;
use crate::now;
use crate::shared::Inner;

/// Machines read from the store per listing page.
const PAGE: usize = 1000;

/// Settings of the status poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusPollConfig {
    /// How often each machine's BMC is read; `None` turns the poll off.
    pub interval: Option<Duration>,
    /// The most BMC readings in flight at once, over the whole fleet (a provider keeps its
    /// own per-BMC limits besides).
    pub concurrency: usize,
    /// How long one reading may take before it counts as no answer.
    pub timeout: Duration,
}

impl Default for StatusPollConfig {
    fn default() -> Self {
        StatusPollConfig {
            interval: None,
            concurrency: 64,
            timeout: Duration::from_secs(60),
        }
    }
}

/// What one round of the status poll did, machine by machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollRound {
    /// Machines whose BMC was read (answered or not).
    pub polled: u64,
    /// Of those, the readings that changed the machine's conditions (written).
    pub changed: u64,
    /// Of those, the BMCs that did not answer.
    pub unreachable: u64,
    /// Of those, the BMCs that report a Warning or Critical health.
    pub degraded: u64,
    /// Power changes with no operation in between.
    pub power_changed_outside: u64,
    /// Machines skipped because an operation of theirs was active (also those whose
    /// reading the store dropped because one was admitted meanwhile).
    pub busy: u64,
    /// Machines skipped because they are blocked (RMA, Retired).
    pub blocked: u64,
    /// Machines whose provider observes nothing, or is not registered here.
    pub unobserved: u64,
    /// Readings that could not be recorded (a store error, a provider that panicked).
    pub failed: u64,
}

/// What became of one machine.
enum Fate {
    Recorded(Observation, Recorded),
    Unobserved,
    Failed,
}

/// Reads the BMC of every machine once. `spread` spaces the readings' starts evenly over
/// that duration; `None` reads as fast as the concurrency allows.
pub(crate) async fn round(
    inner: &Arc<Inner>,
    spread: Option<Duration>,
    fleet_hint: u64,
) -> Result<PollRound, WorkflowError> {
    let cfg = &inner.config.status_poll;
    let concurrency = cfg.concurrency.max(1);
    let gap = match spread {
        Some(d) if fleet_hint > 0 => d / u32::try_from(fleet_hint).unwrap_or(u32::MAX),
        _ => Duration::ZERO,
    };
    let mut stats = PollRound::default();
    let mut tasks: JoinSet<Fate> = JoinSet::new();
    let mut q = MachineQuery {
        limit: PAGE,
        ..MachineQuery::default()
    };
    let mut next_start = Instant::now();
    loop {
        let page = inner.store.list_machines(&q).await?;
        let last = page.items.last().map(|m| m.id.clone());
        for machine in page.items {
            if inner.shutdown.is_cancelled() {
                tasks.shutdown().await;
                return Ok(stats);
            }
            if machine.status.active_operation_id.is_some() {
                stats.busy += 1;
                continue;
            }
            if ConditionType::BLOCKING
                .iter()
                .any(|t| machine.status.conditions.is_true(t))
            {
                stats.blocked += 1;
                continue;
            }
            while tasks.len() >= concurrency {
                if let Some(done) = tasks.join_next().await {
                    count(&mut stats, done);
                }
            }
            if !gap.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep_until(next_start) => {}
                    () = inner.shutdown.cancelled() => {}
                }
                next_start += gap;
            }
            tasks.spawn(read_one(inner.clone(), machine));
        }
        match last {
            Some(last) if page.more => q.after = Some(last),
            _ => break,
        }
    }
    while let Some(done) = tasks.join_next().await {
        count(&mut stats, done);
    }
    Ok(stats)
}

fn count(stats: &mut PollRound, done: Result<Fate, tokio::task::JoinError>) {
    match done {
        Ok(Fate::Recorded(obs, recorded)) => {
            if let Recorded::Busy(_) = recorded {
                stats.busy += 1;
                return;
            }
            stats.polled += 1;
            match obs {
                Observation::Unreachable(_) => stats.unreachable += 1,
                Observation::Answered {
                    health: Some(bm_domain::Health::Warning | bm_domain::Health::Critical),
                    ..
                } => stats.degraded += 1,
                Observation::Answered { .. } => {}
            }
            if let Recorded::Changed {
                power_changed_outside,
                ..
            } = recorded
            {
                stats.changed += 1;
                if power_changed_outside.is_some() {
                    stats.power_changed_outside += 1;
                }
            }
        }
        Ok(Fate::Unobserved) => stats.unobserved += 1,
        Ok(Fate::Failed) => stats.failed += 1,
        Err(e) => {
            // A provider that panicked: the poll goes on with the other machines.
            tracing::error!(error = %e, "a status poll reading panicked");
            stats.failed += 1;
        }
    }
}

async fn read_one(inner: Arc<Inner>, machine: Machine) -> Fate {
    let Ok(provider) = inner.providers.get(&machine.spec.provider) else {
        return Fate::Unobserved;
    };
    let cancel = inner.shutdown.child_token();
    let timeout = inner.config.status_poll.timeout;
    let ctx = ObserveContext {
        machine: &machine,
        cancel: &cancel,
    };
    let began = tokio::time::Instant::now();
    let read = tokio::time::timeout(timeout, provider.observe(ctx)).await;
    cancel.cancel();
    let error = match &read {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.kind()),
        Err(_) => Some(ErrorKind::Unavailable),
    };
    inner
        .config
        .telemetry
        .provider_call(&machine.spec.provider, "observe", began.elapsed(), error);
    let observation = match read {
        Ok(Ok(Some(obs))) => obs,
        Ok(Ok(None)) => return Fate::Unobserved,
        Ok(Err(e)) if e.kind() == ErrorKind::Canceled => return Fate::Unobserved,
        Ok(Err(e)) => Observation::Unreachable(e.to_string()),
        Err(_) => Observation::Unreachable(format!(
            "no answer within {timeout:?} (the status poll's timeout)"
        )),
    };
    match inner
        .store
        .record_observation(&machine.id, &observation, now())
        .await
    {
        Ok(recorded) => {
            if let Recorded::Changed {
                power_changed_outside: Some((was, is)),
                ..
            } = &recorded
            {
                tracing::warn!(
                    machine = %machine.id,
                    was = %was,
                    now = %is,
                    "power changed outside any operation"
                );
            }
            Fate::Recorded(observation, recorded)
        }
        Err(e) => {
            tracing::warn!(machine = %machine.id, error = %e, "could not record a status poll reading");
            Fate::Failed
        }
    }
}

/// Runs rounds until the engine shuts down: one every `interval`, jittered by ±20%.
pub(crate) async fn run(inner: Arc<Inner>, interval: Duration) {
    let mut fleet = 0;
    loop {
        let started = Instant::now();
        match round(&inner, Some(interval.mul_f64(0.8)), fleet).await {
            Ok(r) => {
                fleet = r.polled + r.busy + r.blocked + r.unobserved + r.failed;
                tracing::info!(
                    polled = r.polled,
                    changed = r.changed,
                    unreachable = r.unreachable,
                    degraded = r.degraded,
                    power_changed_outside = r.power_changed_outside,
                    busy = r.busy,
                    failed = r.failed,
                    took = ?started.elapsed(),
                    "status poll round"
                );
            }
            Err(e) => tracing::warn!(error = %e, "status poll round failed; next round as planned"),
        }
        let jitter = rand::rng().random_range(0.8..1.2);
        let next = started + interval.mul_f64(jitter);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = inner.shutdown.cancelled() => return,
        }
    }
}
