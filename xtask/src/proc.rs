//! Child processes: cargo, the project's binaries, and a line-by-line echo of their output.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// The cargo that runs this task.
pub(crate) fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The workspace root (the parent of `xtask/`).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Builds the binaries of `packages` and returns the directory they are in.
pub(crate) fn build(packages: &[&str], release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root()).args(["build", "--quiet", "--bins"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building {} failed", packages.join(", "));
    }
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root, where cargo
/// runs) or `target/`.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |d| root().join(d))
}

/// Sends SIGTERM to a process.
pub(crate) fn terminate(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// The result of a command whose output was echoed.
pub(crate) struct Run {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `cmd`, echoing its stdout and stderr line by line as they come, and returns what it
/// printed. `on_line` sees each stdout line (without colour codes) and may act on it.
pub(crate) fn run_echo(mut cmd: Command, mut on_line: impl FnMut(&str)) -> anyhow::Result<Run> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("starting a command")?;
    let stderr = child.stderr.take().context("stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            all.push_str(&strip_ansi(&line));
            all.push('\n');
        }
        all
    });
    let mut stdout = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            let plain = strip_ansi(&line);
            on_line(&plain);
            stdout.push_str(&plain);
            stdout.push('\n');
        }
    }
    let status = child.wait()?;
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Run {
        code: status.code(),
        stdout,
        stderr,
    })
}

/// Removes ANSI escape sequences.
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
