//! What only the durable backend shows: everything survives a close and reopen, and leases of
//! a previous run are released at start.

use bm_domain::{EventKind, LogLine, OperationPhase, OperationType};
use bm_store::{EventFilter, Lease, SqliteConfig, SqliteStore, Store};

use crate::fixtures::{maintenance_machine, mid, op, t};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_reopen_and_leases_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let (op_id, machine) = {
        let s = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
        s.register_machine(maintenance_machine("m-1", 1))
            .await
            .unwrap();
        let a = s
            .admit(op("m-1", OperationType::Reimage, "r"))
            .await
            .unwrap()
            .operation;
        let lease = Lease {
            owner: "old".into(),
            expires_at: t(1_000_000_000),
        };
        let claimed = s.claim(&lease, t(0), 1).await.unwrap().remove(0);
        let mut o = claimed.operation;
        o.start(t(1)).unwrap();
        o.begin_stage("set-netboot", t(1));
        s.save_progress(&claimed.fence, &o, vec![]).await.unwrap();
        s.append_log(LogLine {
            operation_id: a.id,
            sequence: 1,
            time: t(1),
            stage: "set-netboot".into(),
            tag: "bmc".into(),
            message: "PXE next".into(),
        });
        let m = s.get_machine(&mid("m-1")).await.unwrap();
        // Closed without releasing its lease, as a killed process would leave it.
        s.close();
        (a.id, m)
    };
    let s = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
    assert_eq!(s.get_machine(&mid("m-1")).await.unwrap(), machine);
    let o = s.get_operation(op_id).await.unwrap();
    assert_eq!(o.phase, OperationPhase::Running);
    assert_eq!(o.stages.len(), 1);
    assert_eq!(s.logs_after(op_id, 0, 10).await.unwrap().len(), 1);
    let events = s
        .events_after(0, &EventFilter::default(), 10)
        .await
        .unwrap();
    assert_eq!(events[0].kind, EventKind::Created);
    // The lease of the previous run does not hold the operation back.
    let lease = Lease {
        owner: "new".into(),
        expires_at: t(2_000_000_000),
    };
    let claimed = s.claim(&lease, t(10), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].operation.id, op_id);
}

/// An operation record that cannot be read back is skipped by claims without taking the place
/// of a readable one, so it never holds the rest of the work up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_operation_does_not_hold_up_claims() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
    let mut ids = Vec::new();
    for m in ["m-1", "m-2"] {
        s.register_machine(maintenance_machine(m, ids.len() as u8 + 1))
            .await
            .unwrap();
        let admitted = s.admit(op(m, OperationType::Reimage, "r")).await.unwrap();
        ids.push(admitted.operation.id);
    }
    s.append_log(LogLine {
        operation_id: ids[1],
        sequence: 1,
        time: t(1),
        stage: "set-netboot".into(),
        tag: "bmc".into(),
        message: "PXE next".into(),
    });
    let path = s.path().to_owned();
    drop(s);
    // The oldest pending operation, the first a claim looks at, is damaged on disk.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE operations SET doc = '{' WHERE id = ?1",
            [ids[0].to_string()],
        )
        .unwrap();

    let s = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
    let lease = Lease {
        owner: "x".into(),
        expires_at: t(1_000_000_000),
    };
    let claimed = s.claim(&lease, t(0), 1).await.unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.operation.id).collect::<Vec<_>>(),
        [ids[1]]
    );
    assert_eq!(s.logs_after(ids[1], 0, 10).await.unwrap().len(), 1);
    // A resume point past every sequence (a client's u64) reads nothing, not everything.
    assert!(s.logs_after(ids[1], u64::MAX, 10).await.unwrap().is_empty());
}
