//! Writes `tests/it/golden/store-pg-v1.sql`, the PostgreSQL fixture of the schema upgrade
//! test (see `tests/it/golden/README.md`). Run by hand, once per PostgreSQL schema version:
//! `cargo run -p bm-store --example make_pg_fixture`.

use std::path::{Path, PathBuf};

use bm_store::*;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/golden")
        .join(name)
}

/// Writes `golden/store-pg-v1.sql`: the records of `store-v1.db` (read through today's
/// SqliteStore) put into a PostgreSQL database that today's PgStore created, then dumped.
/// Run by hand (`cargo run -p bm-store --example make_pg_fixture`), once
/// per PostgreSQL schema version; never to refresh a fixture that has shipped.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(golden("store-v1.db"), dir.path().join("baremetal.db")).unwrap();
    let s = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
    let machines = s
        .list_machines(&MachineQuery {
            limit: 100,
            ..MachineQuery::default()
        })
        .await
        .unwrap()
        .items;
    let ops = s
        .list_operations(&OperationQuery {
            limit: 100,
            ..OperationQuery::default()
        })
        .await
        .unwrap()
        .items;
    let events = s
        .events_after(0, &EventFilter::default(), 10_000)
        .await
        .unwrap();
    let mut logs = Vec::new();
    for o in &ops {
        logs.extend(s.logs_after(o.id, 0, 10_000).await.unwrap());
    }
    let cluster = bm_pg_cluster::Cluster::shared();
    let url = cluster.create_database().unwrap();
    drop(bm_store::PgStore::open(bm_store::PgConfig::new(url.clone())).unwrap());
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let doc = |v: &dyn erased::Json| {
            let d = v.json();
            let crc = i64::from(crc32fast::hash(d.as_bytes()));
            (d, crc)
        };
        for m in &machines {
            let (d, crc) = doc(m);
            c.execute(
                "INSERT INTO machines (id, phase, effective_state, doc, doc_crc32) VALUES ($1, $2, $3, $4, $5)",
                &[&m.id.as_str(), &m.status.phase.as_str(), &m.effective_state().as_str(), &d, &crc],
            )
            .unwrap();
            for mac in &m.spec.mac_addresses {
                c.execute(
                    "INSERT INTO machine_macs (mac, machine_id) VALUES ($1, $2)",
                    &[&mac.to_string(), &m.id.as_str()],
                )
                .unwrap();
            }
        }
        for o in &ops {
            let (d, crc) = doc(o);
            c.execute(
                "INSERT INTO operations (id, machine_id, type, phase, request_id, cancel_requested, doc, doc_crc32)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&o.id.to_string(), &o.machine_id.as_str(), &o.op_type.as_str(), &o.phase.as_str(),
                  &o.request_id.as_str(), &o.cancel_requested, &d, &crc],
            )
            .unwrap();
        }
        for e in &events {
            c.execute(
                "INSERT INTO events (revision, operation_id, machine_id, time, operation_type, kind, phase, stage, attempt, message)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[&(e.revision as i64), &e.operation_id.to_string(), &e.machine_id.as_str(), &e.time.as_unix_micros(),
                  &e.operation_type.as_str(), &e.kind.as_str(), &e.phase.as_str(), &e.stage, &i64::from(e.attempt), &e.message],
            )
            .unwrap();
        }
        for (i, l) in logs.iter().enumerate() {
            c.execute(
                "INSERT INTO logs (operation_id, sequence, time, stage, tag, message, log_revision)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&l.operation_id.to_string(), &(l.sequence as i64), &l.time.as_unix_micros(), &l.stage, &l.tag,
                  &l.message, &(i as i64 + 1)],
            )
            .unwrap();
        }
        let last = events.last().map_or(0, |e| e.revision as i64);
        c.execute("UPDATE counters SET value = $1 WHERE name = 'events'", &[&last]).unwrap();
        c.execute("UPDATE counters SET value = $1 WHERE name = 'logs'", &[&(logs.len() as i64)]).unwrap();
        let db = url.rsplit('/').next().unwrap().to_owned();
        let out = cluster
            .command("pg_dump")
            .args(["--no-owner", "--no-privileges", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(cluster.port().to_string())
            .arg(db)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(golden("store-pg-v1.sql"), out.stdout).unwrap();
    })
    .await
    .unwrap();
}
/// Serialising records of either type behind one reference.
mod erased {
    pub(super) trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap()
        }
    }
}
