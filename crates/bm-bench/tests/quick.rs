//! The benchmark's quick mode runs against the debug server and fails on a broken invariant
//! (every reimage succeeded, every machine provisioned, every watcher got every event, a
//! clean shutdown), on SQLite and, for the fleet, on PostgreSQL. Timings are printed, never
//! asserted.

use std::path::Path;
use std::process::Command;

#[test]
fn quick_benchmark_keeps_every_invariant() {
    let build = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "bm-server", "--bin", "bm-server"])
        .output()
        .expect("cargo build");
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_bm-bench"))
        .parent()
        .unwrap()
        .to_path_buf();
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bm-bench-quick");
    let out = Command::new(env!("CARGO_BIN_EXE_bm-bench"))
        .args(["run", "--quick", "--server-bin"])
        .arg(bin_dir.join("bm-server"))
        .arg("--work-dir")
        .arg(&work)
        .output()
        .expect("running bm-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bm-bench --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for scenario in [
        "| baseline |",
        "| fleet |",
        "| api |",
        "| watch |",
        "| memory |",
    ] {
        assert!(stdout.contains(scenario), "no {scenario} row in:\n{stdout}");
    }
    assert!(stdout.contains("0 lost"), "{stdout}");
}

/// `--store postgres` on the fleet: one and three replicas on a throwaway PostgreSQL, every
/// reimage succeeded and every machine ended provisioned on both.
#[test]
fn quick_fleet_on_postgres_keeps_every_invariant() {
    if let Err(e) = bm_pg_cluster::find_binaries() {
        panic!("cannot benchmark PostgreSQL: {e}");
    }
    let build = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "bm-server", "--bin", "bm-server"])
        .output()
        .expect("cargo build");
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_bm-bench"))
        .parent()
        .unwrap()
        .to_path_buf();
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bm-bench-quick-pg");
    let out = Command::new(env!("CARGO_BIN_EXE_bm-bench"))
        .args([
            "run",
            "--quick",
            "--scenario",
            "fleet",
            "--store",
            "postgres",
            "--server-bin",
        ])
        .arg(bin_dir.join("bm-server"))
        .arg("--work-dir")
        .arg(&work)
        .output()
        .expect("running bm-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bm-bench --quick --store postgres failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "| fleet | reimages/s |",
        "| fleet-pg | PostgreSQL: single-row durable commits/s",
        "| fleet-pg | 1 replica: reimages/s |",
        "| fleet-pg | 3 replicas: reimages/s |",
        "| fleet-pg | 3 replicas: bm-server CPU s per 1,000 reimages",
    ] {
        assert!(stdout.contains(row), "no {row:?} row in:\n{stdout}");
    }
}
