//! The store's faults as clients and operators see them: a full disk, a damaged database,
//! a second server on one data directory, and `bm-server backup`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bm_proto::v1 as pb;
use bm_store::{SqliteConfig, SqliteStore};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::inproc::InProcess;
use crate::support::{Server, bin, fake_machine};

/// The next status of `service` on a health watch that differs from `from`.
async fn health_turns(
    watch: &mut tonic::Streaming<HealthCheckResponse>,
    from: ServingStatus,
) -> ServingStatus {
    let next = async {
        loop {
            let status = watch.message().await.unwrap().unwrap().status();
            if status != from {
                return status;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), next)
        .await
        .expect("health did not change")
}

async fn health_of(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// A full disk: writes answer UNAVAILABLE saying so, reads and health go on, the
/// `bm-store-writes` health entry shows it, and all of it comes back once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_unavailable_and_shows_in_health_until_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig {
        max_db_bytes: Some(1 << 20),
        ..SqliteConfig::new(dir.path())
    })
    .unwrap();
    // What an operator will delete to make room.
    let db = store.path().to_owned();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE TABLE filler (b BLOB); INSERT INTO filler VALUES (zeroblob(400000));",
        )
        .unwrap();
    let server = InProcess::with_store(Arc::new(store)).await;
    let channel = server.channel().await;
    let mut machines = pb::machine_service_client::MachineServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel.clone());
    let mut writes = health
        .watch(HealthCheckRequest {
            service: "bm-store-writes".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        writes.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let mut registered = 0u32;
    let refused = loop {
        assert!(registered < 2_000, "the size limit never took effect");
        let mut m = fake_machine(&format!("m-{registered:04}"), registered, &[("rack", "r1")]);
        m.spec.as_mut().unwrap().network_config = "n".repeat(4_000);
        match machines
            .register_machine(pb::RegisterMachineRequest { machine: Some(m) })
            .await
        {
            Ok(_) => registered += 1,
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("the data directory's disk is full"),
        "{refused:?}"
    );
    assert_eq!(
        health_turns(&mut writes, ServingStatus::Serving).await,
        ServingStatus::NotServing
    );
    assert_eq!(health_of(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(
        health_of(&mut health, "baremetal.v1.MachineService").await,
        ServingStatus::Serving
    );
    let listed = machines
        .list_machines(pb::ListMachinesRequest {
            page_size: 1000,
            label_selector: "rack=r1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.machines.len() as u32, registered);

    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("DELETE FROM filler", [])
        .unwrap();
    machines
        .register_machine(pb::RegisterMachineRequest {
            machine: Some(fake_machine("after", 4_000, &[])),
        })
        .await
        .unwrap();
    assert_eq!(
        health_turns(&mut writes, ServingStatus::NotServing).await,
        ServingStatus::Serving
    );
    server.stop().await.expect("serve");
}

/// Overwrites the first page of the `logs` table with garbage, as a bad disk would.
fn damage(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let (root, page): (i64, i64) = conn
        .query_row(
            "SELECT rootpage, (SELECT page_size FROM pragma_page_size) FROM sqlite_master WHERE name = 'logs'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    drop(conn);
    let mut bytes = std::fs::read(db).unwrap();
    let start = ((root - 1) * page) as usize;
    bytes[start..start + page as usize].fill(0xA5);
    std::fs::write(db, bytes).unwrap();
}

/// A damaged database: the server refuses to start and says how to restore; with
/// `--read-only-on-corruption` it serves reads, refuses writes, runs nothing, and health
/// tells the two apart.
#[tokio::test]
async fn a_damaged_store_is_refused_or_served_read_only() {
    let mut server = Server::start();
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[("rack", "r1")])).await;
    c.register(fake_machine("m-2", 2, &[])).await;
    let (status, _) = server.terminate();
    assert!(status.success());
    let data = server.dir.join("data");
    damage(&data.join("baremetal.db"));

    let refused = Command::new(bin("bm-server", "bm-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("integrity check")
            && stderr.contains("restore it from a backup")
            && stderr.contains("--read-only-on-corruption"),
        "{stderr}"
    );
    assert!(refused.stdout.is_empty(), "it did not listen");

    let read_only = Server::start_in(
        &server.dir,
        &["--fake-timing", "instant", "--read-only-on-corruption"],
    );
    let mut c = read_only.clients().await;
    assert_eq!(c.machine("m-1").await.labels["rack"], "r1");
    let err = c
        .machines
        .register_machine(pb::RegisterMachineRequest {
            machine: Some(fake_machine("m-3", 3, &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("read-only"), "{err:?}");
    let err = c
        .machines
        .enter_maintenance(pb::EnterMaintenanceRequest {
            machine_id: "m-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut health = HealthClient::new(c.channel.clone());
    assert_eq!(health_of(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(
        health_of(&mut health, "bm-store-writes").await,
        ServingStatus::NotServing
    );
    assert!(
        read_only.log().contains("the executor does not run"),
        "{}",
        read_only.log()
    );
}

/// The lock is on the database file: deleting the lock file does not let a second server
/// run on the same data directory.
#[tokio::test]
async fn a_second_server_is_refused_even_without_the_lock_file() {
    let server = Server::start();
    let data = server.dir.join("data");
    std::fs::remove_file(data.join("LOCK")).unwrap();
    let second = Command::new(bin("bm-server", "bm-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    // The first one is unharmed.
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
}

/// `bm-server backup` copies the store of a running server; a server started on the copy
/// has what was there.
#[tokio::test]
async fn backup_copies_a_running_store_and_the_copy_serves() {
    let server = Server::start();
    let mut c = server.clients().await;
    for n in 1..=5 {
        c.register(fake_machine(&format!("m-{n}"), n, &[("rack", "r1")]))
            .await;
    }
    let to = server.dir.join("backup.db");
    let out = Command::new(bin("bm-server", "bm-server"))
        .args(["backup", "--data-dir"])
        .arg(server.dir.join("data"))
        .arg("--to")
        .arg(&to)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("5 machines") && stdout.contains("integrity check"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::metadata(&to).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let restored = tempfile::tempdir().unwrap();
    std::fs::create_dir(restored.path().join("data")).unwrap();
    std::fs::copy(&to, restored.path().join("data/baremetal.db")).unwrap();
    let copy = Server::start_in(restored.path(), &["--fake-timing", "instant"]);
    let mut c = copy.clients().await;
    let listed = c
        .machines
        .list_machines(pb::ListMachinesRequest {
            page_size: 100,
            label_selector: "rack=r1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.machines.len(), 5);
}
