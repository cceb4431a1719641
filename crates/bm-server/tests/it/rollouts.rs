//! RolloutService through a real server process: a rollout followed with WatchRollout, a
//! SIGKILL of the server in the middle of it, and the API's refusals.

use bm_proto::v1 as pb;
use bm_proto::v1::rollout_service_client::RolloutServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{Server, fake_machine};

fn create(request_id: &str, op: pb::OperationType) -> pb::CreateRolloutRequest {
    pb::CreateRolloutRequest {
        target: Some(pb::RolloutTarget {
            label_selector: "fleet=a".into(),
            ..Default::default()
        }),
        spec: Some(pb::RolloutSpec {
            operation_type: op.into(),
            max_in_flight: "3".into(),
            failure_budget: "2".into(),
            batch_by: "rack".into(),
            ..Default::default()
        }),
        request_id: request_id.into(),
        note: "kernel 6.12".into(),
    }
}

/// Reads WatchRollout until `done` holds for a message; returns it.
async fn watch_until(
    client: &mut RolloutServiceClient<Channel>,
    id: &str,
    done: impl Fn(&pb::Rollout) -> bool,
) -> pb::Rollout {
    let mut stream = client
        .watch_rollout(pb::WatchRolloutRequest {
            rollout_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let read = async {
        while let Some(r) = stream.message().await.unwrap() {
            if done(&r) {
                return r;
            }
        }
        panic!("the watch ended before the rollout got there");
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("the rollout did not get there within 60 s")
}

fn counts(r: &pb::Rollout) -> pb::RolloutCounts {
    r.counts.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_a_sigkill_and_runs_no_machine_twice() {
    let mut server = Server::start_with(&["--fake-timing", "normal"]);
    let mut c = server.clients().await;
    for i in 0..12u32 {
        let rack = if i % 2 == 0 { "r1" } else { "r2" };
        c.register(fake_machine(
            &format!("m-{i:02}"),
            i + 1,
            &[("fleet", "a"), ("rack", rack)],
        ))
        .await;
    }
    let mut rollouts = RolloutServiceClient::new(c.channel.clone());
    let r = rollouts
        .create_rollout(create("sigkill", pb::OperationType::EnterMaintenance))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.machines.len(), 12);
    assert_eq!(r.batches, ["r1", "r2"]);
    // The same request again is the same rollout.
    let again = rollouts
        .create_rollout(create("sigkill", pb::OperationType::EnterMaintenance))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, r.id);

    // Killed while machines of the first rack are in flight and some are done.
    watch_until(&mut rollouts, &r.id, |r| {
        counts(r).succeeded >= 1 && counts(r).active > 0
    })
    .await;
    server.kill();
    server.spawn();
    let c = server.clients().await;
    let mut rollouts = RolloutServiceClient::new(c.channel.clone());
    let end = watch_until(&mut rollouts, &r.id, |r| {
        r.phase != i32::from(pb::RolloutPhase::Running)
    })
    .await;
    assert_eq!(end.phase(), pb::RolloutPhase::Succeeded, "{end:?}");
    let n = counts(&end);
    assert_eq!((n.succeeded, n.failed, n.pending, n.active), (12, 0, 0, 0));
    assert!(end.end_time.is_some());

    // No machine ran its operation twice; each is the rollout's, with its derived key.
    let mut ops = c.operations.clone();
    for m in &end.machines {
        let list = ops
            .list_operations(pb::ListOperationsRequest {
                machine_id: m.machine_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .operations;
        assert_eq!(list.len(), 1, "{}: {list:?}", m.machine_id);
        assert_eq!(list[0].rollout_id, r.id);
        assert_eq!(list[0].request_id, format!("{}.0", r.id));
        assert_eq!(m.operation_ids, [list[0].id.clone()]);
        assert!(list[0].note.contains("kernel 6.12"), "{}", list[0].note);
    }
    // Listed, newest first, without its machines.
    let listed = rollouts
        .list_rollouts(pb::ListRolloutsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rollouts.len(), 1);
    assert!(listed.rollouts[0].machines.is_empty());
    assert_eq!(counts(&listed.rollouts[0]).succeeded, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_what_it_cannot_do_and_says_why() {
    let server = Server::start();
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[("fleet", "a")])).await;
    let mut rollouts = RolloutServiceClient::new(c.channel.clone());
    let refused = |req: pb::CreateRolloutRequest| {
        let mut rollouts = rollouts.clone();
        async move { rollouts.create_rollout(req).await.unwrap_err() }
    };

    let mut everything = create("a", pb::OperationType::Reboot);
    everything.target = Some(pb::RolloutTarget::default());
    let e = refused(everything).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("rollout target"), "{e:?}");

    let mut zero = create("b", pb::OperationType::Reboot);
    zero.spec.as_mut().unwrap().max_in_flight = "0".into();
    let e = refused(zero).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("spec.max_in_flight"), "{e:?}");

    let e = refused(create("c", pb::OperationType::Rma)).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("machine by machine"), "{e:?}");

    let mut missing = create("d", pb::OperationType::Reboot);
    missing.target = Some(pb::RolloutTarget {
        machine_ids: vec!["m-nope".into()],
        ..Default::default()
    });
    let e = refused(missing).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let e = rollouts
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: "ro-01JD3F5Q2W8Y4ZP0N7R6T9V3KM".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = rollouts
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("rollout_id"), "{e:?}");

    // A rollout whose one machine cannot reboot (FACTORY_READY): skipped, with the
    // server's reason, and the rollout ends; pausing it then is refused.
    let r = rollouts
        .create_rollout(create("e", pb::OperationType::Reboot))
        .await
        .unwrap()
        .into_inner();
    let end = watch_until(&mut rollouts, &r.id, |r| {
        r.phase == i32::from(pb::RolloutPhase::Succeeded)
    })
    .await;
    assert_eq!(end.machines[0].state, "SKIPPED");
    assert!(
        end.machines[0].reason.contains("not allowed"),
        "{:?}",
        end.machines[0]
    );
    let e = rollouts
        .pause_rollout(pb::PauseRolloutRequest {
            rollout_id: r.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("SUCCEEDED"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bmctl_starts_a_rollout_shows_its_failures_and_exits_1_when_the_budget_is_spent() {
    use crate::support::text;
    let server = Server::start();
    let mut c = server.clients().await;
    for i in 0..6u32 {
        let mut labels = vec![("fleet", "a"), ("rack", if i < 3 { "r1" } else { "r2" })];
        if i == 1 || i == 4 {
            labels.push((bm_provider_fake::LABEL_FAIL_ACTION, "drain"));
            labels.push((bm_provider_fake::LABEL_FAIL_KIND, "permanent"));
        }
        c.register(fake_machine(&format!("m-{i}"), i + 1, &labels))
            .await;
    }
    let out = server.bmctl(&[
        "rollout",
        "start",
        "--op",
        "enter-maintenance",
        "-l",
        "fleet=a",
        "--max-in-flight",
        "1",
        "--failure-budget",
        "2",
        "--batch-by",
        "rack",
        "--request-id",
        "cli-rollout",
    ]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(shown.contains("FAILED m-1: "), "{shown}");
    assert!(shown.contains("FAILED m-4: "), "{shown}");
    assert!(shown.contains("rack=r1"), "{shown}");
    // One machine at a time: m-5 never started after the second failure.
    let status = server.bmctl(&["-o", "json", "rollout", "status"]);
    let list: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let detail = server.bmctl(&["rollout", "status", &id]);
    let detail = text(&detail);
    assert!(detail.contains("FAILED"), "{detail}");
    assert!(detail.contains("m-4"), "{detail}");
    let r = server.bmctl(&["-o", "json", "rollout", "status", &id]);
    let r: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(r["phase"], "ROLLOUT_PHASE_FAILED", "{r}");
    assert_eq!(r["counts"]["failed"], 2, "{r}");
    assert_eq!(r["machines"][5]["state"], "PENDING", "{r}");
    // An ended rollout cannot be paused: said plainly, exit code 1.
    let paused = server.bmctl(&["rollout", "pause", &id]);
    assert_eq!(paused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&paused.stderr);
    assert!(said.contains("FAILED: it cannot be paused"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_are_in_the_metrics_by_machine_state_and_phase() {
    let server = Server::start_with(&[
        "--fake-timing",
        "instant",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let metrics = server.logged_address("metrics on http://").await;
    let mut c = server.clients().await;
    for i in 0..3u32 {
        c.register(fake_machine(
            &format!("m-{i}"),
            i + 1,
            &[("fleet", "a"), ("rack", "r1")],
        ))
        .await;
    }
    let mut rollouts = RolloutServiceClient::new(c.channel.clone());
    let r = rollouts
        .create_rollout(create("metrics", pb::OperationType::EnterMaintenance))
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut rollouts, &r.id, |r| {
        r.phase == i32::from(pb::RolloutPhase::Succeeded)
    })
    .await;
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = |name: &str, labels: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
            .unwrap_or_else(|| panic!("no {name} with {labels} in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    let of = format!("rollout=\"{}\"", r.id);
    assert_eq!(
        line("bm_rollout_machines", &format!("{of},state=\"succeeded\"")),
        "3"
    );
    assert_eq!(
        line("bm_rollout_machines", &format!("{of},state=\"failed\"")),
        "0"
    );
    assert_eq!(
        line("bm_rollout_phase", &format!("{of},phase=\"SUCCEEDED\"")),
        "1"
    );
}
