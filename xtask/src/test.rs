//! `cargo xtask test`: installs the system packages the tests need when they are missing,
//! then runs `cargo test --workspace` with the arguments given (without `--workspace` when
//! they pick packages with `-p`).
//!
//! The Redfish provider's tests start real peers: OpenSSH's `sshd` (Debian package
//! `openssh-server`) and the sushy-tools emulator in a Python venv (`python3-venv`). They find
//! those programs as this does: the `PATH`, then the sbin directories. The PostgreSQL store's
//! tests start a throwaway cluster with Debian's `postgresql` binaries
//! (`/usr/lib/postgresql/*/bin`). The metrics tests check the exposition and the alerting
//! rules with Prometheus's `promtool`: the one on the `PATH`, else the one of Debian's
//! `prometheus` package, extracted into `target/tools` (not installed: the package would
//! start a Prometheus server), given to the tests as `BM_PROMTOOL`. The web dashboard's tests
//! drive Debian's `chromium` with playwright-core from npm (`nodejs`, `npm`), which this
//! installs in `crates/bm-server/tests/dashboard` (`npm ci`, from its lock file; Playwright's
//! own browser download is never used).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::proc;

/// Where daemons live, searched after the `PATH` (a user's `PATH` often lacks them).
const SBIN: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/sbin"];

/// Installs what is missing, runs the tests, and exits with their exit code.
pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        install(&missing)?;
        let still = missing_packages();
        if !still.is_empty() {
            bail!("still missing after the install: {}", still.join(" "));
        }
    }
    // The whole workspace, unless the arguments pick packages.
    let picks = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a.starts_with("-p") || a.starts_with("--package"));
    playwright()?;
    let mut cargo = Command::new(proc::cargo());
    cargo.current_dir(proc::root()).arg("test");
    if find("promtool").is_none() {
        cargo.env("BM_PROMTOOL", promtool()?);
    }
    if !picks {
        cargo.arg("--workspace");
    }
    let status = cargo.args(args).status().context("running cargo test")?;
    std::process::exit(status.code().unwrap_or(1));
}

/// A program, searched like the tests search it.
pub(crate) fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where the dashboard's browser tests and benchmark live, with their npm lock file.
pub(crate) fn dashboard_dir() -> PathBuf {
    proc::root().join("crates/bm-server/tests/dashboard")
}

/// The programs of the dashboard's tests, and the Debian packages that bring them.
const BROWSER_TOOLS: [(&str, &str); 3] =
    [("chromium", "chromium"), ("node", "nodejs"), ("npm", "npm")];

/// What the dashboard's browser tests and benchmark need: chromium, Node.js and npm from
/// Debian's packages, playwright-core from npm.
pub(crate) fn browser_tools() -> anyhow::Result<()> {
    let missing: Vec<_> = BROWSER_TOOLS
        .into_iter()
        .filter(|(program, _)| find(program).is_none())
        .map(|(_, package)| package)
        .collect();
    if !missing.is_empty() {
        install(&missing)?;
    }
    playwright()
}

/// playwright-core for the dashboard's tests, from the lock file, unless it is there.
fn playwright() -> anyhow::Result<()> {
    let dir = dashboard_dir();
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Ok(());
    }
    node_is_recent()?;
    println!("==> installing playwright-core for the dashboard's tests (npm ci)");
    let npm = find("npm").context("npm is needed for the dashboard's tests")?;
    let status = Command::new(npm)
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .context("running npm ci")?;
    anyhow::ensure!(status.success(), "npm ci in {} failed", dir.display());
    Ok(())
}

/// playwright-core needs Node.js 20 or later; Debian bookworm's `nodejs` is 18.
fn node_is_recent() -> anyhow::Result<()> {
    let out = Command::new("node")
        .arg("--version")
        .output()
        .context("running node --version")?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("node --version printed {version:?}"))?;
    if major < 20 {
        bail!(
            "the dashboard's tests need Node.js 20 or later (playwright-core), and node is {version}: install Node.js 20 (NodeSource's package, or Debian trixie's nodejs)"
        );
    }
    Ok(())
}

