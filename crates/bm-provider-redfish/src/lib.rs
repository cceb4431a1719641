//! A [`Provider`] for real hardware: power and boot through the machine's Redfish BMC, the
//! in-band steps (imaging, cluster join, drain, ...) as commands over SSH, repair tickets
//! through a webhook. Registered under the name `redfish`.
//!
//! | Provider method | How |
//! |---|---|
//! | `power`, `power_state` | `ComputerSystem.Reset` (a reset type the BMC advertises), confirmed by reading `PowerState` back |
//! | `disarm_netboot` | `BootSourceOverrideEnabled: Disabled` (read back), or the override pointed at `Hdd` on a BMC that cannot disable it; with virtual media, the deploy ISO ejected too |
//! | `set_netboot` | one-time boot override to `Pxe` (after logging how the record's MAC addresses compare with the NICs the BMC reports); or, with `boot.method = "virtual-media"`, the deploy ISO inserted as virtual media (ejecting other media first) and a one-time override to `Cd` |
//! | `repave`, `mint_join_token`, `join_cluster`, `verify_in_cluster`, `drain`, `uncordon`, `wipe_disks`, `apply_network_config`, `verify_connectivity` | the step's command template from `[redfish.commands]`, run over SSH on `spec.ssh_endpoint` |
//! | `notify` | a JSON POST to `notify.webhook_url` with `Idempotency-Key: <operation id>`; without a webhook, a log line |
//!
//! # The machine record
//!
//! - `bmc_endpoint`: `redfish+https://host[:port]/<path of the system>`, e.g.
//!   `redfish+https://10.0.1.5/redfish/v1/Systems/1` (`redfish+http://` for a lab BMC
//!   whose section sets `allow_plaintext`).
//!   The path is the system's `@odata.id` as the BMC writes it. Without a path (or with
//!   `/redfish/v1/Systems`) the BMC's only system is used; `?uuid=<UUID>` picks a system by
//!   its UUID.
//! - `ssh_endpoint`: `[user@]host[:port]` of the machine's SSH daemon (deploy ramdisk or
//!   installed OS); needed when in-band command templates are configured.
//!
//! # Credentials
//!
//! BMC credentials never come from the machine record; they are in the server's
//! configuration (see [`RedfishConfig`] and `examples/provider-config.toml`). For a machine
//! whose BMC endpoint has host `H` and port `P`:
//!
//! 1. `[redfish.bmc."H:P"]`, if it exists and sets `username`;
//! 2. else `[redfish.bmc."H"]`, if it exists and sets `username`, and only when the endpoint
//!    names no port (or the scheme's default) or `"H:P"` has a section: for any other port
//!    the machine is refused;
//! 3. else the most specific network section (`[redfish.bmc."10.0.1.0/24"]`,
//!    `[redfish.bmc."bmc-*.lab"]`) containing `H`, if it sets `username`;
//! 4. else `[redfish.credentials]`, only if `credential_hosts` lists `H` (CIDRs match IP
//!    addresses, names are matched as written, never resolved); if not, the machine is
//!    refused;
//! 5. else no `Authorization` header is sent.
//!
//! A `redfish+http://` endpoint is refused unless `allow_plaintext = true` applies to it
//! (same lookup; a `"H"` section's only for its default port). Refused means: `validate`
//! fails at registration and update with a message naming the setting to change, and no
//! request is sent to such an endpoint of a machine stored earlier. Redirects to another
//! origin are not followed.
//!
//! The password is `password` or, better, the content of `password_file` (read once at
//! start, trailing newline removed). The same lookup, field by field, applies to the TLS
//! settings (`ca_file`, `insecure_skip_verify`), the request timeout and the concurrency
//! limit: each comes from `"H:P"` if it sets it, else from `"H"`, else from the defaults
//! (`tls.ca_file`, certificates verified, `request_timeout`, `max_concurrent_requests`). A
//! section that sets `ca_file` counts as `insecure_skip_verify = false`. Passwords are never
//! logged nor shown by `Debug`.
//!
//! The SSH user is the one in `ssh_endpoint`, else `ssh.user`; the key is `ssh.private_key_file`.
//!
//! # Guarantees
//!
//! Those of [`Provider`]: power actions are idempotent (nothing is sent when the state is
//! already right), every wait and request stops at cancellation, remote commands are sent
//! `SIGTERM` when canceled or timed out, and errors say whether a retry helps (401/404,
//! refused host keys and a system without `PowerState` are permanent; timeouts, 5xx and 429
//! are transient; connection failures are unreachable). At most `max_concurrent_requests`
//! requests go to one BMC host at a time, whatever the number of machines behind it.

