//! The provider's configuration: the `[redfish]` section of the server's configuration file,
//! as plain serde data, and its checks.
//!
//! The serde shapes come first; `RedfishConfig::check` then turns them into settings that
//! work (every field checked, the files it names read, the templates parsed) and reports
//! every mistake as a [`ConfigError`] naming the field, before the server starts serving.
//! [`crate::RedfishProvider::new`] only assembles what it returns.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::endpoint::BmcEndpoint;
use crate::hosts::HostPattern;
use crate::redfish::power::PowerTiming;
use crate::redfish::{BmcOverrides, BmcSettings};
use crate::ssh::SshSettings;
use crate::template::{Template, Var};

/// The `[redfish]` section of the server's configuration file.
///
/// See `examples/provider-config.toml` in this crate for a commented example.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedfishConfig {
    /// The credentials of every BMC that has none of its own in [`RedfishConfig::bmc`].
    /// They are sent only to the BMCs that [`RedfishConfig::credential_hosts`] lists.
    pub credentials: Option<Credentials>,
    /// Where the default [`RedfishConfig::credentials`] may be sent: CIDRs (`10.0.0.0/8`,
    /// `fd00::/64`), single addresses, and host names matched as written in `bmc_endpoint`
    /// (never resolved), where `*` stands for any run of characters within one label
    /// (`bmc-*.dc1.example`). A CIDR matches only endpoints written with an IP address, a
    /// name only endpoints written with a name. Required when `credentials` is set; a machine
    /// whose BMC would get the default credentials but is not listed is refused at
    /// registration and update, and nothing is ever sent to it.
    pub credential_hosts: Vec<String>,
    /// TLS settings of every BMC that has none of its own.
    pub tls: TlsConfig,
    /// Per-BMC settings, keyed by the host of the BMC URL as written in the machine's
    /// `bmc_endpoint` (`10.0.1.5`, `bmc-r1.lab`, `[fd00::5]`), optionally with `:port`, or
    /// by a network: a CIDR (`10.0.1.0/24`) or a host name pattern with `*`
    /// (`bmc-*.lab.example`). Each setting is taken from `host:port` if that section sets
    /// it, else from `host`, else from the most specific network that contains the host,
    /// else from the defaults of this section.
    ///
    /// The credentials and `allow_plaintext` of a `host` section apply only to that host at
    /// its default port, and to the ports that have a `host:port` section of their own.
    pub bmc: BTreeMap<String, BmcConfig>,
    /// How long one HTTP request to a BMC may take.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// How long a virtual media insert may take (many BMCs download the whole image before
    /// they answer).
    #[serde(with = "duration")]
    pub insert_media_timeout: Duration,
    /// How many requests may be in flight to one BMC at once.
    pub max_concurrent_requests: usize,
    /// How power actions are confirmed.
    pub power: PowerConfig,
    /// How [`bm_provider::Provider::set_netboot`] makes the next boot a network boot.
    pub boot: BootConfig,
    /// How the in-band steps reach the machines.
    pub ssh: SshConfig,
    /// The command template of each in-band step.
    pub commands: CommandsConfig,
    /// Where repair tickets go.
    pub notify: NotifyConfig,
    /// Where the images to write are published, so that the repave step can verify what it
    /// wrote.
    pub images: ImagesConfig,
}

impl Default for RedfishConfig {
    fn default() -> Self {
        RedfishConfig {
            credentials: None,
            credential_hosts: Vec::new(),
            tls: TlsConfig::default(),
            bmc: BTreeMap::new(),
            request_timeout: Duration::from_secs(30),
            insert_media_timeout: Duration::from_secs(300),
            max_concurrent_requests: 2,
            power: PowerConfig::default(),
            boot: BootConfig::default(),
            ssh: SshConfig::default(),
            commands: CommandsConfig::default(),
            notify: NotifyConfig::default(),
            images: ImagesConfig::default(),
        }
    }
}

impl RedfishConfig {
    /// Reads the `[redfish]` table of a TOML document (a missing table is the default
    /// configuration).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] with the line and column of the first mistake.
    pub fn from_toml(document: &str) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            redfish: RedfishConfig,
        }
        let doc: Doc = toml::from_str(document).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Ok(doc.redfish)
    }
}

/// A password or another secret: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for the one place that sends it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A BMC user and its password, given inline or (better) in a file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The BMC user.
    pub username: String,
    /// The password, inline. Prefer [`Credentials::password_file`].
    pub password: Option<Secret>,
    /// A file holding the password (a trailing newline is ignored), read once at start.
    pub password_file: Option<PathBuf>,
}

