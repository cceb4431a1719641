//! `bm-bench`: the benchmark client. It starts a real `bm-server` (instant fake hardware,
//! SQLite on disk) and a bare tonic echo server, drives them through their public gRPC APIs
//! from this separate process, checks the invariants each scenario relies on, and prints one
//! Markdown table of figures, each next to the limit it is measured against.
//!
//! `cargo xtask bench` builds everything in release mode and runs it; `--quick` runs small
//! sizes (CI runs it to catch a broken invariant; timings are never asserted).
//! `--store postgres` adds the fleet on PostgreSQL, with one replica and with three.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark prints its results"
)]

mod control;
mod echo;
mod otlp;
mod pg;
mod poll;
mod procs;
mod stats;
mod wal;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;

use control::{Clients, Kind};
use stats::{Row, fmt_count, fmt_duration};

#[derive(Parser, Debug)]
#[command(
    name = "bm-bench",
    about = "Benchmarks of the control plane through its public API"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the benchmarks.
    Run(RunArgs),
    /// Serve the echo baseline (used by `run`).
    EchoServer,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The bm-server binary to benchmark.
    #[arg(long)]
    server_bin: PathBuf,
    /// Where the server keeps its data (on the disk under test, not tmpfs).
    #[arg(long, default_value = "target/bm-bench")]
    work_dir: PathBuf,
    /// Small sizes: checks the invariants quickly; the figures mean little.
    #[arg(long)]
    quick: bool,
    /// Only this scenario.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// `postgres`: the fleet scenario also runs on a durable throwaway PostgreSQL, with one
    /// bm-server and with three sharing the database, beside SQLite, with the database's own
    /// single-row commit rate as their limit.
    #[arg(long, value_enum, default_value_t = StoreArg::Sqlite)]
    store: StoreArg,
    /// The server under test runs with `--metrics-listen` and is scraped every second, as
    /// Prometheus would: compare with a run without it for the cost of metrics.
    #[arg(long)]
    metrics: bool,
    /// The server under test exports its traces (`--otlp-endpoint`, every trace sampled) to
    /// an OTLP receiver in this process that counts the spans: compare with a run without
    /// it for the cost of tracing.
    #[arg(long)]
    traces: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreArg {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Baseline,
    Fleet,
    Api,
    Watch,
    Memory,
    /// The status poll over `memory_machines` machines, in this process.
    Poll,
    /// A rollout reimaging the fleet (max in flight 1,000), after the plain fleet run
    /// (which it includes) on the same server.
    Rollout,
}

struct Sizes {
    fleet: u32,
    client_in_flight: usize,
    get_calls: usize,
    run_for: Duration,
    watchers: usize,
    fan_out_machines: u32,
    memory_machines: u32,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                fleet: 300,
                client_in_flight: 64,
                get_calls: 300,
                run_for: Duration::from_millis(500),
                watchers: 20,
                fan_out_machines: 30,
                memory_machines: 2_000,
            }
        } else {
            Sizes {
                fleet: 10_000,
                client_in_flight: 512,
                get_calls: 5_000,
                run_for: Duration::from_secs(3),
                watchers: 1_000,
                fan_out_machines: 1_000,
                memory_machines: 100_000,
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::EchoServer => runtime.block_on(echo::serve()),
        Cmd::Run(args) => runtime.block_on(run(args)),
    }
}

fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{cores} cores ({model}), {mem_gib:.0} GiB")
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let sizes = Sizes::new(args.quick);
    // The rollout's overhead is against the plain fleet run: that one runs first.
    let want = |s: Scenario| {
        args.scenario == Scenario::All
            || args.scenario == s
            || (s == Scenario::Fleet && args.scenario == Scenario::Rollout)
    };
    std::fs::create_dir_all(&args.work_dir)?;
    let work = std::fs::canonicalize(&args.work_dir)?.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut rows: Vec<Row> = Vec::new();

    // 1. Baselines: the limits of this machine's loopback gRPC and disk.
    let echo = if want(Scenario::Baseline) || want(Scenario::Api) {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("echo-server");
        let server = procs::Proc::start(cmd, "echo listening on")?;
        let channel = connect(&server.addr).await?;
        let seq = echo::sequential(channel.clone(), sizes.get_calls).await?;
        let tput = echo::throughput(channel, 64, sizes.run_for).await?;
        server.stop(Duration::from_secs(5));
        rows.push(Row::new(
            "baseline",
            "echo: sequential p50 / p99",
            format!("{} / {}", fmt_duration(seq.p50), fmt_duration(seq.p99)),
        ));
        rows.push(Row::new(
            "baseline",
            "echo: calls/s, 64 in flight",
            fmt_count(tput),
        ));
        Some((seq, tput))
    } else {
        None
    };
    let fsync = procs::fsync_rate(
        &work,
        if args.quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        },
    )?;
    rows.push(Row::new(
        "baseline",
        "disk: 100-byte appends + fdatasync /s",
        fmt_count(fsync),
    ));

    // The control plane.
    let needs_server = [
        Scenario::Fleet,
        Scenario::Rollout,
        Scenario::Api,
        Scenario::Watch,
        Scenario::Memory,
    ]
    .iter()
    .any(|s| want(*s));
    if needs_server {
        let metrics_addr = if args.metrics {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            Some(l.local_addr()?)
        } else {
            None
        };
        let mut flags: Vec<String> = LIFTED.iter().map(|f| (*f).to_owned()).collect();
        if let Some(addr) = metrics_addr {
            flags.extend(["--metrics-listen".to_owned(), addr.to_string()]);
        }
        let collector = if args.traces {
            let (endpoint, spans) = otlp::receive().await?;
            flags.extend(["--otlp-endpoint".to_owned(), endpoint]);
            Some(spans)
        } else {
            None
        };
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let server = start_server(
            &args.server_bin,
            &work,
            // One anonymous principal makes every call: the limits per principal against
            // abuse (docs/security.md) would measure themselves, so they are lifted.
            &flags,
        )?;
        let scraper = metrics_addr.map(scrape_every_second);
        let pid = server.pid();
        let endpoint = format!("http://{}", server.addr);
        let mut c = Clients::new(connect(&server.addr).await?);
        let mut registered = 0u32;
        let mut in_maintenance = 0u32;
        let mut fleet_rate: Option<f64> = None;
        let mut memory_at = None;

        // 2. The fleet: import, maintenance, reimage everything at once.
        if want(Scenario::Fleet) {
            let n = sizes.fleet;
            let took = control::import(&mut c, 0, n).await?;
            registered = n;
            rows.push(
                Row::new(
                    "fleet",
                    format!("import {} machines", fmt_count(f64::from(n))),
                    fmt_duration(took),
                )
                .vs(format!(
                    "{} machines/s",
                    fmt_count(f64::from(n) / took.as_secs_f64())
                )),
            );
            let wal = wal::WalWatch::start(&work.join("data"));
            let enter = control::run_phase(
                std::slice::from_ref(&c),
                &[pid],
                n,
                Kind::EnterMaintenance,
                sizes.client_in_flight,
                "enter",
            )
            .await?;
            in_maintenance = n;
            rows.push(
                Row::new(
                    "fleet",
                    format!("enter maintenance x {}", fmt_count(f64::from(n))),
                    fmt_duration(enter.wall),
                )
                .vs(format!(
                    "{} ops/s",
                    fmt_count(f64::from(n) / enter.wall.as_secs_f64())
                )),
            );
            let re = control::run_phase(
                std::slice::from_ref(&c),
                &[pid],
                n,
                Kind::Reimage,
                sizes.client_in_flight,
                "reimage",
            )
            .await?;
            control::check_fleet(&mut c, n)
                .await
                .context("after the fleet reimage")?;
            let ops = f64::from(n) / re.wall.as_secs_f64();
            fleet_rate = Some(ops);
            rows.push(
                Row::new(
                    "fleet",
                    format!("reimage x {}, end to end", fmt_count(f64::from(n))),
                    fmt_duration(re.wall),
                )
                .target("≤ 5 s for 10,000"),
            );
            rows.push(
                Row::new("fleet", "reimages/s", fmt_count(ops))
                    .vs(format!("{:.0}x Ironic's 8 nodes/s", ops / 8.0))
                    .target("≥ 2,000"),
            );
            rows.push(Row::new(
                "fleet",
                "reimage latency p50 / p99 (admission to SUCCEEDED)",
                format!(
                    "{} / {}",
                    fmt_duration(re.latency.p50),
                    fmt_duration(re.latency.p99)
                ),
            ));
            let changes = re.events as f64 / re.wall.as_secs_f64();
            rows.push(
                Row::new(
                    "fleet",
                    format!(
                        "durable state changes/s ({} events, {:.1} per reimage)",
                        fmt_count(re.events as f64),
                        re.events as f64 / f64::from(n)
                    ),
                    fmt_count(changes),
                )
                .vs(format!("{:.1}x the disk's fsync rate", changes / fsync))
                .target("≥ 25x"),
            );
            let (_, peak) = procs::rss(pid)?;
            rows.push(
                Row::new(
                    "fleet",
                    "server CPU time during the reimages",
                    format!("{:.2} s", re.cpu.as_secs_f64()),
                )
                .vs(format!(
                    "{:.2} cores busy",
                    re.cpu.as_secs_f64() / re.wall.as_secs_f64()
                )),
            );
            rows.push(Row::new(
                "fleet",
                "server peak RSS",
                format!("{:.1} MiB", peak as f64 / 1048576.0),
            ));
            let wal_peak = wal.stop().await;
            rows.push(
                Row::new(
                    "fleet",
                    "SQLite WAL peak during maintenance + reimage",
                    fmt_mib(wal_peak),
                )
                .target("≤ 128 MiB (docs/operations.md)"),
            );
            // The server empties the log once nothing was written for two seconds.
            tokio::time::sleep(Duration::from_secs(3)).await;
            rows.push(Row::new(
                "fleet",
                "SQLite WAL 3 s after the run",
                fmt_mib(wal::size_in(&work.join("data"))),
            ));
            println!("fleet: done ({n} reimages in {})", fmt_duration(re.wall));
            rss_after(&mut rows, pid, "the fleet run")?;
            if let Some(spans) = &collector {
                rows.push(Row::new(
                    "fleet",
                    "with --otlp-endpoint, spans received",
                    fmt_count(spans.load(std::sync::atomic::Ordering::Relaxed) as f64),
                ));
            }
            if let Some((scrapes, bytes, _)) = &scraper {
                use std::sync::atomic::Ordering;
                rows.push(Row::new(
                    "fleet",
                    "with --metrics-listen, scraped every second",
                    format!(
                        "{} scrapes, {:.1} KiB each",
                        scrapes.load(Ordering::Relaxed),
                        bytes.load(Ordering::Relaxed) as f64 / 1024.0
                    ),
                ));
            }
        }

        // 2b. The same reimage of the fleet as one rollout.
        if want(Scenario::Rollout) {
            let n = sizes.fleet;
            let have = (&mut registered, &mut in_maintenance);
            control::in_maintenance(&mut c, pid, n, have, sizes.client_in_flight).await?;
            let r = control::rollout(&server.addr, pid, n).await?;
            let rate = f64::from(n) / r.wall.as_secs_f64();
            rows.push(
                Row::new(
                    "rollout",
                    format!(
                        "reimage x {} as one rollout, max in flight 1,000",
                        fmt_count(f64::from(n))
                    ),
                    fmt_duration(r.wall),
                )
                .vs(format!("{} reimages/s", fmt_count(rate))),
            );
            if let Some(fleet) = fleet_rate {
                rows.push(Row::new(
                    "rollout",
                    "throughput vs the plain fleet run (512 reimages in flight from the client)",
                    format!("{:+.1}%", (rate / fleet - 1.0) * 100.0),
                ));
            }
            rows.push(
                Row::new(
                    "rollout",
                    "server CPU time during the rollout",
                    format!("{:.2} s", r.cpu.as_secs_f64()),
                )
                .vs(format!(
                    "{:.2} ms per machine",
                    r.cpu.as_secs_f64() * 1000.0 / f64::from(n)
                )),
            );
            println!("rollout: done ({n} reimages in {})", fmt_duration(r.wall));
        }

        // 3. The API under load.
        if want(Scenario::Api) {
            if registered < sizes.fleet {
                control::import(&mut c, registered, sizes.fleet).await?;
                registered = sizes.fleet;
            }
            let seq = control::get_sequential(&mut c, registered, sizes.get_calls).await?;
            let tput = control::get_throughput(&c, registered, 64, sizes.run_for).await?;
            let (echo_seq, echo_tput) = echo.context("the API scenario needs the echo baseline")?;
            rows.push(
                Row::new(
                    "api",
                    format!(
                        "GetMachine sequential p50 / p99 ({} machines)",
                        fmt_count(f64::from(registered))
                    ),
                    format!("{} / {}", fmt_duration(seq.p50), fmt_duration(seq.p99)),
                )
                .vs(format!(
                    "p99 {:.2}x echo's",
                    seq.p99.as_secs_f64() / echo_seq.p99.as_secs_f64()
                ))
                .target("p99 ≤ 3x echo's"),
            );
            rows.push(
                Row::new("api", "GetMachine calls/s, 64 in flight", fmt_count(tput))
                    .vs(format!("{:.0}% of echo's", 100.0 * tput / echo_tput))
                    .target("≥ 50% of echo's"),
            );
            println!("api: done");
        }

        // 4. Watch fan-out during a fleet run.
        if want(Scenario::Watch) {
            let n = sizes.fan_out_machines;
            let have = (&mut registered, &mut in_maintenance);
            control::in_maintenance(&mut c, pid, n, have, sizes.client_in_flight).await?;
            let f = control::fan_out(&endpoint, &mut c, pid, sizes.watchers, n).await?;
            rows.push(
                Row::new(
                    "watch",
                    format!(
                        "{} watchers during {} reimages",
                        fmt_count(f.watchers as f64),
                        fmt_count(f64::from(n))
                    ),
                    format!(
                        "each got all {} events in order, 0 lost",
                        fmt_count(f.events_each as f64)
                    ),
                )
                .vs(format!(
                    "{} deliveries in {}",
                    fmt_count((f.watchers * f.events_each) as f64),
                    fmt_duration(f.wall)
                ))
                .target("0 lost"),
            );
            rows.push(Row::new(
                "watch",
                "delivery latency p50 / p99 (commit to client)",
                format!(
                    "{} / {}",
                    fmt_duration(f.delivery.p50),
                    fmt_duration(f.delivery.p99)
                ),
            ));
            println!("watch: done");
            rss_after(&mut rows, pid, "the fan-out")?;
        }

        // 5. Memory, and listing a big inventory.
        if want(Scenario::Memory) {
            let total = sizes.memory_machines;
            if registered < total {
                let took = control::import(&mut c, registered, total).await?;
                rows.push(
                    Row::new(
                        "memory",
                        format!(
                            "import {} more machines",
                            fmt_count(f64::from(total - registered))
                        ),
                        fmt_duration(took),
                    )
                    .vs(format!(
                        "{} machines/s",
                        fmt_count(f64::from(total - registered) / took.as_secs_f64())
                    )),
                );
                registered = total;
            }
            let (took, count) = control::list_all(&mut c, 500).await?;
            ensure!(
                count == registered as usize,
                "listed {count} of {registered} machines"
            );
            rows.push(
                Row::new(
                    "api",
                    format!(
                        "ListMachines over {} machines, 500 per page",
                        fmt_count(count as f64)
                    ),
                    fmt_duration(took),
                )
                .vs(format!(
                    "{} machines/s",
                    fmt_count(count as f64 / took.as_secs_f64())
                )),
            );
            let (rss, _) = procs::rss(pid)?;
            let per = rss as f64 / f64::from(registered);
            rows.push(
                Row::new(
                    "memory",
                    format!(
                        "server RSS with {} machines, after the load scenarios",
                        fmt_count(f64::from(registered))
                    ),
                    format!("{:.1} MiB", rss as f64 / 1048576.0),
                )
                .vs(format!("{:.2} KiB per machine", per / 1024.0)),
            );
            memory_at = Some(registered);
            println!("memory: done");
        }
        if let Some((_, _, task)) = &scraper {
            task.abort();
        }
        ensure!(
            server.stop(Duration::from_secs(15)),
            "bm-server did not shut down cleanly (log: {})",
            work.join("server.log").display()
        );

        // What holding the machines costs, without what the load scenarios left in the
        // heap: a server restarted on the same store, after it listed every machine.
        if let Some(registered) = memory_at {
            let server = start_server(&args.server_bin, &work, &[])?;
            let mut c = Clients::new(connect(&server.addr).await?);
            let (_, count) = control::list_all(&mut c, 500).await?;
            ensure!(
                count == registered as usize,
                "the restarted server lists {count} of {registered} machines"
            );
            let (rss, _) = procs::rss(server.pid())?;
            let per = rss as f64 / f64::from(registered);
            rows.push(
                Row::new(
                    "memory",
                    format!(
                        "server RSS with {} machines, restarted, after listing them",
                        fmt_count(f64::from(registered))
                    ),
                    format!("{:.1} MiB", rss as f64 / 1048576.0),
                )
                .vs(format!("{:.2} KiB per machine", per / 1024.0))
                .target("≤ 2 KiB per machine"),
            );
            ensure!(
                server.stop(Duration::from_secs(15)),
                "the restarted bm-server did not shut down cleanly"
            );
        }
    }

    // 6. The status poll (power and health sync) over the big fleet.
    if want(Scenario::Poll) {
        poll::run(&work, sizes.memory_machines, &mut rows).await?;
        println!("poll: done");
    }

    if args.store == StoreArg::Postgres && want(Scenario::Fleet) {
        postgres_fleet(&args, &sizes, &work, &mut rows).await?;
    }

    println!(
        "\nbm-bench {} on {}, {}\n",
        if args.quick { "--quick" } else { "(full)" },
        machine_description(),
        chrono_now()
    );
    println!("{}", stats::table(&rows));
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The server flags that lift the limits per principal against abuse (docs/security.md):
/// one anonymous principal makes every call, so they would measure themselves.
const LIFTED: [&str; 8] = [
    "--max-concurrent-operations",
    "4096",
    "--op-rate-per-principal",
    "1000000000",
    "--op-burst-per-principal",
    "1000000000",
    "--max-streams-per-principal",
    "1000000",
];

