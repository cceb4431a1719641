//! `bmctl`: the command line of the bare-metal control plane.
//!
//! Every command talks to `bm-server` over gRPC (`--server`, `BM_SERVER`). Operation
//! commands follow the operation live by default; `--no-wait` returns at once. `-o json`
//! prints the canonical proto3 JSON of the resources instead of tables.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line tool prints"
)]

/// Writes to stdout; exits quietly when the reader went away (`bmctl ... | head`).
macro_rules! out {
    ($($arg:tt)*) => { $crate::emit(format_args!($($arg)*), false) };
}

/// [`out!`] with a newline.
macro_rules! outln {
    () => { $crate::emit(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::emit(format_args!($($arg)*), true) };
}

mod follow;
mod inventory;
mod render;

/// Writes to stdout (colour stripped unless it is a terminal). A closed pipe ends the
/// program with exit code 0: the reader has what it wanted. Any other write error (a full
/// disk) ends it with exit code 1, so that cut output is not taken for the whole.
fn emit(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut out = anstream::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            anstream::eprintln!("error: writing output: {e}");
            std::process::exit(1);
        }
    }
}

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bm_proto::pbjson_types::FieldMask;
use bm_proto::v1 as pb;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};

use render::Palette;

#[derive(Parser, Debug)]
#[command(
    name = "bmctl",
    version,
    about = "Command line of the bare-metal provisioning control plane"
)]
struct Cli {
    /// The server, as host:port or a URL.
    #[arg(
        long,
        env = "BM_SERVER",
        default_value = "localhost:50051",
        global = true
    )]
    server: String,

    /// Output format of the resources a command prints.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Import N fake machines (machine-1..N), or an inventory file (CSV or JSON).
    Import(ImportArgs),
    /// List machines: phase and effective state side by side.
    List(ListArgs),
    /// Show one machine.
    Get {
        /// The machine's id.
        machine: String,
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
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["count", "file"])))]
struct ImportArgs {
    /// How many fake machines to import (1 to 65535).
    #[arg(value_parser = clap::value_parser!(u32).range(1..=65_535))]
    count: Option<u32>,
    /// An inventory file: CSV with a header row, a JSON array, or JSON Lines (also what
    /// `bmctl -o json list` prints).
    #[arg(long, conflicts_with = "count")]
    file: Option<std::path::PathBuf>,
    /// Check every row and report, without importing anything.
    #[arg(long)]
    dry_run: bool,
    /// The image of the fake machines.
    #[arg(long, default_value = "ubuntu-24.04")]
    image: String,
    /// The target cluster of the fake machines.
    #[arg(long, default_value = "prod")]
    cluster: String,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Only this phase.
    #[arg(long, value_enum)]
    phase: Option<PhaseArg>,
    /// Only this effective state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Only machines whose labels match this selector, e.g. "rack in (r1,r2)".
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Machines per request.
    #[arg(long, default_value_t = 500)]
    page_size: i32,
}

