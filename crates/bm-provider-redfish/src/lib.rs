//! A [`Provider`] for real hardware: power and boot through the machine's Redfish BMC, the
//! in-band steps (imaging, cluster join, drain, ...) as commands over SSH, repair tickets
//! through a webhook. Registered under the name `redfish`.
//!
//! | Provider method | How |
//! |---|---|
//! | `power`, `power_state` | `ComputerSystem.Reset` (a reset type the BMC advertises), confirmed by reading `PowerState` back |
//! | `set_netboot` | one-time boot override to `Pxe`; or, with `boot.method = "virtual-media"`, the deploy ISO inserted as virtual media and a one-time override to `Cd` |
//! | `repave`, `mint_join_token`, `join_cluster`, `verify_in_cluster`, `drain`, `uncordon`, `wipe_disks`, `apply_network_config`, `verify_connectivity` | the step's command template from `[redfish.commands]`, run over SSH on `spec.ssh_endpoint` |
//! | `notify` | a JSON POST to `notify.webhook_url` with `Idempotency-Key: <operation id>`; without a webhook, a log line |
//!
//! Besides the trait, [`RedfishProvider::check_macs`] compares the machine record's MAC
//! addresses with the NICs the BMC reports, and [`RedfishProvider::insert_virtual_media`] /
//! [`RedfishProvider::eject_virtual_media`] manage the CD device.
//!
//! # The machine record
//!
//! - `bmc_endpoint`: `redfish+https://host[:port]/<path of the system>`, e.g.
//!   `redfish+https://10.0.1.5/redfish/v1/Systems/1` (`redfish+http://` for a lab BMC).
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
//! 2. else `[redfish.bmc."H"]`, if it exists and sets `username`;
//! 3. else `[redfish.credentials]`;
//! 4. else no `Authorization` header is sent.
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
mod notify;
mod redfish;
mod ssh;
mod template;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bm_domain::{MacAddress, Machine};
use bm_provider::{
    ActionContext, JoinToken, Notice, PowerAction, PowerState, Provider, ProviderError,
};

pub use config::{
    BmcConfig, BootConfig, BootMethod, CommandsConfig, ConfigError, Credentials, CycleMethod,
    NotifyConfig, PowerConfig, RedfishConfig, Secret, SshConfig, StepCommand, TlsConfig,
};
pub use redfish::nic::MacCheck;

use crate::endpoint::{BmcEndpoint, parse_bmc_endpoint, parse_ssh_endpoint};
use crate::notify::Notifier;
use crate::redfish::power::{self, PowerTiming, Reading};
use crate::redfish::system::{self, SystemPower, TAG};
use crate::redfish::{Bmc, BmcOverrides, BmcSettings, Resource};
use crate::ssh::{SshRunner, SshSettings};
use crate::template::{Template, Values, Var};

/// The in-band steps, each a command template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Repave,
    MintJoinToken,
    JoinCluster,
    VerifyInCluster,
    Drain,
    Uncordon,
    WipeDisks,
    ApplyNetworkConfig,
    VerifyConnectivity,
}

impl Step {
    const ALL: [Step; 9] = [
        Step::Repave,
        Step::MintJoinToken,
        Step::JoinCluster,
        Step::VerifyInCluster,
        Step::Drain,
        Step::Uncordon,
        Step::WipeDisks,
        Step::ApplyNetworkConfig,
        Step::VerifyConnectivity,
    ];

