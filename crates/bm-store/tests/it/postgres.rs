//! What only the PostgreSQL backend must show: several stores (replicas) on one database,
//! migrations under a lock, and the schema check.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bm_domain::{Actor, DomainError, LogLine, OperationId, OperationType};
use bm_pg_cluster::Cluster;
use bm_store::{OperationQuery, PgConfig, PgStore, Store, StoreError, StoreUrl, schema_status};

use crate::fixtures::{machine, maintenance_machine, mid, op, t};

fn open(url: &str) -> Arc<PgStore> {
    Arc::new(PgStore::open(PgConfig::new(url)).unwrap())
}

/// Receives from `rx` until `n` items came; fails the test if they do not come at all.
async fn receive<T: Clone>(rx: &mut tokio::sync::broadcast::Receiver<T>, n: usize) -> Vec<T> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Ok(v)) => got.push(v),
            Ok(Err(e)) => panic!("subscriber failed after {} items: {e}", got.len()),
            Err(_) => panic!("only {} of {n} items arrived", got.len()),
        }
    }
    got
}

/// Two stores on one database, written through both at once: each one's subscribers see
/// every event of both, in revision order, numbered without a gap or a duplicate, and every
/// log line of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_sees_every_event_in_revision_order() {
    let url = Cluster::shared().create_database().unwrap();
    let stores = [open(&url), open(&url)];
    let mut events: Vec<_> = stores.iter().map(|s| s.subscribe_events()).collect();
    let mut logs: Vec<_> = stores.iter().map(|s| s.subscribe_logs()).collect();
    const MACHINES: usize = 24;
    for i in 0..MACHINES {
        stores[i % 2]
            .register_machine(maintenance_machine(&format!("m-{i:02}"), i as u8))
            .await
            .unwrap();
    }
    // Each machine gets an operation admitted through one store and canceled through the
    // other (three events: created, cancel requested, phase changed), all at once.
    let tasks: Vec<_> = (0..MACHINES)
        .map(|i| {
            let (a, b) = (stores[i % 2].clone(), stores[(i + 1) % 2].clone());
            tokio::spawn(async move {
                let o = op(&format!("m-{i:02}"), OperationType::Reimage, "r");
                let id = a.admit(o).await.unwrap().operation.id;
                b.request_cancel(id, Actor::new("alice", "token"), t(5))
                    .await
                    .unwrap();
                id
            })
        })
        .collect();
    let mut ops = Vec::new();
    for task in tasks {
        ops.push(task.await.unwrap());
    }
    // Log lines of two operations, each through its own store.
    for (k, id) in ops.iter().take(2).enumerate() {
        for seq in 1..=10 {
            stores[k].append_log(LogLine {
                operation_id: *id,
                sequence: seq,
                time: t(seq as i64),
                stage: "wipe".into(),
                tag: "fake".into(),
                message: format!("line {seq}"),
            });
        }
    }
    let want = MACHINES * 3;
    for (n, rx) in events.iter_mut().enumerate() {
        let got = receive(rx, want).await;
        let revisions: Vec<u64> = got.iter().map(|e| e.revision).collect();
        assert_eq!(
            revisions,
            (1..=want as u64).collect::<Vec<_>>(),
            "store {n} saw revisions out of order, with a gap or twice"
        );
        let per_op: BTreeSet<OperationId> = got.iter().map(|e| e.operation_id).collect();
        assert_eq!(per_op.len(), MACHINES);
    }
    // What the subscribers saw is what the table holds, from either store.
    for s in &stores {
        let stored = s
            .events_after(0, &Default::default(), 10_000)
            .await
            .unwrap();
        assert_eq!(stored.len(), want);
        assert_eq!(s.last_revision().await.unwrap(), want as u64);
    }
    for (n, rx) in logs.iter_mut().enumerate() {
        let got = receive(rx, 20).await;
        let mut by_op: BTreeMap<OperationId, Vec<u64>> = BTreeMap::new();
        for l in got {
            by_op.entry(l.operation_id).or_default().push(l.sequence);
        }
        assert_eq!(by_op.len(), 2, "store {n}");
        for seqs in by_op.values() {
            assert_eq!(*seqs, (1..=10).collect::<Vec<_>>(), "store {n}");
        }
    }
}

/// Fifty identical and fifty conflicting requests, spread over three stores at once: one
/// operation; every other answer is that operation or a refusal naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_across_replicas_admits_one() {
    let url = Cluster::shared().create_database().unwrap();
    let stores = [open(&url), open(&url), open(&url)];
    stores[0]
        .register_machine(maintenance_machine("m-1", 1))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let s = stores[i % 3].clone();
            let request = if i % 2 == 0 {
                "same".to_owned()
            } else {
                format!("other-{i}")
            };
            tokio::spawn(async move { s.admit(op("m-1", OperationType::Reimage, &request)).await })
        })
        .collect();
    let mut created = Vec::new();
    let mut returned = HashSet::new();
    let mut refused = HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(a) if a.created => created.push(a.operation.id),
            Ok(a) => {
                returned.insert(a.operation.id);
            }
            Err(StoreError::Domain(DomainError::Busy { active, .. })) => {
                refused.insert(active);
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(created.len(), 1, "exactly one operation is created");
    let winner = created[0];
    assert!(returned.iter().chain(&refused).all(|id| *id == winner));
    let listed = stores[2]
        .list_operations(&OperationQuery {
            limit: 10,
            machine_id: Some(mid("m-1")),
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].id, winner);
}

