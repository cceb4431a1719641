//! The metrics endpoint (`--metrics-listen`, issue 15) against the real server process:
//! what the executor, the API and the fleet count after a few operations, in both formats.

use std::collections::HashMap;

use bm_proto::v1 as pb;

use crate::support::{Server, fake_machine};

/// Starts a server with metrics on a free port; returns it with the endpoint's URL.
async fn start() -> (Server, String) {
    start_with(&[]).await
}

async fn start_with(extra: &[&str]) -> (Server, String) {
    let mut args = vec![
        "--fake-timing",
        "instant",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let server = Server::start_with(&args);
    let addr = server.logged_address("metrics on http://").await;
    (server, format!("http://{addr}/metrics"))
}

/// The samples of an exposition, by name with labels exactly as written.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("NAME VALUE");
            (name.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

async fn scrape(url: &str, accept: Option<&str>) -> (String, String) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(accept) = accept {
        req = req.header("Accept", accept);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    (content_type, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_stages_calls_and_the_fleet_are_counted() {
    let (server, url) = start().await;
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    // Its repave fails twice (transient), then succeeds: two retries.
    c.register(fake_machine(
        "m-2",
        2,
        &[
            ("fake.baremetal.dev/fail-action", "repave"),
            ("fake.baremetal.dev/fail-times", "2"),
        ],
    ))
    .await;
    // Its repave always fails for good.
    c.register(fake_machine(
        "m-3",
        3,
        &[
            ("fake.baremetal.dev/fail-action", "repave"),
            ("fake.baremetal.dev/fail-kind", "permanent"),
        ],
    ))
    .await;
    for id in ["m-2", "m-3"] {
        let op = c.enter_maintenance(id).await;
        assert_eq!(op.phase(), pb::OperationPhase::Succeeded);
        let op = c.reimage(id, &format!("r-{id}")).await.unwrap();
        c.wait_end(&op.id).await;
    }
    // A call that fails: counted with its code.
    let missing = c
        .machines
        .get_machine(pb::GetMachineRequest {
            machine_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let (content_type, text) = scrape(&url, None).await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    let s = samples(&text);
    let get = |k: &str| {
        s.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in:\n{text}"))
    };
    assert_eq!(
        get(r#"bm_operations_ended_total{type="ENTER_MAINTENANCE",phase="SUCCEEDED"}"#),
        2.0
    );
    assert_eq!(
        get(r#"bm_operations_ended_total{type="REIMAGE",phase="SUCCEEDED"}"#),
        1.0
    );
    assert_eq!(
        get(r#"bm_operations_ended_total{type="REIMAGE",phase="FAILED"}"#),
        1.0
    );
    assert_eq!(get(r#"bm_operations_started_total{type="REIMAGE"}"#), 2.0);
    assert_eq!(
        get(r#"bm_operation_duration_seconds_count{type="REIMAGE",phase="FAILED"}"#),
        1.0
    );
    assert_eq!(
        get(r#"bm_stage_retries_total{type="REIMAGE",stage="repave-image"}"#),
        2.0
    );
    assert_eq!(
        get(
            r#"bm_stage_duration_seconds_count{type="REIMAGE",stage="repave-image",outcome="failed"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            r#"bm_stage_duration_seconds_count{type="REIMAGE",stage="repave-image",outcome="succeeded"}"#
        ),
        1.0
    );
    // Repave attempts: three for m-2 (two failed), one for m-3 (failed for good).
    assert_eq!(
        get(r#"bm_provider_call_duration_seconds_count{provider="fake",action="repave-image"}"#),
        4.0
    );
    assert_eq!(
        get(
            r#"bm_provider_call_errors_total{provider="fake",action="repave-image",kind="transient"}"#
        ),
        2.0
    );
    assert_eq!(
        get(
            r#"bm_provider_call_errors_total{provider="fake",action="repave-image",kind="permanent"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            r#"bm_grpc_requests_total{method="/baremetal.v1.MachineService/RegisterMachine",code="OK"}"#
        ),
        3.0
    );
    assert_eq!(
        get(
            r#"bm_grpc_requests_total{method="/baremetal.v1.MachineService/GetMachine",code="NOT_FOUND"}"#
        ),
        1.0
    );
    // The fleet as it is: m-1 new, m-2 reimaged in maintenance, m-3 failed (attention).
    for (phase, state, n) in [
        ("FACTORY_READY", "NEW", 1.0),
        ("MAINTENANCE", "MAINTENANCE_IDLE", 1.0),
        ("MAINTENANCE", "ATTENTION", 1.0),
        ("READY", "IDLE", 0.0),
    ] {
        assert_eq!(
            get(&format!(
                r#"bm_machines{{phase="{phase}",effective_state="{state}"}}"#
            )),
            n,
            "{phase} {state}"
        );
    }
    assert_eq!(get("bm_executor_running_operations"), 0.0);
    assert_eq!(get("bm_executor_queued_operations"), 0.0);
    // Every write went through the SQLite writer: registrations, admissions, stages.
    assert!(
        get("bm_store_commit_duration_seconds_count") >= 10.0,
        "{text}"
    );
    assert!(get("bm_store_commit_batch_size_sum") >= get("bm_store_commit_batch_size_count"));
    assert_eq!(get("bm_store_commit_failures_total"), 0.0);
    // Time in state: each of the four operations ended BUSY; m-3 is held in ATTENTION.
    assert_eq!(
        get(r#"bm_machine_state_duration_seconds_count{effective_state="BUSY"}"#),
        4.0
    );
    // The idle states end with an admission: m-2 and m-3 left NEW for maintenance, then
    // MAINTENANCE_IDLE for their reimages; m-1 never left NEW.
    assert_eq!(
        get(r#"bm_machine_state_duration_seconds_count{effective_state="NEW"}"#),
        2.0
    );
    assert_eq!(
        get(r#"bm_machine_state_duration_seconds_count{effective_state="MAINTENANCE_IDLE"}"#),
        2.0
    );
    assert!(get(r#"bm_oldest_machine_age_seconds{effective_state="ATTENTION"}"#) >= 0.0);
    assert_eq!(
        get(r#"bm_oldest_machine_age_seconds{effective_state="BLOCKED"}"#),
        0.0
    );
    assert!(
        !text.contains(r#"bm_machine_state_duration_seconds_count{effective_state="ATTENTION"}"#)
    );
    // Cleared: m-3 left ATTENTION (observed), and nothing is held any more.
    let clear = c
        .machines
        .clear_intervention(pb::ClearInterventionRequest {
            machine_id: "m-3".into(),
            request_id: "clear".into(),
            note: "disk replaced".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        c.wait_end(&clear.id).await.phase(),
        pb::OperationPhase::Succeeded
    );
    let (_, text) = scrape(&url, None).await;
    let s = samples(&text);
    assert_eq!(
        s[r#"bm_machine_state_duration_seconds_count{effective_state="ATTENTION"}"#], 1.0,
        "{text}"
    );
    assert_eq!(
        s[r#"bm_oldest_machine_age_seconds{effective_state="ATTENTION"}"#],
        0.0
    );

    // OpenMetrics when asked for it: the same samples, counters' families without _total.
    let (content_type, om) = scrape(
        &url,
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE bm_operations_ended counter\n"), "{om}");
    let om_samples = samples(&om.replace("# EOF\n", ""));
    assert_eq!(
        om_samples[r#"bm_operations_ended_total{type="REIMAGE",phase="FAILED"}"#],
        1.0
    );
}

/// An operation that waits for the executor is queued; canceled while pending, it is counted
/// as ended by the replica that took the cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_operations_and_pending_cancels_are_counted() {
    let (server, url) = start_with(&["--max-concurrent-operations", "1"]).await;
    let mut c = server.clients().await;
    for id in ["m-1", "m-2"] {
        c.register(fake_machine(
            id,
            if id == "m-1" { 1 } else { 2 },
            &[("fake.baremetal.dev/hang-action", "drain")],
        ))
        .await;
    }
    let machines = c.machines.clone();
    let admit = |id: &'static str| {
        let mut machines = machines.clone();
        async move {
            machines
                .enter_maintenance(pb::EnterMaintenanceRequest {
                    machine_id: id.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let running = admit("m-1").await;
    c.wait_stage(&running.id, "drain").await;
    let pending = admit("m-2").await;
    let (_, text) = scrape(&url, None).await;
    let s = samples(&text);
    assert_eq!(s["bm_executor_running_operations"], 1.0, "{text}");
    assert_eq!(s["bm_executor_queued_operations"], 1.0, "{text}");
    for op in [&pending.id, &running.id] {
        c.operations
            .cancel_operation(pb::CancelOperationRequest {
                operation_id: op.clone(),
            })
            .await
            .unwrap();
        c.wait_end(op).await;
    }
    let (_, text) = scrape(&url, None).await;
    let s = samples(&text);
    assert_eq!(
        s[r#"bm_operations_ended_total{type="ENTER_MAINTENANCE",phase="CANCELED"}"#], 2.0,
        "{text}"
    );
    // Only the one that ran was started.
    assert_eq!(
        s[r#"bm_operations_started_total{type="ENTER_MAINTENANCE"}"#], 1.0,
        "{text}"
    );
    assert_eq!(s["bm_executor_queued_operations"], 0.0, "{text}");
}

/// The status poll's readings are provider calls too (action `observe`), failures by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_poll_readings_are_provider_calls() {
    let (server, url) = start_with(&["--status-poll-interval", "1s"]).await;
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    c.register(fake_machine(
        "m-2",
        2,
        &[("fake.baremetal.dev/bmc", "unreachable")],
    ))
    .await;
    server.wait_for_log("status poll round polled=2", 1).await;
    let (_, text) = scrape(&url, None).await;
    let s = samples(&text);
    let observed =
        s[r#"bm_provider_call_duration_seconds_count{provider="fake",action="observe"}"#];
    assert!(observed >= 2.0, "{text}");
    assert!(
        s[r#"bm_provider_call_errors_total{provider="fake",action="observe",kind="unreachable"}"#]
            >= 1.0,
        "{text}"
    );
}

/// Prometheus's `promtool`: `BM_PROMTOOL` (set by `cargo xtask test`), else the `PATH`.
fn promtool() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("BM_PROMTOOL") {
        return p.into();
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
        .expect("promtool is needed: run the tests with `cargo xtask test`, which fetches it, or put it on the PATH")
}

fn alerts_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/alerts")
}

/// `promtool ARGS` with `stdin`; fails the test with its output unless it succeeds.
fn run_promtool(args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool())
        .args(args)
        .current_dir(alerts_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A BMC that answers every request with 503, on a free port of 127.0.0.1; its port.
async fn failing_bmc() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app =
        axum::Router::new().fallback(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE });
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// A server with metrics, the Redfish provider allowed to talk plain HTTP to loopback BMCs,
/// and the status poll every second; `extra` flags too.
async fn start_with_redfish(extra: &[&str]) -> (Server, String) {
    let server_dir = tempfile::tempdir().unwrap();
    let config = server_dir.path().join("providers.toml");
    std::fs::write(
        &config,
        "[redfish]\n[redfish.bmc.\"127.0.0.0/8\"]\nallow_plaintext = true\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let mut args = vec!["--provider-config", &config, "--status-poll-interval", "1s"];
    args.extend_from_slice(extra);
    let started = start_with(&args).await;
    // The server read the file at its start.
    drop(server_dir);
    started
}

fn redfish_machine(id: &str, n: u32, bmc_port: u16) -> pb::Machine {
    let mut m = fake_machine(id, n, &[]);
    let spec = m.spec.as_mut().unwrap();
    spec.provider = "redfish".into();
    spec.bmc_endpoint = format!("redfish+http://127.0.0.1:{bmc_port}");
    spec.ssh_endpoint = String::new();
    m
}

/// Scrapes until `name` has a sample; its value.
async fn wait_for_sample(url: &str, name: &str) -> f64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, text) = scrape(url, None).await;
        if let Some(v) = samples(&text).get(name) {
            return *v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {name} within 30 s:\n{text}"
        );
        // A status poll round comes every second: there is nothing to wait on but it.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Requests to BMCs are timed per host, and hosts past the cap count as `other`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bmc_requests_are_counted_by_host_up_to_the_cap() {
    let (server, url) = start_with_redfish(&["--metrics-max-bmc-hosts", "1"]).await;
    let mut c = server.clients().await;
    let (a, b) = (failing_bmc().await, failing_bmc().await);
    c.register(redfish_machine("r-1", 1, a)).await;
    let first = format!(
        "bm_bmc_request_duration_seconds_count{{provider=\"redfish\",host=\"127.0.0.1:{a}\",status=\"5xx\"}}"
    );
    assert!(wait_for_sample(&url, &first).await >= 1.0);
    // The cap is 1: the second BMC's requests count as `other`.
    c.register(redfish_machine("r-2", 2, b)).await;
    let other =
        "bm_bmc_request_duration_seconds_count{provider=\"redfish\",host=\"other\",status=\"5xx\"}";
    assert!(wait_for_sample(&url, other).await >= 1.0);
    let (_, text) = scrape(&url, None).await;
    assert!(!text.contains(&format!("127.0.0.1:{b}")), "{text}");
}

/// The example alerting rules (docs/alerts) are valid, pass their unit tests, and use only
/// metrics the server exposes; the exposition passes promtool's lint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerting_rules_and_the_exposition_pass_promtool() {
    run_promtool(&["check", "rules", "bm.rules.yml"], "");
    run_promtool(&["test", "rules", "bm.rules.test.yml"], "");

    let (server, url) = start_with_redfish(&[]).await;
    let mut c = server.clients().await;
    // A BMC the status poll reads: the BMC requests have samples.
    let bmc = failing_bmc().await;
    c.register(redfish_machine("r-1", 9, bmc)).await;
    wait_for_sample(
        &url,
        &format!(
            "bm_bmc_request_duration_seconds_count{{provider=\"redfish\",host=\"127.0.0.1:{bmc}\",status=\"5xx\"}}"
        ),
    )
    .await;
    // A reimage whose repave fails once: every family the rules use has a sample.
    c.register(fake_machine(
        "m-1",
        1,
        &[
            ("fake.baremetal.dev/fail-action", "repave"),
            ("fake.baremetal.dev/fail-times", "1"),
        ],
    ))
    .await;
    let op = c.enter_maintenance("m-1").await;
    assert_eq!(op.phase(), pb::OperationPhase::Succeeded);
    let op = c.reimage("m-1", "r-1").await.unwrap();
    assert_eq!(
        c.wait_end(&op.id).await.phase(),
        pb::OperationPhase::Succeeded
    );
    let (_, text) = scrape(&url, None).await;
    run_promtool(&["check", "metrics"], &text);

    let rules = std::fs::read_to_string(alerts_dir().join("bm.rules.yml")).unwrap();
    let used: std::collections::BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("bm_"))
        .collect();
    assert!(!used.is_empty());
    for name in used {
        let family = ["_total", "_count", "_sum", "_bucket"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {name} "))
                || text.contains(&format!("# TYPE {family} ")),
            "the rules use {name}, which the server does not expose:\n{text}"
        );
    }
}
