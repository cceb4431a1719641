//! Several real bm-server processes on one PostgreSQL database (issue 12): operations
//! survive the death of the replica that ran them, watchers on any replica see every event
//! of every operation in revision order with no gap and no duplicate, admission holds across
//! replicas, and a replica that stalled past its lease writes nothing after the takeover.
//!
//! The database is a throwaway cluster this test binary starts (`bm-pg-cluster`).

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bm_pg_cluster::Cluster;
use bm_proto::v1 as pb;
use tokio::sync::Notify;

use crate::support::{Server, connect, fake_machine};

/// Lease of every replica: short, so that a dead one's operations are taken up in seconds.
const LEASE: &str = "2s";

fn replica(url: &str, timing: &str) -> Server {
    replica_leased(url, timing, LEASE)
}

fn replica_leased(url: &str, timing: &str, lease: &str) -> Server {
    Server::start_with(&[
        "--store",
        url,
        "--lease-duration",
        lease,
        "--fake-timing",
        timing,
        "--op-rate-per-principal",
        "100000",
        "--op-burst-per-principal",
        "100000",
    ])
}

fn signal(server: &Server, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &server.pid()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill {sig}");
}

fn is_terminal(e: &pb::OperationEvent) -> bool {
    e.r#type == pb::EventType::PhaseChanged as i32
        && [
            pb::OperationPhase::Succeeded,
            pb::OperationPhase::Failed,
            pb::OperationPhase::Canceled,
        ]
        .iter()
        .any(|p| *p as i32 == e.phase)
}

/// What one watcher received, shared with the test.
#[derive(Default)]
struct Seen {
    events: Mutex<Vec<pb::OperationEvent>>,
    /// Wakes the test when events arrive or the watcher moved to another replica.
    changed: Notify,
    /// How many replicas the watcher has left (their stream broke).
    failovers: Mutex<usize>,
}

impl Seen {
    fn events(&self) -> Vec<pb::OperationEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the events received (120 s at most).
    async fn wait(&self, what: &str, done: impl Fn(&[pb::OperationEvent]) -> bool) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if done(&self.events.lock().unwrap()) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what}: not within 120 s ({} events received)",
                    self.events.lock().unwrap().len()
                )
            });
    }
}

/// Watches every event of the fleet from the first, on `addrs[0]`; when that replica's
/// stream breaks (it died), resumes on the next one from the last revision received.
fn watch(addrs: Vec<String>) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let out = seen.clone();
    tokio::spawn(async move {
        for (i, addr) in addrs.iter().enumerate() {
            if i > 0 {
                *out.failovers.lock().unwrap() += 1;
                out.changed.notify_waiters();
            }
            let after = out.events.lock().unwrap().last().map_or(0, |e| e.revision);
            let Ok(mut c) = tokio::time::timeout(Duration::from_secs(5), connect(addr)).await
            else {
                continue;
            };
            let Ok(stream) = c
                .operations
                .watch_operations(pb::WatchOperationsRequest {
                    after_revision: Some(after),
                    ..Default::default()
                })
                .await
            else {
                continue;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(batch)) = stream.message().await {
                out.events.lock().unwrap().extend(batch.events);
                out.changed.notify_waiters();
            }
        }
    });
    seen
}

/// Revisions from 1, each one more than the last: nothing missed, nothing twice.
fn assert_gap_free(events: &[pb::OperationEvent], who: &str) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e.revision,
            i as u64 + 1,
            "{who}: event {i} has revision {} (gap or duplicate)",
            e.revision
        );
    }
}

fn count_terminal(events: &[pb::OperationEvent]) -> usize {
    events.iter().filter(|e| is_terminal(e)).count()
}

fn by_operation(events: &[pb::OperationEvent]) -> BTreeMap<String, Vec<pb::OperationEvent>> {
    let mut out: BTreeMap<String, Vec<pb::OperationEvent>> = BTreeMap::new();
    for e in events {
        out.entry(e.operation_id.clone())
            .or_default()
            .push(e.clone());
    }
    out
}