mod config;
mod endpoint;
mod hosts;
mod image;
mod notify;
mod redfish;
mod ssh;
mod template;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bm_domain::{MacAddress, Machine};
use bm_provider::{
    ActionContext, BootWitness, ErrorKind, JoinToken, Notice, Observation, ObserveContext,
    PowerAction, PowerState, Provider, ProviderError,
};
use tokio_util::sync::CancellationToken;

pub use config::{
    BmcConfig, BootConfig, BootMethod, BootMode, CommandsConfig, ConfigError, Credentials,
    CycleMethod, ImagesConfig, NotifyConfig, PowerConfig, RedfishConfig, Secret, SshConfig,
    StepCommand, TlsConfig,
};

use crate::config::{BmcTable, Boot, Images, Step, StepPlan};
use crate::endpoint::{BmcEndpoint, parse_bmc_endpoint, parse_ssh_endpoint};
use crate::notify::Notifier;
use crate::redfish::nic::MacCheck;
use crate::redfish::power::{self, PowerTiming, Reading};
use crate::redfish::system::{self, SystemPower, TAG};
use crate::redfish::{Bmc, Resource};
use crate::ssh::SshRunner;
use crate::template::{Template, Values};

/// The name the provider registers under (machines' `spec.provider`).
pub const PROVIDER_NAME: &str = "redfish";

/// The Redfish + SSH provider. Build it with [`RedfishProvider::new`] from the server's
/// `[redfish]` configuration and register it in a [`bm_provider::ProviderRegistry`].
#[derive(Debug)]
pub struct RedfishProvider {
    /// The settings of each BMC.
    bmc_settings: BmcTable,
    /// One client and concurrency limit per BMC origin (`https://host:port`).
    bmcs: Mutex<HashMap<String, Arc<Bmc>>>,
    /// The system path found for each BMC endpoint, so that discovery runs once.
    systems: Mutex<HashMap<String, String>>,
    power: PowerTiming,
    insert_media_timeout: Duration,
    boot: Boot,
    boot_mode: Option<BootMode>,
    steps: HashMap<&'static str, StepPlan>,
    ssh: Option<SshRunner>,
    notifier: Notifier,
    /// Learns of deploy-environment check-ins, to prove warm resets.
    witness: Option<Witness>,
    /// Learns of every request to a BMC (metrics per BMC host).
    observer: Option<Arc<dyn bm_provider::RequestObserver>>,
    /// Where images and their checksums are published (`[redfish.images]`).
    images: Option<Images>,
    /// Fetches the published checksums.
    http: reqwest::Client,
}

/// A [`BootWitness`] in the provider (which is `Debug`).
#[derive(Clone)]
struct Witness(Arc<dyn BootWitness>);

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootWitness")
    }
}

/// The label that chooses a machine's firmware boot mode (`uefi`, `legacy`), over
/// `boot.mode`.
pub const LABEL_BOOT_MODE: &str = "redfish.baremetal.dev/boot-mode";

