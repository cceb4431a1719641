//! The command line: every command, argument and flag of bmctl, as clap definitions.
//!
//! Only definitions and the conversion of their values to the API's enums live here; the
//! commands themselves are in `commands/`. `bmctl completion` and `bmctl man` are generated
//! from these definitions.

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "bmctl",
    version,
    about = "Command line of the bare-metal provisioning control plane"
)]
pub(crate) struct Cli {
    /// The server, as host:port or a URL (https:// for TLS) [default: the context's, else
    /// localhost:50051].
    #[arg(long, env = "BM_SERVER", global = true)]
    pub(crate) server: Option<String>,

    /// The context of the configuration file to use instead of its current one.
    #[arg(long, env = "BMCTL_CONTEXT", global = true)]
    pub(crate) context: Option<String>,

    /// The CA certificate (PEM) that signed the server's certificate; implies TLS.
    #[arg(long, env = "BM_CA", global = true)]
    pub(crate) ca: Option<std::path::PathBuf>,

    /// A client certificate (PEM) for mutual TLS; with --key.
    #[arg(long, env = "BM_CERT", global = true, requires = "key")]
    pub(crate) cert: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, env = "BM_KEY", global = true, requires = "cert")]
    pub(crate) key: Option<std::path::PathBuf>,

    /// A bearer token (NAME.SECRET). Prefer --token-file: arguments show in `ps`.
    #[arg(long, env = "BM_TOKEN", global = true, hide_env_values = true)]
    pub(crate) token: Option<String>,

    /// A file holding the bearer token. Without a token, bmctl uses the local admin token
    /// of a server on this host ($BM_DATA_DIR/admin-token, else ./bm-data/admin-token).
    #[arg(long, env = "BM_TOKEN_FILE", global = true, conflicts_with = "token")]
    pub(crate) token_file: Option<std::path::PathBuf>,

    /// Output format of the resources a command prints.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub(crate) output: Output,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Import N fake machines (machine-1..N), or an inventory file (CSV or JSON).
    Import(ImportArgs),
    /// List machines: phase and effective state side by side.
    List(ListArgs),
    /// Machines by effective state and phase, and the one longest in ATTENTION and in
    /// BLOCKED (what the metrics bm_machines and bm_oldest_machine_age_seconds show).
    Stats,
    /// Show one machine.
    Get {
        /// The machine's id.
        machine: String,
    },
    /// What happened to a machine outside operations (power changes the status poll saw),
    /// oldest first.
    Events {
        /// The machine's id.
        machine: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Change a machine's spec or labels.
    Update(UpdateArgs),
    /// Operation history, newest first.
    #[command(alias = "runs")]
    Ops(OpsArgs),
    /// Show one operation with its stages.
    Op {
        /// The operation's id.
        operation: String,
    },
    /// Drain the node and move the machine to MAINTENANCE.
    EnterMaintenance(OpArgs),
    /// Uncordon the node and move the machine to READY.
    ExitMaintenance(OpArgs),
    /// Netboot, write the image, join the cluster (MAINTENANCE only).
    #[command(alias = "repave")]
    Reimage(OpArgs),
    /// Power-cycle the machine (READY or MAINTENANCE).
    Reboot(OpArgs),
    /// Drain, wipe and open a repair ticket; the machine ends BLOCKED.
    Rma(OpArgs),
    /// Drain, wipe and power off; the machine ends BLOCKED.
    Retire(OpArgs),
    /// Drain and reimage with the spec's image (MAINTENANCE only).
    Upgrade(OpArgs),
    /// Apply the spec's network config and verify connectivity (MAINTENANCE only).
    NetReconfig(OpArgs),
    /// Record that the cause of a failure was fixed: clears NeedsIntervention.
    #[command(alias = "mark-fixed")]
    ClearIntervention(OpArgs),
    /// Take back a machine that returned from RMA: clears RMA/Retired, back to FACTORY_READY.
    Readmit(OpArgs),
    /// Follow an operation live until it ends (after Ctrl+C, or from another terminal).
    #[command(alias = "wait")]
    Follow {
        /// The operation's id.
        operation: String,
    },
    /// Cancel a pending or running operation.
    Cancel {
        /// The operation's id.
        operation: String,
    },
    /// Follow every operation event live.
    Watch(WatchArgs),
    /// Print an operation's provider log: what was logged so far, then live until it ends.
    Logs {
        /// The operation's id.
        operation: String,
        /// Skip lines up to this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Each operation type with its stages in the order they run, as the server runs them.
    Plans,
    /// Roll one kind of operation over many machines, batch by batch, within a failure
    /// budget (docs/rollouts.md).
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// bmctl's version, and whether the server runs with --insecure (no authentication).
    Version,
    /// The configuration file's contexts (server, CA, credentials).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a completion script for a shell, e.g. `bmctl completion bash >
    /// /etc/bash_completion.d/bmctl`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print bmctl's man page (roff), e.g. `bmctl man | man -l -`.
    Man {
        /// Write the pages into this directory instead: bmctl.1 and one page per command
        /// (bmctl-import.1, ...).
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["count", "file"])))]
pub(crate) struct ImportArgs {
    /// How many fake machines to import (1 to 65535).
    #[arg(value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub(crate) count: Option<u32>,
    /// An inventory file: CSV with a header row, a JSON array, or JSON Lines (also what
    /// `bmctl -o json list` prints).
    #[arg(long, conflicts_with = "count")]
    pub(crate) file: Option<std::path::PathBuf>,
    /// Check every row and report, without importing anything.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// The image of the fake machines.
    #[arg(long, default_value = "ubuntu-24.04")]
    pub(crate) image: String,
    /// The target cluster of the fake machines.
    #[arg(long, default_value = "prod")]
    pub(crate) cluster: String,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    /// Only this phase.
    #[arg(long, value_enum)]
    pub(crate) phase: Option<PhaseArg>,
    /// Only this effective state.
    #[arg(long, value_enum)]
    pub(crate) state: Option<StateArg>,
    /// Only machines whose labels match this selector, e.g. "rack in (r1,r2)".
    #[arg(short = 'l', long)]
    pub(crate) selector: Option<String>,
    /// Machines per request.
    #[arg(long, default_value_t = 500)]
    pub(crate) page_size: i32,
    /// The order: by id, or by age: the machines longest in BLOCKED or ATTENTION first
    /// (since the condition that holds them), then the others by id.
    #[arg(long, value_enum, default_value_t = SortArg::Id)]
    pub(crate) sort: SortArg,
}