    /// The log tag.
    fn tag(self) -> &'static str {
        match self {
            Step::Repave => "repave",
            Step::MintJoinToken => "mint-join-token",
            Step::JoinCluster => "join-cluster",
            Step::VerifyInCluster => "verify-in-cluster",
            Step::Drain => "drain",
            Step::Uncordon => "uncordon",
            Step::WipeDisks => "wipe-disks",
            Step::ApplyNetworkConfig => "apply-network-config",
            Step::VerifyConnectivity => "verify-connectivity",
        }
    }

    /// The key in `[redfish.commands]`.
    fn key(self) -> &'static str {
        match self {
            Step::Repave => "repave",
            Step::MintJoinToken => "mint_join_token",
            Step::JoinCluster => "join_cluster",
            Step::VerifyInCluster => "verify_in_cluster",
            Step::Drain => "drain",
            Step::Uncordon => "uncordon",
            Step::WipeDisks => "wipe_disks",
            Step::ApplyNetworkConfig => "apply_network_config",
            Step::VerifyConnectivity => "verify_connectivity",
        }
    }

    fn configured(self, c: &CommandsConfig) -> Option<&StepCommand> {
        match self {
            Step::Repave => c.repave.as_ref(),
            Step::MintJoinToken => c.mint_join_token.as_ref(),
            Step::JoinCluster => c.join_cluster.as_ref(),
            Step::VerifyInCluster => c.verify_in_cluster.as_ref(),
            Step::Drain => c.drain.as_ref(),
            Step::Uncordon => c.uncordon.as_ref(),
            Step::WipeDisks => c.wipe_disks.as_ref(),
            Step::ApplyNetworkConfig => c.apply_network_config.as_ref(),
            Step::VerifyConnectivity => c.verify_connectivity.as_ref(),
        }
    }
}

/// A configured step.
#[derive(Clone, Debug)]
enum StepPlan {
    Run(Template),
    Noop,
}

/// How `set_netboot` works.
#[derive(Clone, Debug)]
enum Boot {
    Pxe,
    VirtualMedia(Template),
}

/// The Redfish + SSH provider. Build it with [`RedfishProvider::new`] from the server's
/// `[redfish]` configuration and register it in a [`bm_provider::ProviderRegistry`].
#[derive(Debug)]
pub struct RedfishProvider {
    default_bmc: BmcSettings,
    /// What each `[redfish.bmc."..."]` section sets, by its key.
    per_bmc: BTreeMap<String, BmcOverrides>,
    /// One client and concurrency limit per BMC origin (`https://host:port`).
    bmcs: Mutex<HashMap<String, Arc<Bmc>>>,
    /// The system path found for each BMC endpoint, so that discovery runs once.
    systems: Mutex<HashMap<String, String>>,
    power: PowerTiming,
    insert_media_timeout: Duration,
    boot: Boot,
    steps: HashMap<&'static str, StepPlan>,
    ssh: Option<SshRunner>,
    notifier: Notifier,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_file(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        field: field.to_owned(),
        path: path.to_owned(),
        source,
    })
}

/// Resolves `username` + `password` | `password_file` of one section (`prefix` names it in
/// errors).
fn resolve_auth(
    prefix: &str,
    username: Option<&str>,
    password: Option<&Secret>,
    password_file: Option<&Path>,
) -> Result<Option<(String, Secret)>, ConfigError> {
    let field = |f: &str| format!("{prefix}{f}");
    let Some(user) = username else {
        if password.is_some() || password_file.is_some() {
            return Err(ConfigError::invalid(
                field("username"),
                "a password is set but no username",
            ));
        }
        return Ok(None);
    };
    if user.is_empty() {
        return Err(ConfigError::invalid(field("username"), "must not be empty"));
    }
    let secret = match (password, password_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                field("password"),
                "set password or password_file, not both",
            ));
        }
        (Some(p), None) => p.clone(),
        (None, Some(path)) => {
            let bytes = read_file(&field("password_file"), path)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                ConfigError::invalid(field("password_file"), "the password file is not UTF-8")
            })?;
            Secret::new(text.trim_end_matches(['\n', '\r']))
        }
        (None, None) => {
            return Err(ConfigError::invalid(
                field("password_file"),
                format!("the user {user:?} has no password: set password_file (or password)"),
            ));
        }
    };
    if secret.expose().is_empty() {
        return Err(ConfigError::invalid(
            field("password"),
            "the password is empty",
        ));
    }
    Ok(Some((user.to_owned(), secret)))
}