/// TLS settings towards BMCs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// A PEM file with the CA certificate(s) that signed the BMCs' certificates. When set,
    /// only these CAs are trusted; otherwise the system's trust store is used.
    pub ca_file: Option<PathBuf>,
}

/// Settings of one BMC host; each unset field falls back to the `host` section (for a
/// `host:port` key), then to the section's default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BmcConfig {
    /// The BMC user; with it, `password` or `password_file`.
    pub username: Option<String>,
    /// The password, inline.
    pub password: Option<Secret>,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// The CA file for this BMC.
    pub ca_file: Option<PathBuf>,
    /// Skip TLS certificate verification for this BMC (labs only: anyone on the path can
    /// then read the BMC password). Unset, it is inherited like the other fields; a section
    /// that sets `ca_file` verifies with it.
    pub insecure_skip_verify: Option<bool>,
    /// The request timeout for this BMC.
    #[serde(with = "duration::option")]
    pub request_timeout: Option<Duration>,
    /// The concurrency limit for this BMC.
    pub max_concurrent_requests: Option<usize>,
    /// Allow `redfish+http://` endpoints (labs and emulators: the password and every
    /// command then cross the network in cleartext). Unset, it is inherited like the other
    /// fields; nowhere set, BMCs are reached only over HTTPS.
    pub allow_plaintext: Option<bool>,
}

/// How power actions are confirmed by reading the power state back.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PowerConfig {
    /// The first wait between two reads of the power state; it grows by half each time.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// The longest wait between two reads.
    #[serde(with = "duration")]
    pub max_poll_interval: Duration,
    /// How long an action may take before it fails (a transient error).
    #[serde(with = "duration")]
    pub deadline: Duration,
    /// After how long without any change of the power state a reset is taken as lost by the
    /// BMC and sent again (never a `PushPowerButton`: a second press could undo the first).
    #[serde(with = "duration")]
    pub reissue_after: Duration,
    /// Power off tries `GracefulShutdown` first for this long, then `ForceOff`; `0s` (the
    /// default) powers off hard at once.
    #[serde(with = "duration")]
    pub graceful_shutdown_timeout: Duration,
    /// How a power cycle of a machine that is on is done.
    pub cycle: CycleMethod,
}

/// How [`bm_provider::PowerAction::Cycle`] is done when the machine is on (when it is off,
/// it is simply powered on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CycleMethod {
    /// `ForceOff`, wait for Off, `On`, wait for On: each half is confirmed by the read-back
    /// on every BMC. The default.
    #[default]
    OffOn,
    /// One `ForceRestart` (or `PowerCycle`); confirmed only as far as the BMC shows the
    /// transition (many report On throughout a warm reset).
    Restart,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig {
            poll_interval: Duration::from_secs(1),
            max_poll_interval: Duration::from_secs(5),
            deadline: Duration::from_secs(180),
            reissue_after: Duration::from_secs(20),
            graceful_shutdown_timeout: Duration::ZERO,
            cycle: CycleMethod::OffOn,
        }
    }
}

/// How the next boot is made a network boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMethod {
    /// A one-time boot override to PXE.
    #[default]
    Pxe,
    /// Insert the deploy ISO ([`BootConfig::iso_url`]) as virtual media and make the next
    /// boot a one-time boot from CD.
    VirtualMedia,
}

/// How [`bm_provider::Provider::set_netboot`] works.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootConfig {
    /// PXE or virtual media.
    pub method: BootMethod,
    /// For virtual media: the URL of the deploy ISO, a template with the machine's fields
    /// (`{machine_id}`, `{image}`, `{mac}`, ...), e.g. `http://10.0.0.2/deploy/{machine_id}.iso`.
    pub iso_url: Option<String>,
    /// The firmware boot mode of the network boot (`BootSourceOverrideMode`): `uefi` or
    /// `legacy`; unset leaves the BMC's. A machine's label
    /// `redfish.baremetal.dev/boot-mode` overrides it. Set, the netboot fails (permanent
    /// error) on a BMC that cannot set it.
    pub mode: Option<BootMode>,
}

/// A firmware boot mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    /// UEFI.
    Uefi,
    /// Legacy BIOS.
    Legacy,
}

impl BootMode {
    /// The `BootSourceOverrideMode` value.
    pub fn redfish_value(self) -> &'static str {
        match self {
            BootMode::Uefi => "UEFI",
            BootMode::Legacy => "Legacy",
        }
    }

    /// The mode a label value names (`uefi`, `legacy`, any case).
    pub fn parse(s: &str) -> Option<BootMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uefi" => Some(BootMode::Uefi),
            "legacy" => Some(BootMode::Legacy),
            _ => None,
        }
    }
}

