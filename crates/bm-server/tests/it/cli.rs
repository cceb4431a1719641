//! bmctl as a process against a real server: every command, and the error paths.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::{Server, bmctl_command, err_text, text};

fn ok(server: &Server, args: &[&str]) -> String {
    let out = server.bmctl(args);
    assert!(
        out.status.success(),
        "bmctl {args:?} failed ({:?}):\n{}{}",
        out.status,
        text(&out),
        err_text(&out)
    );
    text(&out)
}

fn json(server: &Server, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = server.bmctl(&all);
    serde_json::from_str(&text(&out))
        .unwrap_or_else(|e| panic!("bmctl {args:?}: {e}\n{}{}", text(&out), err_text(&out)))
}

/// A bmctl running `args` (an operation command that follows, say), and its stdout lines as
/// they come.
fn spawn_bmctl(
    server: &Server,
    args: &[&str],
    stderr: Stdio,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut child = bmctl_command(&server.addr, args)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Presses Ctrl+C on `child` (SIGINT), reads its stdout to the end, and returns its exit
/// code and stderr. bmctl listens for Ctrl+C before it opens its streams, so a signal sent
/// after a line from them is caught.
fn interrupt(
    mut child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
) -> (Option<i32>, String) {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // Read on to the end, so that bmctl never sees its reader go away.
    lines.for_each(drop);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (child.wait().unwrap().code(), stderr)
}

/// The operation id in a follow's header box.
fn op_id(follow_output: &str) -> String {
    follow_output
        .lines()
        .find_map(|l| l.strip_prefix("│ Operation: "))
        .unwrap_or_else(|| panic!("no operation header in:\n{follow_output}"))
        .trim()
        .to_owned()
}

#[test]
fn the_spec_000_session() {
    let server = Server::start();
    // Step 3: import.
    let out = ok(&server, &["import", "5"]);
    assert!(
        out.contains("Imported: 5 created, 0 already present, 0 failed"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("machine-5 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("02:00:00:00:00:05") && row.contains("CREATED"),
        "{row}"
    );
    let again = ok(&server, &["import", "5"]);
    assert!(again.contains("0 created, 5 already present"), "{again}");

    // Step 4: list shows phase and effective state side by side.
    let list = ok(&server, &["list"]);
    let header = list.lines().next().unwrap();
    for col in ["MACHINE", "PHASE", "EFFECTIVE", "CONDITIONS", "ACTIVE OP"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(list.contains("machine-1  FACTORY_READY  NEW"), "{list}");

    // Step 5: maintenance and a followed reimage with both streams.
    ok(&server, &["enter-maintenance", "machine-1"]);
    let reimage = ok(&server, &["reimage", "machine-1"]);
    for marker in [
        "│ Operation: op-",
        "│ Machine: machine-1",
        "│ Request ID: bmctl-",
        "→ set-netboot...",
        "✓ verify-in-cluster",
        "│ [repave] Writing image to /dev/sda: 100%",
        "] Step repave-image started",
        "] Step repave-image succeeded",
        "│ ✓ SUCCEEDED",
        "│ Stages: 5 completed",
    ] {
        assert!(
            reimage.contains(marker),
            "missing {marker:?} in:\n{reimage}"
        );
    }
    let list = ok(&server, &["list"]);
    assert!(
        list.contains("machine-1  MAINTENANCE    MAINT      InCustomerCluster=✓, Provisioned=✓"),
        "{list}"
    );

    // Step 6: exit maintenance.
    ok(&server, &["exit-maintenance", "machine-1"]);
    let m = json(&server, &["get", "machine-1"]);
    assert_eq!(m["status"]["phase"], "PHASE_READY");
    assert_eq!(m["effectiveState"], "EFFECTIVE_STATE_IDLE");

    // Step 7: the same request id returns the same operation, ~0 s, nothing runs again.
    ok(&server, &["enter-maintenance", "machine-2"]);
    let first = ok(
        &server,
        &["repave", "machine-2", "--request-id", "demo-idempotent-123"],
    );
    let second = ok(
        &server,
        &[
            "reimage",
            "machine-2",
            "--request-id",
            "demo-idempotent-123",
        ],
    );
    assert_eq!(op_id(&first), op_id(&second));
    assert!(
        second.contains("Already ended before this request: nothing ran again"),
        "{second}"
    );
    assert!(!second.contains("→ "), "no step ran: {second}");

    // Step 8: reboot on READY; reimage on READY is refused.
    let reboot = ok(&server, &["reboot", "machine-1"]);
    assert!(
        reboot.contains("✓ reboot") && reboot.contains("│ Stages: 1 completed"),
        "{reboot}"
    );
    let refused = server.bmctl(&["reimage", "machine-1"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = err_text(&refused);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(
            "error: FAILED_PRECONDITION: REIMAGE is not allowed on machine machine-1 in phase READY"
        ),
        "{err}"
    );

    // Step 10: history, newest first, filterable, with the alias.
    let ops = ok(&server, &["ops", "--machine", "machine-2"]);
    assert_eq!(ops.lines().count(), 3, "header + enter + reimage:\n{ops}");
    assert!(ops.lines().nth(1).unwrap().contains("REIMAGE"), "{ops}");
    let runs = json(&server, &["runs"]);
    assert_eq!(runs.as_array().unwrap().len(), 6);
    assert_eq!(runs[0]["type"], "OPERATION_TYPE_REBOOT");

    // get / op details.
    let detail = ok(&server, &["op", &op_id(&first)]);
    assert!(
        detail.contains("repave-image") && detail.contains("SUCCEEDED"),
        "{detail}"
    );
    let machine = ok(&server, &["get", "machine-2"]);
    assert!(
        machine.contains("Provisioned") && machine.contains("Reimaged"),
        "{machine}"
    );
}

#[test]
fn cancel_failure_and_blocked_machines() {
    let server = Server::start();
    ok(&server, &["import", "5"]);
    // Step 9: cancel of a running operation; the follow ends CANCELED with exit code 3.
    ok(&server, &["enter-maintenance", "machine-3"]);
    ok(
        &server,
        &[
            "update",
            "machine-3",
            "--label",
            "fake.baremetal.dev/hang-action=repave",
        ],
    );
    let (mut follow, mut lines) = spawn_bmctl(&server, &["reimage", "machine-3"], Stdio::inherit());
    let mut seen = Vec::new();
    let mut op = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("│ Operation: ") {
            op = id.trim().to_owned();
        }
        let hanging = line.contains("injected hang");
        seen.push(line);
        if hanging {
            break;
        }
    }
    let canceled = json(&server, &["cancel", &op]);
    assert_eq!(canceled["phase"], "OPERATION_PHASE_CANCELED");
    seen.extend(lines.map(Result::unwrap));
    let status = follow.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "canceled => exit 3:\n{}",
        seen.join("\n")
    );
    assert!(
        seen.iter().any(|l| l.contains("│ ⊘ CANCELED")),
        "{}",
        seen.join("\n")
    );
    let list = ok(&server, &["list"]);
    assert!(
        list.contains("machine-3  MAINTENANCE    MAINT      OperationCanceled=✓"),
        "{list}"
    );
    let again = server.bmctl(&["cancel", &op]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        err_text(&again).contains("FAILED_PRECONDITION"),
        "{}",
        err_text(&again)
    );

    // An injected failure: FAILED, ⚠ATTN, cleared with a note.
    ok(&server, &["enter-maintenance", "machine-4"]);
    ok(
        &server,
        &[
            "update",
            "machine-4",
            "--label",
            "fake.baremetal.dev/fail-action=repave",
        ],
    );
    let failed = server.bmctl(&["reimage", "machine-4"]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(text(&failed).contains("│ ✗ FAILED"), "{}", text(&failed));
    assert!(
        text(&failed).contains("↻ repave-image will be retried"),
        "{}",
        text(&failed)
    );
    assert!(ok(&server, &["list"]).contains("⚠ATTN"));
    ok(
        &server,
        &[
            "update",
            "machine-4",
            "--remove-label",
            "fake.baremetal.dev/fail-action",
        ],
    );
    ok(
        &server,
        &[
            "mark-fixed",
            "machine-4",
            "--note",
            "replaced the disk cable",
        ],
    );
    let m = json(&server, &["get", "machine-4"]);
    assert_eq!(m["effectiveState"], "EFFECTIVE_STATE_MAINTENANCE_IDLE");

    // RMA blocks; only readmit runs; retire blocks too.
    ok(&server, &["rma", "machine-5", "--note", "PSU failure"]);
    assert!(ok(&server, &["list"]).contains("machine-5  FACTORY_READY  ⛔BLOCK    RMA=✓"));
    let refused = server.bmctl(&["reboot", "machine-5"]);
    assert!(
        err_text(&refused).contains("blocked (RMA=true)"),
        "{}",
        err_text(&refused)
    );
    ok(&server, &["readmit", "machine-5"]);
    assert_eq!(
        json(&server, &["get", "machine-5"])["effectiveState"],
        "EFFECTIVE_STATE_NEW"
    );
    ok(&server, &["retire", "machine-5"]);
    assert_eq!(
        json(&server, &["get", "machine-5"])["effectiveState"],
        "EFFECTIVE_STATE_BLOCKED"
    );

    // Upgrade and net-reconfig in maintenance; --no-wait returns the pending operation.
    ok(&server, &["update", "machine-4", "--image", "ubuntu-26.04"]);
    let up = ok(&server, &["upgrade", "machine-4"]);
    assert!(
        up.contains("✓ drain") && up.contains("│ ✓ SUCCEEDED"),
        "{up}"
    );
    let pending = json(&server, &["net-reconfig", "machine-4", "--no-wait"]);
    assert_eq!(pending["type"], "OPERATION_TYPE_NET_RECONFIG");
    let id = pending["id"].as_str().unwrap().to_owned();
    // logs follows it to its end; watch of one operation ends with it.
    let logs = ok(&server, &["logs", &id]);
    assert!(
        logs.contains("│ [net] Applying with netplan apply"),
        "{logs}"
    );
    let watch = ok(&server, &["watch", "--operation", &id, "--since", "0"]);
    assert!(
        watch.contains("verify-connectivity succeeded") && watch.contains("SUCCEEDED"),
        "{watch}"
    );
}

#[test]
fn import_file_reports_bad_rows_by_line() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("inventory.csv");
    std::fs::write(
        &csv,
        "id,provider,mac_addresses,ssh_endpoint,labels\n\
         r740-1,fake,02:00:00:00:01:01,root@10.1.0.1,rack=r1\n\
         r740-2,fake,02:00:00:00:01:zz,root@10.1.0.2,rack=r1\n\
         r740-3,fake,02:00:00:00:01:03,root@10.1.0.3,rack=r2\n",
    )
    .unwrap();
    let out = server.bmctl(&["import", "--file", csv.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a bad row makes the exit code non-zero"
    );
    let t = text(&out);
    let bad = t
        .lines()
        .find(|l| l.contains("r740-2"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        bad.starts_with("3 ") && bad.contains("FAILED") && bad.contains("mac_addresses[0]"),
        "{bad}"
    );
    assert!(t.contains("2 created, 0 already present, 1 failed"), "{t}");
    assert_eq!(
        json(&server, &["list", "-l", "rack in (r1,r2)"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let dry = json(
        &server,
        &["import", "--file", csv.to_str().unwrap(), "--dry-run"],
    );
    assert_eq!(
        (
            dry["created"].as_i64(),
            dry["unchanged"].as_i64(),
            dry["failed"].as_i64()
        ),
        (Some(0), Some(2), Some(1))
    );
}

#[test]
fn errors_are_one_line_with_the_status_name() {
    let server = Server::start();
    let out = server.bmctl(&["get", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        err_text(&out),
        "error: NOT_FOUND: machine ghost not found\n"
    );
    let out = server.bmctl(&["reboot", "ghost"]);
    assert_eq!(
        err_text(&out),
        "error: NOT_FOUND: machine ghost not found\n"
    );
    let out = crate::support::bmctl("127.0.0.1:1", &["list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = err_text(&out);
    assert!(
        err.starts_with("error: UNAVAILABLE: cannot reach the server at http://127.0.0.1:1"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_follow_survives_a_server_restart() {
    let mut server = Server::start();
    ok(&server, &["import", "1"]);
    ok(&server, &["enter-maintenance", "machine-1"]);
    // Slow hardware, so that the restart lands mid-reimage.
    ok(
        &server,
        &[
            "update",
            "machine-1",
            "--label",
            "fake.baremetal.dev/delay-ms=400",
        ],
    );
    let (mut follow, mut lines) = spawn_bmctl(&server, &["reimage", "machine-1"], Stdio::inherit());
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let at_repave = line.starts_with("→ repave-image");
        seen.push(line);
        if at_repave {
            break;
        }
    }
    let (status, _) = server.terminate();
    assert!(status.success());
    server.spawn();
    seen.extend(lines.map(Result::unwrap));
    let code = follow.wait().unwrap().code();
    let out = seen.join("\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("↻ lost the server"), "{out}");
    assert!(out.contains("↻ reconnected"), "{out}");
    assert!(
        out.contains("│ ✓ SUCCEEDED") && out.contains("✓ verify-in-cluster"),
        "{out}"
    );
    // Every step line appears once: the resumed streams did not replay what was shown.
    assert_eq!(out.matches("✓ set-netboot").count(), 1, "{out}");
}

#[test]
fn follow_reattaches_and_usage_errors_exit_2() {
    let server = Server::start();
    ok(&server, &["import", "1"]);
    let op = json(&server, &["enter-maintenance", "machine-1", "--no-wait"]);
    let id = op["id"].as_str().unwrap();
    let out = ok(&server, &["follow", id]);
    assert!(out.contains("│ ✓ SUCCEEDED"), "{out}");
    // Following it again, once it has ended: no claim of a replayed request.
    let again = ok(&server, &["follow", id]);
    assert!(
        again.contains("│ ✓ SUCCEEDED") && again.contains("│ Already ended before this follow"),
        "{again}"
    );
    assert!(!again.contains("nothing ran again"), "{again}");
    for bad in [
        &["list", "--phase", "bogus"][..],
        &["update", "machine-1", "--label", "no-equals"],
        &["import"],
        &["import", "0"],
        &["ops", "--type", "nope"],
    ] {
        assert_eq!(server.bmctl(bad).status.code(), Some(2), "{bad:?}");
    }
    let out = server.bmctl(&["-o", "json", "import", "2"]);
    let doc: serde_json::Value = serde_json::from_str(&text(&out)).expect("pure JSON on stdout");
    assert_eq!(doc["created"], 1);
    let listed = json(
        &server,
        &["ops", "--type", "enter-maintenance", "--phase", "succeeded"],
    );
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

#[test]
fn a_closed_pipe_is_not_a_crash() {
    let server = Server::start();
    ok(&server, &["import", "1000"]);
    // Far more than a pipe holds (64 KiB), so that most is written after the hang-up.
    let whole = ok(&server, &["-o", "json", "list"]);
    assert!(whole.len() > 256 * 1024, "only {} bytes", whole.len());
    let mut child = bmctl_command(&server.addr, &["-o", "json", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then hang up, as `| head -1` does.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(first, "[\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "", "a closed pipe is not an error");
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_an_error() {
    let server = Server::start();
    ok(&server, &["import", "3"]);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = bmctl_command(&server.addr, &["list"])
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: writing output: "), "{stderr}");
}

#[test]
fn ctrl_c_exits_130_and_the_operation_goes_on() {
    let server = Server::start();
    ok(&server, &["import", "1"]);
    ok(&server, &["enter-maintenance", "machine-1"]);
    ok(
        &server,
        &[
            "update",
            "machine-1",
            "--label",
            "fake.baremetal.dev/hang-action=repave",
        ],
    );
    // An operation command's follow.
    let (child, mut lines) = spawn_bmctl(&server, &["reimage", "machine-1"], Stdio::piped());
    let mut op = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("│ Operation: ") {
            op = id.trim().to_owned();
        }
        if line.contains("injected hang") {
            break;
        }
    }
    assert!(!op.is_empty(), "no header");
    let (code, stderr) = interrupt(child, lines);
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!("`bmctl follow {op}` follows it again")),
        "{stderr}"
    );
    assert_eq!(
        json(&server, &["op", &op])["phase"],
        "OPERATION_PHASE_RUNNING"
    );
    // `follow`, `logs` and `watch` of it: Ctrl+C is 130 for each. Each is interrupted
    // after a line from its streams (the header box of `follow` comes before them).
    for (args, after) in [
        (&["follow", &op][..], "injected hang"),
        (&["logs", &op], "injected hang"),
        (&["watch", "--operation", &op, "--since", "0"], ""),
        (&["watch", "--since", "0"], ""),
    ] {
        let (child, mut lines) = spawn_bmctl(&server, args, Stdio::piped());
        let seen = lines
            .by_ref()
            .map(Result::unwrap)
            .any(|l| l.contains(after));
        assert!(seen, "{args:?}: no {after:?}");
        let (code, stderr) = interrupt(child, lines);
        assert_eq!(code, Some(130), "{args:?}: {stderr}");
    }
}

#[test]
fn plans_come_from_the_server() {
    let server = Server::start();
    let out = ok(&server, &["plans"]);
    assert!(out.starts_with("TYPE"), "{out}");
    assert!(
        out.contains(
            "REIMAGE             set-netboot → reboot-to-netboot → repave-image → join-cluster → verify-in-cluster"
        ),
        "{out}"
    );
    assert!(
        out.contains("RMA                 drain → wipe → notify"),
        "{out}"
    );
    let doc = json(&server, &["plans"]);
    let types = doc["operationTypes"].as_array().unwrap();
    assert_eq!(types.len(), 10, "{doc}");
    let net = types
        .iter()
        .find(|t| t["type"] == "OPERATION_TYPE_NET_RECONFIG")
        .unwrap();
    assert_eq!(
        net["stages"],
        serde_json::json!(["apply-net-config", "verify-connectivity"])
    );
}

#[test]
fn completion_and_man_need_no_server() {
    // Nothing listens on port 1.
    let out = bmctl_command("127.0.0.1:1", &["completion", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", err_text(&out));
    let script = text(&out);
    assert!(
        script.contains("complete -F _bmctl") && script.contains("enter-maintenance"),
        "{script}"
    );
    let out = bmctl_command("127.0.0.1:1", &["man"]).output().unwrap();
    assert!(out.status.success(), "{}", err_text(&out));
    assert!(text(&out).contains(".SH SYNOPSIS"));
    let out = bmctl_command("127.0.0.1:1", &["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// Issue 15: `bmctl stats` counts the fleet and names the machine longest in ATTENTION;
/// `bmctl list --sort age` puts the held machines first, the longest held first.
#[test]
fn stats_and_list_by_age() {
    let server = Server::start();
    ok(&server, &["import", "4"]);
    // machine-3, then machine-2, fail a reimage for good: both end in ATTENTION, machine-3
    // first.
    for m in ["machine-3", "machine-2"] {
        ok(&server, &["enter-maintenance", m]);
        ok(
            &server,
            &[
                "update",
                m,
                "--label",
                "fake.baremetal.dev/fail-action=repave",
                "--label",
                "fake.baremetal.dev/fail-kind=permanent",
            ],
        );
        let out = server.bmctl(&["reimage", m]);
        assert!(!out.status.success(), "{}", text(&out));
    }
    let stats = json(&server, &["stats"]);
    assert_eq!(stats["machines"], 4, "{stats}");
    assert_eq!(stats["by_effective_state"]["ATTENTION"], 2, "{stats}");
    assert_eq!(stats["by_effective_state"]["NEW"], 2, "{stats}");
    assert_eq!(stats["by_phase"]["MAINTENANCE"], 2, "{stats}");
    assert_eq!(
        stats["oldest"]["ATTENTION"]["machine_id"], "machine-3",
        "{stats}"
    );
    assert!(stats["oldest"].get("BLOCKED").is_none(), "{stats}");
    let table = ok(&server, &["stats"]);
    assert!(
        table.contains("longest in ATTENTION: machine-3 for "),
        "{table}"
    );
    assert!(table.contains("nothing in BLOCKED"), "{table}");

    let ids = |args: &[&str]| -> Vec<String> {
        let list = json(&server, args);
        list.as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(&["list"]),
        ["machine-1", "machine-2", "machine-3", "machine-4"]
    );
    assert_eq!(
        ids(&["list", "--sort", "age"]),
        ["machine-3", "machine-2", "machine-1", "machine-4"]
    );
}
