//! `cargo xtask`: the project's tasks, in Rust so they run wherever cargo does.
//!
//! - `demo [--slow] [--store postgres]`: plays spec 000's presenter script against a fresh
//!   server (on SQLite, or on a throwaway local PostgreSQL that it starts and stops).
//! - `bench [--quick] [--scenario NAME] [--store postgres]`: builds in release mode and runs
//!   `bm-bench`; `--scenario dashboard` runs the web dashboard's benchmark in chromium
//!   instead (`crates/bm-server/tests/dashboard/bench.mjs`).
//! - `test [ARGS]`: installs the system packages the tests need, then `cargo test --workspace
//!   ARGS`.
//! - `lab netboot | up | status | reimage | down | test`: a QEMU VM network-boots the deploy
//!   environment through the boot service; the virtual datacenter (libvirt VMs behind
//!   sushy-tools, bm-server with the Redfish provider) and a real reimage in it (`lab/`).
//! - `ci`: runs `.ci/run` (formatting, lints, docs, the tests).
//! - `man OUTDIR`: writes bmctl's man pages into a directory.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a task runner prints"
)]

mod demo;
mod lab;
mod proc;
mod test;

use anyhow::bail;

fn usage() -> &'static str {
    "usage: cargo xtask <task>

tasks:
  demo [--slow] [--fake-timing normal|slow|instant] [--store sqlite|postgres]
        play spec 000's presenter script (steps 3-10) against a fresh server; with
        --store postgres, on a local PostgreSQL that it starts and stops itself
  bench [--quick] [--scenario all|baseline|fleet|rollout|api|watch|memory|poll] [--store postgres] [--metrics] [--traces]
        build in release mode, run the benchmarks against a real server, print one table;
        --store postgres adds the fleet on a throwaway PostgreSQL, 1 and 3 replicas;
        --metrics runs the server with --metrics-listen, scraped every second;
        --traces with --otlp-endpoint, exporting every trace to a receiver in bm-bench
  bench --scenario dashboard [--machines N]
        the web dashboard in headless chromium with 10,000 machines (or N): load, scroll,
        and a burst of operations it follows live (installs chromium and playwright-core)
  test [ARGS]
        install the system packages the tests need (openssh-server, python3-venv,
        postgresql, chromium, nodejs, npm) and playwright-core when missing, then run
        cargo test --workspace ARGS
  lab netboot
        a QEMU VM (software emulation, user-mode network) network-boots through the boot
        service into the deploy environment built here, during a reimage (docs/netboot.md)
  lab up [--vms N] | status | reimage [VM] [--image NAME] | down | test
        the virtual datacenter (root): libvirt VMs behind the sushy-tools Redfish BMC,
        bm-server with the Redfish provider; a real reimage of a VM; test = up, a reimage
        that must succeed, one that must fail, down (docs/lab.md). Installs what is missing
  ci    formatting, lints, docs and tests, as .ci/run does
  man OUTDIR
        write bmctl's man pages (bmctl.1 and one per command) into OUTDIR"
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((task, rest)) = args.split_first() else {
        println!("{}", usage());
        return Ok(());
    };
    match task.as_str() {
        "demo" => {
            let code = demo::run(rest)?;
            std::process::exit(code);
        }
        "bench" => bench(rest),
        "lab" => lab::run(rest),
        "test" => test::run(rest),
        "ci" => ci(),
        "man" => man(rest),
        "-h" | "--help" | "help" => {
            println!("{}", usage());
            Ok(())
        }
        other => bail!("unknown task {other:?}\n\n{}", usage()),
    }
}

/// Builds the server and the benchmark client in release mode and runs the benchmarks.
fn bench(args: &[String]) -> anyhow::Result<()> {
    if args
        .windows(2)
        .any(|w| w[0] == "--scenario" && w[1] == "dashboard")
    {
        return bench_dashboard(args);
    }
    println!("Building bm-server and bm-bench in release mode...");
    let bin = proc::build(&["bm-server", "bm-bench"], true)?;
    let status = std::process::Command::new(bin.join("bm-bench"))
        .arg("run")
        .arg("--server-bin")
        .arg(bin.join("bm-server"))
        .arg("--work-dir")
        .arg(proc::target_dir().join("bm-bench"))
        .args(args)
        .status()?;
    if !status.success() {
        bail!("the benchmark failed");
    }
    Ok(())
}

/// The dashboard's benchmark: a release bm-server, the fleet page in chromium.
fn bench_dashboard(args: &[String]) -> anyhow::Result<()> {
    let mut machines = "10000".to_owned();
    let mut rest = args.iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--scenario" => {
                rest.next();
            }
            "--machines" => match rest.next() {
                Some(n) if n.parse::<u32>().is_ok_and(|n| n > 0) => machines.clone_from(n),
                _ => bail!("--machines takes a number of machines above 0"),
            },
            other => bail!("bench --scenario dashboard takes only --machines N, not {other:?}"),
        }
    }
    test::browser_tools()?;
    println!("Building bm-server in release mode...");
    let bin = proc::build(&["bm-server"], true)?;
    let status = std::process::Command::new("node")
        .arg("bench.mjs")
        .current_dir(test::dashboard_dir())
        .env("BM_SERVER_BIN", bin.join("bm-server"))
        .env("BM_BENCH_MACHINES", machines)
        .status()?;
    if !status.success() {
        bail!("the dashboard's benchmark failed");
    }
    Ok(())
}

/// Runs `.ci/run`, the one definition of what CI checks.
fn ci() -> anyhow::Result<()> {
    let status = std::process::Command::new(proc::root().join(".ci/run")).status()?;
    if !status.success() {
        bail!(".ci/run failed");
    }
    Ok(())
}

/// Builds bmctl and has it write its man pages (`bmctl man --dir OUTDIR`): the pages come
/// from its clap definitions, so xtask needs neither clap nor clap_mangen.
fn man(args: &[String]) -> anyhow::Result<()> {
    let [out_dir] = args else {
        bail!("usage: cargo xtask man OUTDIR");
    };
    let bin = proc::build(&["bm-cli"], false)?;
    let status = std::process::Command::new(bin.join("bmctl"))
        .args(["man", "--dir", out_dir])
        .status()?;
    if !status.success() {
        bail!("bmctl man failed");
    }
    Ok(())
}