/// Registering one machine through three stores at once: the database's unique key decides,
/// the losers are told it exists (their job met the violation, was rolled back alone and run
/// again), and a batch neighbour's write is not lost with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_between_replicas_fails_only_its_job() {
    let url = Cluster::shared().create_database().unwrap();
    let stores = [open(&url), open(&url), open(&url)];
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let s = stores[i % 3].clone();
            tokio::spawn(async move {
                // Every third one registers a machine of its own, in the same batches.
                if i % 3 == 2 {
                    s.register_machine(machine(&format!("own-{i}"), 100 + i as u8))
                        .await
                        .map(|_| true)
                } else {
                    s.register_machine(machine("contested", 1))
                        .await
                        .map(|_| false)
                }
            })
        })
        .collect();
    let (mut won, mut exists, mut own) = (0, 0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(true) => own += 1,
            Ok(false) => won += 1,
            Err(StoreError::MachineExists(_)) => exists += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((won, exists, own), (1, 19, 10));
}

/// Replicas starting together migrate once, safely; the check reads the version without
/// changing it; a newer schema is refused.
#[test]
fn migrations_are_safe_and_checked() {
    let url = Cluster::shared().create_database().unwrap();
    let status = schema_status(&StoreUrl::parse(&url)).unwrap();
    assert_eq!(status.found, 0);
    assert!(!status.is_current());
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::open(PgConfig::new(url)).map(drop))
        })
        .collect();
    for o in opened {
        o.join().unwrap().unwrap();
    }
    let status = schema_status(&StoreUrl::parse(&url)).unwrap();
    assert!(status.is_current(), "{status:?}");

    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .execute("UPDATE schema_version SET version = version + 1", &[])
        .unwrap();
    drop(client);
    assert!(schema_status(&StoreUrl::parse(&url)).unwrap().is_newer());
    let err = PgStore::open(PgConfig::new(url)).unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
}

/// The SQLite check, on a fresh directory, an opened store and a newer one.
#[test]
fn sqlite_schema_status() {
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::parse(dir.path().to_str().unwrap());
    assert_eq!(schema_status(&url).unwrap().found, 0);
    drop(bm_store::SqliteStore::open(bm_store::SqliteConfig::new(dir.path())).unwrap());
    let status = schema_status(&url).unwrap();
    assert!(status.is_current(), "{status:?}");
}

/// Writes a self-signed certificate for 127.0.0.1 and its key, readable by the server (which
/// runs as `postgres` when the tests run as root); returns the certificate's path.
fn certificate(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        let ok = std::process::Command::new("chown")
            .arg("postgres:")
            .arg(&crt)
            .arg(&key)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    (crt, key)
}

/// A server that takes TLS connections only: `sslmode=require` connects without checking the
/// certificate, `verify-full` checks it against `sslrootcert`, refuses another CA's, and asks
/// for the file when it is missing; `disable` is turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_as_the_url_asks() {
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = certificate(dir.path(), "server");
    let (other, _) = certificate(dir.path(), "other");
    let quoted = |p: &std::path::Path| format!("'{}'", p.display());
    let cluster = Cluster::start_with(&bm_pg_cluster::Options {
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), quoted(&crt)),
            ("ssl_key_file".into(), quoted(&key)),
        ],
        hba: Some("hostssl all all 127.0.0.1/32 trust\n".into()),
        ..Default::default()
    })
    .unwrap();
    let url = cluster.create_database().unwrap();
    let with = |query: String| PgStore::open(PgConfig::new(format!("{url}?{query}")));

    let plain = with("sslmode=disable".into()).unwrap_err();
    assert!(format!("{plain:?}").contains("pg_hba.conf"), "{plain:?}");

    let s = with("sslmode=require".into()).unwrap();
    s.register_machine(machine("m-1", 1)).await.unwrap();
    drop(s);
    let s = with(format!("sslmode=verify-full&sslrootcert={}", crt.display())).unwrap();
    assert_eq!(s.get_machine(&mid("m-1")).await.unwrap().id, mid("m-1"));
    drop(s);

    let wrong = with(format!(
        "sslmode=verify-full&sslrootcert={}",
        other.display()
    ))
    .unwrap_err();
    assert!(
        format!("{wrong:?}").contains("InvalidCertificate"),
        "{wrong:?}"
    );
    let missing = with("sslmode=verify-full".into()).unwrap_err();
    assert!(
        format!("{:?}", missing).contains("sslrootcert"),
        "{missing:?}"
    );
}