/// What one `[redfish.bmc."<key>"]` section sets, checked and with its files read.
fn bmc_overrides(key: &str, b: &BmcConfig) -> Result<BmcOverrides, ConfigError> {
    let prefix = format!("bmc.{key:?}.");
    if key.is_empty() || key.contains('/') || key.contains("://") {
        return Err(ConfigError::invalid(
            format!("bmc.{key:?}"),
            "the key must be a BMC host or host:port as written in bmc_endpoint, e.g. \"10.0.1.5\"",
        ));
    }
    let auth = resolve_auth(
        &prefix,
        b.username.as_deref(),
        b.password.as_ref(),
        b.password_file.as_deref(),
    )?;
    if b.insecure_skip_verify == Some(true) && b.ca_file.is_some() {
        return Err(ConfigError::invalid(
            format!("{prefix}insecure_skip_verify"),
            "set ca_file or insecure_skip_verify, not both",
        ));
    }
    let ca_pem = match &b.ca_file {
        Some(p) => Some(read_file(&format!("{prefix}ca_file"), p)?),
        None => None,
    };
    let timeout = match b.request_timeout {
        Some(t) => Some(positive(&format!("{prefix}request_timeout"), t)?),
        None => None,
    };
    if b.max_concurrent_requests == Some(0) {
        return Err(ConfigError::invalid(
            format!("{prefix}max_concurrent_requests"),
            "must be at least 1",
        ));
    }
    Ok(BmcOverrides {
        auth,
        ca_pem,
        // A section that names a CA wants certificates checked with it, whatever a less
        // specific section says.
        insecure: b.insecure_skip_verify.or(b.ca_file.as_ref().map(|_| false)),
        timeout,
        concurrency: b.max_concurrent_requests,
    })
}

fn positive(field: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::invalid(field, "must be more than 0s"))
    } else {
        Ok(d)
    }
}

