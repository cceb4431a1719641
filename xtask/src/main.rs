//! `cargo xtask`: the project's tasks, in Rust so they run wherever cargo does.
//!
//! - `demo [--slow]`: plays spec 000's presenter script against a fresh server.
//! - `ci`: runs `.ci/run` (formatting, lints, docs, the tests).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a task runner prints"
)]

mod demo;
mod proc;

use anyhow::bail;

fn usage() -> &'static str {
    "usage: cargo xtask <task>

tasks:
  demo [--slow] [--fake-timing normal|slow|instant]
        play spec 000's presenter script (steps 3-10) against a fresh server
  ci    formatting, lints, docs and tests, as .ci/run does"
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
        "ci" => ci(),
        "-h" | "--help" | "help" => {
            println!("{}", usage());
            Ok(())
        }
        other => bail!("unknown task {other:?}\n\n{}", usage()),
    }
}

/// Runs `.ci/run`, the one definition of what CI checks.
fn ci() -> anyhow::Result<()> {
    let status = std::process::Command::new(proc::root().join(".ci/run")).status()?;
    if !status.success() {
        bail!(".ci/run failed");
    }
    Ok(())
}