/// Three replicas, 1,000 operations submitted round-robin; one replica SIGKILLed mid-run,
/// then a second. Every operation ends exactly once, no stage that had succeeded runs
/// again, and every watcher sees every event in revision order, with no gap and no
/// duplicate, including one that resumes on another replica after its own died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_run_every_operation_once_through_two_crashes() {
    let url = Cluster::shared().create_database().expect("database");
    let mut servers: Vec<Server> = (0..3).map(|_| replica(&url, "normal")).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    // Watchers: one per replica; the first moves to the third when its replica dies.
    let on_a = watch(vec![addrs[0].clone(), addrs[2].clone()]);
    let on_b = watch(vec![addrs[1].clone()]);
    let on_c = watch(vec![addrs[2].clone()]);

    const MACHINES: usize = 500;
    let mut clients = Vec::new();
    for a in &addrs {
        clients.push(connect(a).await);
    }
    let rows: Vec<pb::Machine> = (0..MACHINES)
        .map(|i| fake_machine(&format!("m-{i:03}"), i as u32 + 1, &[]))
        .collect();
    let imported = clients[0]
        .machines
        .import_machines(pb::ImportMachinesRequest {
            machines: rows,
            source: "replicas test".into(),
            validate_only: false,
        })
        .await
        .expect("import")
        .into_inner();
    assert_eq!(imported.results.len(), MACHINES);

    // 500 maintenance entries, then 500 reimages: 1,000 operations, round-robin.
    let mut ids = Vec::new();
    for i in 0..MACHINES {
        let op = clients[i % 3]
            .machines
            .enter_maintenance(pb::EnterMaintenanceRequest {
                machine_id: format!("m-{i:03}"),
                request_id: format!("enter-{i}"),
                ..Default::default()
            })
            .await
            .expect("enter maintenance")
            .into_inner();
        ids.push(op.id);
    }
    on_c.wait("the maintenance entries end", |e| {
        count_terminal(e) >= MACHINES
    })
    .await;
    for i in 0..MACHINES {
        let op = clients[(i + 1) % 3]
            .reimage(&format!("m-{i:03}"), &format!("reimage-{i}"))
            .await
            .expect("reimage");
        ids.push(op.id);
    }
    // Mid-run: some images are being written.
    on_c.wait("reimages reach repave-image", |e| {
        e.iter()
            .filter(|e| e.stage == "repave-image" && e.r#type == pb::EventType::StageStarted as i32)
            .count()
            >= 50
    })
    .await;
    servers[0].kill();
    // The dead replica's operations are taken up by the others once their leases expire.
    on_c.wait("an operation of the dead replica resumes", |e| {
        e.iter()
            .any(|e| e.message.contains("resumed after a server restart"))
    })
    .await;
    servers[1].kill();
    on_c.wait("every operation ends", |e| {
        count_terminal(e) >= 2 * MACHINES
    })
    .await;

    // Every operation ended exactly once, as the survivor's watcher saw it.
    let seen_c = on_c.events();
    assert_gap_free(&seen_c, "watcher on the surviving replica");
    let ops = by_operation(&seen_c);
    assert_eq!(ops.len(), 2 * MACHINES);
    for id in &ids {
        let events = ops.get(id).unwrap_or_else(|| panic!("no events of {id}"));
        assert_eq!(
            count_terminal(events),
            1,
            "{id} ended {} times",
            count_terminal(events)
        );
        // No stage that had succeeded started again.
        let mut succeeded: HashMap<&str, usize> = HashMap::new();
        for e in events {
            if e.r#type == pb::EventType::StageSucceeded as i32 {
                *succeeded.entry(&e.stage).or_default() += 1;
            }
            if e.r#type == pb::EventType::StageStarted as i32 {
                assert!(
                    !succeeded.contains_key(e.stage.as_str()),
                    "{id}: stage {} started again after it had succeeded",
                    e.stage
                );
            }
        }
        assert!(succeeded.values().all(|n| *n == 1), "{id}: {succeeded:?}");
        // An operation that was not interrupted succeeded; one that was either succeeded
        // or failed saying that a crash interrupted a stage unsafe to repeat.
        let last = events.last().unwrap();
        let resumed = events
            .iter()
            .any(|e| e.message.contains("resumed after a server restart"));
        if last.phase != pb::OperationPhase::Succeeded as i32 {
            assert!(
                resumed,
                "{id} ended {:?} without a crash: {}",
                last.phase, last.message
            );
            assert!(
                last.message.contains("interrupted by a server crash"),
                "{id}: {}",
                last.message
            );
        }
    }
    let final_ops: usize = ops
        .values()
        .filter(|ev| {
            ev.iter()
                .any(|e| e.message.contains("resumed after a server restart"))
        })
        .count();
    assert!(final_ops > 0, "no operation was taken over");

    // The second replica's watcher saw a prefix of the same history; the first one's,
    // resumed on the survivor from its last revision, saw all of it.
    let seen_b = on_b.events();
    assert!(!seen_b.is_empty());
    assert_eq!(
        seen_b[..],
        seen_c[..seen_b.len()],
        "watcher on the second replica"
    );
    on_a.wait("the first watcher catches up on the survivor", |e| {
        e.len() >= seen_c.len()
    })
    .await;
    assert_eq!(*on_a.failovers.lock().unwrap(), 1);
    let seen_a = on_a.events();
    assert_eq!(
        seen_a[..seen_c.len()],
        seen_c[..],
        "watcher resumed on another replica"
    );
    assert_gap_free(&seen_a, "watcher resumed on another replica");
}

