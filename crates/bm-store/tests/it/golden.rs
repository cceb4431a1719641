//! Golden files of what the store keeps on disk.
//!
//! Stored machines and operations are the serde form of the domain types, so renaming a
//! field, a variant or a condition type would silently break every existing database. The
//! JSON files in `golden/` are records as the store writes them; `store-v1.db` is a database
//! written by the store at schema version 1, `store-pg-v1.sql` the same records in a
//! PostgreSQL database at its schema version 1 (see `golden/README.md`). When a test here fails,
//! do not edit the fixture: keep reading the old form (a serde alias, a migration) and add a
//! fixture for the new one.

use std::path::{Path, PathBuf};

use bm_domain::{
    ConditionType, Conditions, EventKind, Labels, Machine, MachineId, MachineSpec, MachineStatus,
    Operation, OperationId, OperationPhase, OperationType, Phase, RequestId, StageOutcome,
    Timestamp,
};
use bm_store::{EventFilter, MachineQuery, OperationQuery, SqliteConfig, SqliteStore, Store};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/golden")
        .join(name)
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_unix_micros(1_800_000_000_000_000 + seconds * 1_000_000)
}

/// A machine with every spec field, labels and conditions of known and unknown types.
fn machine() -> Machine {
    let mut conditions = Conditions::new();
    conditions.set(
        ConditionType::Provisioned,
        true,
        "Imaged",
        "ubuntu-24.04 written",
        at(2),
    );
    conditions.set(
        ConditionType::InCustomerCluster,
        true,
        "Joined",
        "node of prod",
        at(3),
    );
    conditions.set(
        ConditionType::NeedsIntervention,
        false,
        "Cleared",
        "cable replaced",
        at(4),
    );
    conditions.set(
        ConditionType::Other("FirmwareOutdated".into()),
        true,
        "BiosOld",
        "BIOS 1.2 < 1.4",
        at(1),
    );
    Machine {
        id: MachineId::new("r740-01").unwrap(),
        spec: MachineSpec {
            provider: "redfish".into(),
            mac_addresses: vec![
                "02:00:00:00:10:01".parse().unwrap(),
                "02:00:00:00:10:02".parse().unwrap(),
            ],
            ssh_endpoint: "root@10.0.0.1:22".into(),
            bmc_endpoint: "redfish+https://10.0.1.1:443".into(),
            image: "ubuntu-24.04".into(),
            target_cluster: "prod".into(),
            network_config: "{\"bond0\": [\"eth0\", \"eth1\"]}".into(),
        },
        labels: Labels::from_pairs([("rack", "r1"), ("example.com/zone", "a"), ("gpu", "")])
            .unwrap(),
        status: MachineStatus {
            phase: Phase::Maintenance,
            conditions,
            active_operation_id: Some(OperationId::from_parts(1_800_000_000_123, 77)),
            state_since: None,
        },
        created_at: at(0),
        updated_at: at(5),
        updated_by: bm_domain::Actor::default(),
    }
}

