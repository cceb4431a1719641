//! The demo plays to completion (with instant fake hardware, to keep it quick), on SQLite
//! and on a throwaway PostgreSQL.

use std::process::Command;

/// Runs `cargo xtask demo ARGS` and checks that every step behaved as the script says.
fn demo_completes(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("demo")
        .args(args)
        .args(["--fake-timing", "instant"])
        .env("NO_COLOR", "1")
        .output()
        .expect("running cargo xtask demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo {args:?} failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for caption in ["Step 3:", "Step 5:", "Step 7:", "Step 9:", "Step 10:"] {
        assert!(stdout.contains(caption), "missing {caption}");
    }
    assert!(stdout.contains("Demo complete"), "{stdout}");
    stdout
}

#[test]
fn demo_runs_to_completion() {
    let stdout = demo_completes(&[]);
    assert!(!stdout.contains("postgres://"), "{stdout}");
}

#[test]
fn demo_runs_to_completion_on_postgres() {
    if let Err(e) = bm_pg_cluster::find_binaries() {
        panic!("cannot run the demo on PostgreSQL: {e}");
    }
    let stdout = demo_completes(&["--store", "postgres"]);
    // The server really ran on the database the demo started.
    assert!(
        stdout.contains("(store postgres://postgres@127.0.0.1:"),
        "{stdout}"
    );
}