/// `promtool` from Debian's `prometheus` package, extracted once into `target/tools`.
fn promtool() -> anyhow::Result<PathBuf> {
    let tools = proc::target_dir().join("tools");
    let promtool = tools.join("promtool");
    if promtool.exists() {
        return Ok(promtool);
    }
    println!("==> fetching promtool (Debian's prometheus package, extracted, not installed)");
    let debs = tools.join("debs");
    std::fs::create_dir_all(&debs)?;
    // The system's own package lists (refreshed if they lack the package); downloads land
    // in the target directory, which apt's sandbox user may not be able to enter.
    let opts = ["-o".to_owned(), "APT::Sandbox::User=root".to_owned()];
    let download = ["download", "-q", "prometheus"];
    if apt_get(&opts, &download, Some(&debs)).is_err() {
        apt_get(&opts, &["update", "-qq"], None)?;
        apt_get(&opts, &download, Some(&debs))?;
    }
    let deb = std::fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download prometheus left no .deb")?;
    let tree = tools.join("prometheus");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tree)
        .status()
        .context("running dpkg-deb")?;
    anyhow::ensure!(status.success(), "dpkg-deb -x {} failed", deb.display());
    std::fs::copy(tree.join("usr/bin/promtool"), &promtool)
        .context("the prometheus package has no usr/bin/promtool")?;
    let _ = std::fs::remove_dir_all(&tree);
    let _ = std::fs::remove_dir_all(&debs);
    Ok(promtool)
}

/// The Debian packages of the programs the tests need and this machine lacks.
fn missing_packages() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if find("sshd").is_none() {
        missing.push("openssh-server");
    }
    // python3-venv brings python3 with it, and ensurepip, without which a venv has no pip.
    if !find("python3").is_some_and(|python| venv_works(&python)) {
        missing.push("python3-venv");
    }
    // The PostgreSQL store's tests start a throwaway cluster (crates/bm-pg-cluster).
    if bm_pg_cluster::find_binaries().is_err() {
        missing.push("postgresql");
    }
    // The dashboard's tests: a real browser, and Node.js to run Playwright.
    for (program, package) in BROWSER_TOOLS {
        if find(program).is_none() {
            missing.push(package);
        }
    }
    missing
}

/// Whether `python` can make a virtualenv with pip in it (Debian's `python3-venv`).
pub(crate) fn venv_works(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import venv, ensurepip"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this runs as root.
pub(crate) fn is_root() -> anyhow::Result<bool> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    Ok(String::from_utf8_lossy(&uid.stdout).trim() == "0")
}

/// `apt-get install`s `packages`, through sudo unless this runs as root.
fn install(packages: &[&str]) -> anyhow::Result<()> {
    println!("==> installing {}", packages.join(" "));
    if find("apt-get").is_none() {
        bail!(
            "the tests need the Debian packages {} (or your system's equivalents), and there is no apt-get here: install them, then run cargo test --workspace",
            packages.join(" ")
        );
    }
    apt_get(&[], &["update", "-qq"], None)?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt_get(&[], &args, None)
}

/// Runs `apt-get OPTS ARGS` (in `dir`, if given), non-interactive, through sudo unless this
/// runs as root.
pub(crate) fn apt_get(opts: &[String], args: &[&str], dir: Option<&Path>) -> anyhow::Result<()> {
    let apt = find("apt-get").context("there is no apt-get here")?;
    let mut c = if is_root()? {
        Command::new(&apt)
    } else {
        let sudo = find("sudo").with_context(|| {
            format!(
                "apt-get {} needs root, and there is no sudo: run it as root",
                args.join(" ")
            )
        })?;
        let mut c = Command::new(sudo);
        // sudo resets the environment; it takes variables as arguments.
        c.arg("DEBIAN_FRONTEND=noninteractive").arg(&apt);
        c
    };
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .args(opts)
        .args(args);
    if let Some(dir) = dir {
        c.current_dir(dir);
    }
    let status = c.status().context("running apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed", args.join(" "));
    }
    Ok(())
}