/// 50 identical and 50 conflicting requests at once, spread over three replicas: one
/// operation; every other request gets it back or is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_holds_across_replicas() {
    let url = Cluster::shared().create_database().expect("database");
    let servers: Vec<Server> = (0..3).map(|_| replica(&url, "instant")).collect();
    let mut c = servers[0].clients().await;
    // The reimage hangs in repave, so it stays active while the requests arrive.
    c.register(fake_machine(
        "m-1",
        1,
        &[("fake.baremetal.dev/hang-action", "repave")],
    ))
    .await;
    c.enter_maintenance("m-1").await;

    let mut tasks = Vec::new();
    for i in 0..100usize {
        let addr = servers[i % 3].addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&addr).await;
            // Even: one request id; odd: each its own.
            let request = if i % 2 == 0 {
                "same".to_owned()
            } else {
                format!("other-{i}")
            };
            (request.clone(), c.reimage("m-1", &request).await)
        }));
    }
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (request, Ok(op)) => admitted.push((request, op.id)),
            (_, Err(status)) => refused.push(status),
        }
    }
    let winners: std::collections::BTreeSet<&String> = admitted.iter().map(|(_, id)| id).collect();
    assert_eq!(winners.len(), 1, "{admitted:?}");
    let winner = (*winners.iter().next().unwrap()).clone();
    // Only requests with the winner's request id got it back.
    let winning_request = &admitted[0].0;
    assert!(admitted.iter().all(|(r, _)| r == winning_request));
    for status in &refused {
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(&winner), "{}", status.message());
    }
    assert_eq!(admitted.len() + refused.len(), 100);
    let listed = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            machine_id: "m-1".into(),
            r#type: pb::OperationType::Reimage as i32,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.operations.len(), 1);
    assert_eq!(listed.operations[0].id, winner);
}

/// A replica stopped (SIGSTOP) past its lease while it runs an operation: another takes the
/// operation over and ends it; when the first one runs again (SIGCONT) it learns that it
/// lost the lease and writes nothing: no event, no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_writes_nothing_after_the_takeover() {
    let url = Cluster::shared().create_database().expect("database");
    let a = replica(&url, "normal");
    let mut c = a.clients().await;
    // Every action takes over a second more, so the stall lands inside one.
    c.register(fake_machine(
        "m-1",
        1,
        &[("fake.baremetal.dev/delay-ms", "1500")],
    ))
    .await;
    c.enter_maintenance("m-1").await;
    let op = c.reimage("m-1", "r").await.expect("reimage");
    c.wait_stage(&op.id, "set-netboot").await;
    signal(&a, "-STOP");

    // Only now does the second replica start, so the first one ran the operation.
    let b = replica(&url, "normal");
    let mut cb = b.clients().await;
    let ended = cb.wait_end(&op.id).await;
    assert_eq!(
        ended.phase,
        pb::OperationPhase::Succeeded as i32,
        "{ended:?}"
    );
    let events = cb.events(&op.id).await;
    let logs_before = log_lines(&mut cb, &op.id).await;

    signal(&a, "-CONT");
    a.wait_for_log("lease lost", 1).await;
    // What the first replica could have written by now is in the tables; read them through
    // the second replica.
    assert_eq!(
        cb.events(&op.id).await,
        events,
        "the stalled replica wrote events"
    );
    assert_eq!(
        log_lines(&mut cb, &op.id).await,
        logs_before,
        "the stalled replica wrote log lines"
    );
    assert_eq!(cb.operation(&op.id).await, ended);
    drop(a);
}

