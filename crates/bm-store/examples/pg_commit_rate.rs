//! Measures PgStore's group commit on a durable throwaway cluster beside the database's own
//! single-row commit rate (pgbench, one client): the figures behind the choice of client in
//! docs/ARCHITECTURE.md. `cargo run --release -p bm-store --example pg_commit_rate`.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use bm_domain::{Labels, Machine, MachineId, MachineSpec, Timestamp};
use bm_pg_cluster::{Cluster, Options};
use bm_store::{PgConfig, PgStore, Store};

const WRITES: usize = 20_000;
const IN_FLIGHT: usize = 512;

fn machine(i: usize) -> Machine {
    Machine::register(
        MachineId::new(format!("m-{i:06}")).unwrap(),
        MachineSpec {
            provider: "fake".into(),
            ..MachineSpec::default()
        },
        Labels::default(),
        Timestamp::EPOCH,
    )
    .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cluster = Cluster::start_with(&Options {
        durable: true,
        ..Options::default()
    })
    .unwrap();
    // The database's own limit: single-row durable commits from one client.
    let url = cluster.create_database().unwrap();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let script = cluster.data_dir().with_file_name("one_row.sql");
    std::fs::write(&script, "INSERT INTO t VALUES (1);\n").unwrap();
    let mut psql = std::process::Command::new("sh");
    psql.args([
        "-c",
        &format!(
            "chmod a+r '{}'; '{}' -h 127.0.0.1 -p {} -U postgres -c 'CREATE TABLE t (v int)' {db}",
            script.display(),
            cluster.bin_dir().join("psql").display(),
            cluster.port()
        ),
    ]);
    assert!(psql.status().unwrap().success());
    let out = cluster
        .command("pgbench")
        .args([
            "-n",
            "-c",
            "1",
            "-T",
            "5",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
        ])
        .arg(cluster.port().to_string())
        .arg("-f")
        .arg(&script)
        .arg(&db)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps"))
        .unwrap_or("tps: ?");
    println!("pgbench, single-row durable commits, 1 client: {tps}");

    let url = cluster.create_database().unwrap();
    let store = Arc::new(PgStore::open(PgConfig::new(url)).unwrap());
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::with_capacity(WRITES);
    for i in 0..WRITES {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.register_machine(machine(i)).await.unwrap();
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "PgStore::register_machine, {IN_FLIGHT} in flight: {WRITES} writes in {secs:.2} s = {:.0} writes/s",
        WRITES as f64 / secs
    );
}