/// The command that prints the kernel's boot id, new at every boot.
const BOOT_ID_COMMAND: &str = "cat /proc/sys/kernel/random/boot_id";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RedfishProvider {
    /// Checks the configuration, reads the files it names (passwords, CA, SSH key) and
    /// parses the templates.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first field that cannot work and why.
    pub fn new(config: RedfishConfig) -> Result<Self, ConfigError> {
        let c = config.check()?;
        Ok(RedfishProvider {
            bmc_settings: c.bmcs,
            bmcs: Mutex::new(HashMap::new()),
            systems: Mutex::new(HashMap::new()),
            power: c.power,
            insert_media_timeout: c.insert_media_timeout,
            boot: c.boot,
            boot_mode: c.boot_mode,
            steps: c.steps,
            ssh: c.ssh.map(SshRunner::new),
            notifier: Notifier::new(&config.notify)?,
            witness: None,
            observer: None,
            images: c.images,
            http: reqwest::Client::new(),
        })
    }

    /// Takes a deploy-environment check-in seen by `witness` after a warm reset as proof of
    /// the reboot (the BMC may report `On` throughout one). Without a witness, warm resets
    /// are proven by the BMC's `LastResetTime` / `BootProgress` or the boot id over SSH.
    #[must_use]
    pub fn with_boot_witness(mut self, witness: Arc<dyn BootWitness>) -> Self {
        self.witness = Some(Witness(witness));
        self
    }

    /// Tells `observer` of every request sent to a BMC: its host, its duration and its
    /// HTTP status (for metrics per BMC host). Call it before the first request.
    #[must_use]
    pub fn with_request_observer(
        mut self,
        observer: Arc<dyn bm_provider::RequestObserver>,
    ) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The machine's boot id read over SSH; `None` when SSH is not configured, the machine
    /// has no `ssh_endpoint` or it does not answer (it may be rebooting).
    async fn read_boot_id(&self, ctx: &ActionContext<'_>) -> Option<String> {
        let runner = self.ssh.as_ref()?;
        let target = parse_ssh_endpoint(&ctx.machine.spec.ssh_endpoint).ok()?;
        let cmd = ssh::Command {
            tag: TAG,
            command: BOOT_ID_COMMAND.to_owned(),
            display: BOOT_ID_COMMAND.to_owned(),
            stdin: None,
            capture_stdout: true,
            keep_line: None,
        };
        let out = runner.run(ctx, &target, cmd).await.ok()?;
        let id = out.stdout.trim();
        (!id.is_empty()).then(|| id.to_owned())
    }

    fn endpoint(machine: &Machine) -> Result<BmcEndpoint, ProviderError> {
        parse_bmc_endpoint(&machine.spec.bmc_endpoint)
            .map_err(|e| ProviderError::permanent(format!("machine {}: {e}", machine.id)))
    }

    /// The client of the machine's BMC, built on first use.
    ///
    /// The endpoint is checked against the configuration first, every time: a record stored
    /// before the configuration changed gets no request, let alone a credential.
    async fn bmc(&self, ep: &BmcEndpoint) -> Result<Arc<Bmc>, ProviderError> {
        let settings = self
            .bmc_settings
            .settings_for(ep)
            .map_err(ProviderError::permanent)?;
        let key = ep.base.origin().ascii_serialization();
        if let Some(b) = lock(&self.bmcs).get(&key) {
            return Ok(b.clone());
        }
        let (name, base) = (ep.host_port.clone(), ep.base.clone());
        // Building a TLS client may read the system trust store: off the runtime.
        let observer = self.observer.clone();
        let bmc = tokio::task::spawn_blocking(move || Bmc::new(name, base, settings, observer))
            .await
            .map_err(|e| {
                ProviderError::transient(format!("setting up the BMC client failed: {e}"))
            })??;
        Ok(lock(&self.bmcs)
            .entry(key)
            .or_insert_with(|| Arc::new(bmc))
            .clone())
    }

    /// The machine's BMC and its ComputerSystem, fresh from the BMC.
    async fn system(&self, ctx: &ActionContext<'_>) -> Result<(Arc<Bmc>, Resource), ProviderError> {
        self.system_of(ctx.machine, ctx.cancel).await
    }

    /// The machine's BMC client and its ComputerSystem resource, read now (one GET once the
    /// system's path is known).
    async fn system_of(
        &self,
        machine: &Machine,
        cancel: &CancellationToken,
    ) -> Result<(Arc<Bmc>, Resource), ProviderError> {
        let ep = Self::endpoint(machine)?;
        let bmc = self.bmc(&ep).await?;
        let spec_endpoint = &machine.spec.bmc_endpoint;
        let cached = lock(&self.systems).get(spec_endpoint).cloned();
        if let Some(path) = cached {
            if let Some(res) = bmc.get_opt(cancel, &path).await? {
                return Ok((bmc, res));
            }
            lock(&self.systems).remove(spec_endpoint);
        }
        let res = system::find_system(&bmc, cancel, &ep.system).await?;
        lock(&self.systems).insert(spec_endpoint.clone(), res.path.clone());
        Ok((bmc, res))
    }

    fn values(ctx: &ActionContext<'_>, token: Option<&JoinToken>) -> Values {
        let spec = &ctx.machine.spec;
        let macs: Vec<String> = spec.mac_addresses.iter().map(ToString::to_string).collect();
        Values {
            machine_id: ctx.machine.id.to_string(),
            image: spec.image.clone(),
            target_cluster: spec.target_cluster.clone(),
            mac: macs.first().cloned().unwrap_or_default(),
            macs: macs.join(" "),
            network_config: spec.network_config.clone(),
            operation_id: ctx.operation_id.to_string(),
            ssh_host: parse_ssh_endpoint(&spec.ssh_endpoint)
                .map(|t| t.host)
                .unwrap_or_default(),
            token: token.map(|t| t.0.clone()),
            image_url: String::new(),
            image_checksum: String::new(),
        }
    }

    /// Runs an in-band step's command.
    async fn run_step(
        &self,
        ctx: &ActionContext<'_>,
        step: Step,
        token: Option<&JoinToken>,
    ) -> Result<ssh::Output, ProviderError> {
        self.run_step_with(ctx, step, token, Self::values(ctx, token), None)
            .await
    }

    /// Runs an in-band step's command with these values; `keep_line` as in
    /// [`ssh::Command::keep_line`].
    async fn run_step_with(
        &self,
        ctx: &ActionContext<'_>,
        step: Step,
        token: Option<&JoinToken>,
        values: Values,
        keep_line: Option<&'static str>,
    ) -> Result<ssh::Output, ProviderError> {
        let template = match self.steps.get(step.tag()) {
            None => {
                return Err(ProviderError::permanent(format!(
                    "no command template for {}: set [redfish.commands] {} in the server configuration",
                    step.tag(),
                    step.key()
                )));
            }
            Some(StepPlan::Noop) => {
                ctx.log.line(step.tag(), "configured as a no-op");
                return Ok(ssh::Output::default());
            }
            Some(StepPlan::Run(t)) => t,
        };
        let Some(runner) = &self.ssh else {
            return Err(ProviderError::permanent("SSH is not configured"));
        };
        let target = parse_ssh_endpoint(&ctx.machine.spec.ssh_endpoint).map_err(|e| {
            ProviderError::permanent(format!(
                "machine {} cannot run {} over SSH: {e}",
                ctx.machine.id,
                step.tag()
            ))
        })?;
        let stdin = match step {
            Step::JoinCluster => token.map(|t| format!("{}\n", t.0)),
            Step::ApplyNetworkConfig => Some(values.network_config.clone()),
            _ => None,
        };
        let cmd = ssh::Command {
            tag: step.tag(),
            command: template.render_shell(&values),
            display: template.render_display(&values),
            stdin,
            capture_stdout: step == Step::MintJoinToken,
            keep_line,
        };
        runner.run(ctx, &target, cmd).await
    }

    /// Repave with `[redfish.images]`: the published checksum first, then the command with
    /// `{image_url}` and `{image_checksum}`, which must report the checksum of what it wrote.
    async fn repave_verified(
        &self,
        ctx: &ActionContext<'_>,
        images: &Images,
    ) -> Result<(), ProviderError> {
        let mut values = Self::values(ctx, None);
        let image_url = images.url.render_raw(&values);
        let sha_url = images.sha256_url.render_raw(&values);
        let tag = Step::Repave.tag();
        ctx.log.line(tag, format!("published checksum: {sha_url}"));
        let want =
            image::published_sha256(&self.http, ctx.cancel, &sha_url, images.timeout).await?;
        values.image_url = image_url;
        values.image_checksum = want.clone();
        let out = self
            .run_step_with(ctx, Step::Repave, None, values, Some(image::REPORT_PREFIX))
            .await?;
        image::check_written(out.kept.as_deref(), &want, &ctx.machine.spec.image)?;
        ctx.log.line(
            tag,
            format!("the written image matches its published SHA-256 {want}"),
        );
        Ok(())
    }

    /// Compares the MAC addresses of the machine record with the NICs its BMC reports and
    /// logs the result. A PXE boot reaches the deploy ramdisk only through a MAC of the
    /// record (its DHCP reservation), so a mismatch is the first thing to know when the boot
    /// never arrives. Only a cancel stops the action: a BMC that cannot list its NICs (many
    /// list them partly or not at all) is logged and the boot goes on.
    async fn check_macs(
        &self,
        ctx: &ActionContext<'_>,
        bmc: &Bmc,
        sys: &Resource,
    ) -> Result<(), ProviderError> {
        let record = &ctx.machine.spec.mac_addresses;
        if record.is_empty() {
            return Ok(());
        }
        let found = match system::macs(bmc, ctx.cancel, sys).await {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::Canceled => return Err(e),
            Err(e) => {
                ctx.log
                    .line(TAG, format!("NICs not compared with the record: {e}"));
                return Ok(());
            }
        };
        let check = MacCheck::compare(record, found);
        let show = |v: &[MacAddress]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if check.record_matches() {
            ctx.log.line(
                TAG,
                format!("NICs: {} (the record matches)", show(&check.on_hardware)),
            );
        } else {
            ctx.log.line(
                TAG,
                format!(
                    "NICs: {}; the record lists {} which the hardware does not have",
                    show(&check.on_hardware),
                    show(&check.missing_on_hardware)
                ),
            );
        }
        Ok(())
    }

    /// The boot mode for the machine: its label, else `boot.mode`.
    fn boot_mode(&self, machine: &Machine) -> Result<Option<BootMode>, ProviderError> {
        match machine.labels.get(LABEL_BOOT_MODE) {
            None => Ok(self.boot_mode),
            Some(v) => BootMode::parse(v).map(Some).ok_or_else(|| {
                ProviderError::permanent(format!(
                    "machine {}: label {LABEL_BOOT_MODE} is {v:?}; it must be uefi or legacy",
                    machine.id
                ))
            }),
        }
    }

    fn iso_url(&self, ctx: &ActionContext<'_>, t: &Template) -> Result<String, ProviderError> {
        let url = t.render_raw(&Self::values(ctx, None));
        match reqwest::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(url),
            _ => Err(ProviderError::permanent(format!(
                "the deploy ISO URL for machine {} is not an http(s) URL: {url:?} (check boot.iso_url)",
                ctx.machine.id
            ))),
        }
    }
}