impl RedfishProvider {
    /// Checks the configuration, reads the files it names (passwords, CA, SSH key) and
    /// parses the templates.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first field that cannot work and why.
    pub fn new(config: RedfishConfig) -> Result<Self, ConfigError> {
        let c = &config;
        let request_timeout = positive("request_timeout", c.request_timeout)?;
        if c.max_concurrent_requests == 0 {
            return Err(ConfigError::invalid(
                "max_concurrent_requests",
                "must be at least 1",
            ));
        }
        let default_auth = match &c.credentials {
            None => None,
            Some(cr) => resolve_auth(
                "credentials.",
                Some(cr.username.as_str()),
                cr.password.as_ref(),
                cr.password_file.as_deref(),
            )?,
        };
        let default_ca = match &c.tls.ca_file {
            None => None,
            Some(p) => Some(read_file("tls.ca_file", p)?),
        };
        let default_bmc = BmcSettings {
            auth: default_auth,
            ca_pem: default_ca,
            insecure: false,
            timeout: request_timeout,
            concurrency: c.max_concurrent_requests,
        };
        let mut per_bmc = BTreeMap::new();
        for (key, b) in &c.bmc {
            per_bmc.insert(key.clone(), bmc_overrides(key, b)?);
        }

        let p = &c.power;
        let power = PowerTiming {
            poll_interval: positive("power.poll_interval", p.poll_interval)?,
            max_poll_interval: positive("power.max_poll_interval", p.max_poll_interval)?,
            deadline: positive("power.deadline", p.deadline)?,
            reissue_after: positive("power.reissue_after", p.reissue_after)?,
            graceful_timeout: p.graceful_shutdown_timeout,
            cycle: p.cycle,
        };

        let boot = match c.boot.method {
            BootMethod::Pxe => Boot::Pxe,
            BootMethod::VirtualMedia => {
                let Some(src) = &c.boot.iso_url else {
                    return Err(ConfigError::invalid(
                        "boot.iso_url",
                        "method = \"virtual-media\" needs the URL of the deploy ISO",
                    ));
                };
                let t = Template::parse(src, &Var::COMMON)
                    .map_err(|e| ConfigError::invalid("boot.iso_url", e))?;
                Boot::VirtualMedia(t)
            }
        };

        let mut steps = HashMap::new();
        for step in Step::ALL {
            let field = format!("commands.{}", step.key());
            let plan = match step.configured(&c.commands) {
                None => continue,
                Some(StepCommand::Disabled(false))
                    if matches!(step, Step::Drain | Step::Uncordon) =>
                {
                    StepPlan::Noop
                }
                Some(StepCommand::Disabled(_)) => {
                    return Err(ConfigError::invalid(
                        field,
                        "expected a command template; only drain and uncordon may be false (a no-op)",
                    ));
                }
                Some(StepCommand::Run(src)) => {
                    if src.trim().is_empty() {
                        return Err(ConfigError::invalid(
                            field,
                            "the command is empty (leave the step out, or write false for drain/uncordon)",
                        ));
                    }
                    let allowed: Vec<Var> = if step == Step::JoinCluster {
                        Var::COMMON.iter().copied().chain([Var::Token]).collect()
                    } else {
                        Var::COMMON.to_vec()
                    };
                    StepPlan::Run(
                        Template::parse(src, &allowed)
                            .map_err(|e| ConfigError::invalid(field, e))?,
                    )
                }
            };
            steps.insert(step.tag(), plan);
        }

        let needs_ssh = steps.values().any(|p| matches!(p, StepPlan::Run(_)));
        let ssh = if needs_ssh {
            let s = &c.ssh;
            let Some(key_path) = &s.private_key_file else {
                return Err(ConfigError::invalid(
                    "ssh.private_key_file",
                    "the in-band command templates run over SSH and need a private key",
                ));
            };
            let Some(known_hosts) = &s.known_hosts_file else {
                return Err(ConfigError::invalid(
                    "ssh.known_hosts_file",
                    "host keys must be checked: name a known_hosts file (with trust_on_first_use, the file keys are pinned in)",
                ));
            };
            if s.user.is_empty() {
                return Err(ConfigError::invalid("ssh.user", "must not be empty"));
            }
            let key = russh::keys::load_secret_key(key_path, None).map_err(|source| {
                ConfigError::SshKey {
                    path: key_path.clone(),
                    source: Box::new(source),
                }
            })?;
            Some(SshRunner::new(SshSettings {
                user: s.user.clone(),
                key: Arc::new(key),
                key_path: key_path.clone(),
                known_hosts: known_hosts.clone(),
                tofu: s.trust_on_first_use,
                connect_timeout: positive("ssh.connect_timeout", s.connect_timeout)?,
                command_timeout: positive("ssh.command_timeout", s.command_timeout)?,
            }))
        } else {
            None
        };

        Ok(RedfishProvider {
            default_bmc,
            per_bmc,
            bmcs: Mutex::new(HashMap::new()),
            systems: Mutex::new(HashMap::new()),
            power,
            insert_media_timeout: positive("insert_media_timeout", c.insert_media_timeout)?,
            boot,
            steps,
            ssh,
            notifier: Notifier::new(&c.notify)?,
        })
    }

    fn endpoint(machine: &Machine) -> Result<BmcEndpoint, ProviderError> {
        parse_bmc_endpoint(&machine.spec.bmc_endpoint)
            .map_err(|e| ProviderError::permanent(format!("machine {}: {e}", machine.id)))
    }

    /// The settings of a BMC, field by field from `[bmc."host:port"]`, `[bmc."host"]` and
    /// the defaults, in that order.
    fn settings_for(&self, ep: &BmcEndpoint) -> BmcSettings {
        let none = BmcOverrides::default();
        let with_port = self.per_bmc.get(&ep.host_port).unwrap_or(&none);
        let host = self.per_bmc.get(&ep.host).unwrap_or(&none);
        with_port.clone().or(host).resolve(&self.default_bmc)
    }