/// A cancel asked through one replica stops an operation that another runs at once, not at
/// the runner's next lease renewal: here leases last a minute (renewed every 20 s), and the
/// cancel call, which waits up to 2 s for the operation to end, already answers it CANCELED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_another_replica_stops_the_operation_at_once() {
    let url = Cluster::shared().create_database().expect("database");
    let runner = replica_leased(&url, "normal", "60s");
    let mut c = runner.clients().await;
    c.register(fake_machine(
        "m-1",
        1,
        &[("fake.baremetal.dev/hang-action", "repave")],
    ))
    .await;
    c.enter_maintenance("m-1").await;
    let op = c.reimage("m-1", "r").await.expect("reimage");
    c.wait_stage(&op.id, "repave-image").await;

    // Started only now: the operation is the first replica's.
    let other = replica_leased(&url, "normal", "60s");
    let mut co = other.clients().await;
    let answer = co
        .operations
        .cancel_operation(pb::CancelOperationRequest {
            operation_id: op.id.clone(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(
        answer.phase,
        pb::OperationPhase::Canceled as i32,
        "the running replica did not stop the operation within the cancel's wait: {answer:?}"
    );
    assert_eq!(co.wait_end(&op.id).await, answer);
}

async fn log_lines(c: &mut crate::support::Clients, op: &str) -> Vec<pb::LogLine> {
    let mut stream = c
        .operations
        .stream_logs(pb::StreamLogsRequest {
            operation_id: op.into(),
            after_sequence: 0,
        })
        .await
        .expect("logs")
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.expect("log message") {
        out.extend(batch.lines);
    }
    out
}

/// Stops or starts the cluster's server, keeping its data (an outage of the database).
fn pg_ctl(cluster: &Cluster, action: &str) {
    let mut cmd = cluster.command("pg_ctl");
    cmd.arg(action).arg("-D").arg(cluster.data_dir()).arg("-w");
    if action == "start" {
        cmd.arg("-l")
            .arg(cluster.log())
            .arg("-o")
            .arg(format!("-p {}", cluster.port()));
    } else {
        cmd.args(["-m", "fast"]);
    }
    let out = cmd.output().expect("pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The database goes away for longer than a lease while an operation runs: requests fail
/// fast with UNAVAILABLE, health says NOT_SERVING, the operation waits, and when the
/// database is back health says SERVING again and the operation goes on and succeeds, with
/// no stage run twice and no log line lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_pauses_operations_and_loses_nothing() {
    let cluster = Cluster::start().expect("cluster");
    let url = cluster.create_database().expect("database");
    let server = replica(&url, "normal");
    let mut c = server.clients().await;
    c.register(fake_machine(
        "m-1",
        1,
        &[("fake.baremetal.dev/delay-ms", "1000")],
    ))
    .await;
    c.enter_maintenance("m-1").await;
    let op = c.reimage("m-1", "r").await.expect("reimage");
    c.wait_stage(&op.id, "reboot-to-netboot").await;

    // Health as a load balancer sees it, watched: it follows the database.
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health watch")
        .into_inner();
    let mut next_status = async move |want: ServingStatus| loop {
        let got = health
            .message()
            .await
            .expect("health stream")
            .expect("health stream ended");
        if got.status == want as i32 {
            return;
        }
    };
    next_status(ServingStatus::Serving).await;

    pg_ctl(&cluster, "stop");
    let started = std::time::Instant::now();
    let err = c
        .machines
        .get_machine(pb::GetMachineRequest {
            machine_id: "m-1".into(),
        })
        .await
        .expect_err("a read with the database down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("database"), "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not fast: {:?}",
        started.elapsed()
    );
    let err = c
        .machines
        .reboot(pb::RebootRequest {
            machine_id: "m-1".into(),
            request_id: "during-outage".into(),
            ..Default::default()
        })
        .await
        .expect_err("a write with the database down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // Down for longer than the lease (2 s): renewals fail every 2/3 s.
    server.wait_for_log("could not renew leases", 4).await;
    // The replica is taken out of rotation while its database cannot be reached ...
    next_status(ServingStatus::NotServing).await;
    pg_ctl(&cluster, "start");
    // ... and put back by itself once it answers again.
    next_status(ServingStatus::Serving).await;

    let ended = c.wait_end(&op.id).await;
    assert_eq!(
        ended.phase,
        pb::OperationPhase::Succeeded as i32,
        "{ended:?}"
    );
    let events = c.events(&op.id).await;
    let mut started_stages: Vec<&str> = events
        .iter()
        .filter(|e| e.r#type == pb::EventType::StageStarted as i32)
        .map(|e| e.stage.as_str())
        .collect();
    let n = started_stages.len();
    started_stages.dedup();
    assert_eq!(started_stages.len(), n, "a stage ran twice: {events:?}");
    // Log lines numbered from 1 with none missing: nothing was dropped in the outage.
    let lines = log_lines(&mut c, &op.id).await;
    assert!(!lines.is_empty());
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.sequence, i as u64 + 1, "log line {i}: {lines:?}");
    }
    // The request refused during the outage left nothing behind.
    let listed = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            machine_id: "m-1".into(),
            r#type: pb::OperationType::Reboot as i32,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.operations.is_empty());
}