/// An ended operation whose stages show every field of a stage record.
fn operation() -> Operation {
    let mut op = Operation::new(
        OperationId::from_parts(1_800_000_000_123, 77),
        MachineId::new("r740-01").unwrap(),
        OperationType::Reimage,
        RequestId::new("ticket-4711").unwrap(),
        "replace the boot disk".into(),
        at(10),
    )
    .unwrap();
    op.start(at(11)).unwrap();
    op.begin_stage("set-netboot", at(12));
    op.end_stage(StageOutcome::Succeeded, None, at(13));
    op.begin_stage("power-cycle", at(14));
    op.stage_attempt_failed("BMC timed out");
    op.begin_stage("power-cycle", at(15));
    op.end_stage(StageOutcome::Succeeded, None, at(16));
    op.begin_stage("repave", at(17));
    op.mark_interrupted();
    op.begin_stage("repave", at(18));
    op.release_stage();
    op.end_stage(
        StageOutcome::Failed,
        Some("disk /dev/sda not found"),
        at(19),
    );
    op.phase = OperationPhase::Failed;
    op.finished_at = Some(at(19));
    op.error = Some("stage repave failed: disk /dev/sda not found".into());
    op.cancel_requested = true;
    op
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(golden(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The stored form of a machine decodes to the same values, and today's encoding of those
/// values is the stored form.
#[test]
fn a_stored_machine_reads_back_and_encodes_the_same() {
    let text = fixture("machine.json");
    let decoded: Machine = serde_json::from_str(&text).unwrap();
    let m = machine();
    assert_eq!(decoded, m);
    // A few values by hand, so that the fixture and `machine()` cannot drift together.
    assert_eq!(decoded.spec.bmc_endpoint, "redfish+https://10.0.1.1:443");
    assert_eq!(decoded.labels.get("example.com/zone"), Some("a"));
    assert!(
        decoded
            .status
            .conditions
            .is_true(&ConditionType::InCustomerCluster)
    );
    assert!(
        !decoded
            .status
            .conditions
            .is_true(&ConditionType::NeedsIntervention)
    );
    assert!(
        decoded
            .status
            .conditions
            .is_true(&ConditionType::Other("FirmwareOutdated".into()))
    );
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&m).unwrap(), expected);
}

/// The same for an operation with its stages.
#[test]
fn a_stored_operation_reads_back_and_encodes_the_same() {
    let text = fixture("operation.json");
    let decoded: Operation = serde_json::from_str(&text).unwrap();
    let op = operation();
    assert_eq!(decoded, op);
    assert_eq!(decoded.phase, OperationPhase::Failed);
    assert_eq!(
        decoded
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.outcome, s.attempts, s.released))
            .collect::<Vec<_>>(),
        [
            ("set-netboot", StageOutcome::Succeeded, 1, false),
            ("power-cycle", StageOutcome::Succeeded, 2, false),
            ("repave", StageOutcome::Failed, 2, true),
        ]
    );
    assert_eq!(
        decoded.stages[1].last_error.as_deref(),
        Some("BMC timed out")
    );
    assert_eq!(decoded.stages[2].interruptions, 1);
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&op).unwrap(), expected);
}

/// The audit trail's form (issue 11): the actor of the last machine change and of an
/// operation. The files without it (above) read as an unknown actor and encode unchanged.
#[test]
fn the_audit_trail_s_actors_read_back_and_encode_the_same() {
    let text = fixture("machine-audited.json");
    let mut m = machine();
    m.updated_by = bm_domain::Actor::new("alice", "token");
    assert_eq!(serde_json::from_str::<Machine>(&text).unwrap(), m);
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&m).unwrap(), expected);
    assert!(machine().updated_by.is_unknown());

    let text = fixture("operation-audited.json");
    let mut op = operation();
    op.requested_by = bm_domain::Actor::new("ops-bot", "cert");
    assert_eq!(serde_json::from_str::<Operation>(&text).unwrap(), op);
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&op).unwrap(), expected);
}

/// When a machine entered its effective state (issue 15). The files without it read as a
/// machine that does not know, and encode unchanged.
#[test]
fn a_machine_s_state_since_reads_back_and_encodes_the_same() {
    let text = fixture("machine-state-since.json");
    let mut m = machine();
    m.updated_by = bm_domain::Actor::new("alice", "token");
    m.status.state_since = Some(at(4));
    let decoded: Machine = serde_json::from_str(&text).unwrap();
    assert_eq!(decoded, m);
    assert_eq!(decoded.status.state_since, Some(at(4)));
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&m).unwrap(), expected);
    assert_eq!(machine().status.state_since, None);
}

/// The trace context an operation keeps when the server exports traces (issue 15). The
/// files without it read as an operation without one and encode unchanged.
#[test]
fn an_operation_s_trace_parent_reads_back_and_encodes_the_same() {
    let text = fixture("operation-traced.json");
    let mut op = operation();
    op.requested_by = bm_domain::Actor::new("ops-bot", "cert");
    op.trace_parent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let decoded: Operation = serde_json::from_str(&text).unwrap();
    assert_eq!(decoded, op);
    assert_eq!(decoded.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&op).unwrap(), expected);
    assert_eq!(operation().trace_parent, None);
}

