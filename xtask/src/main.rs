//! `cargo xtask`: the project's tasks, in Rust so they run wherever cargo does.
//!
//! - `demo [--slow] [--store postgres]`: plays spec 000's presenter script against a fresh
//!   server (on SQLite, or on a throwaway local PostgreSQL that it starts and stops).
//! - `bench [--quick] [--scenario NAME] [--store postgres]`: builds in release mode and runs
//!   `bm-bench`.
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
  bench [--quick] [--scenario all|baseline|fleet|api|watch|memory|poll] [--store postgres] [--metrics] [--traces]
        build in release mode, run the benchmarks against a real server, print one table;
        --store postgres adds the fleet on a throwaway PostgreSQL, 1 and 3 replicas;
        --metrics runs the server with --metrics-listen, scraped every second;
        --traces with --otlp-endpoint, exporting every trace to a receiver in bm-bench
  test [ARGS]
        install the system packages the tests need (openssh-server, python3-venv,
        postgresql) when missing, then run cargo test --workspace ARGS
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