/// The fleet on a durable throwaway PostgreSQL, on a fresh database each time: with one
/// bm-server, then with three sharing the database (requests round robin over them), each
/// measured against the database's own single-row commit rate.
async fn postgres_fleet(
    args: &RunArgs,
    sizes: &Sizes,
    work: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let cluster = bm_pg_cluster::Cluster::start_with(&bm_pg_cluster::Options {
        durable: true,
        ..bm_pg_cluster::Options::default()
    })
    .context("starting a durable throwaway PostgreSQL")?;
    let commits = pg::commit_rate(
        &cluster,
        if args.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        },
    )?;
    rows.push(Row::new(
        "fleet-pg",
        "PostgreSQL: single-row durable commits/s, 1 client (pgbench)",
        fmt_count(commits),
    ));
    let n = sizes.fleet;
    let mut one_replica = None;
    for replicas in [1usize, 3] {
        let label = if replicas == 1 {
            "1 replica".to_owned()
        } else {
            format!("{replicas} replicas")
        };
        let url = cluster.create_database()?;
        let mut servers = Vec::with_capacity(replicas);
        for r in 0..replicas {
            let dir = work.join(format!("pg{replicas}-{r}"));
            std::fs::create_dir_all(&dir)?;
            let mut flags = vec!["--store", url.as_str()];
            flags.extend(LIFTED);
            servers.push((start_server(&args.server_bin, &dir, &flags)?, dir));
        }
        let pids: Vec<u32> = servers.iter().map(|(s, _)| s.pid()).collect();
        let mut clients = Vec::with_capacity(replicas);
        for (s, _) in &servers {
            clients.push(Clients::new(connect(&s.addr).await?));
        }
        let took = control::import(&mut clients[0], 0, n).await?;
        rows.push(
            Row::new(
                "fleet-pg",
                format!("{label}: import {} machines", fmt_count(f64::from(n))),
                fmt_duration(took),
            )
            .vs(format!(
                "{} machines/s",
                fmt_count(f64::from(n) / took.as_secs_f64())
            )),
        );
        let enter = control::run_phase(
            &clients,
            &pids,
            n,
            Kind::EnterMaintenance,
            sizes.client_in_flight,
            "enter",
        )
        .await?;
        rows.push(
            Row::new(
                "fleet-pg",
                format!("{label}: enter maintenance x {}", fmt_count(f64::from(n))),
                fmt_duration(enter.wall),
            )
            .vs(format!(
                "{} ops/s",
                fmt_count(f64::from(n) / enter.wall.as_secs_f64())
            )),
        );
        let pg_cpu0 = pg::cpu(&cluster)?;
        let syncs0 = pg::wal_syncs(&cluster)?;
        let re = control::run_phase(
            &clients,
            &pids,
            n,
            Kind::Reimage,
            sizes.client_in_flight,
            "reimage",
        )
        .await?;
        let pg_cpu = pg::cpu(&cluster)?.saturating_sub(pg_cpu0);
        let syncs = pg::wal_syncs(&cluster)?.saturating_sub(syncs0);
        control::check_fleet(&mut clients[0], n)
            .await
            .with_context(|| format!("after the fleet reimage on PostgreSQL, {label}"))?;
        let ops = f64::from(n) / re.wall.as_secs_f64();
        rows.push(Row::new(
            "fleet-pg",
            format!("{label}: reimage x {}, end to end", fmt_count(f64::from(n))),
            fmt_duration(re.wall),
        ));
        let row = Row::new("fleet-pg", format!("{label}: reimages/s"), fmt_count(ops))
            .vs(format!("{:.1}x the single-row commit rate", ops / commits));
        rows.push(match one_replica {
            None => row.target("≥ 1,000"),
            Some(one) => row
                .vs(format!(
                    "{:.2}x one replica's; {:.1}x the single-row commit rate",
                    ops / one,
                    ops / commits
                ))
                .target("≥ one replica's"),
        });
        rows.push(Row::new(
            "fleet-pg",
            format!("{label}: reimage latency p50 / p99"),
            format!(
                "{} / {}",
                fmt_duration(re.latency.p50),
                fmt_duration(re.latency.p99)
            ),
        ));
        let changes = re.events as f64 / re.wall.as_secs_f64();
        rows.push(
            Row::new(
                "fleet-pg",
                format!(
                    "{label}: durable state changes/s ({} events)",
                    fmt_count(re.events as f64)
                ),
                fmt_count(changes),
            )
            .vs(format!(
                "{:.1}x the single-row commit rate",
                changes / commits
            )),
        );
        rows.push(
            Row::new(
                "fleet-pg",
                format!("{label}: WAL flushes (durable commits) during the reimages"),
                fmt_count(syncs as f64),
            )
            .vs(format!(
                "{:.0} per 1,000 reimages; {} /s",
                syncs as f64 * 1000.0 / f64::from(n),
                fmt_count(syncs as f64 / re.wall.as_secs_f64())
            )),
        );
        // CPU seconds per 1,000 reimages: what a reader multiplies to size real hosts.
        let thousands = f64::from(n) / 1000.0;
        let each: Vec<String> = re
            .cpu_each
            .iter()
            .map(|c| format!("{:.2}", c.as_secs_f64() / thousands))
            .collect();
        rows.push(
            Row::new(
                "fleet-pg",
                format!("{label}: bm-server CPU s per 1,000 reimages, all (each replica)"),
                format!(
                    "{:.2} s ({})",
                    re.cpu.as_secs_f64() / thousands,
                    each.join(" / ")
                ),
            )
            .vs(format!(
                "{:.2} cores busy",
                re.cpu.as_secs_f64() / re.wall.as_secs_f64()
            )),
        );
        rows.push(
            Row::new(
                "fleet-pg",
                format!("{label}: PostgreSQL CPU s per 1,000 reimages"),
                format!("{:.2} s", pg_cpu.as_secs_f64() / thousands),
            )
            .vs(format!(
                "{:.2} cores busy",
                pg_cpu.as_secs_f64() / re.wall.as_secs_f64()
            )),
        );
        println!(
            "fleet on PostgreSQL, {label}: done ({n} reimages in {})",
            fmt_duration(re.wall)
        );
        for (server, dir) in servers {
            ensure!(
                server.stop(Duration::from_secs(15)),
                "a bm-server on PostgreSQL did not shut down cleanly (log: {})",
                dir.join("server.log").display()
            );
        }
        one_replica.get_or_insert(ops);
    }
    Ok(())
}