/// How the in-band steps reach the machines over SSH.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshConfig {
    /// The user when the machine's `ssh_endpoint` names none.
    pub user: String,
    /// The private key (OpenSSH format, not passphrase-protected).
    pub private_key_file: Option<PathBuf>,
    /// The known_hosts file that host keys are checked against.
    pub known_hosts_file: Option<PathBuf>,
    /// Accept the key of a host that has no entry in `known_hosts_file` and pin it there; a
    /// host whose key differs from its pinned one is still refused.
    pub trust_on_first_use: bool,
    /// How long connecting, the key exchange and authentication may take.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// How long one command may run.
    #[serde(with = "duration")]
    pub command_timeout: Duration,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            user: "root".to_owned(),
            private_key_file: None,
            known_hosts_file: None,
            trust_on_first_use: false,
            connect_timeout: Duration::from_secs(15),
            command_timeout: Duration::from_secs(3600),
        }
    }
}

/// The command of one in-band step.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "a command template (a string), or false for an explicit no-op"
)]
pub enum StepCommand {
    /// A command template run over SSH.
    Run(String),
    /// `false`: the step does nothing (only for `drain` and `uncordon`, e.g. in a fleet
    /// without Kubernetes).
    Disabled(bool),
}

/// The command template of each in-band step, run with `sh -c` by the machine's SSH
/// daemon.
///
/// Placeholders such as `{image}` are replaced by the machine's fields, each shell-quoted as
/// one word: do not put quotes around them. `{{` and `}}` stand for literal braces; other
/// braces (`${HOME}`, `awk '{print $1}'`) are left alone.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// Writes `{image}` to the disk (from the deploy ramdisk).
    pub repave: Option<StepCommand>,
    /// Prints a join token for `{target_cluster}` on its last line of standard output.
    pub mint_join_token: Option<StepCommand>,
    /// Joins `{target_cluster}` with `{token}` (also given on standard input).
    pub join_cluster: Option<StepCommand>,
    /// Succeeds once the machine's node is Ready.
    pub verify_in_cluster: Option<StepCommand>,
    /// Cordons and drains the node.
    pub drain: Option<StepCommand>,
    /// Uncordons the node.
    pub uncordon: Option<StepCommand>,
    /// Erases the disks.
    pub wipe_disks: Option<StepCommand>,
    /// Applies `{network_config}` (also given on standard input).
    pub apply_network_config: Option<StepCommand>,
    /// Succeeds when the machine's network works.
    pub verify_connectivity: Option<StepCommand>,
}

/// `[redfish.images]`: where the deploy environment gets the image it writes, and its
/// published SHA-256. With it, the repave command gets `{image_url}` and `{image_checksum}`,
/// must print `bm-image-sha256: HEX` of what it wrote, and the step fails unless that is the
/// published checksum.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    /// The URL of the machine's image, a template (`{image}` is its `spec.image`), e.g.
    /// `http://10.0.0.1:8080/boot/files/{image}.img`; off when unset.
    pub url: Option<String>,
    /// The URL of its SHA-256 (a file whose first word is the hex digest, as `sha256sum`
    /// writes), a template; by default the image's URL with `.sha256` appended.
    pub sha256_url: Option<String>,
    /// How long fetching the checksum may take.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            url: None,
            sha256_url: None,
            timeout: Duration::from_secs(15),
        }
    }
}

/// The checked `[redfish.images]`.
#[derive(Clone, Debug)]
pub(crate) struct Images {
    pub(crate) url: Template,
    pub(crate) sha256_url: Template,
    pub(crate) timeout: Duration,
}

/// Where repair tickets go.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// A URL that receives a JSON POST per notice; without it notices are only logged.
    pub webhook_url: Option<String>,
    /// How long the webhook may take.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhook_url: None,
            timeout: Duration::from_secs(15),
        }
    }
}

