//! The provider's configuration: the `[redfish]` section of the server's configuration file,
//! as plain serde data, and its checks.
//!
//! Everything here is data; [`crate::RedfishProvider::new`] turns it into working parts
//! (files read, templates parsed, clients built) and reports every mistake as a
//! [`ConfigError`] before the server starts serving.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The `[redfish]` section of the server's configuration file.
///
/// See `examples/provider-config.toml` in this crate for a commented example.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedfishConfig {
    /// The credentials of every BMC that has none of its own in [`RedfishConfig::bmc`].
    pub credentials: Option<Credentials>,
    /// TLS settings of every BMC that has none of its own.
    pub tls: TlsConfig,
    /// Per-BMC settings, keyed by the host of the BMC URL as written in the machine's
    /// `bmc_endpoint` (`10.0.1.5`, `bmc-r1.lab`, `[fd00::5]`), optionally with `:port`.
    /// Each setting is taken from `host:port` if that section sets it, else from `host`,
    /// else from the defaults of this section.
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
}

impl Default for RedfishConfig {
    fn default() -> Self {
        RedfishConfig {
            credentials: None,
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

#[cfg(test)]
mod tests {
    use super::*;

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