#[async_trait]
impl Provider for RedfishProvider {
    fn name(&self) -> &str {
        PROVIDER_NAME
    }

    fn validate(&self, machine: &Machine) -> Result<(), ProviderError> {
        let ep = Self::endpoint(machine)?;
        self.bmc_settings
            .settings_for(&ep)
            .map_err(|e| ProviderError::permanent(format!("machine {}: {e}", machine.id)))?;
        // SSH is configured exactly when some in-band step runs a command.
        let in_band = self.ssh.is_some();
        let ssh = &machine.spec.ssh_endpoint;
        if in_band && ssh.is_empty() {
            return Err(ProviderError::permanent(format!(
                "machine {} has no ssh_endpoint: the redfish provider runs the in-band steps (repave, join, ...) over SSH",
                machine.id
            )));
        }
        if !ssh.is_empty() {
            parse_ssh_endpoint(ssh)
                .map_err(|e| ProviderError::permanent(format!("machine {}: {e}", machine.id)))?;
        }
        Ok(())
    }

    async fn power(
        &self,
        ctx: ActionContext<'_>,
        action: PowerAction,
    ) -> Result<(), ProviderError> {
        let (bmc, sys) = self.system(&ctx).await?;
        let (target, allowed) = system::reset_action(&bmc, ctx.cancel, ctx.log, &sys).await?;
        ctx.log.line(
            TAG,
            format!("power {action:?} of {} via BMC {}", sys.path, bmc.name()),
        );
        let read_boot_id = || -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
            Box::pin(self.read_boot_id(&ctx))
        };
        let ops = SystemPower {
            bmc: &bmc,
            cancel: ctx.cancel,
            log: ctx.log,
            system_path: &sys.path,
            reset_target: &target,
            boot_id: Some(&read_boot_id),
            witness: self
                .witness
                .as_ref()
                .map(|w| (w.0.as_ref(), &ctx.machine.id)),
        };
        // The system was just read: its PowerState is the first reading.
        let current = Reading::parse(sys.str("PowerState"));
        power::apply(&ops, ctx.cancel, &self.power, &allowed, action, current).await
    }

    async fn power_state(&self, ctx: ActionContext<'_>) -> Result<PowerState, ProviderError> {
        let (bmc, sys) = self.system(&ctx).await?;
        let ops = SystemPower {
            bmc: &bmc,
            cancel: ctx.cancel,
            log: ctx.log,
            system_path: &sys.path,
            reset_target: "",
            boot_id: None,
            witness: None,
        };
        let first = Reading::parse(sys.str("PowerState"));
        let reading = power::read_settled(&ops, ctx.cancel, &self.power, first).await?;
        Ok(reading.state().unwrap_or(PowerState::Off))
    }

    async fn observe(&self, ctx: ObserveContext<'_>) -> Result<Option<Observation>, ProviderError> {
        let (_, sys) = self.system_of(ctx.machine, ctx.cancel).await?;
        Ok(Some(system::observation(&sys)))
    }

    async fn set_netboot(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let (bmc, sys) = self.system(&ctx).await?;
        let mode = self.boot_mode(ctx.machine)?;
        match &self.boot {
            Boot::Pxe => {
                self.check_macs(&ctx, &bmc, &sys).await?;
                system::boot_once(&bmc, ctx.cancel, ctx.log, &sys, "Pxe", mode).await
            }
            Boot::VirtualMedia(t) => {
                let url = self.iso_url(&ctx, t)?;
                let dev = system::find_cd(&bmc, ctx.cancel, &sys).await?;
                system::insert_media(
                    &bmc,
                    ctx.cancel,
                    ctx.log,
                    &dev,
                    &url,
                    self.insert_media_timeout,
                )
                .await?;
                // Fresh, for a current ETag.
                let sys = bmc.get(ctx.cancel, &sys.path).await?;
                system::boot_once(&bmc, ctx.cancel, ctx.log, &sys, "Cd", mode).await
            }
        }
    }

    async fn disarm_netboot(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let (bmc, sys) = self.system(&ctx).await?;
        system::disable_boot_override(&bmc, ctx.cancel, ctx.log, &sys).await?;
        if let Boot::VirtualMedia(t) = &self.boot {
            let url = self.iso_url(&ctx, t)?;
            let dev = system::find_cd(&bmc, ctx.cancel, &sys).await?;
            if system::image(&dev) == Some(url.as_str()) {
                system::eject_media(&bmc, ctx.cancel, ctx.log, &dev, self.insert_media_timeout)
                    .await?;
                ctx.log
                    .line(TAG, format!("virtual media {} ejected", dev.path));
            } else {
                ctx.log.line(
                    TAG,
                    format!("virtual media {} does not hold the deploy ISO", dev.path),
                );
            }
        }
        Ok(())
    }

    async fn repave(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        match &self.images {
            Some(images) => self.repave_verified(&ctx, images).await,
            None => self.run_step(&ctx, Step::Repave, None).await.map(drop),
        }
    }

    async fn mint_join_token(&self, ctx: ActionContext<'_>) -> Result<JoinToken, ProviderError> {
        let out = self.run_step(&ctx, Step::MintJoinToken, None).await?;
        let token = out
            .stdout
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .ok_or_else(|| {
                ProviderError::permanent(
                    "the mint_join_token command printed no token on its standard output",
                )
            })?;
        ctx.log
            .line(Step::MintJoinToken.tag(), "minted a join token (not shown)");
        Ok(JoinToken(token.to_owned()))
    }

    async fn join_cluster(
        &self,
        ctx: ActionContext<'_>,
        token: &JoinToken,
    ) -> Result<(), ProviderError> {
        self.run_step(&ctx, Step::JoinCluster, Some(token))
            .await
            .map(drop)
    }

    async fn verify_in_cluster(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        self.run_step(&ctx, Step::VerifyInCluster, None)
            .await
            .map(drop)
    }

    async fn drain(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        self.run_step(&ctx, Step::Drain, None).await.map(drop)
    }

    async fn uncordon(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        self.run_step(&ctx, Step::Uncordon, None).await.map(drop)
    }

    async fn wipe_disks(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        self.run_step(&ctx, Step::WipeDisks, None).await.map(drop)
    }

    async fn notify(
        &self,
        ctx: ActionContext<'_>,
        notice: &Notice,
    ) -> Result<String, ProviderError> {
        self.notifier.send(&ctx, notice).await
    }

    async fn apply_network_config(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        self.run_step(&ctx, Step::ApplyNetworkConfig, None)
            .await
            .map(drop)
    }

    async fn verify_connectivity(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        self.run_step(&ctx, Step::VerifyConnectivity, None)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use bm_domain::{Labels, MachineId, MachineSpec, Timestamp};

    use super::*;

    fn config(doc: &str) -> RedfishConfig {
        RedfishConfig::from_toml(doc).unwrap()
    }

    fn machine(bmc: &str, ssh: &str) -> Machine {
        Machine::register(
            MachineId::new("node-1").unwrap(),
            MachineSpec {
                provider: "redfish".into(),
                bmc_endpoint: bmc.into(),
                ssh_endpoint: ssh.into(),
                ..MachineSpec::default()
            },
            Labels::default(),
            Timestamp::EPOCH,
        )
        .unwrap()
    }

    #[test]
    fn validate_needs_a_redfish_endpoint_and_ssh_for_in_band_steps() {
        let p = RedfishProvider::new(config("[redfish.commands]\ndrain = false")).unwrap();
        assert_eq!(p.name(), "redfish");
        p.validate(&machine(
            "redfish+https://10.0.0.5/redfish/v1/Systems/1",
            "",
        ))
        .unwrap();
        let e = p.validate(&machine("", "")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert!(e.to_string().contains("no BMC endpoint"), "{e}");
        // A record stored before its endpoint was checked at registration.
        let mut old = machine("", "");
        old.spec.bmc_endpoint = "https://10.0.0.5/".into();
        let e = p.validate(&old).unwrap_err();
        assert!(
            e.to_string()
                .contains("the scheme must be redfish+https://"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        let kp = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]);
        russh::keys::PrivateKey::from(kp)
            .write_openssh_file(&key, russh::keys::ssh_key::LineEnding::LF)
            .unwrap();
        let doc = format!(
            "[redfish.commands]\nrepave = \"x\"\n[redfish.ssh]\nprivate_key_file = {:?}\nknown_hosts_file = \"/kh\"",
            key.display().to_string()
        );
        let p = RedfishProvider::new(config(&doc)).unwrap();
        let e = p
            .validate(&machine("redfish+https://10.0.0.5/", ""))
            .unwrap_err();
        assert!(e.to_string().contains("has no ssh_endpoint"), "{e}");
        p.validate(&machine("redfish+https://10.0.0.5/", "root@10.0.0.9:2222"))
            .unwrap();
    }
}
