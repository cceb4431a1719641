//! `cargo xtask demo`: spec 000's presenter script, steps 3-10, played end to end against a
//! fresh server, with a one-line caption before each step. Every step's outcome is checked;
//! the demo exits non-zero as soon as one does not behave as the script says.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::proc::{self, Run};

struct Options {
    slow: bool,
    timing: String,
    /// Which store the server runs on.
    store: StoreKind,
}

/// The demo's store: the embedded SQLite (the default) or a local PostgreSQL that the demo
/// starts itself (a throwaway cluster, stopped at the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoreKind {
    Sqlite,
    Postgres,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        slow: false,
        timing: "normal".into(),
        store: StoreKind::Sqlite,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--slow" => {
                o.slow = true;
                o.timing = "slow".into();
            }
            "--fake-timing" => {
                o.timing = it.next().context("--fake-timing needs a value")?.clone();
                ensure!(
                    matches!(o.timing.as_str(), "normal" | "slow" | "instant"),
                    "--fake-timing is normal, slow or instant"
                );
            }
            "--store" => {
                o.store = match it.next().map(String::as_str) {
                    Some("sqlite") => StoreKind::Sqlite,
                    Some("postgres") => StoreKind::Postgres,
                    _ => bail!("--store is sqlite or postgres"),
                };
            }
            other => bail!(
                "unknown demo option {other:?} (options: --slow, --fake-timing T, --store sqlite|postgres)"
            ),
        }
    }
    Ok(o)
}

struct Demo {
    bin: PathBuf,
    addr: String,
    /// The server's data directory, where bmctl finds the local admin token.
    data: PathBuf,
    pause: Duration,
    color: bool,
    interrupted: Arc<AtomicBool>,
}