#[derive(Args, Debug)]
struct OpsArgs {
    /// Only this machine's operations.
    #[arg(long, short = 'm')]
    machine: Option<String>,
    /// Only operations of this type.
    #[arg(long = "type", value_enum)]
    op_type: Option<OpType>,
    /// Only operations in this phase.
    #[arg(long, value_enum)]
    phase: Option<OpPhaseArg>,
    /// The most operations to show.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

#[derive(Args, Debug)]
struct OpArgs {
    /// The machine's id.
    machine: String,
    /// Idempotency key: the same key returns the same operation (default: a new one).
    #[arg(long)]
    request_id: Option<String>,
    /// Return at once instead of following the operation.
    #[arg(long)]
    no_wait: bool,
    /// A note for the audit trail (what was fixed, a ticket number).
    #[arg(long, default_value = "")]
    note: String,
}

#[derive(Args, Debug)]
struct UpdateArgs {
    /// The machine's id.
    machine: String,
    /// New image (used by the next reimage or upgrade).
    #[arg(long)]
    image: Option<String>,
    /// New target cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// New SSH endpoint.
    #[arg(long)]
    ssh: Option<String>,
    /// New BMC endpoint.
    #[arg(long)]
    bmc: Option<String>,
    /// New provider.
    #[arg(long)]
    provider: Option<String>,
    /// New MAC addresses (the whole list); repeatable.
    #[arg(long = "mac", value_name = "MAC")]
    macs: Vec<String>,
    /// New network configuration, read from this file ("-" for standard input); applied by
    /// net-reconfig.
    #[arg(long, value_name = "FILE")]
    network_config: Option<std::path::PathBuf>,
    /// Set a label (key=value); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Remove a label; repeatable.
    #[arg(long = "remove-label", value_name = "KEY")]
    remove_labels: Vec<String>,
}

/// `key=value`, for clap.
fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PhaseArg {
    FactoryReady,
    Ready,
    Maintenance,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StateArg {
    Blocked,
    Attention,
    Busy,
    MaintenanceIdle,
    New,
    Idle,
}

/// The operation types: the operation commands, and `ops --type`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum OpType {
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
enum OpPhaseArg {
    Pending,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

/// The API's name of a clap value: `maintenance-idle` with `EFFECTIVE_STATE_` is
/// `EFFECTIVE_STATE_MAINTENANCE_IDLE`.
fn api_enum<E: ValueEnum, T>(
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
struct WatchArgs {
    /// Only this machine's events.
    #[arg(long, short = 'm')]
    machine: Option<String>,
    /// Only this operation's events (ends with the operation).
    #[arg(long)]
    operation: Option<String>,
    /// Replay stored events after this revision first (0: everything).
    #[arg(long)]
    since: Option<u64>,
}

struct Clients {
    machines: MachineServiceClient<Channel>,
    operations: OperationServiceClient<Channel>,
}

async fn connect(server: &str) -> anyhow::Result<Clients> {
    let uri = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("--server {server:?} is not a valid address"))?
        .connect_timeout(Duration::from_secs(5))
        // A follow on a dead network notices within half a minute.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|e| {
        let cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
        tonic::Status::unavailable(format!(
            "cannot reach the server at {uri}: {cause} (is bm-server running? set --server or BM_SERVER)"
        ))
    })?;
    Ok(Clients {
        machines: MachineServiceClient::new(channel.clone())
            .max_decoding_message_size(bm_max_message()),
        operations: OperationServiceClient::new(channel)
            .max_decoding_message_size(bm_max_message()),
    })
}

fn bm_max_message() -> usize {
    64 * 1024 * 1024
}

/// The exit code after Ctrl+C (128 + SIGINT), as the README says: the command stopped, an
/// operation it followed goes on.
const INTERRUPTED: u8 = 130;

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints a resource as JSON or through its renderer; exit code 0.
fn show<T: serde::Serialize>(
    json: bool,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<u8> {
    if json {
        print_json(value)?;
    } else {
        out!("{}", render(value));
    }
    Ok(0)
}

/// Reads a server stream until it ends (exit code 0) or Ctrl+C ([`INTERRUPTED`]), handing
/// each message to `each`. When the server goes away (a restart), `open` is called again to
/// resume where `each` got to; after [`follow::RECONNECT_FOR`] without a server, it gives up.
async fn drain<T, F, Fut>(
    mut open: F,
    mut each: impl FnMut(T) -> anyhow::Result<()>,
) -> anyhow::Result<u8>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Streaming<T>, tonic::Status>>,
{
    let mut ctrl_c = follow::interrupt_listener().await;
    let mut lost_since: Option<Instant> = None;
    loop {
        let mut stream = match open().await {
            Ok(s) => s,
            Err(s) if lost_since.is_some() && follow::is_disconnect(&s) => {
                if lost_since.is_some_and(|t| t.elapsed() > follow::RECONNECT_FOR) {
                    return Err(s.into());
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut ctrl_c => return Ok(INTERRUPTED),
                }
            }
            Err(s) => return Err(s.into()),
        };
        if lost_since.take().is_some() {
            anstream::eprintln!("↻ reconnected");
        }
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(Ok(m)) => each(m)?,
                    Some(Err(s)) if follow::is_disconnect(&s) => {
                        anstream::eprintln!("↻ lost the server ({}); reconnecting...", s.message());
                        lost_since = Some(Instant::now());
                        break;
                    }
                    Some(Err(s)) => return Err(s.into()),
                    None => return Ok(0),
                },
                () = &mut ctrl_c => return Ok(INTERRUPTED),
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => {
                    let msg = s.message().replace('\n', " ");
                    anstream::eprintln!("error: {}: {msg}", bm_proto::code_name(s.code()));
                }
                None => anstream::eprintln!("error: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let pal = Palette::color();
    let json = cli.output == Output::Json;
    let mut c = connect(&cli.server).await?;
    match cli.command {
        Command::Import(args) => import(&mut c, args, json, &pal).await,
        Command::List(args) => {
            let phase = args
                .phase
                .map(|p| api_enum(p, "PHASE_", pb::Phase::from_str_name))
                .transpose()?;
            let state = args
                .state
                .map(|s| api_enum(s, "EFFECTIVE_STATE_", pb::EffectiveState::from_str_name))
                .transpose()?;
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let page = c
                    .machines
                    .list_machines(pb::ListMachinesRequest {
                        page_size: args.page_size,
                        page_token: token,
                        phase: phase.map_or(0, |p| p as i32),
                        effective_state: state.map_or(0, |s| s as i32),
                        label_selector: args.selector.clone().unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                all.extend(page.machines);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            show(json, &all, |all| render::machines_table(all, &pal))
        }
        Command::Get { machine } => {
            let m = c
                .machines
                .get_machine(pb::GetMachineRequest {
                    machine_id: machine,
                })
                .await?
                .into_inner();
            show(json, &m, |m| render::machine_detail(m, &pal))
        }
        Command::Update(args) => update(&mut c, args, json, &pal).await,
        Command::Ops(args) => {
            let op_type = args
                .op_type
                .map(|t| api_enum(t, "OPERATION_TYPE_", pb::OperationType::from_str_name))
                .transpose()?;
            let op_phase = args
                .phase
                .map(|p| api_enum(p, "OPERATION_PHASE_", pb::OperationPhase::from_str_name))
                .transpose()?;
            let mut all = Vec::new();
            let mut token = String::new();
            while all.len() < args.limit {
                let page = c
                    .operations
                    .list_operations(pb::ListOperationsRequest {
                        page_size: i32::try_from((args.limit - all.len()).min(1000))
                            .unwrap_or(1000),
                        page_token: token,
                        machine_id: args.machine.clone().unwrap_or_default(),
                        r#type: op_type.map_or(0, |t| t as i32),
                        phase: op_phase.map_or(0, |p| p as i32),
                    })
                    .await?
                    .into_inner();
                all.extend(page.operations);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            show(json, &all, |all| render::operations_table(all, &pal))
        }
        Command::Op { operation } => {
            let o = c
                .operations
                .get_operation(pb::GetOperationRequest {
                    operation_id: operation,
                })
                .await?
                .into_inner();
            show(json, &o, |o| render::operation_detail(o, &pal))
        }
        Command::EnterMaintenance(a) => {
            operation(&mut c, OpType::EnterMaintenance, a, json, &pal).await
        }
        Command::ExitMaintenance(a) => {
            operation(&mut c, OpType::ExitMaintenance, a, json, &pal).await
        }
        Command::Reimage(a) => operation(&mut c, OpType::Reimage, a, json, &pal).await,
        Command::Reboot(a) => operation(&mut c, OpType::Reboot, a, json, &pal).await,
        Command::Rma(a) => operation(&mut c, OpType::Rma, a, json, &pal).await,
        Command::Retire(a) => operation(&mut c, OpType::Retire, a, json, &pal).await,
        Command::Upgrade(a) => operation(&mut c, OpType::Upgrade, a, json, &pal).await,
        Command::NetReconfig(a) => operation(&mut c, OpType::NetReconfig, a, json, &pal).await,
        Command::ClearIntervention(a) => {
            operation(&mut c, OpType::ClearIntervention, a, json, &pal).await
        }
        Command::Readmit(a) => operation(&mut c, OpType::Readmit, a, json, &pal).await,
        Command::Follow { operation } => {
            let started = Instant::now();
            let op = c
                .operations
                .get_operation(pb::GetOperationRequest {
                    operation_id: operation,
                })
                .await?
                .into_inner();
            follow_to_end(&mut c, op, started, render::Ended::BeforeFollow, json, &pal).await
        }
        Command::Cancel { operation } => {
            let o = c
                .operations
                .cancel_operation(pb::CancelOperationRequest {
                    operation_id: operation,
                })
                .await?
                .into_inner();
            show(json, &o, |o| render::operation_detail(o, &pal))
        }
        Command::Watch(args) => {
            let last = std::cell::Cell::new(args.since);
            let (machine_id, operation_id) = (
                args.machine.unwrap_or_default(),
                args.operation.unwrap_or_default(),
            );
            let ops = c.operations.clone();
            let open = || {
                let mut ops = ops.clone();
                let req = pb::WatchOperationsRequest {
                    machine_id: machine_id.clone(),
                    operation_id: operation_id.clone(),
                    after_revision: last.get(),
                };
                async move {
                    ops.watch_operations(req)
                        .await
                        .map(tonic::Response::into_inner)
                }
            };
            drain(open, |batch| {
                for e in batch.events {
                    last.set(Some(e.revision));
                    if json {
                        outln!("{}", serde_json::to_string(&e)?);
                    } else {
                        outln!("{}", render::watch_line(&e, &pal));
                    }
                }
                Ok(())
            })
            .await
        }
        Command::Logs { operation, after } => {
            let last = std::cell::Cell::new(after);
            let ops = c.operations.clone();
            let open = || {
                let mut ops = ops.clone();
                let req = pb::StreamLogsRequest {
                    operation_id: operation.clone(),
                    after_sequence: last.get(),
                };
                async move { ops.stream_logs(req).await.map(tonic::Response::into_inner) }
            };
            drain(open, |batch| {
                for l in batch.lines {
                    last.set(l.sequence);
                    if json {
                        outln!("{}", serde_json::to_string(&l)?);
                    } else {
                        outln!(
                            "{} {}",
                            render::clock(l.time.as_ref()),
                            render::log_line(&l, &pal)
                        );
                    }
                }
                Ok(())
            })
            .await
        }
    }
}

async fn operation(
    c: &mut Clients,
    kind: OpType,
    a: OpArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let started = Instant::now();
    let (machine_id, note) = (a.machine, a.note);
    let request_id = a
        .request_id
        .unwrap_or_else(|| format!("bmctl-{}", ulid::Ulid::generate()));
    let m = &mut c.machines;
    macro_rules! call {
        ($method:ident, $req:ident) => {
            m.$method(pb::$req {
                machine_id,
                request_id,
                note,
            })
            .await?
            .into_inner()
        };
    }
    let op = match kind {
        OpType::EnterMaintenance => call!(enter_maintenance, EnterMaintenanceRequest),
        OpType::ExitMaintenance => call!(exit_maintenance, ExitMaintenanceRequest),
        OpType::Reimage => call!(reimage, ReimageRequest),
        OpType::Reboot => call!(reboot, RebootRequest),
        OpType::Rma => call!(rma, RmaRequest),
        OpType::Retire => call!(retire, RetireRequest),
        OpType::Upgrade => call!(upgrade, UpgradeRequest),
        OpType::NetReconfig => call!(reconfigure_network, ReconfigureNetworkRequest),
        OpType::ClearIntervention => call!(clear_intervention, ClearInterventionRequest),
        OpType::Readmit => call!(readmit, ReadmitRequest),
    };
    if a.no_wait {
        return show(json, &op, |op| render::operation_detail(op, pal));
    }
    follow_to_end(c, op, started, render::Ended::BeforeRequest, json, pal).await
}

/// Follows an operation to its end: live with both streams and the boxes, or (with
/// `-o json`) silently, printing the operation at the end. The exit code says how it ended.
/// `if_ended` is what the final box says of an operation that had already ended.
async fn follow_to_end(
    c: &mut Clients,
    op: pb::Operation,
    started: Instant,
    if_ended: render::Ended,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    if !json {
        return Ok(follow::run(&mut c.operations, op, started, if_ended, pal).await?);
    }
    let done = if follow::is_terminal(op.phase) {
        op
    } else {
        match follow::follow(&mut c.operations, &op, pal, false).await? {
            follow::Followed::Ended(done) => *done,
            follow::Followed::Interrupted => {
                anstream::eprintln!("{}", follow::interrupted_message(&op.id));
                return Ok(INTERRUPTED);
            }
        }
    };
    print_json(&done)?;
    Ok(follow::exit_code(done.phase))
}

/// One row of an import's report.
struct ImportResult {
    /// The line of the inventory file; 0 for generated machines.
    line: usize,
    machine_id: String,
    /// The row's MAC addresses, space-separated.
    mac: String,
    /// CREATED, UNCHANGED or FAILED.
    outcome: String,
    failed: bool,
    /// `CODE: message`, or empty.
    error: String,
}

/// Rows per import request (the server takes up to 10,000).
const IMPORT_BATCH: usize = 1000;

async fn import(
    c: &mut Clients,
    args: ImportArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    // (line, machine) rows; line 0 means generated.
    let (rows, local_errors, source) = match &args.file {
        None => {
            let n = args
                .count
                .expect("clap requires a count (1 to 65535) when there is no file");
            if !json {
                outln!("Importing {n} fake machines...");
            }
            let rows: Vec<inventory::Row> = (1..=n)
                .map(|i| inventory::Row {
                    line: 0,
                    machine: pb::Machine {
                        id: format!("machine-{i}"),
                        spec: Some(pb::MachineSpec {
                            provider: "fake".into(),
                            mac_addresses: vec![format!(
                                "02:00:00:00:{:02x}:{:02x}",
                                i >> 8,
                                i & 0xff
                            )],
                            ssh_endpoint: format!("root@10.0.{}.{}:22", i >> 8, i & 0xff),
                            image: args.image.clone(),
                            target_cluster: args.cluster.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                })
                .collect();
            (rows, Vec::new(), format!("bmctl import {n}"))
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let name = path.to_string_lossy().into_owned();
            let (rows, errors) = inventory::parse(&name, &text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (rows, errors, name)
        }
    };

    let mut report: Vec<ImportResult> = local_errors
        .iter()
        .map(|e| ImportResult {
            line: e.line,
            machine_id: "-".to_owned(),
            mac: "-".to_owned(),
            outcome: "FAILED".to_owned(),
            failed: true,
            error: e.message.clone(),
        })
        .collect();
    let mut failed = local_errors.len();
    let (mut created, mut unchanged) = (0, 0);
    for chunk in rows.chunks(IMPORT_BATCH) {
        let resp = c
            .machines
            .import_machines(pb::ImportMachinesRequest {
                machines: chunk.iter().map(|r| r.machine.clone()).collect(),
                source: source.clone(),
                validate_only: args.dry_run,
            })
            .await?
            .into_inner();
        created += resp.created_count;
        unchanged += resp.unchanged_count;
        failed += resp.failed_count as usize;
        for r in resp.results {
            let row = usize::try_from(r.index).ok().and_then(|i| chunk.get(i));
            let line = row.map_or(0, |r| r.line);
            let mac = row
                .and_then(|r| r.machine.spec.as_ref())
                .map(|s| s.mac_addresses.join(" "))
                .unwrap_or_default();
            let outcome = pb::ImportOutcome::try_from(r.outcome).map_or_else(
                |_| "?".into(),
                |o| {
                    o.as_str_name()
                        .trim_start_matches("IMPORT_OUTCOME_")
                        .to_owned()
                },
            );
            // The server names the row by its index in the batch; the LINE column says where.
            let message = r
                .error_message
                .strip_prefix(&format!("machines[{}].", r.index))
                .or_else(|| {
                    r.error_message
                        .strip_prefix(&format!("machines[{}]", r.index))
                })
                .unwrap_or(&r.error_message);
            let error = if r.error_code.is_empty() {
                String::new()
            } else {
                format!("{}: {message}", r.error_code)
            };
            report.push(ImportResult {
                line,
                machine_id: r.machine_id,
                mac,
                outcome,
                failed: r.outcome == pb::ImportOutcome::Failed as i32,
                error,
            });
        }
    }
    report.sort_by_key(|r| r.line);
    if json {
        let rows: Vec<serde_json::Value> = report
            .iter()
            .map(|r| {
                serde_json::json!({"line": r.line, "machineId": r.machine_id, "macAddresses": r.mac, "outcome": r.outcome, "error": r.error})
            })
            .collect();
        print_json(&serde_json::json!({
            "created": created, "unchanged": unchanged, "failed": failed, "dryRun": args.dry_run, "rows": rows
        }))?;
    } else {
        const SHOWN: usize = 20;
        let from_file = args.file.is_some();
        // Show failures first, then the first rows.
        let mut shown: Vec<&ImportResult> = report.iter().filter(|r| r.failed).collect();
        shown.extend(report.iter().filter(|r| !r.failed));
        let rows: Vec<Vec<String>> = shown
            .iter()
            .take(SHOWN.max(failed))
            .map(|r| {
                let mut row = vec![
                    r.machine_id.clone(),
                    r.mac.clone(),
                    r.outcome.clone(),
                    if r.error.is_empty() {
                        "-".into()
                    } else {
                        r.error.clone()
                    },
                ];
                if from_file {
                    row.insert(0, r.line.to_string());
                }
                row
            })
            .collect();
        let header: &[&str] = if from_file {
            &["LINE", "MACHINE_ID", "MAC", "RESULT", "ERROR"]
        } else {
            &["MACHINE_ID", "MAC", "RESULT", "ERROR"]
        };
        out!("{}", render::table(header, &rows));
        if shown.len() > rows.len() {
            outln!("... and {} more", shown.len() - rows.len());
        }
        let verb = if args.dry_run {
            "Would import"
        } else {
            "Imported"
        };
        let summary =
            format!("{verb}: {created} created, {unchanged} already present, {failed} failed");
        if failed > 0 {
            outln!("{}", render::warn(&summary, pal));
        } else {
            outln!("{summary}");
        }
    }
    Ok(u8::from(failed > 0))
}

async fn update(c: &mut Clients, a: UpdateArgs, json: bool, pal: &Palette) -> anyhow::Result<u8> {
    // Only the fields named are sent, each with its own path (one per label), so that the
    // server applies them to the machine as it is: concurrent updates of other fields and
    // other labels are kept.
    let mut spec = pb::MachineSpec::default();
    let mut paths = Vec::new();
    let mut set = |path: &str, field: &mut String, v: Option<String>| {
        if let Some(v) = v {
            *field = v;
            paths.push(path.to_owned());
        }
    };
    set("spec.image", &mut spec.image, a.image);
    set("spec.target_cluster", &mut spec.target_cluster, a.cluster);
    set("spec.ssh_endpoint", &mut spec.ssh_endpoint, a.ssh);
    set("spec.bmc_endpoint", &mut spec.bmc_endpoint, a.bmc);
    set("spec.provider", &mut spec.provider, a.provider);
    if let Some(file) = &a.network_config {
        spec.network_config = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
                .context("reading the network config from standard input")?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        paths.push("spec.network_config".into());
    }
    if !a.macs.is_empty() {
        spec.mac_addresses = a.macs;
        paths.push("spec.mac_addresses".into());
    }
    let mut labels = std::collections::HashMap::new();
    for (k, v) in a.labels {
        paths.push(format!("labels.{k}"));
        labels.insert(k, v);
    }
    for k in a.remove_labels {
        paths.push(format!("labels.{k}"));
    }
    if paths.is_empty() {
        bail!(
            "nothing to change: give --image, --cluster, --ssh, --bmc, --provider, --mac, --network-config, --label or --remove-label"
        );
    }
    let m = c
        .machines
        .update_machine(pb::UpdateMachineRequest {
            machine: Some(pb::Machine {
                id: a.machine,
                spec: Some(spec),
                labels,
                ..Default::default()
            }),
            update_mask: Some(FieldMask { paths }),
        })
        .await?
        .into_inner();
    show(json, &m, |m| render::machine_detail(m, pal))
}

#[cfg(test)]
mod tests {
    use super::*;

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