/// A database written by the store at schema version 1 opens with today's code (which
/// migrates it) and holds everything it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_schema_version_1_opens_intact() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(golden("store-v1.db"), dir.path().join("baremetal.db")).unwrap();
    let s = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
    holds_the_v1_fixture(&s).await;
}

/// A PostgreSQL database written at schema version 1 (a plain `pg_dump`, see
/// `golden/README.md`) loads and opens with today's code and holds everything it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_database_of_schema_version_1_opens_intact() {
    let cluster = bm_pg_cluster::Cluster::shared();
    let url = cluster.create_database().unwrap();
    let mut psql = cluster.command("psql");
    psql.args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-f"])
        .arg(golden("store-pg-v1.sql"))
        .stdin(std::process::Stdio::null());
    let out = psql.output().unwrap();
    assert!(
        out.status.success(),
        "loading the dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = bm_store::PgStore::open(bm_store::PgConfig::new(url)).unwrap();
    holds_the_v1_fixture(&s).await;
}

/// The machines, operations, events and log lines of the version-1 fixture (the SQLite file
/// and the PostgreSQL dump hold the same records), and the store takes writes.
async fn holds_the_v1_fixture(s: &dyn Store) {
    let all = s
        .list_machines(&MachineQuery {
            limit: 100,
            ..MachineQuery::default()
        })
        .await
        .unwrap();
    let summary: Vec<(String, Phase, Option<&str>)> = all
        .items
        .iter()
        .map(|m| (m.id.to_string(), m.status.phase, m.labels.get("rack")))
        .collect();
    assert_eq!(
        summary,
        [
            ("machine-1".to_owned(), Phase::Maintenance, Some("r1")),
            ("machine-2".to_owned(), Phase::Maintenance, Some("r2")),
            ("machine-3".to_owned(), Phase::Ready, Some("r1")),
            ("machine-4".to_owned(), Phase::FactoryReady, Some("r2")),
        ]
    );
    let m1 = &all.items[0];
    assert_eq!(m1.spec.ssh_endpoint, "root@10.0.0.1:22");
    assert_eq!(m1.spec.mac_addresses[0].to_string(), "02:00:00:00:00:01");
    assert!(
        m1.status
            .conditions
            .is_true(&ConditionType::OperationCanceled)
    );
    // The label index was filled from the existing machines by the migration.
    let r1 = s
        .list_machines(&MachineQuery {
            limit: 100,
            selector: "rack=r1,zone".parse().unwrap(),
            ..MachineQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        r1.items.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["machine-1", "machine-3"]
    );

    let ops = s
        .list_operations(&OperationQuery {
            limit: 10,
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    let summary: Vec<(&str, OperationType, OperationPhase, usize)> = ops
        .items
        .iter()
        .map(|o| (o.machine_id.as_str(), o.op_type, o.phase, o.stages.len()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                "machine-1",
                OperationType::Reboot,
                OperationPhase::Canceled,
                0
            ),
            (
                "machine-2",
                OperationType::Reboot,
                OperationPhase::Pending,
                0
            ),
            (
                "machine-1",
                OperationType::Reimage,
                OperationPhase::Succeeded,
                3
            ),
        ]
    );
    let reimage = &ops.items[2];
    assert_eq!(reimage.request_id.as_str(), "req-10");
    assert!(
        reimage
            .stages
            .iter()
            .all(|s| s.outcome == StageOutcome::Succeeded)
    );
    let events = s
        .events_after(0, &EventFilter::default(), 1000)
        .await
        .unwrap();
    let kinds = |op: OperationId| -> Vec<EventKind> {
        events
            .iter()
            .filter(|e| e.operation_id == op)
            .map(|e| e.kind)
            .collect()
    };
    assert_eq!(
        kinds(reimage.id),
        [
            EventKind::Created,
            EventKind::StageStarted,
            EventKind::StageStarted,
            EventKind::StageStarted,
            EventKind::StageSucceeded,
            EventKind::PhaseChanged,
        ]
    );
    assert_eq!(
        kinds(ops.items[0].id),
        [
            EventKind::Created,
            EventKind::CancelRequested,
            EventKind::PhaseChanged
        ]
    );
    assert!(events.windows(2).all(|w| w[0].revision < w[1].revision));
    let logs = s.logs_after(reimage.id, 0, 100).await.unwrap();
    assert_eq!(logs.len(), 6);
    assert_eq!(logs[5].message, "repave step 1");
    // The migrated store takes writes.
    s.request_cancel(ops.items[1].id, bm_domain::Actor::default(), at(100))
        .await
        .unwrap();
}

/// A rollout with a machine in each kind of progress.
fn rollout() -> bm_domain::Rollout {
    use bm_domain::{Amount, Progress, RolloutAction, RolloutId, RolloutSpec, Target, WhenBusy};
    let mut r = bm_domain::Rollout::new(
        "ro-01JD3F5Q2W8Y4ZP0N7R6T9V3KM"
            .parse::<RolloutId>()
            .unwrap(),
        RequestId::new("kernel-6.12").unwrap(),
        RolloutSpec {
            action: RolloutAction::MaintenanceReimage,
            max_in_flight: Amount::Percent(25),
            failure_budget: Amount::Machines(2),
            batch_by: Some("rack".into()),
            soak: std::time::Duration::from_secs(900),
            when_busy: WhenBusy::Wait,
        },
        (0..6)
            .map(|i| Target {
                machine_id: MachineId::new(format!("m-{i}")).unwrap(),
                labels: Labels::from_pairs([("rack", if i < 3 { "r1" } else { "r2" })]).unwrap(),
            })
            .collect(),
        bm_domain::Actor::new("alice", "token"),
        at(0),
        "kernel 6.12 everywhere".into(),
    )
    .unwrap();
    let op = |n: u128| OperationId::from_parts(1_800_000_000_000, n);
    r.machines[0].progress = Progress::Succeeded;
    r.machines[0].operations = vec![op(1), op(2), op(3)];
    r.machines[1].progress = Progress::Failed {
        step: 1,
        error: "repave failed".into(),
    };
    r.machines[1].operations = vec![op(4), op(5)];
    r.machines[2].progress = Progress::Skipped {
        reason: "it was ATTENTION when its turn came".into(),
    };
    r.machines[3].progress = Progress::Active {
        step: 1,
        operation: Some(op(6)),
    };
    r.machines[3].operations = vec![op(7), op(6)];
    r.machines[4].progress = Progress::Canceled { step: 0 };
    r.batch = 1;
    r.soak_until = Some(at(60));
    r.update_time = at(30);
    r
}

/// A stored rollout (issue 16) decodes to the same values and encodes the same.
#[test]
fn a_stored_rollout_reads_back_and_encodes_the_same() {
    let text = fixture("rollout.json");
    let decoded: bm_domain::Rollout = serde_json::from_str(&text).unwrap();
    let r = rollout();
    assert_eq!(decoded, r);
    assert_eq!(decoded.batches, ["r1", "r2"]);
    assert_eq!(decoded.spec.soak, std::time::Duration::from_secs(900));
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&r).unwrap(), expected);
}

/// An operation that a rollout started (issue 16) names it. The files without it read as an
/// operation no rollout started, and encode unchanged.
#[test]
fn an_operation_s_rollout_reads_back_and_encodes_the_same() {
    let text = fixture("operation-rollout.json");
    let mut op = operation();
    op.requested_by = bm_domain::Actor::new("ops-bot", "cert");
    op.trace_parent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    op.rollout_id = Some("ro-01JD3F5Q2W8Y4ZP0N7R6T9V3KM".parse().unwrap());
    let decoded: Operation = serde_json::from_str(&text).unwrap();
    assert_eq!(decoded, op);
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&op).unwrap(), expected);
    assert_eq!(operation().rollout_id, None);
}
