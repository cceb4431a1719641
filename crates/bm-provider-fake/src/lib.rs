//! A [`Provider`] that simulates the hardware: BMC power, PXE, imaging, cluster joins, with
//! realistic timing and log lines, and failures injected on purpose.
//!
//! It makes the demo and the tests possible; it is not the product. Real hardware is driven
//! by other provider crates behind the same trait.
//!
//! # Failure injection
//!
//! Deterministic, per machine, through the machine's labels, so that a test can drive it
//! through the public API:
//!
//! | label | value | effect |
//! |---|---|---|
//! | `fake.baremetal.dev/fail-action` | an [`Action`] name, e.g. `repave` | that action fails |
//! | `fake.baremetal.dev/fail-times` | `N` or `always` (default) | only its first N calls fail |
//! | `fake.baremetal.dev/fail-kind` | `transient` (default), `unreachable`, `unavailable` (retried for minutes), `permanent`, or `panic` (a provider bug) | the kind of error |
//! | `fake.baremetal.dev/hang-action` | an [`Action`] name | that action runs until canceled |
//! | `fake.baremetal.dev/delay-ms` | `N` | every action takes N ms longer |
//!
//! And what the status poll ([`Provider::observe`]) reads:
//!
//! | label | value | effect |
//! |---|---|---|
//! | `fake.baremetal.dev/bmc` | `unreachable` | the BMC does not answer the poll |
//! | `fake.baremetal.dev/health` | `ok` (default), `warning`, `critical` | the health the BMC reports |
//! | `fake.baremetal.dev/power` | `on`, `off` | someone changed the power outside the control plane |
//!
//! And random, for the whole fleet: [`FakeConfig::failure_rate`] with a seed, which makes a
//! run reproducible.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bm_domain::{Machine, MachineId, OperationId};
use bm_provider::{
    ActionContext, ErrorKind, Health, JoinToken, Notice, Observation, ObserveContext, PowerAction,
    PowerState, Provider, ProviderError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

/// The label that names the action to fail.
pub const LABEL_FAIL_ACTION: &str = "fake.baremetal.dev/fail-action";
/// The label that says how many calls fail (`N` or `always`).
pub const LABEL_FAIL_TIMES: &str = "fake.baremetal.dev/fail-times";
/// The label that says how the action fails.
pub const LABEL_FAIL_KIND: &str = "fake.baremetal.dev/fail-kind";
/// The label that names an action that runs until canceled.
pub const LABEL_HANG_ACTION: &str = "fake.baremetal.dev/hang-action";
/// The label that adds a delay to every action, in milliseconds.
pub const LABEL_DELAY_MS: &str = "fake.baremetal.dev/delay-ms";

/// The label that makes the BMC unreachable for the status poll (`unreachable`).
pub const LABEL_BMC: &str = "fake.baremetal.dev/bmc";
/// The label that sets the health the BMC reports (`ok`, `warning`, `critical`).
pub const LABEL_HEALTH: &str = "fake.baremetal.dev/health";
/// The label that sets the power state as if someone had pressed the button (`on`, `off`).
pub const LABEL_POWER: &str = "fake.baremetal.dev/power";

/// The power state of a machine no action has touched: racked machines are usually on.
const DEFAULT_POWER: PowerState = PowerState::On;

/// How fast the simulated hardware is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Timing {
    /// A reimage takes 2-3 s in all: fast enough to wait for, slow enough to watch.
    #[default]
    Normal,
    /// About three times slower, for a live audience.
    Slow,
    /// No waiting at all, for tests and benchmarks.
    Instant,
}

/// Settings of a [`FakeProvider`].
#[derive(Clone, Debug, Default)]
pub struct FakeConfig {
    /// The timing profile.
    pub timing: Timing,
    /// The chance that any action fails with a transient error, from 0 to 1.
    pub failure_rate: f64,
    /// Seed of the random failures.
    pub seed: u64,
}

