//! Power actions that are done only when the BMC reports the target state.
//!
//! A `ComputerSystem.Reset` is fire-and-forget on most BMCs: a 204 says nothing about the
//! power state, the change may land seconds later, and a reset may be dropped (the
//! emulator drops one whose target equals the state at the time it arrives). So every
//! action polls `PowerState` with a growing interval until it shows the target, sends the
//! reset again when nothing changed for a while (except `PushPowerButton`: a press toggles,
//! so a second one could undo the first), and fails with a transient error at its deadline.
//! A BMC that reports no `PowerState` (missing or null) cannot confirm anything; many omit
//! it while the BMC or the host boots, so it is an unavailable error (the engine retries it
//! for minutes) at the first read, and no reading at all while polling.
//!
//! A warm reset (`ForceRestart`, `PowerCycle`) is the hard case: Dell and HPE keep reporting
//! `On` through it, so `PowerState` cannot tell a reboot from a reset the BMC ignored. A
//! restart that shows no power transition is proven another way ([`Evidence`]): the BMC's
//! `LastResetTime` / `BootProgress` changed, the kernel's boot id read over SSH changed, or
//! the deploy environment checked in (a [`bm_provider::BootWitness`]). Where nothing can
//! prove it, the stage fails with "unverified" rather than pass.
//!
//! The logic is written against [`PowerOps`] so that it can be tested with a scripted BMC
//! and paused time.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bm_provider::{PowerAction, ProviderError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::CycleMethod;

/// A `PowerState` as read from the BMC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reading {
    On,
    Off,
    PoweringOn,
    PoweringOff,
    /// Missing, null or a value this client does not know: nothing can be confirmed.
    Unknown,
}

impl Reading {
    /// Reads a `PowerState` value. `Paused` counts as on: the machine has power.
    pub(crate) fn parse(v: Option<&str>) -> Reading {
        match v {
            Some("On" | "Paused") => Reading::On,
            Some("Off") => Reading::Off,
            Some("PoweringOn") => Reading::PoweringOn,
            Some("PoweringOff") => Reading::PoweringOff,
            _ => Reading::Unknown,
        }
    }

    fn is_stable(self) -> bool {
        self.state().is_some()
    }

    /// The power state, when the reading is a stable one.
    pub(crate) fn state(self) -> Option<bm_provider::PowerState> {
        match self {
            Reading::On => Some(bm_provider::PowerState::On),
            Reading::Off => Some(bm_provider::PowerState::Off),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reading::On => "On",
            Reading::Off => "Off",
            Reading::PoweringOn => "PoweringOn",
            Reading::PoweringOff => "PoweringOff",
            Reading::Unknown => "unknown",
        }
    }
}