/// Plays the demo; returns the exit code.
pub(crate) fn run(args: &[String]) -> anyhow::Result<i32> {
    let options = parse(args)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl+C handler")?;
    }
    println!("Building bm-server and bmctl...");
    let bin = proc::build(&["bm-server", "bm-cli"], false)?;
    let dir = std::env::temp_dir().join(format!("bm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // A PostgreSQL of its own, stopped (and deleted) when `cluster` is dropped at the end.
    let (cluster, store) = match options.store {
        StoreKind::Sqlite => (None, None),
        StoreKind::Postgres => {
            println!("Starting a throwaway PostgreSQL...");
            let cluster = bm_pg_cluster::Cluster::start()
                .context("starting a local PostgreSQL for the demo")?;
            let url = cluster
                .create_database()
                .context("creating the demo's database")?;
            (Some(cluster), Some(url))
        }
    };
    let (mut server, addr) = start_server(&bin, &dir, &options, store.as_deref())?;
    match &store {
        None => println!(
            "Server listening on {addr} (data in {}, log in {})",
            dir.join("data").display(),
            dir.join("server.log").display()
        ),
        Some(url) => println!(
            "Server listening on {addr} (store {url}, log in {})",
            dir.join("server.log").display()
        ),
    }
    if let Some(http) = dashboard_address(&dir.join("server.log")) {
        println!(
            "Dashboard on http://{http}/ (sign in with the token in {})",
            dir.join("data/admin-token").display()
        );
    }

    let mut demo = Demo {
        bin,
        addr,
        data: dir.join("data"),
        pause: match options.timing.as_str() {
            "instant" => Duration::ZERO,
            _ if options.slow => Duration::from_secs(2),
            _ => Duration::from_millis(400),
        },
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        interrupted: interrupted.clone(),
    };
    let result = demo.script();
    // Stop the server cleanly whatever happened (on Ctrl+C it got the signal too).
    proc::terminate(&server);
    let status = wait_for(&mut server, Duration::from_secs(10));
    let clean = matches!(status, Some(s) if s.success());
    let code = match (&result, interrupted.load(Ordering::SeqCst)) {
        (_, true) => {
            println!(
                "\nInterrupted; the server stopped {}.",
                if clean { "cleanly" } else { "uncleanly" }
            );
            130
        }
        (Ok(()), false) if clean => {
            println!(
                "\n{}",
                demo.bold("Clean Ctrl+C/SIGTERM: the server shut down gracefully (exit 0).")
            );
            println!(
                "{}",
                demo.bold("Demo complete: every step behaved as the script says.")
            );
            0
        }
        (Ok(()), false) => {
            eprintln!(
                "\nThe server did not exit cleanly ({status:?}); its log:\n{}",
                tail(&dir.join("server.log"))
            );
            1
        }
        (Err(e), false) => {
            eprintln!(
                "\nDEMO FAILED: {e:#}\n\nServer log (last lines):\n{}",
                tail(&dir.join("server.log"))
            );
            1
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    drop(cluster);
    Ok(code)
}

/// Starts bm-server on `dir/data` (where it keeps the local admin token bmctl reads), on
/// the PostgreSQL database `store` when given.
fn start_server(
    bin: &Path,
    dir: &Path,
    o: &Options,
    store: Option<&str>,
) -> anyhow::Result<(Child, String)> {
    let log = std::fs::File::create(dir.join("server.log"))?;
    let mut cmd = Command::new(bin.join("bm-server"));
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--fake-timing", &o.timing])
        // Every few seconds rather than the default 5 minutes, so that step 11 shows it.
        .args(["--status-poll-interval", "2s"])
        // The web dashboard, to watch the demo in a browser.
        .args(["--http-listen", "127.0.0.1:0"]);
    if let Some(url) = store {
        cmd.args(["--store", url]);
    }
    cmd.env("NO_COLOR", "1").stdout(Stdio::piped()).stderr(log);
    let mut child = cmd.spawn().context("starting bm-server")?;
    let mut line = String::new();
    let read = child
        .stdout
        .take()
        .context("server stdout")
        .and_then(|out| Ok(BufReader::new(out).read_line(&mut line)?));
    let addr = read.and_then(|_| {
        line.trim()
            .strip_prefix("bm-server listening on ")
            .map(str::to_owned)
            .with_context(|| format!("unexpected server output {line:?}"))
    });
    match addr {
        Ok(addr) => Ok((child, addr)),
        Err(e) => {
            // Not left running behind a failed demo.
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Where the server's dashboard listens, from its log (it logs that as it starts serving);
/// nothing if it has not said so within 5 s.
fn dashboard_address(log: &Path) -> Option<String> {
    const NEEDLE: &str = "HTTP API on http://";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(at) = text.find(NEEDLE) {
            let rest = &text[at + NEEDLE.len()..];
            return rest.split('/').next().map(str::to_owned);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            _ => {
                let _ = child.kill();
                return None;
            }
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Demo {
    fn bold(&self, s: &str) -> String {
        if self.color {
            format!("\u{1b}[1m{s}\u{1b}[0m")
        } else {
            s.to_owned()
        }
    }

    fn check_interrupt(&self) -> anyhow::Result<()> {
        if self.interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }

    /// A one-line caption before a step.
    fn caption(&mut self, number: &str, text: &str) -> anyhow::Result<()> {
        self.check_interrupt()?;
        std::thread::sleep(self.pause);
        let line = format!("━━ Step {number}: {text}");
        println!(
            "\n{}",
            if self.color {
                format!("\u{1b}[1;36m{line}\u{1b}[0m")
            } else {
                line
            }
        );
        Ok(())
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join("bmctl"));
        cmd.args(args)
            .env("BM_SERVER", &self.addr)
            .env("BM_DATA_DIR", &self.data);
        if self.color {
            cmd.env("CLICOLOR_FORCE", "1");
        } else {
            cmd.env("NO_COLOR", "1");
        }
        cmd
    }

    /// Runs bmctl for the audience, echoing its output live.
    fn show(&self, args: &[&str]) -> anyhow::Result<Run> {
        self.show_with(args, |_| {})
    }

    fn show_with(&self, args: &[&str], on_line: impl FnMut(&str)) -> anyhow::Result<Run> {
        self.check_interrupt()?;
        println!("$ bmctl {}", args.join(" "));
        let run = proc::run_echo(self.command(args), on_line)?;
        self.check_interrupt()?;
        Ok(run)
    }

    fn expect_ok(&self, args: &[&str]) -> anyhow::Result<Run> {
        let run = self.show(args)?;
        ensure!(
            run.code == Some(0),
            "`bmctl {}` exited with {:?}",
            args.join(" "),
            run.code
        );
        Ok(run)
    }

    /// Runs bmctl quietly with `-o json`, for the checks.
    fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self
            .command(&all)
            .env("NO_COLOR", "1")
            .env_remove("CLICOLOR_FORCE")
            .output()?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`bmctl {}`: {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn machine(&self, id: &str) -> anyhow::Result<Value> {
        self.json(&["get", id])
    }

    fn script(&mut self) -> anyhow::Result<()> {
        self.caption(
            "3",
            "import machines from inventory: each starts FACTORY_READY, effective NEW",
        )?;
        let run = self.expect_ok(&["import", "5"])?;
        ensure!(
            run.stdout.contains("5 created"),
            "the import did not create 5 machines"
        );

        self.caption(
            "4",
            "phase is the intent, EFFECTIVE is computed from phase, conditions and activity",
        )?;
        let run = self.expect_ok(&["list"])?;
        ensure!(
            run.stdout.matches("FACTORY_READY  NEW").count() == 5,
            "not every machine is NEW"
        );

        self.caption(
            "5",
            "enter maintenance: the safety gate before disruptive work",
        )?;
        self.expect_ok(&["enter-maintenance", "machine-1"])?;
        self.caption(
            "5",
            "reimage: two gRPC streams interleaved (WatchOperations: → ✓ [HH:MM:SS]; StreamLogs: │ [tag])",
        )?;
        let run = self.expect_ok(&["reimage", "machine-1"])?;
        ensure!(
            run.stdout.contains("│ ✓ SUCCEEDED"),
            "the reimage did not succeed"
        );
        ensure!(
            run.stdout.contains("│ [repave]"),
            "no provider log lines were shown"
        );
        let run = self.expect_ok(&["list"])?;
        ensure!(
            run.stdout.contains(
                "machine-1  MAINTENANCE    MAINT      InCustomerCluster=✓, Provisioned=✓"
            ),
            "machine-1 is not provisioned in maintenance"
        );

        self.caption(
            "6",
            "exit maintenance: the operator decides when the machine returns to production",
        )?;
        self.expect_ok(&["exit-maintenance", "machine-1"])?;
        let m = self.machine("machine-1")?;
        ensure!(
            m["effectiveState"] == "EFFECTIVE_STATE_IDLE",
            "machine-1 is not IDLE: {}",
            m["effectiveState"]
        );
        self.expect_ok(&["list"])?;

        self.caption(
            "7",
            "idempotency: the first request with request_id demo-idempotent-123 runs the reimage",
        )?;
        self.expect_ok(&["enter-maintenance", "machine-2"])?;
        let first = self.expect_ok(&[
            "reimage",
            "machine-2",
            "--request-id",
            "demo-idempotent-123",
        ])?;
        self.caption("7", "the retry with the same request_id returns the same operation at once: nothing runs again")?;
        let second = self.expect_ok(&[
            "reimage",
            "machine-2",
            "--request-id",
            "demo-idempotent-123",
        ])?;
        let id = |r: &Run| {
            r.stdout
                .lines()
                .find_map(|l| l.strip_prefix("│ Operation: ").map(|s| s.trim().to_owned()))
        };
        ensure!(
            id(&first).is_some() && id(&first) == id(&second),
            "the retry returned another operation"
        );
        ensure!(
            second.stdout.contains("nothing ran again"),
            "the retry ran something"
        );
        let reimages = self
            .json(&["ops", "--machine", "machine-2"])?
            .as_array()
            .map_or(0, |ops| {
                ops.iter()
                    .filter(|o| o["type"] == "OPERATION_TYPE_REIMAGE")
                    .count()
            });
        ensure!(reimages == 1, "machine-2 has {reimages} reimage operations");

        self.caption(
            "8",
            "reboot is a one-step plan and works on READY without maintenance",
        )?;
        let run = self.expect_ok(&["reboot", "machine-1"])?;
        ensure!(run.stdout.contains("✓ reboot"), "the reboot did not run");
        self.caption(
            "8",
            "reimage on READY is refused by the API (FAILED_PRECONDITION)",
        )?;
        let run = self.show(&["reimage", "machine-1"])?;
        ensure!(
            run.code == Some(1) && run.stderr.contains("FAILED_PRECONDITION"),
            "the reimage on READY was not refused"
        );

        self.caption(
            "9",
            "cancel a running reimage: CANCELED + OperationCanceled, not NeedsIntervention",
        )?;
        self.expect_ok(&["enter-maintenance", "machine-3"])?;
        // Slower hardware on this machine, so that the cancel lands mid-reimage at any timing.
        self.expect_ok(&[
            "update",
            "machine-3",
            "--label",
            "fake.baremetal.dev/delay-ms=1500",
        ])?;
        self.cancel_mid_reimage("machine-3")?;
        let m = self.machine("machine-3")?;
        let cond = |m: &Value, t: &str| {
            m["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == true))
        };
        ensure!(
            cond(&m, "OperationCanceled"),
            "machine-3 lacks OperationCanceled"
        );
        ensure!(
            !cond(&m, "NeedsIntervention"),
            "a cancel must not need intervention"
        );
        ensure!(
            m["status"]["phase"] == "PHASE_MAINTENANCE",
            "machine-3 left maintenance"
        );

        self.caption(
            "9",
            "a step that fails after its retries: FAILED, NeedsIntervention, effective ⚠ATTN",
        )?;
        self.expect_ok(&["enter-maintenance", "machine-4"])?;
        self.expect_ok(&[
            "update",
            "machine-4",
            "--label",
            "fake.baremetal.dev/fail-action=repave",
        ])?;
        let run = self.show(&["reimage", "machine-4"])?;
        ensure!(
            run.code == Some(1) && run.stdout.contains("│ ✗ FAILED"),
            "the injected failure did not fail the reimage"
        );
        let run = self.expect_ok(&["list"])?;
        ensure!(run.stdout.contains("⚠ATTN"), "no machine shows ⚠ATTN");
        self.caption("9", "a person fixes the cause, then clears the condition; the note goes into the audit trail")?;
        self.expect_ok(&[
            "update",
            "machine-4",
            "--remove-label",
            "fake.baremetal.dev/fail-action",
        ])?;
        self.expect_ok(&[
            "clear-intervention",
            "machine-4",
            "--note",
            "replaced the disk cable",
        ])?;
        let m = self.machine("machine-4")?;
        ensure!(
            m["effectiveState"] == "EFFECTIVE_STATE_MAINTENANCE_IDLE",
            "machine-4 still needs attention"
        );

        self.caption(
            "9",
            "RMA is a condition, not a phase: drain, wipe, ticket, and the machine is ⛔BLOCKED",
        )?;
        self.expect_ok(&["rma", "machine-5", "--note", "PSU failure"])?;
        let run = self.expect_ok(&["list"])?;
        ensure!(run.stdout.contains("⛔BLOCK"), "machine-5 is not blocked");

        self.caption(
            "10",
            "every operation is recorded: the audit trail, newest first",
        )?;
        self.expect_ok(&["ops"])?;
        let ops = self.json(&["ops"])?;
        let count = ops.as_array().map_or(0, Vec::len);
        // 4 enter-maintenance, 4 reimages (the retry made none), exit, reboot, clear, RMA.
        ensure!(
            count == 12,
            "the history has {count} operations, the script ran 12"
        );

        self.caption(
            "11",
            "power and health sync: the server reads every BMC (here every 2 s, by default every 5 min)",
        )?;
        self.caption(
            "11",
            "a fan fails on machine-2, machine-3's BMC stops answering, someone powers machine-1 off",
        )?;
        // The poll has read machine-1 since its reboot (the reboot may have changed its power;
        // only a change after that reading is one outside any operation).
        self.wait_for_poll(&[("machine-1", "PoweredOn", true, "Observed")])?;
        for (machine, label) in [
            ("machine-2", "fake.baremetal.dev/health=warning"),
            ("machine-3", "fake.baremetal.dev/bmc=unreachable"),
            ("machine-1", "fake.baremetal.dev/power=off"),
        ] {
            self.expect_ok(&["update", machine, "--label", label])?;
        }
        self.wait_for_poll(&[
            ("machine-2", "Degraded", true, "HealthWarning"),
            ("machine-3", "Reachable", false, "BmcUnreachable"),
            ("machine-1", "PoweredOn", false, "ChangedOutsideOperation"),
        ])?;
        let run = self.expect_ok(&["list"])?;
        for (machine, shown) in [
            ("machine-1", "PoweredOn=✗"),
            ("machine-2", "Degraded=✓"),
            ("machine-3", "Reachable=✗"),
        ] {
            ensure!(
                run.stdout
                    .lines()
                    .any(|l| l.starts_with(machine) && l.contains(shown)),
                "bmctl list does not show {shown} on {machine}"
            );
        }
        self.caption(
            "11",
            "each condition says why and since when; a power change outside any operation is called so",
        )?;
        self.expect_ok(&["get", "machine-1"])?;
        self.caption(
            "11",
            "and the change is in the machine's audit trail, beside its operations",
        )?;
        let run = self.expect_ok(&["events", "machine-1"])?;
        ensure!(
            run.stdout.contains("POWER_CHANGED") && run.stdout.contains("from On to Off"),
            "machine-1's power change is not among its events"
        );
        self.rollout()
    }

    /// Step 12: a rollout over five new machines, two at a time, rack by rack, with one
    /// failure (injected) within the budget.
    fn rollout(&mut self) -> anyhow::Result<()> {
        self.caption(
            "12",
            "five new machines in two racks; edge-4's disk will fail to take the image",
        )?;
        let fail = "fake.baremetal.dev/fail-action=repave;fake.baremetal.dev/fail-kind=permanent";
        let mut csv =
            String::from("id,provider,mac_addresses,ssh_endpoint,image,target_cluster,labels\n");
        for i in 1..=5 {
            let rack = if i <= 3 { "r1" } else { "r2" };
            let extra = if i == 4 {
                format!(";{fail}")
            } else {
                String::new()
            };
            csv.push_str(&format!(
                "edge-{i},fake,02:00:00:00:e0:0{i},root@10.0.9.{i}:22,ubuntu-24.04,prod,pool=edge;rack={rack}{extra}\n"
            ));
        }
        let file = self
            .data
            .parent()
            .context("the demo's directory")?
            .join("edge.csv");
        std::fs::write(&file, csv)?;
        let file = file.display().to_string();
        self.expect_ok(&["import", "--file", &file])?;
        self.caption(
            "12",
            "a rollout: enter maintenance, reimage, exit maintenance on each, 2 at a time, rack by rack, stop at 2 failures",
        )?;
        self.expect_ok(&[
            "rollout",
            "start",
            "--op",
            "maintenance-reimage",
            "-l",
            "pool=edge",
            "--max-in-flight",
            "2",
            "--failure-budget",
            "2",
            "--batch-by",
            "rack",
            "--note",
            "demo rollout",
        ])?;
        let list = self.json(&["rollout", "status"])?;
        let id = list[0]["id"]
            .as_str()
            .context("no rollout listed")?
            .to_owned();
        let r = self.json(&["rollout", "status", &id])?;
        ensure!(
            r["phase"] == "ROLLOUT_PHASE_SUCCEEDED"
                && r["counts"]["succeeded"] == 4
                && r["counts"]["failed"] == 1,
            "the rollout did not end SUCCEEDED with 4 machines done and 1 failed: {r}"
        );
        self.caption(
            "12",
            "the failure stayed within the budget: the rollout says which machine and why",
        )?;
        let run = self.expect_ok(&["rollout", "status", &id])?;
        ensure!(
            run.stdout.contains("edge-4") && run.stdout.contains("FAILED"),
            "the rollout's status does not show edge-4's failure"
        );
        Ok(())
    }

    /// Waits (up to 30 s) until the status poll has recorded each `(machine, condition,
    /// status, reason)`: nothing announces a poll's reading but the machine's record.
    fn wait_for_poll(&self, want: &[(&str, &str, bool, &str)]) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut missing = Vec::new();
            for (machine, condition, status, reason) in want {
                let m = self.machine(machine)?;
                let seen = m["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        // JSON leaves out a false bool, as proto3 does.
                        .any(|c| {
                            c["type"] == *condition
                                && c["status"].as_bool().unwrap_or(false) == *status
                                && c["reason"] == *reason
                        })
                });
                if !seen {
                    missing.push(format!("{machine} {condition}={status} ({reason})"));
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            self.check_interrupt()?;
            ensure!(
                std::time::Instant::now() < deadline,
                "the status poll did not record {} within 30 s",
                missing.join(", ")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Starts a followed reimage and cancels it from a second bmctl once repave-image runs.
    fn cancel_mid_reimage(&self, machine: &str) -> anyhow::Result<()> {
        let mut op = String::new();
        let mut cancel: Option<anyhow::Result<Run>> = None;
        let run = self.show_with(&["reimage", machine], |line| {
            if let Some(id) = line.strip_prefix("│ Operation: ") {
                op = id.trim().to_owned();
            }
            if line.starts_with("→ repave-image") && cancel.is_none() {
                println!("$ bmctl cancel {op}   # from a second terminal");
                let out = self
                    .command(&["cancel", &op])
                    .env("NO_COLOR", "1")
                    .env_remove("CLICOLOR_FORCE")
                    .output();
                cancel = Some(out.map_err(anyhow::Error::from).map(|o| Run {
                    code: o.status.code(),
                    stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                }));
            }
        })?;
        let cancel = cancel.context("the reimage ended before repave-image started")??;
        ensure!(
            cancel.code == Some(0),
            "bmctl cancel failed: {}",
            cancel.stderr
        );
        ensure!(
            run.code == Some(3) && run.stdout.contains("│ ⊘ CANCELED"),
            "the reimage did not end CANCELED"
        );
        Ok(())
    }
}