/// The simulated actions, one per provider call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Power on.
    PowerOn,
    /// Power off.
    PowerOff,
    /// Power cycle.
    PowerCycle,
    /// Read the power state.
    PowerStatus,
    /// One-time PXE boot.
    SetNetboot,
    /// Write the image.
    Repave,
    /// Mint a join token.
    MintJoinToken,
    /// Join the cluster.
    JoinCluster,
    /// Verify the node.
    VerifyInCluster,
    /// Drain the node.
    Drain,
    /// Uncordon the node.
    Uncordon,
    /// Wipe the disks.
    WipeDisks,
    /// Open a ticket.
    Notify,
    /// Apply the network config.
    ApplyNetConfig,
    /// Verify connectivity.
    VerifyConnectivity,
    /// Disarm the one-time PXE boot after a failed or canceled operation.
    DisarmNetboot,
    /// The status poll's reading of power and health.
    Observe,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 17] = [
        Action::PowerOn,
        Action::PowerOff,
        Action::PowerCycle,
        Action::PowerStatus,
        Action::SetNetboot,
        Action::Repave,
        Action::MintJoinToken,
        Action::JoinCluster,
        Action::VerifyInCluster,
        Action::Drain,
        Action::Uncordon,
        Action::WipeDisks,
        Action::Notify,
        Action::ApplyNetConfig,
        Action::VerifyConnectivity,
        Action::DisarmNetboot,
        Action::Observe,
    ];

    /// The name used in labels, e.g. `repave`.
    pub fn name(self) -> &'static str {
        match self {
            Action::PowerOn => "power-on",
            Action::PowerOff => "power-off",
            Action::PowerCycle => "power-cycle",
            Action::PowerStatus => "power-status",
            Action::SetNetboot => "set-netboot",
            Action::Repave => "repave",
            Action::MintJoinToken => "mint-join-token",
            Action::JoinCluster => "join-cluster",
            Action::VerifyInCluster => "verify-in-cluster",
            Action::Drain => "drain",
            Action::Uncordon => "uncordon",
            Action::WipeDisks => "wipe-disks",
            Action::Notify => "notify",
            Action::ApplyNetConfig => "apply-net-config",
            Action::VerifyConnectivity => "verify-connectivity",
            Action::DisarmNetboot => "disarm-netboot",
            Action::Observe => "observe",
        }
    }

    /// The action of that name.
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// How long it takes at normal speed, in milliseconds.
    fn normal_ms(self) -> u64 {
        match self {
            Action::PowerStatus | Action::MintJoinToken | Action::Observe => 50,
            Action::Notify | Action::Uncordon => 150,
            Action::SetNetboot | Action::DisarmNetboot | Action::PowerOn | Action::PowerOff => 200,
            Action::JoinCluster | Action::VerifyInCluster | Action::Drain => 300,
            Action::ApplyNetConfig | Action::VerifyConnectivity => 300,
            Action::PowerCycle => 500,
            Action::WipeDisks => 800,
            Action::Repave => 1000,
        }
    }

    /// The tag its log lines carry.
    fn tag(self) -> &'static str {
        match self {
            Action::PowerOn
            | Action::PowerOff
            | Action::PowerCycle
            | Action::PowerStatus
            | Action::Observe => "bmc",
            Action::SetNetboot | Action::DisarmNetboot => "pxe",
            Action::Repave => "repave",
            Action::MintJoinToken | Action::JoinCluster => "kubeadm",
            Action::VerifyInCluster | Action::Drain | Action::Uncordon => "k8s",
            Action::WipeDisks => "wipe",
            Action::Notify => "ticket",
            Action::ApplyNetConfig | Action::VerifyConnectivity => "net",
        }
    }
}

/// The simulated provider. Registered under the name `fake`.
#[derive(Debug)]
pub struct FakeProvider {
    config: FakeConfig,
    rng: Mutex<StdRng>,
    calls: Mutex<HashMap<(MachineId, Action), u64>>,
    power: Mutex<HashMap<MachineId, PowerState>>,
    tickets: Mutex<HashMap<OperationId, String>>,
}