/// What can prove that a machine rebooted when `PowerState` shows nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Evidence {
    /// The BMC's `LastResetTime` and `BootProgress` (state and time), as one string; `None`
    /// when it reports neither.
    pub(crate) bmc: Option<String>,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`) read over SSH; `None` when
    /// it could not be read (no SSH, the machine is booting, ...).
    pub(crate) boot_id: Option<String>,
    /// The machine's deploy environment checked in since the reset was sent.
    pub(crate) checked_in: bool,
}

/// What the power logic needs from a BMC.
pub(crate) trait PowerOps: Sync {
    /// Reads the power state.
    fn read(&self) -> impl Future<Output = Result<Reading, ProviderError>> + Send;
    /// Sends `ComputerSystem.Reset` with this `ResetType`.
    fn reset(&self, reset_type: &str) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Reports progress.
    fn log(&self, line: &str);
    /// The BMC's name in messages.
    fn bmc(&self) -> &str;
    /// Reads what could prove a reboot. `since` is when the reset was sent (`None` before
    /// it): the check-in is asked for only then. With `boot_id`, the boot id is read over
    /// SSH when the BMC reports no reset markers (only then: it costs a connection).
    fn evidence(
        &self,
        since: Option<std::time::SystemTime>,
        boot_id: bool,
    ) -> impl Future<Output = Result<Evidence, ProviderError>> + Send;
    /// Whether a check-in of the deploy environment can prove a reboot.
    fn awaits_check_in(&self) -> bool;
}

/// The timing of power actions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PowerTiming {
    pub(crate) poll_interval: Duration,
    pub(crate) max_poll_interval: Duration,
    pub(crate) deadline: Duration,
    pub(crate) reissue_after: Duration,
    pub(crate) graceful_timeout: Duration,
    pub(crate) cycle: CycleMethod,
}

/// The `ResetType`s a system allows: `None` when it does not say (then the standard
/// values are tried in order of preference).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Allowed(pub(crate) Option<Vec<String>>);

impl Allowed {
    /// The first of `prefs` the BMC allows.
    pub(crate) fn pick(&self, prefs: &[&'static str]) -> Option<&'static str> {
        match &self.0 {
            None => prefs.first().copied(),
            Some(allowed) => prefs
                .iter()
                .copied()
                .find(|p| allowed.iter().any(|a| a == p)),
        }
    }

    fn has(&self, t: &str) -> bool {
        self.0.as_ref().is_none_or(|a| a.iter().any(|x| x == t))
    }

    fn require(&self, bmc: &str, prefs: &[&'static str]) -> Result<&'static str, ProviderError> {
        self.pick(prefs).ok_or_else(|| {
            ProviderError::permanent(format!(
                "BMC {bmc} allows none of the reset types {} (it allows {})",
                prefs.join(", "),
                self.0.as_deref().unwrap_or_default().join(", ")
            ))
        })
    }
}

const ON: &[&str] = &["On", "ForceOn", "PushPowerButton"];
/// Off is a hard off: a button press is an ACPI request the OS may ignore or take its time
/// over, and a toggle besides.
const OFF: &[&str] = &["ForceOff"];
const RESTART: &[&str] = &["ForceRestart", "PowerCycle", "GracefulRestart"];

/// True for a reset that toggles the power (a press of the button) rather than naming the
/// state it leads to.
fn is_toggle(reset_type: &str) -> bool {
    reset_type == "PushPowerButton"
}

/// Whether `reset_type` may be sent when the state has not moved, `sent` telling whether it
/// was sent already. A lost `On` can be sent again; a second press of the button could turn
/// the machine back off (or on) if the first one landed late.
fn may_send(reset_type: &str, sent: bool) -> bool {
    !sent || !is_toggle(reset_type)
}

/// The reading, or an unavailable error if the BMC gave no usable `PowerState`: many omit
/// it for a while when they or the host boot.
fn known(bmc: &str, reading: Reading) -> Result<Reading, ProviderError> {
    if reading == Reading::Unknown {
        return Err(ProviderError::unavailable(format!(
            "BMC {bmc} reports no PowerState (missing, null or not a Redfish value) for the system, as BMCs do while they or the host boot: power actions cannot be confirmed until it does"
        )));
    }
    Ok(reading)
}

/// How waiting for a state ended.
enum Outcome {
    Reached,
    TimedOut(Reading),
}

/// Applies `action` and returns once the BMC reports the resulting state. `current` is the
/// state the caller just read (so that it is not read again at once).
pub(crate) async fn apply<P: PowerOps>(
    ops: &P,
    cancel: &CancellationToken,
    timing: &PowerTiming,
    allowed: &Allowed,
    action: PowerAction,
    current: Reading,
) -> Result<(), ProviderError> {
    let started = Instant::now();
    let deadline = started + timing.deadline;
    let poller = Poller {
        ops,
        cancel,
        timing,
        resets: AtomicU32::new(0),
    };
    match action {
        PowerAction::On => {
            let rt = allowed.require(ops.bmc(), ON)?;
            poller
                .ensure(Reading::On, rt, true, deadline, Some(current))
                .await
        }
        PowerAction::Off => poller.power_off(allowed, deadline, Some(current)).await,
        PowerAction::Cycle => {
            let state = poller.settle(deadline, Some(current)).await?;
            if state == Reading::Off {
                ops.log("PowerState is Off: powering on instead of a cycle");
                let rt = allowed.require(ops.bmc(), ON)?;
                return poller
                    .ensure(Reading::On, rt, true, deadline, Some(state))
                    .await;
            }
            let off_on = allowed.pick(OFF).is_some() && allowed.pick(ON).is_some();
            match (timing.cycle, allowed.pick(RESTART)) {
                (CycleMethod::Restart, Some(rt)) => poller.restart(rt, allowed, deadline).await,
                (CycleMethod::OffOn, _) if off_on => poller.off_on(allowed, deadline, state).await,
                (_, Some(rt)) => poller.restart(rt, allowed, deadline).await,
                (_, None) => poller.off_on(allowed, deadline, state).await,
            }
        }
    }
}

/// The state, waiting out transitional values (up to the deadline); `first` is the state the
/// caller just read.
pub(crate) async fn read_settled<P: PowerOps>(
    ops: &P,
    cancel: &CancellationToken,
    timing: &PowerTiming,
    first: Reading,
) -> Result<Reading, ProviderError> {
    let poller = Poller {
        ops,
        cancel,
        timing,
        resets: AtomicU32::new(0),
    };
    poller
        .settle(Instant::now() + timing.deadline, Some(first))
        .await
}

struct Poller<'a, P> {
    ops: &'a P,
    cancel: &'a CancellationToken,
    timing: &'a PowerTiming,
    /// Resets sent so far, for messages.
    resets: AtomicU32,
}

impl<P: PowerOps> Poller<'_, P> {
    async fn wait(&self, d: Duration) -> Result<(), ProviderError> {
        tokio::select! {
            () = tokio::time::sleep(d) => Ok(()),
            () = self.cancel.cancelled() => Err(ProviderError::canceled()),
        }
    }

    /// A read during polling: a BMC that is busy or resetting may fail a request, which
    /// is not the end of the action.
    async fn read_tolerant(&self) -> Result<Option<Reading>, ProviderError> {
        match self.ops.read().await {
            Ok(Reading::Unknown) => {
                self.ops
                    .log("the BMC reports no PowerState for now, will read it again");
                Ok(None)
            }
            Ok(r) => Ok(Some(r)),
            Err(e) if e.is_retryable() => {
                self.ops
                    .log(&format!("reading PowerState failed, will retry: {e}"));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a reset and counts it.
    async fn send_reset(&self, reset_type: &str) -> Result<(), ProviderError> {
        self.resets.fetch_add(1, Ordering::Relaxed);
        self.ops.reset(reset_type).await
    }

    fn timeout_error(&self, what: &str, last: Reading) -> ProviderError {
        ProviderError::transient(format!(
            "BMC {} did not reach PowerState {what} within {}s (last reported: {}; {} resets sent): check the BMC's event log, that the machine has power and that no BMC job or front-panel lock holds it",
            self.ops.bmc(),
            self.timing.deadline.as_secs(),
            last.name(),
            self.resets.load(Ordering::Relaxed)
        ))
    }

    /// The state once it is On or Off (waiting out PoweringOn/PoweringOff); `first` is a
    /// reading in hand, if any.
    async fn settle(
        &self,
        deadline: Instant,
        first: Option<Reading>,
    ) -> Result<Reading, ProviderError> {
        let mut interval = self.timing.poll_interval;
        let first = match first {
            Some(r) => r,
            None => self.ops.read().await?,
        };
        let mut state = known(self.ops.bmc(), first)?;
        while !state.is_stable() {
            if Instant::now() >= deadline {
                return Err(ProviderError::transient(format!(
                    "BMC {} kept reporting PowerState {} for {}s",
                    self.ops.bmc(),
                    state.name(),
                    self.timing.deadline.as_secs()
                )));
            }
            self.wait(interval.min(deadline - Instant::now())).await?;
            interval = self.grow(interval);
            if let Some(s) = self.read_tolerant().await? {
                state = s;
            }
        }
        Ok(state)
    }

    fn grow(&self, interval: Duration) -> Duration {
        (interval * 3 / 2).min(self.timing.max_poll_interval.max(self.timing.poll_interval))
    }

    /// Off then On, each confirmed; `state` is the settled state in hand.
    async fn off_on(
        &self,
        allowed: &Allowed,
        deadline: Instant,
        state: Reading,
    ) -> Result<(), ProviderError> {
        self.power_off(allowed, deadline, Some(state)).await?;
        let rt = allowed.require(self.ops.bmc(), ON)?;
        self.ensure(Reading::On, rt, true, deadline, None).await
    }

    async fn power_off(
        &self,
        allowed: &Allowed,
        deadline: Instant,
        mut first: Option<Reading>,
    ) -> Result<(), ProviderError> {
        let graceful = self.timing.graceful_timeout;
        if !graceful.is_zero() && allowed.has("GracefulShutdown") {
            let soft_deadline = (Instant::now() + graceful).min(deadline);
            match self
                .wait_for(
                    Reading::Off,
                    Some("GracefulShutdown"),
                    true,
                    soft_deadline,
                    first.take(),
                )
                .await?
            {
                Outcome::Reached => return Ok(()),
                Outcome::TimedOut(_) => self.ops.log(&format!(
                    "still on {}s after GracefulShutdown: forcing it off",
                    graceful.as_secs()
                )),
            }
        }
        let rt = allowed.require(self.ops.bmc(), OFF)?;
        self.ensure(Reading::Off, rt, true, deadline, first).await
    }

    async fn ensure(
        &self,
        target: Reading,
        reset_type: &str,
        send_first: bool,
        deadline: Instant,
        first: Option<Reading>,
    ) -> Result<(), ProviderError> {
        match self
            .wait_for(target, Some(reset_type), send_first, deadline, first)
            .await?
        {
            Outcome::Reached => Ok(()),
            Outcome::TimedOut(last) => Err(self.timeout_error(target.name(), last)),
        }
    }

    /// Sends `reset_type` (unless the state already is `target`, or `send_first` is
    /// false) and polls until the state is `target`, sending the reset again when the state
    /// did not move for `reissue_after` (a toggle only if it was not sent yet). `first` is
    /// a reading in hand, if any.
    async fn wait_for(
        &self,
        target: Reading,
        reset_type: Option<&str>,
        send_first: bool,
        deadline: Instant,
        first: Option<Reading>,
    ) -> Result<Outcome, ProviderError> {
        let start = Instant::now();
        let mut last = self.settle(deadline, first).await?;
        if last == target {
            if send_first {
                self.ops
                    .log(&format!("PowerState is already {}", target.name()));
            }
            return Ok(Outcome::Reached);
        }
        let mut sent = false;
        if send_first && let Some(rt) = reset_type {
            self.ops.log(&format!("Reset {rt}"));
            self.send_reset(rt).await?;
            sent = true;
        }
        let mut last_event = Instant::now();
        let mut interval = self.timing.poll_interval;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(Outcome::TimedOut(last));
            }
            self.wait(interval.min(deadline - now)).await?;
            interval = self.grow(interval);
            let Some(state) = self.read_tolerant().await? else {
                continue;
            };
            if state == target {
                self.ops.log(&format!(
                    "PowerState {} after {:.1}s",
                    target.name(),
                    start.elapsed().as_secs_f32()
                ));
                return Ok(Outcome::Reached);
            }
            if state != last {
                self.ops.log(&format!("PowerState {}", state.name()));
                last = state;
                last_event = Instant::now();
            } else if let Some(rt) = reset_type
                && may_send(rt, sent)
                && state.is_stable()
                && last_event.elapsed() >= self.timing.reissue_after
            {
                self.ops.log(&format!(
                    "PowerState still {} {}s after Reset {rt}: the BMC may have dropped it, sending it again",
                    state.name(),
                    last_event.elapsed().as_secs()
                ));
                self.send_reset(rt).await?;
                sent = true;
                last_event = Instant::now();
                interval = self.timing.poll_interval;
            }
        }
    }

    /// A warm reset: sent once; done when the state left On and came back, or, when it
    /// never visibly left On within `reissue_after` (many BMCs keep reporting On through a
    /// restart), when [`Evidence`] proves the reboot.
    async fn restart(
        &self,
        reset_type: &str,
        allowed: &Allowed,
        deadline: Instant,
    ) -> Result<(), ProviderError> {
        let before = self.ops.evidence(None, true).await?;
        self.ops.log(&format!("Reset {reset_type}"));
        let sent_at = std::time::SystemTime::now();
        self.send_reset(reset_type).await?;
        let watch_until = (Instant::now() + self.timing.reissue_after).min(deadline);
        let mut interval = self.timing.poll_interval;
        loop {
            let now = Instant::now();
            if now >= watch_until {
                return self
                    .prove_warm_reset(reset_type, &before, sent_at, deadline)
                    .await;
            }
            self.wait(interval.min(watch_until - now)).await?;
            interval = self.grow(interval);
            match self.read_tolerant().await? {
                Some(Reading::On) | None => {}
                Some(state) => {
                    self.ops.log(&format!("PowerState {}", state.name()));
                    break;
                }
            }
        }
        // It left On; it comes back by itself. Send On only if it stays off for long (and
        // the BMC allows one).
        let rt = allowed.pick(ON);
        match self
            .wait_for(Reading::On, rt, false, deadline, None)
            .await?
        {
            Outcome::Reached => Ok(()),
            Outcome::TimedOut(last) => Err(self.timeout_error("On", last)),
        }
    }

    /// Waits (up to the deadline) for proof that a warm reset that showed no power
    /// transition rebooted the machine: the BMC's reset markers or the boot id changed, or
    /// the deploy environment checked in. Without any of them the reset is unverified: a
    /// permanent error at once when nothing could prove it, a transient one at the deadline.
    async fn prove_warm_reset(
        &self,
        reset_type: &str,
        before: &Evidence,
        sent_at: std::time::SystemTime,
        deadline: Instant,
    ) -> Result<(), ProviderError> {
        let bmc = self.ops.bmc();
        let check_in = self.ops.awaits_check_in();
        if before.bmc.is_none() && before.boot_id.is_none() && !check_in {
            self.ops.log(&format!(
                "reboot unverified: PowerState stayed On after {reset_type}"
            ));
            return Err(ProviderError::permanent(format!(
                "reboot unverified: BMC {bmc} reported PowerState On throughout {reset_type}, and nothing else can prove the machine rebooted (the BMC reports no LastResetTime or BootProgress, no boot id could be read over SSH, no deploy-environment check-in is awaited); set power.cycle = \"off-on\" or give the machine an ssh_endpoint"
            )));
        }
        self.ops.log(&format!(
            "PowerState stayed On after {reset_type}: waiting for proof of the reboot ({})",
            [
                before
                    .bmc
                    .as_ref()
                    .map(|_| "the BMC's LastResetTime/BootProgress"),
                before.boot_id.as_ref().map(|_| "the boot id over SSH"),
                check_in.then_some("the deploy environment's check-in"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        ));
        let mut interval = self.timing.poll_interval;
        loop {
            let now = match self.ops.evidence(Some(sent_at), before.bmc.is_none()).await {
                Ok(e) => e,
                Err(e) if e.is_retryable() => Evidence::default(),
                Err(e) => return Err(e),
            };
            let changed = |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(a), Some(b)) if a != b);
            let proof = if changed(&before.bmc, &now.bmc) {
                Some(format!(
                    "the BMC's reset record changed ({} -> {})",
                    before.bmc.as_deref().unwrap_or_default(),
                    now.bmc.as_deref().unwrap_or_default()
                ))
            } else if changed(&before.boot_id, &now.boot_id) {
                Some("the boot id read over SSH changed".to_owned())
            } else if now.checked_in {
                Some("the deploy environment checked in".to_owned())
            } else {
                None
            };
            if let Some(proof) = proof {
                self.ops
                    .log(&format!("reboot confirmed after {reset_type}: {proof}"));
                return Ok(());
            }
            let t = Instant::now();
            if t >= deadline {
                break;
            }
            self.wait(interval.min(deadline - t)).await?;
            interval = self.grow(interval);
        }
        self.ops.log(&format!(
            "reboot unverified: nothing changed within {}s of {reset_type}",
            self.timing.deadline.as_secs()
        ));
        Err(ProviderError::transient(format!(
            "reboot unverified: BMC {bmc} reported PowerState On throughout {reset_type} and nothing proved a reboot within {}s (the BMC may have ignored the reset): check the machine's console",
            self.timing.deadline.as_secs()
        )))
    }
}

/// True for the error [`apply`] returns at its deadline.
#[cfg(test)]
fn is_deadline(e: &ProviderError) -> bool {
    e.kind() == bm_provider::ErrorKind::Transient
        && e.message().contains("did not reach PowerState")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bm_provider::ErrorKind;

    use super::*;

    /// A scripted BMC: a reset lands after `delay` unless it is in `drop` (by call index),
    /// and is dropped when the target equals the current state, as the emulator does.
    struct Scripted {
        state: Mutex<(Reading, Option<(Instant, Reading)>)>,
        delay: Duration,
        drop: Vec<usize>,
        resets: Mutex<Vec<String>>,
        lines: Mutex<Vec<String>>,
        /// ForceRestart shows this state at once (None: stays On, like a warm reset).
        restart_shows: Option<Reading>,
        /// How many times PowerState was read.
        reads: Mutex<usize>,
        /// The BMC's reset record (`LastResetTime`); `None`: it keeps none.
        marker: Mutex<Option<String>>,
        /// A restart updates the reset record (a real reboot); false: the BMC ignores it.
        restart_reboots: bool,
        /// The boot id over SSH, if it can be read.
        boot_id: Mutex<Option<String>>,
    }

    impl Scripted {
        fn new(initial: Reading, delay: Duration) -> Self {
            Scripted {
                state: Mutex::new((initial, None)),
                delay,
                drop: Vec::new(),
                resets: Mutex::new(Vec::new()),
                lines: Mutex::new(Vec::new()),
                restart_shows: Some(Reading::Off),
                reads: Mutex::new(0),
                marker: Mutex::new(None),
                restart_reboots: true,
                boot_id: Mutex::new(None),
            }
        }
        fn resets(&self) -> Vec<String> {
            self.resets.lock().unwrap().clone()
        }
    }

    impl PowerOps for Scripted {
        async fn read(&self) -> Result<Reading, ProviderError> {
            *self.reads.lock().unwrap() += 1;
            let mut s = self.state.lock().unwrap();
            if let Some((at, to)) = s.1
                && Instant::now() >= at
            {
                *s = (to, None);
            }
            Ok(s.0)
        }
        async fn reset(&self, reset_type: &str) -> Result<(), ProviderError> {
            let n = {
                let mut r = self.resets.lock().unwrap();
                r.push(reset_type.to_owned());
                r.len() - 1
            };
            let mut s = self.state.lock().unwrap();
            let to = match reset_type {
                "On" | "ForceOn" => Reading::On,
                "ForceOff" | "GracefulShutdown" => Reading::Off,
                "PushPowerButton" if s.0 == Reading::On => Reading::Off,
                "PushPowerButton" => Reading::On,
                "ForceRestart" => {
                    if self.restart_reboots {
                        if let Some(m) = self.marker.lock().unwrap().as_mut() {
                            m.push('+');
                        }
                        if let Some(b) = self.boot_id.lock().unwrap().as_mut() {
                            b.push('+');
                        }
                    }
                    if let Some(shown) = self.restart_shows {
                        *s = (shown, Some((Instant::now() + self.delay, Reading::On)));
                    }
                    return Ok(());
                }
                other => panic!("unexpected reset {other}"),
            };
            if self.drop.contains(&n) || s.0 == to {
                return Ok(());
            }
            s.1 = Some((Instant::now() + self.delay, to));
            Ok(())
        }
        fn log(&self, line: &str) {
            self.lines.lock().unwrap().push(line.to_owned());
        }
        fn bmc(&self) -> &str {
            "bmc-1"
        }
        async fn evidence(
            &self,
            _since: Option<std::time::SystemTime>,
            boot_id: bool,
        ) -> Result<Evidence, ProviderError> {
            let bmc = self.marker.lock().unwrap().clone();
            let boot_id = if boot_id && bmc.is_none() {
                self.boot_id.lock().unwrap().clone()
            } else {
                None
            };
            Ok(Evidence {
                bmc,
                boot_id,
                checked_in: false,
            })
        }
        fn awaits_check_in(&self) -> bool {
            false
        }
    }

    fn timing() -> PowerTiming {
        PowerTiming {
            poll_interval: Duration::from_millis(500),
            max_poll_interval: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
            reissue_after: Duration::from_secs(15),
            graceful_timeout: Duration::ZERO,
            cycle: CycleMethod::OffOn,
        }
    }

    async fn run(
        bmc: &Scripted,
        timing: PowerTiming,
        allowed: Allowed,
        action: PowerAction,
    ) -> Result<(), ProviderError> {
        // As the provider does: the system is read, then the action starts from that reading.
        let current = bmc.read().await?;
        apply(
            bmc,
            &CancellationToken::new(),
            &timing,
            &allowed,
            action,
            current,
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn on_waits_for_the_read_back() {
        let bmc = Scripted::new(Reading::Off, Duration::from_secs(7));
        let start = Instant::now();
        run(&bmc, timing(), Allowed(None), PowerAction::On)
            .await
            .unwrap();
        assert_eq!(bmc.resets(), ["On"]);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(7) && took < Duration::from_secs(10),
            "{took:?}"
        );
        assert_eq!(bmc.read().await.unwrap(), Reading::On);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_sent_when_the_state_is_already_right() {
        let bmc = Scripted::new(Reading::On, Duration::from_secs(1));
        run(&bmc, timing(), Allowed(None), PowerAction::On)
            .await
            .unwrap();
        assert!(bmc.resets().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_reset_is_sent_again() {
        let mut bmc = Scripted::new(Reading::Off, Duration::from_secs(2));
        bmc.drop = vec![0];
        run(&bmc, timing(), Allowed(None), PowerAction::On)
            .await
            .unwrap();
        assert_eq!(bmc.resets(), ["On", "On"]);
        let lines = bmc.lines.lock().unwrap().clone();
        assert!(
            lines.iter().any(|l| l.contains("sending it again")),
            "{lines:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_a_transient_error() {
        let mut bmc = Scripted::new(Reading::Off, Duration::from_secs(2));
        bmc.drop = (0..100).collect();
        let e = run(&bmc, timing(), Allowed(None), PowerAction::On)
            .await
            .unwrap_err();
        assert!(is_deadline(&e), "{e}");
        assert!(
            e.to_string()
                .contains("last reported: Off; 4 resets sent): check the BMC's event log"),
            "{e}"
        );
        // 60 s deadline, reissued every 15 s.
        assert_eq!(bmc.resets().len(), 4, "{:?}", bmc.resets());
    }

    #[tokio::test(start_paused = true)]
    async fn cycle_is_off_then_on_and_on_when_off() {
        let bmc = Scripted::new(Reading::On, Duration::from_secs(3));
        run(&bmc, timing(), Allowed(None), PowerAction::Cycle)
            .await
            .unwrap();
        assert_eq!(bmc.resets(), ["ForceOff", "On"]);
        let bmc = Scripted::new(Reading::Off, Duration::from_secs(3));
        run(&bmc, timing(), Allowed(None), PowerAction::Cycle)
            .await
            .unwrap();
        assert_eq!(bmc.resets(), ["On"]);
    }

    #[tokio::test(start_paused = true)]
    async fn cycle_by_restart() {
        let t = PowerTiming {
            cycle: CycleMethod::Restart,
            ..timing()
        };
        let bmc = Scripted::new(Reading::On, Duration::from_secs(5));
        run(&bmc, t, Allowed(None), PowerAction::Cycle)
            .await
            .unwrap();
        assert_eq!(bmc.resets(), ["ForceRestart"]);
        assert_eq!(bmc.read().await.unwrap(), Reading::On);
        let lines = bmc.lines.lock().unwrap().clone();
        assert!(lines.iter().any(|l| l == "PowerState Off"), "{lines:?}");
        // A BMC that reports On throughout a warm reset: its LastResetTime proves it.
        let mut bmc = Scripted::new(Reading::On, Duration::from_secs(5));
        bmc.restart_shows = None;
        *bmc.marker.lock().unwrap() = Some("2026-01-01T00:00:00Z".into());
        run(&bmc, t, Allowed(None), PowerAction::Cycle)
            .await
            .unwrap();
        assert_eq!(bmc.resets(), ["ForceRestart"]);
        let lines = bmc.lines.lock().unwrap().clone();
        assert!(
            lines.iter().any(|l| l
                .contains("reboot confirmed after ForceRestart: the BMC's reset record changed")),
            "{lines:?}"
        );
        // Without Off/On allowed, off-on falls back to a restart.
        let allowed = Allowed(Some(vec!["ForceRestart".into()]));
        let mut bmc = Scripted::new(Reading::On, Duration::from_secs(1));
        bmc.restart_shows = None;
        *bmc.boot_id.lock().unwrap() = Some("b1".into());
        run(&bmc, timing(), allowed, PowerAction::Cycle)
            .await
            .unwrap();
        assert_eq!(bmc.resets(), ["ForceRestart"]);
    }

    #[tokio::test(start_paused = true)]
    async fn graceful_shutdown_falls_back_to_force_off() {
        let t = PowerTiming {
            graceful_timeout: Duration::from_secs(10),
            ..timing()
        };
        // The OS ignores the ACPI request.
        let mut bmc = Scripted::new(Reading::On, Duration::from_secs(1));
        bmc.drop = vec![0];
        run(&bmc, t, Allowed(None), PowerAction::Off).await.unwrap();
        assert_eq!(bmc.resets(), ["GracefulShutdown", "ForceOff"]);
        // It obeys.
        let bmc = Scripted::new(Reading::On, Duration::from_secs(1));
        run(&bmc, t, Allowed(None), PowerAction::Off).await.unwrap();
        assert_eq!(bmc.resets(), ["GracefulShutdown"]);
    }

    #[test]
    fn reset_types_the_bmc_allows() {
        let allowed = Allowed(Some(vec![
            "ForceOn".into(),
            "ForceOff".into(),
            "Nmi".into(),
        ]));
        assert_eq!(allowed.pick(ON), Some("ForceOn"));
        assert_eq!(allowed.pick(OFF), Some("ForceOff"));
        assert_eq!(allowed.pick(RESTART), None);
        assert_eq!(Allowed(None).pick(ON), Some("On"));
        let e = Allowed(Some(vec!["Nmi".into()]))
            .require("b", ON)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert!(
            e.to_string()
                .contains("allows none of the reset types On, ForceOn"),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_polling() {
        let mut bmc = Scripted::new(Reading::Off, Duration::from_secs(2));
        bmc.drop = (0..100).collect();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            c.cancel();
        });
        let start = Instant::now();
        let e = apply(
            &bmc,
            &cancel,
            &timing(),
            &Allowed(None),
            PowerAction::On,
            Reading::Off,
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Canceled);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_reading_in_hand_is_not_read_again() {
        let bmc = Scripted::new(Reading::On, Duration::from_secs(1));
        let cancel = CancellationToken::new();
        let allowed = Allowed(None);
        apply(
            &bmc,
            &cancel,
            &timing(),
            &allowed,
            PowerAction::On,
            Reading::On,
        )
        .await
        .unwrap();
        assert_eq!(*bmc.reads.lock().unwrap(), 0);
        assert!(bmc.resets().is_empty());
        let got = read_settled(&bmc, &cancel, &timing(), Reading::On).await;
        assert_eq!(got.unwrap(), Reading::On);
        assert_eq!(*bmc.reads.lock().unwrap(), 0);
    }

    #[test]
    fn a_toggle_is_never_sent_twice_nor_used_to_power_off() {
        assert!(may_send("On", false) && may_send("On", true));
        assert!(may_send("ForceOff", true));
        assert!(may_send("PushPowerButton", false));
        assert!(!may_send("PushPowerButton", true));
        assert!(!OFF.iter().any(|t| is_toggle(t)), "{OFF:?}");
        let button = Allowed(Some(vec![
            "GracefulShutdown".into(),
            "PushPowerButton".into(),
        ]));
        assert_eq!(button.pick(OFF), None);
        assert_eq!(button.pick(ON), Some("PushPowerButton"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_button_press_is_not_repeated() {
        // The press lands late (after reissue_after): a second press would turn it back off.
        let bmc = Scripted::new(Reading::Off, Duration::from_secs(25));
        let button = Allowed(Some(vec!["PushPowerButton".into()]));
        run(&bmc, timing(), button.clone(), PowerAction::On)
            .await
            .unwrap();
        assert_eq!(bmc.resets(), ["PushPowerButton"]);
        assert_eq!(bmc.read().await.unwrap(), Reading::On);
        // A press that is lost for good: one press, then the deadline.
        let mut bmc = Scripted::new(Reading::Off, Duration::from_secs(2));
        bmc.drop = (0..100).collect();
        let e = run(&bmc, timing(), button.clone(), PowerAction::On)
            .await
            .unwrap_err();
        assert!(is_deadline(&e), "{e}");
        assert_eq!(bmc.resets(), ["PushPowerButton"]);
        // Off is a hard off: a BMC that offers only the button cannot do it.
        let bmc = Scripted::new(Reading::On, Duration::from_secs(2));
        let e = run(&bmc, timing(), button, PowerAction::Off)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
        assert!(bmc.resets().is_empty());
    }

    #[test]
    fn no_power_state_is_unavailable_for_now() {
        let e = known("bmc-1", Reading::Unknown).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("reports no PowerState"), "{e}");
        for r in [
            Reading::On,
            Reading::Off,
            Reading::PoweringOn,
            Reading::PoweringOff,
        ] {
            assert_eq!(known("bmc-1", r).unwrap(), r);
        }
        assert_eq!(Reading::parse(None), Reading::Unknown);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bmc_without_power_state_fails_at_once() {
        let start = Instant::now();
        for action in [PowerAction::On, PowerAction::Off, PowerAction::Cycle] {
            let bmc = Scripted::new(Reading::Unknown, Duration::from_secs(1));
            let e = run(&bmc, timing(), Allowed(None), action)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{action:?}: {e}");
            assert!(bmc.resets().is_empty(), "{action:?}");
        }
        let bmc = Scripted::new(Reading::Unknown, Duration::from_secs(1));
        let e = read_settled(&bmc, &CancellationToken::new(), &timing(), Reading::Unknown)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_eq!(start.elapsed(), Duration::ZERO, "no waiting");
    }

    #[tokio::test(start_paused = true)]
    async fn power_state_lost_while_polling_is_waited_out() {
        // The BMC stops reporting PowerState after the reset (it boots): polling goes on, to
        // the deadline here since it never comes back.
        let mut bmc = Scripted::new(Reading::Off, Duration::from_secs(1));
        bmc.drop = vec![0];
        let soon = Instant::now() + Duration::from_secs(1);
        bmc.state.lock().unwrap().1 = Some((soon, Reading::Unknown));
        let start = Instant::now();
        let e = run(&bmc, timing(), Allowed(None), PowerAction::On)
            .await
            .unwrap_err();
        assert!(is_deadline(&e), "{e}");
        assert_eq!(start.elapsed(), timing().deadline);
        let lines = bmc.lines.lock().unwrap().clone();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("reports no PowerState for now")),
            "{lines:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_warm_reset_that_did_nothing_is_not_a_reboot() {
        let t = PowerTiming {
            cycle: CycleMethod::Restart,
            ..timing()
        };
        // The BMC keeps a reset record, but the reset changes nothing: at the deadline, a
        // transient "unverified" error.
        let mut bmc = Scripted::new(Reading::On, Duration::from_secs(1));
        bmc.restart_shows = None;
        bmc.restart_reboots = false;
        *bmc.marker.lock().unwrap() = Some("2026-01-01T00:00:00Z".into());
        let start = Instant::now();
        let e = run(&bmc, t, Allowed(None), PowerAction::Cycle)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
        assert!(e.to_string().starts_with("reboot unverified"), "{e}");
        assert_eq!(start.elapsed(), t.deadline);
        assert_eq!(bmc.resets(), ["ForceRestart"]);
        // Nothing can prove a reboot: a permanent error once the watch is over, which says
        // what to change.
        let mut bmc = Scripted::new(Reading::On, Duration::from_secs(1));
        bmc.restart_shows = None;
        let start = Instant::now();
        let e = run(&bmc, t, Allowed(None), PowerAction::Cycle)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
        assert!(e.to_string().contains("power.cycle = \"off-on\""), "{e}");
        assert_eq!(start.elapsed(), t.reissue_after);
        let lines = bmc.lines.lock().unwrap().clone();
        assert!(
            lines.iter().any(|l| l.starts_with("reboot unverified")),
            "{lines:?}"
        );
        // The boot id over SSH proves it where the BMC keeps no record.
        let mut bmc = Scripted::new(Reading::On, Duration::from_secs(1));
        bmc.restart_shows = None;
        *bmc.boot_id.lock().unwrap() = Some("b1".into());
        run(&bmc, t, Allowed(None), PowerAction::Cycle)
            .await
            .unwrap();
        let lines = bmc.lines.lock().unwrap().clone();
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("the boot id read over SSH changed")),
            "{lines:?}"
        );
    }
}