/// Scrapes `http://addr/metrics` every second, as Prometheus would, counting the scrapes
/// answered and the size of the last one, until the task is aborted.
fn scrape_every_second(
    addr: std::net::SocketAddr,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (s, b) = (scrapes.clone(), bytes.clone());
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Ok(mut conn) = tokio::net::TcpStream::connect(addr).await else {
                continue;
            };
            let request = "GET /metrics HTTP/1.0\r\nHost: bench\r\nAccept: application/openmetrics-text\r\n\r\n";
            if conn.write_all(request.as_bytes()).await.is_err() {
                continue;
            }
            let mut body = Vec::new();
            if conn.read_to_end(&mut body).await.is_ok() && body.starts_with(b"HTTP/1.0 200") {
                s.fetch_add(1, Ordering::Relaxed);
                b.store(body.len() as u64, Ordering::Relaxed);
            }
        }
    });
    (scrapes, bytes, task)
}

/// Starts the server under test on `work/data` (instant fake hardware), its log appended to
/// `work/server.log`.
fn start_server(
    bin: &std::path::Path,
    work: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<procs::Proc> {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(work.join("server.log"))?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--fake-timing",
        "instant",
        "--log-level",
        "warn",
        // The benchmark measures the API and the engine; with a token, every call costs a
        // header, a BLAKE2 digest and a cache lookup more (docs/security.md).
        "--insecure",
        // The status poll is measured on its own (scenario poll).
        "--status-poll-interval",
        "0",
    ])
    .args(extra)
    .arg("--data-dir")
    .arg(work.join("data"))
    .env("NO_COLOR", "1")
    .stderr(log);
    procs::Proc::start(cmd, "bm-server listening on")
}

/// Bytes as MiB with one decimal.
fn fmt_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// A row with the server's resident memory after a scenario.
fn rss_after(rows: &mut Vec<Row>, pid: u32, what: &str) -> anyhow::Result<()> {
    let (rss, _) = procs::rss(pid)?;
    rows.push(Row::new(
        "memory",
        format!("server RSS after {what}"),
        format!("{:.1} MiB", rss as f64 / 1048576.0),
    ));
    Ok(())
}

/// The date, from `date -u` (no date crate needed for one line).
fn chrono_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(String::new, |s| s.trim().to_owned())
}