impl Default for FakeProvider {
    fn default() -> Self {
        FakeProvider::new(FakeConfig::default())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeProvider {
    /// A fake provider with these settings.
    pub fn new(config: FakeConfig) -> Self {
        FakeProvider {
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            config,
            calls: Mutex::new(HashMap::new()),
            power: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
        }
    }

    /// How many times `action` was called for `machine`.
    pub fn calls(&self, machine: &str, action: Action) -> u64 {
        lock(&self.calls)
            .iter()
            .filter(|((m, a), _)| m.as_str() == machine && *a == action)
            .map(|(_, n)| *n)
            .sum()
    }

    /// How many times `action` was called, over all machines.
    pub fn total_calls(&self, action: Action) -> u64 {
        lock(&self.calls)
            .iter()
            .filter(|((_, a), _)| *a == action)
            .map(|(_, n)| *n)
            .sum()
    }

    fn scale(&self, ms: u64) -> Duration {
        match self.config.timing {
            Timing::Normal => Duration::from_millis(ms),
            Timing::Slow => Duration::from_millis(ms * 3),
            Timing::Instant => Duration::ZERO,
        }
    }

    /// Waits `d`, or fails at once if the action is canceled.
    async fn wait(ctx: &ActionContext<'_>, d: Duration) -> Result<(), ProviderError> {
        Self::wait_or_cancel(ctx.cancel, d).await
    }

    async fn wait_or_cancel(cancel: &CancellationToken, d: Duration) -> Result<(), ProviderError> {
        if d.is_zero() {
            return if cancel.is_cancelled() {
                Err(ProviderError::canceled())
            } else {
                Ok(())
            };
        }
        tokio::select! {
            () = tokio::time::sleep(d) => Ok(()),
            () = cancel.cancelled() => Err(ProviderError::canceled()),
        }
    }

    /// Counts a call of `action` on `machine` and returns its number (from 1).
    fn count(&self, machine: &MachineId, action: Action) -> u64 {
        let mut calls = lock(&self.calls);
        let n = calls.entry((machine.clone(), action)).or_insert(0);
        *n += 1;
        *n
    }

    /// Runs one simulated action: counts the call, applies the injected behaviour, and
    /// logs `lines` spread over the action's duration.
    async fn act(
        &self,
        ctx: ActionContext<'_>,
        action: Action,
        lines: &[String],
    ) -> Result<(), ProviderError> {
        let machine = ctx.machine;
        let call = self.count(&machine.id, action);
        let labels = &machine.labels;
        let tag = action.tag();
        if labels.get(LABEL_HANG_ACTION) == Some(action.name()) {
            ctx.log.line(
                tag,
                format!("{} is not answering (injected hang)", action.name()),
            );
            ctx.cancel.cancelled().await;
            return Err(ProviderError::canceled());
        }
        let extra = labels
            .get(LABEL_DELAY_MS)
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        let total = self.scale(action.normal_ms()) + extra;
        let step = total / u32::try_from(lines.len().max(1)).unwrap_or(1);
        // Each line says what is about to take time, then the time passes.
        for (i, line) in lines.iter().enumerate() {
            ctx.log.line(tag, line);
            if i == 0 {
                self.injected_failure(machine, action, call)?;
            }
            Self::wait(&ctx, step).await?;
        }
        if lines.is_empty() {
            self.injected_failure(machine, action, call)?;
            Self::wait(&ctx, total).await?;
        }
        Ok(())
    }

    fn injected_failure(
        &self,
        machine: &Machine,
        action: Action,
        call: u64,
    ) -> Result<(), ProviderError> {
        let labels = &machine.labels;
        if labels.get(LABEL_FAIL_ACTION) == Some(action.name()) {
            let times = labels.get(LABEL_FAIL_TIMES).unwrap_or("always");
            let fails = times == "always" || times.parse::<u64>().is_ok_and(|n| call <= n);
            if fails {
                let kind = match labels.get(LABEL_FAIL_KIND) {
                    // What a bug in a provider crate does; the executor must survive it.
                    Some("panic") => panic!("injected panic of {} (call {call})", action.name()),
                    Some("permanent") => ErrorKind::Permanent,
                    Some("unreachable") => ErrorKind::Unreachable,
                    Some("unavailable") => ErrorKind::Unavailable,
                    _ => ErrorKind::Transient,
                };
                return Err(ProviderError::new(
                    kind,
                    format!("injected failure of {} (call {call})", action.name()),
                ));
            }
        }
        if self.config.failure_rate > 0.0 {
            let roll: f64 = lock(&self.rng).random();
            if roll < self.config.failure_rate {
                return Err(ProviderError::transient(format!(
                    "random failure of {} (rate {})",
                    action.name(),
                    self.config.failure_rate
                )));
            }
        }
        Ok(())
    }

    fn in_cluster(machine: &Machine) -> Option<&str> {
        (!machine.spec.target_cluster.is_empty()).then_some(machine.spec.target_cluster.as_str())
    }
}

fn bmc(machine: &Machine) -> String {
    if machine.spec.bmc_endpoint.is_empty() {
        format!("bmc-{}", machine.id)
    } else {
        machine.spec.bmc_endpoint.clone()
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn name(&self) -> &str {
        "fake"
    }

    async fn power(
        &self,
        ctx: ActionContext<'_>,
        action: PowerAction,
    ) -> Result<(), ProviderError> {
        let m = ctx.machine;
        let (a, lines, state) = match action {
            PowerAction::On => (
                Action::PowerOn,
                vec![format!("Power on via {}", bmc(m)), "PowerState: On".into()],
                PowerState::On,
            ),
            PowerAction::Off => (
                Action::PowerOff,
                vec![
                    format!("Power off via {}", bmc(m)),
                    "PowerState: Off".into(),
                ],
                PowerState::Off,
            ),
            PowerAction::Cycle => (
                Action::PowerCycle,
                vec![
                    format!("Power cycle via {}", bmc(m)),
                    "PowerState: Off".into(),
                    "PowerState: On".into(),
                    "POST complete, booting".into(),
                ],
                PowerState::On,
            ),
        };
        self.act(ctx, a, &lines).await?;
        lock(&self.power).insert(m.id.clone(), state);
        Ok(())
    }

    async fn power_state(&self, ctx: ActionContext<'_>) -> Result<PowerState, ProviderError> {
        self.act(ctx, Action::PowerStatus, &[]).await?;
        Ok(lock(&self.power)
            .get(&ctx.machine.id)
            .copied()
            .unwrap_or(DEFAULT_POWER))
    }

    async fn observe(&self, ctx: ObserveContext<'_>) -> Result<Option<Observation>, ProviderError> {
        let m = ctx.machine;
        let call = self.count(&m.id, Action::Observe);
        let labels = &m.labels;
        Self::wait_or_cancel(ctx.cancel, self.scale(Action::Observe.normal_ms())).await?;
        if labels.get(LABEL_BMC) == Some("unreachable") {
            return Err(ProviderError::unreachable(format!(
                "{} did not answer (simulated by the label {LABEL_BMC}=unreachable)",
                bmc(m)
            )));
        }
        self.injected_failure(m, Action::Observe, call)?;
        let power = {
            let mut power = lock(&self.power);
            // A label stands for someone at the console: the simulated state follows it.
            let forced = match labels.get(LABEL_POWER) {
                Some("on") => Some(PowerState::On),
                Some("off") => Some(PowerState::Off),
                _ => None,
            };
            if let Some(state) = forced {
                power.insert(m.id.clone(), state);
            }
            power.get(&m.id).copied().unwrap_or(DEFAULT_POWER)
        };
        let (health, detail) = match labels.get(LABEL_HEALTH) {
            Some("warning") => (Health::Warning, "fan 3 below its threshold (simulated)"),
            Some("critical") => (Health::Critical, "DIMM A2 uncorrectable errors (simulated)"),
            _ => (Health::Ok, ""),
        };
        Ok(Some(Observation::Answered {
            power: Some(power),
            health: Some(health),
            detail: detail.to_owned(),
        }))
    }

    async fn set_netboot(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let mac = ctx
            .machine
            .spec
            .mac_addresses
            .first()
            .map_or_else(|| "the first NIC".to_owned(), ToString::to_string);
        let lines = [
            format!("Boot override: PXE (once) on {}", bmc(ctx.machine)),
            format!("DHCP reservation for {mac} points at the iPXE deploy ramdisk"),
        ];
        self.act(ctx, Action::SetNetboot, &lines).await
    }

    async fn disarm_netboot(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let lines = [format!(
            "Boot override: disabled on {} (next boot from disk)",
            bmc(ctx.machine)
        )];
        self.act(ctx, Action::DisarmNetboot, &lines).await
    }

    async fn repave(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let image = if ctx.machine.spec.image.is_empty() {
            "default-image"
        } else {
            &ctx.machine.spec.image
        };
        let lines = [
            format!("Downloading image {image}"),
            "Writing image to /dev/sda: 25%".to_owned(),
            "Writing image to /dev/sda: 50%".to_owned(),
            "Writing image to /dev/sda: 75%".to_owned(),
            "Writing image to /dev/sda: 100%".to_owned(),
            "Configuring bootloader (UEFI, grub)".to_owned(),
            "Image written and verified (sha256 ok)".to_owned(),
        ];
        self.act(ctx, Action::Repave, &lines).await
    }

    async fn mint_join_token(&self, ctx: ActionContext<'_>) -> Result<JoinToken, ProviderError> {
        let cluster = Self::in_cluster(ctx.machine).unwrap_or("default");
        let lines = [format!("Minting a bootstrap token for cluster {cluster}")];
        self.act(ctx, Action::MintJoinToken, &lines).await?;
        Ok(JoinToken(format!("fake.{}", ctx.operation_id.ulid())))
    }

    async fn join_cluster(
        &self,
        ctx: ActionContext<'_>,
        _token: &JoinToken,
    ) -> Result<(), ProviderError> {
        let cluster = Self::in_cluster(ctx.machine).unwrap_or("default");
        let lines = [
            format!("kubeadm join {cluster}-api:6443 --token <redacted>"),
            "Kubelet started, TLS bootstrap complete".to_owned(),
            format!(
                "Node {} joined cordoned (schedulable after exit-maintenance)",
                ctx.machine.id
            ),
        ];
        self.act(ctx, Action::JoinCluster, &lines).await
    }

    async fn verify_in_cluster(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let lines = [
            format!("Waiting for node {} to be Ready", ctx.machine.id),
            format!("Node {} is Ready", ctx.machine.id),
        ];
        self.act(ctx, Action::VerifyInCluster, &lines).await
    }

    async fn drain(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let id = &ctx.machine.id;
        let lines = [
            format!("Cordoning node {id}"),
            format!("Evicting pods from {id}"),
            format!("Node {id} drained"),
        ];
        self.act(ctx, Action::Drain, &lines).await
    }

    async fn uncordon(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let lines = [format!("Uncordoning node {}", ctx.machine.id)];
        self.act(ctx, Action::Uncordon, &lines).await
    }

    async fn wipe_disks(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let lines = [
            "Secure erase of /dev/sda".to_owned(),
            "Secure erase of /dev/sdb".to_owned(),
            "Disks wiped".to_owned(),
        ];
        self.act(ctx, Action::WipeDisks, &lines).await
    }

    async fn notify(
        &self,
        ctx: ActionContext<'_>,
        notice: &Notice,
    ) -> Result<String, ProviderError> {
        let lines = [format!("Opening ticket: {}", notice.summary)];
        self.act(ctx, Action::Notify, &lines).await?;
        // Idempotent: one ticket per operation, however often the step runs.
        let mut tickets = lock(&self.tickets);
        let next = tickets.len() + 1;
        Ok(tickets
            .entry(ctx.operation_id)
            .or_insert_with(|| format!("RMA-{next:05}"))
            .clone())
    }

    async fn apply_network_config(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let size = ctx.machine.spec.network_config.len();
        let lines = [
            format!("Rendering network config ({size} bytes)"),
            "Applying with netplan apply".to_owned(),
        ];
        self.act(ctx, Action::ApplyNetConfig, &lines).await
    }

    async fn verify_connectivity(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let target = if ctx.machine.spec.ssh_endpoint.is_empty() {
            ctx.machine.id.to_string()
        } else {
            ctx.machine.spec.ssh_endpoint.clone()
        };
        let lines = [
            format!("Probing {target}"),
            "Reachable: ping ok, ssh ok".to_owned(),
        ];
        self.act(ctx, Action::VerifyConnectivity, &lines).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_domain::{Labels, MachineSpec, Timestamp};
    use bm_provider::LogSink;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    fn machine(labels: &[(&str, &str)]) -> Machine {
        Machine::register(
            MachineId::new("machine-1").unwrap(),
            MachineSpec {
                provider: "fake".into(),
                image: "ubuntu-24.04".into(),
                ..MachineSpec::default()
            },
            Labels::from_pairs(labels.iter().copied()).unwrap(),
            Timestamp::EPOCH,
        )
        .unwrap()
    }

    fn collect() -> (LogSink, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        (
            LogSink::new(move |tag, msg| lock(&l2).push(format!("[{tag}] {msg}"))),
            lines,
        )
    }

    fn instant() -> FakeProvider {
        FakeProvider::new(FakeConfig {
            timing: Timing::Instant,
            ..FakeConfig::default()
        })
    }

    #[tokio::test]
    async fn repave_logs_progress_and_counts_calls() {
        let p = instant();
        let m = machine(&[]);
        let (log, lines) = collect();
        let cancel = CancellationToken::new();
        let ctx = ActionContext {
            machine: &m,
            operation_id: OperationId::from_parts(1, 1),
            cancel: &cancel,
            log: &log,
        };
        p.repave(ctx).await.unwrap();
        let lines = lock(&lines).clone();
        assert_eq!(lines[0], "[repave] Downloading image ubuntu-24.04");
        assert!(lines.iter().any(|l| l.contains("100%")));
        assert_eq!(p.calls("machine-1", Action::Repave), 1);
        assert_eq!(p.total_calls(Action::SetNetboot), 0);
    }

    #[tokio::test]
    async fn failures_are_injected_by_label_n_times() {
        let p = instant();
        let m = machine(&[
            (LABEL_FAIL_ACTION, "repave"),
            (LABEL_FAIL_TIMES, "2"),
            (LABEL_FAIL_KIND, "unreachable"),
        ]);
        let cancel = CancellationToken::new();
        let log = LogSink::discard();
        let ctx = ActionContext {
            machine: &m,
            operation_id: OperationId::from_parts(1, 1),
            cancel: &cancel,
            log: &log,
        };
        for _ in 0..2 {
            let e = p.repave(ctx).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unreachable);
        }
        p.repave(ctx).await.unwrap();
        // Other actions are not affected.
        p.set_netboot(ctx).await.unwrap();
    }

    #[tokio::test]
    async fn always_failing_and_permanent() {
        let p = instant();
        let m = machine(&[(LABEL_FAIL_ACTION, "drain"), (LABEL_FAIL_KIND, "permanent")]);
        let cancel = CancellationToken::new();
        let log = LogSink::discard();
        let ctx = ActionContext {
            machine: &m,
            operation_id: OperationId::from_parts(1, 1),
            cancel: &cancel,
            log: &log,
        };
        for _ in 0..5 {
            assert!(!p.drain(ctx).await.unwrap_err().is_retryable());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_a_hanging_action_at_once() {
        let p = Arc::new(FakeProvider::default());
        let m = machine(&[(LABEL_HANG_ACTION, "repave")]);
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            c2.cancel();
        });
        let log = LogSink::discard();
        let ctx = ActionContext {
            machine: &m,
            operation_id: OperationId::from_parts(1, 1),
            cancel: &cancel,
            log: &log,
        };
        let e = p.repave(ctx).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Canceled);
        // Paused time: the hang lasted exactly until the cancel, not a tick longer.
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn normal_timing_reimage_takes_two_to_three_seconds() {
        let p = FakeProvider::default();
        let m = machine(&[]);
        let cancel = CancellationToken::new();
        let log = LogSink::discard();
        let ctx = ActionContext {
            machine: &m,
            operation_id: OperationId::from_parts(1, 1),
            cancel: &cancel,
            log: &log,
        };
        let start = tokio::time::Instant::now();
        p.set_netboot(ctx).await.unwrap();
        p.power(ctx, PowerAction::Cycle).await.unwrap();
        p.repave(ctx).await.unwrap();
        let token = p.mint_join_token(ctx).await.unwrap();
        p.join_cluster(ctx, &token).await.unwrap();
        p.verify_in_cluster(ctx).await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took <= Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn random_failures_are_reproducible_by_seed() {
        let run = |seed| async move {
            let p = FakeProvider::new(FakeConfig {
                timing: Timing::Instant,
                failure_rate: 0.3,
                seed,
            });
            let m = machine(&[]);
            let cancel = CancellationToken::new();
            let log = LogSink::discard();
            let ctx = ActionContext {
                machine: &m,
                operation_id: OperationId::from_parts(1, 1),
                cancel: &cancel,
                log: &log,
            };
            let mut outcomes = Vec::new();
            for _ in 0..50 {
                outcomes.push(p.drain(ctx).await.is_ok());
            }
            outcomes
        };
        let a = run(7).await;
        assert_eq!(a, run(7).await);
        let failures = a.iter().filter(|ok| !**ok).count();
        assert!((5..=25).contains(&failures), "{failures} of 50 at rate 0.3");
    }

    #[tokio::test]
    async fn tickets_are_idempotent_per_operation() {
        let p = instant();
        let m = machine(&[]);
        let cancel = CancellationToken::new();
        let log = LogSink::discard();
        let notice = Notice {
            kind: bm_provider::NoticeKind::RmaTicket,
            summary: "disk".into(),
        };
        let ctx = |n| ActionContext {
            machine: &m,
            operation_id: OperationId::from_parts(1, n),
            cancel: &cancel,
            log: &log,
        };
        let a = p.notify(ctx(1), &notice).await.unwrap();
        assert_eq!(p.notify(ctx(1), &notice).await.unwrap(), a);
        assert_ne!(p.notify(ctx(2), &notice).await.unwrap(), a);
    }
}