/// The order of `bmctl list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum SortArg {
    Id,
    Age,
}

#[derive(Args, Debug)]
pub(crate) struct OpsArgs {
    /// Only this machine's operations.
    #[arg(long, short = 'm')]
    pub(crate) machine: Option<String>,
    /// Only operations of this type.
    #[arg(long = "type", value_enum)]
    pub(crate) op_type: Option<OpType>,
    /// Only operations in this phase.
    #[arg(long, value_enum)]
    pub(crate) phase: Option<OpPhaseArg>,
    /// The most operations to show.
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: usize,
}

#[derive(Args, Debug)]
pub(crate) struct OpArgs {
    /// The machine's id.
    pub(crate) machine: String,
    /// Idempotency key: the same key returns the same operation (default: a new one).
    #[arg(long)]
    pub(crate) request_id: Option<String>,
    /// Return at once instead of following the operation.
    #[arg(long)]
    pub(crate) no_wait: bool,
    /// A note for the audit trail (what was fixed, a ticket number).
    #[arg(long, default_value = "")]
    pub(crate) note: String,
}

#[derive(Args, Debug)]
pub(crate) struct UpdateArgs {
    /// The machine's id.
    pub(crate) machine: String,
    /// New image (used by the next reimage or upgrade).
    #[arg(long)]
    pub(crate) image: Option<String>,
    /// New target cluster.
    #[arg(long)]
    pub(crate) cluster: Option<String>,
    /// New SSH endpoint.
    #[arg(long)]
    pub(crate) ssh: Option<String>,
    /// New BMC endpoint.
    #[arg(long)]
    pub(crate) bmc: Option<String>,
    /// New provider.
    #[arg(long)]
    pub(crate) provider: Option<String>,
    /// New MAC addresses (the whole list); repeatable.
    #[arg(long = "mac", value_name = "MAC")]
    pub(crate) macs: Vec<String>,
    /// New network configuration, read from this file ("-" for standard input); applied by
    /// net-reconfig.
    #[arg(long, value_name = "FILE")]
    pub(crate) network_config: Option<std::path::PathBuf>,
    /// Set a label (key=value); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// Remove a label; repeatable.
    #[arg(long = "remove-label", value_name = "KEY")]
    pub(crate) remove_labels: Vec<String>,
}