/// A mistake in the configuration, found before the server serves.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML document does not parse or does not have the expected shape.
    #[error("invalid [redfish] configuration: {0}")]
    Parse(String),
    /// A field has a value that cannot work.
    #[error("redfish.{field}: {reason}")]
    Invalid {
        /// The field, e.g. `ssh.private_key_file`.
        field: String,
        /// What is wrong and what would work.
        reason: String,
    },
    /// A file named by a field cannot be read.
    #[error("redfish.{field}: cannot read {}", path.display())]
    ReadFile {
        /// The field naming the file.
        field: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The SSH private key cannot be loaded.
    #[error("redfish.ssh.private_key_file: cannot load the SSH private key {}", path.display())]
    SshKey {
        /// The key file.
        path: PathBuf,
        /// Why (an error of the SSH library).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The HTTP client of the ticket webhook cannot be built.
    #[error("redfish.notify: cannot set up the HTTP client")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Durations written `"500ms"`, `"30s"`, `"5m"`, `"2h"`, or a number of seconds.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    /// Parses `"500ms"`, `"30s"`, `"5m"`, `"2h"` or `"30"` (seconds).
    pub(crate) fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let bad = || {
            format!("invalid duration {s:?}: expected e.g. \"500ms\", \"30s\", \"5m\" or \"2h\"")
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let d = match unit.trim() {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        Ok(d)
    }

    fn from_raw(raw: Raw) -> Result<Duration, String> {
        match raw {
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
            Raw::Text(s) => parse(&s),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = Raw::deserialize(d).map_err(|_| {
            de::Error::custom("expected a duration such as \"500ms\", \"30s\", \"5m\" or \"2h\"")
        })?;
        from_raw(raw).map_err(de::Error::custom)
    }

    /// The same for `Option<Duration>` fields.
    pub(crate) mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, de};

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            let raw = super::Raw::deserialize(d).map_err(|_| {
                de::Error::custom(
                    "expected a duration such as \"500ms\", \"30s\", \"5m\" or \"2h\"",
                )
            })?;
            super::from_raw(raw).map(Some).map_err(de::Error::custom)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Checking: from the serde shapes above to settings that work.

/// The in-band steps, each a command template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
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
    pub(crate) const ALL: [Step; 9] = [
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
    pub(crate) fn tag(self) -> &'static str {
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
    pub(crate) fn key(self) -> &'static str {
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

    pub(crate) fn configured(self, c: &CommandsConfig) -> Option<&StepCommand> {
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
pub(crate) enum StepPlan {
    Run(Template),
    Noop,
}

/// How `set_netboot` works.
#[derive(Clone, Debug)]
pub(crate) enum Boot {
    Pxe,
    VirtualMedia(Template),
}

/// One `[redfish.bmc."<network>"]` section: a CIDR or a host name pattern.
#[derive(Debug)]
struct NetworkSection {
    key: String,
    hosts: HostPattern,
    set: BmcOverrides,
}

/// The settings of every BMC: the defaults, what each `[redfish.bmc."..."]` section sets,
/// and where credentials may be sent.
#[derive(Debug)]
pub(crate) struct BmcTable {
    default: BmcSettings,
    /// Where the default credentials may be sent (`credential_hosts`).
    credential_hosts: Vec<HostPattern>,
    /// What each `[redfish.bmc."host"]` and `[redfish.bmc."host:port"]` section sets.
    per_bmc: BTreeMap<String, BmcOverrides>,
    /// The network sections.
    networks: Vec<NetworkSection>,
}

impl BmcTable {
    /// The settings of a BMC, field by field from `[bmc."host:port"]`, `[bmc."host"]`, the
    /// most specific network section that contains the host, and the defaults, in that
    /// order; or, when nothing may be sent to this endpoint, why and which setting to change.
    ///
    /// Refused: `redfish+http://` unless `allow_plaintext` is set for it; an endpoint that
    /// would get the default credentials but is not in `credential_hosts`; a port of a host
    /// whose section sets credentials that are for its default port (or for other ports
    /// with sections of their own). This one function decides both at registration
    /// (`validate`) and before every client is built, so that an endpoint stored before the
    /// configuration changed gets nothing either.
    pub(crate) fn settings_for(&self, ep: &BmcEndpoint) -> Result<BmcSettings, String> {
        let none = BmcOverrides::default();
        let port_written = ep.host_port != ep.host;
        let port_section = if port_written {
            self.per_bmc.get(&ep.host_port)
        } else {
            None
        };
        let mut host_section = self.per_bmc.get(&ep.host).cloned().unwrap_or_default();
        // A host section's credentials and plaintext permission cover its default port and
        // the ports with a section of their own, not whatever port an endpoint names.
        if port_written && port_section.is_none() {
            if host_section.auth.is_some() {
                return Err(format!(
                    "[redfish.bmc.\"{host}\"] sets the credentials of BMC {host} at its default port only, \
                     and port {port} has no section: to use this port, add a [redfish.bmc.\"{hp}\"] section \
                     (it inherits the rest from [redfish.bmc.\"{host}\"])",
                    host = ep.host,
                    hp = ep.host_port,
                    port = ep.base.port().map(|p| p.to_string()).unwrap_or_default(),
                ));
            }
            host_section.plaintext = None;
        }
        let network = self
            .networks
            .iter()
            .filter(|n| n.hosts.matches(&ep.host))
            .max_by_key(|n| n.hosts.specificity());
        let merged = port_section
            .unwrap_or(&none)
            .clone()
            .or(&host_section)
            .or(network.map_or(&none, |n| &n.set));
        if ep.base.scheme() == "http" && merged.plaintext != Some(true) {
            let net = network.map_or_else(
                || "a network section such as [redfish.bmc.\"10.0.0.0/24\"]".to_owned(),
                |n| format!("[redfish.bmc.\"{}\"]", n.key),
            );
            return Err(format!(
                "BMC {hp} would be reached over plain HTTP (redfish+http://), which shows its \
                 password and every command to the network: use redfish+https://, or for a lab \
                 BMC set allow_plaintext = true in [redfish.bmc.\"{hp}\"] or {net}",
                hp = ep.host_port,
            ));
        }
        let own_auth = merged.auth.is_some();
        let settings = merged.resolve(&self.default);
        if !own_auth
            && settings.auth.is_some()
            && !self.credential_hosts.iter().any(|h| h.matches(&ep.host))
        {
            return Err(format!(
                "BMC {hp} would get the default credentials of [redfish.credentials], but \
                 redfish.credential_hosts does not list it: add its address, its network \
                 (e.g. \"10.0.0.0/8\") or its host name (pattern, e.g. \"bmc-*.dc1.example\") \
                 to credential_hosts, or give it credentials of its own in [redfish.bmc.\"{host}\"]",
                hp = ep.host_port,
                host = ep.host,
            ));
        }
        Ok(settings)
    }
}

/// A checked configuration: its files read, its templates parsed.
pub(crate) struct Checked {
    pub(crate) bmcs: BmcTable,
    pub(crate) power: PowerTiming,
    pub(crate) insert_media_timeout: Duration,
    pub(crate) boot: Boot,
    pub(crate) boot_mode: Option<BootMode>,
    pub(crate) steps: HashMap<&'static str, StepPlan>,
    /// Set exactly when some in-band step runs a command.
    pub(crate) ssh: Option<SshSettings>,
    pub(crate) images: Option<Images>,
}

impl RedfishConfig {
    /// Checks every field, reads the files the configuration names (passwords, CA, SSH
    /// key) and parses the templates: what [`crate::RedfishProvider::new`] builds from.
    pub(crate) fn check(&self) -> Result<Checked, ConfigError> {
        let c = self;
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
        let mut credential_hosts = Vec::new();
        for (i, h) in c.credential_hosts.iter().enumerate() {
            credential_hosts.push(
                HostPattern::parse(h)
                    .map_err(|e| ConfigError::invalid(format!("credential_hosts[{i}]"), e))?,
            );
        }
        if default_bmc.auth.is_some() && credential_hosts.is_empty() {
            return Err(ConfigError::invalid(
                "credential_hosts",
                "[redfish.credentials] is set but no BMC may receive it: list the BMC networks and \
                 host names it is for, e.g. credential_hosts = [\"10.0.0.0/8\", \"bmc-*.dc1.example\"]",
            ));
        }
        let mut per_bmc = BTreeMap::new();
        let mut networks = Vec::new();
        for (key, b) in &c.bmc {
            let set = bmc_overrides(key, b)?;
            if key.contains('/') || key.contains('*') {
                let hosts = HostPattern::parse(key)
                    .map_err(|e| ConfigError::invalid(format!("bmc.{key:?}"), e))?;
                networks.push(NetworkSection {
                    key: key.clone(),
                    hosts,
                    set,
                });
            } else {
                per_bmc.insert(key.clone(), set);
            }
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

        let images = match &c.images.url {
            None => {
                if c.images.sha256_url.is_some() {
                    return Err(ConfigError::invalid(
                        "images.sha256_url",
                        "needs images.url, the image it is the checksum of",
                    ));
                }
                None
            }
            Some(src) => {
                let url = Template::parse(src, &Var::COMMON)
                    .map_err(|e| ConfigError::invalid("images.url", e))?;
                let sha_src = c
                    .images
                    .sha256_url
                    .clone()
                    .unwrap_or_else(|| format!("{src}.sha256"));
                let sha256_url = Template::parse(&sha_src, &Var::COMMON)
                    .map_err(|e| ConfigError::invalid("images.sha256_url", e))?;
                Some(Images {
                    url,
                    sha256_url,
                    timeout: positive("images.timeout", c.images.timeout)?,
                })
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
                    let allowed: Vec<Var> = match step {
                        Step::JoinCluster => {
                            Var::COMMON.iter().copied().chain([Var::Token]).collect()
                        }
                        Step::Repave if images.is_some() => Var::COMMON
                            .iter()
                            .copied()
                            .chain([Var::ImageUrl, Var::ImageChecksum])
                            .collect(),
                        _ => Var::COMMON.to_vec(),
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
            Some(SshSettings {
                user: s.user.clone(),
                key: Arc::new(key),
                key_path: key_path.clone(),
                known_hosts: known_hosts.clone(),
                tofu: s.trust_on_first_use,
                connect_timeout: positive("ssh.connect_timeout", s.connect_timeout)?,
                command_timeout: positive("ssh.command_timeout", s.command_timeout)?,
            })
        } else {
            None
        };

        Ok(Checked {
            bmcs: BmcTable {
                default: default_bmc,
                credential_hosts,
                per_bmc,
                networks,
            },
            power,
            insert_media_timeout: positive("insert_media_timeout", c.insert_media_timeout)?,
            boot,
            boot_mode: c.boot.mode,
            steps,
            ssh,
            images,
        })
    }
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
    if key.is_empty() || key.contains("://") {
        return Err(ConfigError::invalid(
            format!("bmc.{key:?}"),
            "the key must be a BMC host or host:port as written in bmc_endpoint (e.g. \"10.0.1.5\"), \
             a CIDR (\"10.0.1.0/24\") or a host name pattern (\"bmc-*.lab.example\")",
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
        plaintext: b.allow_plaintext,
    })
}

fn positive(field: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::invalid(field, "must be more than 0s"))
    } else {
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RedfishProvider;
    use crate::endpoint::parse_bmc_endpoint;

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
            (
                "[redfish.credentials]\nusername = \"a\"\npassword = \"p\"",
                "redfish.credential_hosts: [redfish.credentials] is set but no BMC may receive it",
            ),
            (
                "[redfish]\ncredential_hosts = [\"10.0.0.0/33\"]",
                "redfish.credential_hosts[0]: \"10.0.0.0/33\" is not a CIDR",
            ),
            (
                "[redfish]\ncredential_hosts = [\"10.0.0.0/8\", \"a b\"]",
                "redfish.credential_hosts[1]",
            ),
            (
                "[redfish.bmc.\"10.0.0.0/40\"]\nallow_plaintext = true",
                "redfish.bmc.\"10.0.0.0/40\": \"10.0.0.0/40\" is not a CIDR",
            ),
            (
                "[redfish.images]\nsha256_url = \"http://x/{image}.sha256\"",
                "redfish.images.sha256_url: needs images.url",
            ),
            (
                "[redfish.images]\nurl = \"http://x/{imag}.img\"",
                "redfish.images.url",
            ),
            (
                "[redfish.commands]\nrepave = \"wget {image_url}\"",
                "{image_url} is not available",
            ),
        ];
        for (doc, want) in cases {
            let e = new_err(doc);
            assert!(e.contains(want), "{doc}\n  got: {e}\n want: {want}");
        }
    }

    #[test]
    fn per_bmc_settings_fall_back_field_by_field() {
        let p = config(
            r#"
            [redfish]
            request_timeout = "20s"
            credential_hosts = ["10.0.0.0/24"]
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
        )
        .check()
        .unwrap();
        let get = |url: &str| {
            p.bmcs
                .settings_for(&parse_bmc_endpoint(url).unwrap())
                .unwrap()
        };
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
        assert!(!format!("{:?}", p.bmcs).contains("default-pw"));
    }

    #[test]
    fn a_host_port_section_inherits_what_it_leaves_unset_from_the_host_section() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "rack CA").unwrap();
        let p = config(&format!(
            r#"
            [redfish]
            max_concurrent_requests = 4
            credential_hosts = ["10.0.1.0/24"]
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
        ))
        .check()
        .unwrap();
        let get = |url: &str| {
            p.bmcs
                .settings_for(&parse_bmc_endpoint(url).unwrap())
                .unwrap()
        };
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

    /// Which user each endpoint gets, or the refusal (a fragment of it).
    fn check_endpoints(doc: &str, cases: &[(&str, Result<Option<&str>, &str>)]) {
        let p = config(doc).check().unwrap();
        for (url, want) in cases {
            let got = p.bmcs.settings_for(&parse_bmc_endpoint(url).unwrap());
            match (got, want) {
                (Ok(s), Ok(user)) => {
                    assert_eq!(s.auth.as_ref().map(|a| a.0.as_str()), *user, "{url}")
                }
                (Err(e), Err(frag)) => {
                    assert!(e.contains(frag), "{url}\n  got: {e}\n want: {frag}")
                }
                (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn credentials_go_only_to_the_bmcs_the_configuration_lists() {
        let doc = r#"
            [redfish]
            credential_hosts = ["10.0.0.0/16", "bmc-*.dc1.example", "[fd00::5]"]
            [redfish.credentials]
            username = "default"
            password = "default-pw"
            [redfish.bmc."10.9.0.5"]
            username = "own"
            password = "own-pw"
            [redfish.bmc."10.9.0.5:8443"]
            request_timeout = "5s"
            [redfish.bmc."10.0.7.5"]
            username = "seven"
            password = "seven-pw"
            [redfish.bmc."192.168.50.0/24"]
            allow_plaintext = true
            username = "lab"
            password = "lab-pw"
            [redfish.bmc."192.168.50.9:8000"]
            allow_plaintext = false
            [redfish.bmc."10.0.3.3:8000"]
            allow_plaintext = true
            [redfish.bmc."10.0.4.4"]
            allow_plaintext = true
        "#;
        let not_listed = "redfish.credential_hosts does not list it";
        let plain = "over plain HTTP (redfish+http://)";
        let other_port = "at its default port only, and port 18443 has no section";
        check_endpoints(
            doc,
            &[
                // The default credentials: only to credential_hosts.
                ("redfish+https://10.0.1.5/", Ok(Some("default"))),
                ("redfish+https://10.0.1.5:18443/", Ok(Some("default"))),
                ("redfish+https://10.1.0.5/", Err(not_listed)),
                ("redfish+https://127.0.0.1:18443/", Err(not_listed)),
                ("redfish+https://bmc-r1.dc1.example/", Ok(Some("default"))),
                ("redfish+https://bmc-r1.evil.example/", Err(not_listed)),
                ("redfish+https://[fd00::5]/", Ok(Some("default"))),
                ("redfish+https://[fd00::6]/", Err(not_listed)),
                // A name that may resolve into a listed network is not the network.
                ("redfish+https://localhost/", Err(not_listed)),
                // A host's own credentials: its default port and the ports with a section.
                ("redfish+https://10.9.0.5/", Ok(Some("own"))),
                ("redfish+https://10.9.0.5:443/", Ok(Some("own"))),
                ("redfish+https://10.9.0.5:8443/", Ok(Some("own"))),
                ("redfish+https://10.9.0.5:18443/", Err(other_port)),
                // ... even inside credential_hosts: the host's credentials are its own.
                (
                    "redfish+https://10.0.7.5:18443/",
                    Err("[redfish.bmc.\"10.0.7.5\"] sets the credentials"),
                ),
                // A network section's credentials: every host and port in it.
                ("redfish+https://192.168.50.7/", Ok(Some("lab"))),
                ("redfish+http://192.168.50.7:8000/", Ok(Some("lab"))),
                // No downgrade: plain HTTP only where allow_plaintext says so.
                ("redfish+http://10.0.1.5/", Err(plain)),
                ("redfish+http://10.9.0.5/", Err(plain)),
                ("redfish+http://192.168.50.9:8000/", Err(plain)),
                ("redfish+http://10.0.3.3:8000/", Ok(Some("default"))),
                ("redfish+http://10.0.3.3:8001/", Err(plain)),
                ("redfish+http://10.0.4.4/", Ok(Some("default"))),
                // A host section's allow_plaintext is for its default port too.
                ("redfish+http://10.0.4.4:8080/", Err(plain)),
            ],
        );
        // Without default credentials there is nothing to withhold: unlisted BMCs are
        // reached, without an Authorization header; plaintext still needs allow_plaintext.
        check_endpoints(
            "[redfish.bmc.\"10.9.0.5\"]\nusername = \"own\"\npassword = \"pw\"",
            &[
                ("redfish+https://10.1.0.5/", Ok(None)),
                ("redfish+https://10.9.0.5/", Ok(Some("own"))),
                ("redfish+http://10.1.0.5/", Err(plain)),
            ],
        );
    }

    #[test]
    fn refusals_name_the_setting_to_change() {
        let p = config(
            "[redfish]\ncredential_hosts = [\"10.0.0.0/8\"]\n[redfish.credentials]\nusername = \"u\"\npassword = \"p\"\n[redfish.bmc.\"192.168.1.0/24\"]\nrequest_timeout = \"5s\"",
        )
        .check()
        .unwrap();
        let refusal = |url: &str| {
            p.bmcs
                .settings_for(&parse_bmc_endpoint(url).unwrap())
                .unwrap_err()
        };
        let e = refusal("redfish+https://192.168.1.5:8443/");
        assert!(e.contains("BMC 192.168.1.5:8443"), "{e}");
        assert!(e.contains("to credential_hosts, or give it credentials of its own in [redfish.bmc.\"192.168.1.5\"]"), "{e}");
        let e = refusal("redfish+http://10.0.0.5/");
        assert!(e.contains("set allow_plaintext = true in [redfish.bmc.\"10.0.0.5\"] or a network section such as"), "{e}");
        // The network section the host is in is named.
        let e = refusal("redfish+http://192.168.1.5/");
        assert!(e.contains("or [redfish.bmc.\"192.168.1.0/24\"]"), "{e}");
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

    fn parse_err(doc: &str) -> String {
        match RedfishConfig::from_toml(doc) {
            Ok(c) => panic!("{doc:?} parsed: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn durations() {
        let check = |s: &str, want: Result<Duration, &str>| match (duration::parse(s), want) {
            (Ok(d), Ok(w)) => assert_eq!(d, w, "{s}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{s}: {e}"),
            (got, want) => panic!("{s}: got {got:?}, want {want:?}"),
        };
        check("500ms", Ok(Duration::from_millis(500)));
        check("30s", Ok(Duration::from_secs(30)));
        check("30", Ok(Duration::from_secs(30)));
        check("5m", Ok(Duration::from_secs(300)));
        check("2h", Ok(Duration::from_secs(7200)));
        check("2 h", Ok(Duration::from_secs(7200)));
        check("", Err("invalid duration"));
        check("1.5s", Err("invalid duration"));
        check("-1s", Err("invalid duration"));
        check("10d", Err("invalid duration"));
    }

    #[test]
    fn an_empty_document_is_the_default() {
        let c = RedfishConfig::from_toml("").unwrap();
        assert_eq!(c.max_concurrent_requests, 2);
        assert_eq!(c.boot.method, BootMethod::Pxe);
        assert_eq!(c.ssh.user, "root");
    }

    #[test]
    fn parses_a_full_section() {
        let c = RedfishConfig::from_toml(
            r#"
            [redfish]
            request_timeout = "10s"
            [redfish.credentials]
            username = "admin"
            password_file = "/etc/bm/pw"
            [redfish.bmc."10.0.0.5:8443"]
            insecure_skip_verify = true
            request_timeout = 5
            [redfish.power]
            poll_interval = "250ms"
            [redfish.boot]
            method = "virtual-media"
            iso_url = "http://10.0.0.2/{machine_id}.iso"
            [redfish.commands]
            repave = "deploy {image}"
            drain = false
            "#,
        )
        .unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        let bmc = &c.bmc["10.0.0.5:8443"];
        assert_eq!(bmc.insecure_skip_verify, Some(true));
        assert_eq!(bmc.request_timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.power.poll_interval, Duration::from_millis(250));
        assert_eq!(c.boot.method, BootMethod::VirtualMedia);
        assert_eq!(c.commands.drain, Some(StepCommand::Disabled(false)));
        assert_eq!(
            c.commands.repave,
            Some(StepCommand::Run("deploy {image}".into()))
        );
        // Secrets stay out of Debug output.
        let c = RedfishConfig::from_toml(
            "[redfish.credentials]\nusername = \"u\"\npassword = \"hunter2\"",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn parse_errors_say_where_and_what() {
        let e = parse_err("[redfish]\nrequest_timeout = \"soon\"");
        assert!(e.contains("invalid duration \"soon\""), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = parse_err("[redfish]\nrequest_timout = \"1s\"");
        assert!(e.contains("unknown field `request_timout`"), "{e}");
        let e = parse_err("[redfish.boot]\nmethod = \"usb\"");
        assert!(e.contains("unknown variant `usb`"), "{e}");
        let e = parse_err("[redfish.commands]\nrepave = 3");
        assert!(e.contains("a command template"), "{e}");
        let e = parse_err("[redfish.commands]\nrepav = \"x\"");
        assert!(e.contains("unknown field `repav`"), "{e}");
    }

    #[test]
    fn the_example_file_parses() {
        let doc = include_str!("../examples/provider-config.toml");
        let c = RedfishConfig::from_toml(doc).unwrap();
        assert!(c.credentials.is_some());
        assert!(c.commands.repave.is_some());
    }
}