    /// The client of the machine's BMC, built on first use.
    async fn bmc(&self, ep: &BmcEndpoint) -> Result<Arc<Bmc>, ProviderError> {
        let key = ep.base.origin().ascii_serialization();
        if let Some(b) = lock(&self.bmcs).get(&key) {
            return Ok(b.clone());
        }
        let (name, base, settings) = (ep.host_port.clone(), ep.base.clone(), self.settings_for(ep));
        // Building a TLS client may read the system trust store: off the runtime.
        let bmc = tokio::task::spawn_blocking(move || Bmc::new(name, base, settings))
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
        let ep = Self::endpoint(ctx.machine)?;
        let bmc = self.bmc(&ep).await?;
        let spec_endpoint = &ctx.machine.spec.bmc_endpoint;
        let cached = lock(&self.systems).get(spec_endpoint).cloned();
        if let Some(path) = cached {
            if let Some(res) = bmc.get_opt(ctx.cancel, &path).await? {
                return Ok((bmc, res));
            }
            lock(&self.systems).remove(spec_endpoint);
        }
        let res = system::find_system(&bmc, ctx.cancel, &ep.system).await?;
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
        }
    }

    /// Runs an in-band step's command.
    async fn run_step(
        &self,
        ctx: &ActionContext<'_>,
        step: Step,
        token: Option<&JoinToken>,
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
        let values = Self::values(ctx, token);
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
        };
        runner.run(ctx, &target, cmd).await
    }

    /// The normalised MAC addresses of the machine's NICs, as its BMC reports them.
    ///
    /// # Errors
    ///
    /// As for any BMC request; Permanent if the system lists no EthernetInterfaces.
    pub async fn discover_macs(
        &self,
        ctx: ActionContext<'_>,
    ) -> Result<Vec<MacAddress>, ProviderError> {
        let (bmc, sys) = self.system(&ctx).await?;
        system::macs(&bmc, ctx.cancel, &sys).await
    }

    /// Compares the MAC addresses of the machine record with those of the hardware and logs
    /// the result.
    ///
    /// # Errors
    ///
    /// As [`RedfishProvider::discover_macs`]; a mismatch is not an error but a
    /// [`MacCheck`] whose [`MacCheck::record_matches`] is false.
    pub async fn check_macs(&self, ctx: ActionContext<'_>) -> Result<MacCheck, ProviderError> {
        let found = self.discover_macs(ctx).await?;
        let check = MacCheck::compare(&ctx.machine.spec.mac_addresses, found);
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
        Ok(check)
    }

    /// Inserts the image at `image_url` into the machine's virtual CD/DVD (ejecting other
    /// media first) and checks the BMC shows it. Does not change the boot order.
    ///
    /// # Errors
    ///
    /// Permanent if the BMC has no CD/DVD virtual media; as for any BMC request otherwise.
    pub async fn insert_virtual_media(
        &self,
        ctx: ActionContext<'_>,
        image_url: &str,
    ) -> Result<(), ProviderError> {
        let (bmc, sys) = self.system(&ctx).await?;
        let dev = system::find_cd(&bmc, ctx.cancel, &sys).await?;
        system::insert_media(
            &bmc,
            ctx.cancel,
            ctx.log,
            &dev,
            image_url,
            self.insert_media_timeout,
        )
        .await
    }

    /// Ejects whatever the machine's virtual CD/DVD holds.
    ///
    /// # Errors
    ///
    /// Permanent if the BMC has no CD/DVD virtual media; as for any BMC request otherwise.
    pub async fn eject_virtual_media(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let (bmc, sys) = self.system(&ctx).await?;
        let dev = system::find_cd(&bmc, ctx.cancel, &sys).await?;
        system::eject_media(&bmc, ctx.cancel, ctx.log, &dev)
            .await
            .map(drop)
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
        "redfish"
    }

    fn validate(&self, machine: &Machine) -> Result<(), ProviderError> {
        Self::endpoint(machine)?;
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
        let ops = SystemPower {
            bmc: &bmc,
            cancel: ctx.cancel,
            log: ctx.log,
            system_path: &sys.path,
            reset_target: &target,
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
        };
        let first = Reading::parse(sys.str("PowerState"));
        let reading = power::read_settled(&ops, ctx.cancel, &self.power, first).await?;
        Ok(if reading == Reading::On {
            PowerState::On
        } else {
            PowerState::Off
        })
    }

    async fn set_netboot(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        let (bmc, sys) = self.system(&ctx).await?;
        match &self.boot {
            Boot::Pxe => system::boot_once(&bmc, ctx.cancel, ctx.log, &sys, "Pxe").await,
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
                system::boot_once(&bmc, ctx.cancel, ctx.log, &sys, "Cd").await
            }
        }
    }

    async fn repave(&self, ctx: ActionContext<'_>) -> Result<(), ProviderError> {
        self.run_step(&ctx, Step::Repave, None).await.map(drop)
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
    use bm_provider::ErrorKind;

    use super::*;

    fn config(doc: &str) -> RedfishConfig {
        RedfishConfig::from_toml(doc).unwrap()
    }

    fn new_err(doc: &str) -> String {
        match RedfishProvider::new(config(doc)) {
            Ok(_) => panic!("{doc:?} was accepted"),
            Err(e) => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(e) = src {
                    s.push_str(&format!(": {e}"));
                    src = e.source();
                }
                s
            }
        }
    }

    #[test]
    fn configuration_errors_name_the_field() {
        let cases = [
            (
                "[redfish]\nmax_concurrent_requests = 0",
                "redfish.max_concurrent_requests: must be at least 1",
            ),
            (
                "[redfish]\nrequest_timeout = \"0s\"",
                "redfish.request_timeout: must be more than 0s",
            ),
            (
                "[redfish.credentials]\nusername = \"admin\"",
                "redfish.credentials.password_file: the user \"admin\" has no password",
            ),
            (
                "[redfish.credentials]\nusername = \"a\"\npassword = \"p\"\npassword_file = \"/x\"",
                "not both",
            ),
            (
                "[redfish.credentials]\nusername = \"a\"\npassword_file = \"/nonexistent/pw\"",
                "redfish.credentials.password_file: cannot read /nonexistent/pw: No such file",
            ),
            (
                "[redfish.bmc.\"h\"]\npassword = \"p\"",
                "redfish.bmc.\"h\".username: a password is set but no username",
            ),
            (
                "[redfish.bmc.\"h\"]\ninsecure_skip_verify = true\nca_file = \"/x\"",
                "set ca_file or insecure_skip_verify, not both",
            ),
            (
                "[redfish.tls]\nca_file = \"/nonexistent/ca.pem\"",
                "redfish.tls.ca_file: cannot read",
            ),
            (
                "[redfish.boot]\nmethod = \"virtual-media\"",
                "redfish.boot.iso_url",
            ),
            (
                "[redfish.boot]\nmethod = \"virtual-media\"\niso_url = \"http://x/{machine}.iso\"",
                "unknown variable {machine}",
            ),
            (
                "[redfish.commands]\nrepave = \"x\"",
                "redfish.ssh.private_key_file",
            ),
            (
                "[redfish.commands]\nrepave = \"x\"\n[redfish.ssh]\nprivate_key_file = \"/k\"",
                "redfish.ssh.known_hosts_file",
            ),
            (
                "[redfish.commands]\nrepave = \"x\"\n[redfish.ssh]\nprivate_key_file = \"/nonexistent/k\"\nknown_hosts_file = \"/k\"",
                "cannot load the SSH private key /nonexistent/k",
            ),
            (
                "[redfish.commands]\nrepave = false",
                "only drain and uncordon may be false",
            ),
            ("[redfish.commands]\nrepave = \" \"", "the command is empty"),
            (
                "[redfish.commands]\nrepave = \"deploy {token}\"",
                "{token} is not available",
            ),
            (
                "[redfish.notify]\nwebhook_url = \"ftp://x\"",
                "must be an http:// or https:// URL",
            ),
            (
                "[redfish.power]\npoll_interval = \"0ms\"",
                "redfish.power.poll_interval",
            ),
        ];
        for (doc, want) in cases {
            let e = new_err(doc);
            assert!(e.contains(want), "{doc}\n  got: {e}\n want: {want}");
        }
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
        let e = p.validate(&machine("https://10.0.0.5/", "")).unwrap_err();
        assert!(e.to_string().contains("not a Redfish URL"), "{e}");

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

    #[test]
    fn per_bmc_settings_fall_back_field_by_field() {
        let p = RedfishProvider::new(config(
            r#"
            [redfish]
            request_timeout = "20s"
            [redfish.credentials]
            username = "admin"
            password = "default-pw"
            [redfish.bmc."10.0.0.5:8443"]
            username = "special"
            password = "pw2"
            [redfish.bmc."10.0.0.5"]
            insecure_skip_verify = true
            request_timeout = "3s"
            "#,
        ))
        .unwrap();
        let get = |url: &str| p.settings_for(&parse_bmc_endpoint(url).unwrap());
        let s = get("redfish+https://10.0.0.5:8443/");
        assert_eq!(s.auth.as_ref().map(|a| a.0.as_str()), Some("special"));
        // What "10.0.0.5:8443" leaves unset comes from "10.0.0.5", not from the default.
        assert!(s.insecure);
        assert_eq!(s.timeout, Duration::from_secs(3));
        let s = get("redfish+https://10.0.0.5/");
        assert_eq!(s.auth.as_ref().map(|a| a.0.as_str()), Some("admin"));
        assert!(s.insecure);
        assert_eq!(s.timeout, Duration::from_secs(3));
        let s = get("redfish+https://10.0.0.6/");
        assert_eq!(s.auth.as_ref().map(|a| a.1.expose()), Some("default-pw"));
        assert!(!format!("{p:?}").contains("default-pw"));
    }

    #[test]
    fn a_host_port_section_inherits_what_it_leaves_unset_from_the_host_section() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "rack CA").unwrap();
        let p = RedfishProvider::new(config(&format!(
            r#"
            [redfish]
            max_concurrent_requests = 4
            [redfish.credentials]
            username = "admin"
            password = "default-pw"
            [redfish.bmc."10.0.1.5"]
            username = "root"
            password = "host-pw"
            insecure_skip_verify = true
            [redfish.bmc."10.0.1.5:8443"]
            request_timeout = "7s"
            [redfish.bmc."10.0.1.5:9443"]
            ca_file = {ca:?}
            max_concurrent_requests = 1
            [redfish.bmc."10.0.1.5:10443"]
            insecure_skip_verify = false
            "#
        )))
        .unwrap();
        let get = |url: &str| p.settings_for(&parse_bmc_endpoint(url).unwrap());
        // Only a timeout for the port: the credentials and TLS choice of the host still hold.
        let s = get("redfish+https://10.0.1.5:8443/");
        assert_eq!(
            s.auth.as_ref().map(|(u, pw)| (u.as_str(), pw.expose())),
            Some(("root", "host-pw"))
        );
        assert!(s.insecure);
        assert_eq!(s.timeout, Duration::from_secs(7));
        assert_eq!(s.concurrency, 4);
        // A CA for the port means checking certificates with it.
        let s = get("redfish+https://10.0.1.5:9443/");
        assert!(!s.insecure);
        assert_eq!(s.ca_pem.as_deref(), Some(b"rack CA".as_slice()));
        assert_eq!(s.concurrency, 1);
        assert_eq!(s.auth.as_ref().map(|a| a.0.as_str()), Some("root"));
        let s = get("redfish+https://10.0.1.5:10443/");
        assert!(!s.insecure);
        assert_eq!(s.timeout, Duration::from_secs(30));
        // Another host: the defaults.
        let s = get("redfish+https://10.0.1.6:8443/");
        assert_eq!(s.auth.as_ref().map(|a| a.0.as_str()), Some("admin"));
        assert!(!s.insecure);
        assert_eq!(s.ca_pem, None);
    }

    #[test]
    fn password_files_lose_their_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret \n").unwrap();
        let auth = resolve_auth("credentials.", Some("u"), None, Some(&f))
            .unwrap()
            .unwrap();
        assert_eq!(auth.1.expose(), "s3cret ");
    }
}