/// `key=value`, for clap.
fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum PhaseArg {
    FactoryReady,
    Ready,
    Maintenance,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum StateArg {
    Blocked,
    Attention,
    Busy,
    MaintenanceIdle,
    New,
    Idle,
}

/// The operation types: the operation commands, and `ops --type`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum OpType {
    Reimage,
    Reboot,
    EnterMaintenance,
    ExitMaintenance,
    Rma,
    Retire,
    Upgrade,
    NetReconfig,
    ClearIntervention,
    Readmit,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum OpPhaseArg {
    Pending,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

/// The API's name of a clap value: `maintenance-idle` with `EFFECTIVE_STATE_` is
/// `EFFECTIVE_STATE_MAINTENANCE_IDLE`.
pub(crate) fn api_enum<E: ValueEnum, T>(
    v: E,
    prefix: &str,
    from: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<T> {
    let name = v
        .to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default();
    let api = format!("{prefix}{}", name.to_uppercase().replace('-', "_"));
    from(&api).with_context(|| format!("{api} is not in the API"))
}

#[derive(Args, Debug)]
pub(crate) struct WatchArgs {
    /// Only this machine's events.
    #[arg(long, short = 'm')]
    pub(crate) machine: Option<String>,
    /// Only this operation's events (ends with the operation).
    #[arg(long)]
    pub(crate) operation: Option<String>,
    /// Replay stored events after this revision first (0: everything).
    #[arg(long)]
    pub(crate) since: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_proto::v1 as pb;

    /// Every value of `E` names a value of the API's enum.
    fn all_in_the_api<E: ValueEnum + std::fmt::Debug, T>(
        prefix: &str,
        from: impl Fn(&str) -> Option<T>,
    ) -> usize {
        for v in E::value_variants() {
            if let Err(e) = api_enum(v.clone(), prefix, &from) {
                panic!("{v:?}: {e}");
            }
        }
        E::value_variants().len()
    }

    #[test]
    fn arg_enums_name_api_values() {
        assert_eq!(
            all_in_the_api::<PhaseArg, _>("PHASE_", pb::Phase::from_str_name),
            3
        );
        assert_eq!(
            all_in_the_api::<StateArg, _>("EFFECTIVE_STATE_", pb::EffectiveState::from_str_name),
            6
        );
        assert_eq!(
            all_in_the_api::<OpPhaseArg, _>("OPERATION_PHASE_", pb::OperationPhase::from_str_name),
            5
        );
        assert_eq!(
            all_in_the_api::<OpType, _>("OPERATION_TYPE_", pb::OperationType::from_str_name),
            10
        );
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

/// `bmctl config`: the contexts of the configuration file ($BMCTL_CONFIG, else
/// ~/.config/bmctl/config.toml).
#[derive(Subcommand, Debug)]
pub(crate) enum ConfigCommand {
    /// List the contexts; the current one is marked with *.
    GetContexts,
    /// Make NAME the current context.
    UseContext {
        /// The context.
        name: String,
    },
    /// Create or change context NAME from the global flags given with it (--server, --ca,
    /// --cert, --key, --token-file).
    SetContext {
        /// The context.
        name: String,
    },
}

/// `bmctl rollout ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum RolloutCommand {
    /// Start a rollout and follow it live (per batch progress, counts, failures as they
    /// happen) until it ends; exits 1 if it failed or was aborted.
    Start(RolloutStartArgs),
    /// One rollout with each of its machines, or (without an id) the rollouts, newest first.
    Status {
        /// The rollout's id.
        rollout: Option<String>,
        /// With no id: only the rollouts that have not ended.
        #[arg(long)]
        active: bool,
    },
    /// Pause: no machine starts until resumed; what runs finishes.
    Pause {
        /// The rollout's id.
        rollout: String,
    },
    /// Resume a paused rollout.
    Resume {
        /// The rollout's id.
        rollout: String,
    },
    /// Abort: nothing new starts, and the running operations are canceled.
    Abort {
        /// The rollout's id.
        rollout: String,
    },
    /// Follow a rollout live until it ends; exits 1 if it failed or was aborted.
    Watch {
        /// The rollout's id.
        rollout: String,
    },
}

/// What a rollout does to each machine.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum RolloutOp {
    Reimage,
    Upgrade,
    Reboot,
    NetReconfig,
    EnterMaintenance,
    ExitMaintenance,
    /// Enter maintenance, reimage, exit maintenance, as one step per machine.
    MaintenanceReimage,
}

#[derive(Args, Debug)]
pub(crate) struct RolloutStartArgs {
    /// What to do to each machine.
    #[arg(long = "op", value_enum)]
    pub(crate) op: RolloutOp,
    /// The machines whose labels match this selector, e.g. "rack in (r1,r2)".
    #[arg(short = 'l', long = "selector", default_value = "")]
    pub(crate) selector: String,
    /// Only machines in this phase.
    #[arg(long, value_enum)]
    pub(crate) phase: Option<PhaseArg>,
    /// Only machines in this effective state.
    #[arg(long, value_enum)]
    pub(crate) state: Option<StateArg>,
    /// These machines (repeatable), filtered by the criteria above.
    #[arg(long = "machine")]
    pub(crate) machines: Vec<String>,
    /// The most machines in flight at once: a number (50) or a share of the target (10%).
    #[arg(long)]
    pub(crate) max_in_flight: String,
    /// Stop when this many machines failed (5), or this share of the target (2%).
    #[arg(long)]
    pub(crate) failure_budget: String,
    /// One batch per value of this label, in order (one rack at a time).
    #[arg(long)]
    pub(crate) batch_by: Option<String>,
    /// Wait this long after a batch before the next one, e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) soak: Option<std::time::Duration>,
    /// Wait for machines that are BLOCKED, ATTENTION or BUSY when their turn comes,
    /// instead of skipping them.
    #[arg(long)]
    pub(crate) wait_busy: bool,
    /// Idempotency key: the same key returns the same rollout (default: a new one).
    #[arg(long)]
    pub(crate) request_id: Option<String>,
    /// A note for the audit trail, also on each of its operations.
    #[arg(long, default_value = "")]
    pub(crate) note: String,
    /// Return at once instead of following the rollout.
    #[arg(long)]
    pub(crate) no_wait: bool,
}
