//! The HTTP gateway (`--http-listen`): the API as JSON and Server-Sent Events, through the
//! same authentication as the gRPC API, against the real server process.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::Server;

/// Starts a server with the gateway; returns it with the gateway's base URL.
async fn start(args: &[&str], secure: bool) -> (Server, String) {
    let mut all = vec!["--fake-timing", "instant", "--http-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let server = if secure {
        Server::start_secure(&all)
    } else {
        Server::start_with(&all)
    };
    let addr = server.logged_address("HTTP API on http://").await;
    (server, format!("http://{addr}/api/v1"))
}

/// `POST base/path` with `body` (and a bearer token); the status and the JSON answer.
async fn post(base: &str, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/{path}"))
        .body(body.to_string());
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, value)
}

fn machine(id: &str, n: u8) -> Value {
    json!({
        "machine": {
            "id": id,
            "spec": {
                "provider": "fake",
                "macAddresses": [format!("02:00:00:00:00:{n:02x}")],
                "sshEndpoint": format!("root@10.0.0.{n}:22"),
                "image": "ubuntu-24.04",
                "targetCluster": "prod",
            }
        }
    })
}

/// One SSE event: its type, id and data.
#[derive(Debug)]
struct SseEvent {
    kind: String,
    id: Option<String>,
    data: Value,
}

/// Reads SSE events from `url` until `done` says so (or the stream ends).
async fn read_sse(
    url: &str,
    last_event_id: Option<&str>,
    done: impl Fn(&[SseEvent]) -> bool,
) -> Vec<SseEvent> {
    let mut req = reqwest::Client::new().get(url);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let mut r = req.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{url}");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buf = String::new();
    let mut events = Vec::new();
    let read = async {
        while let Some(chunk) = r.chunk().await.unwrap() {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut kind, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if kind.is_empty() {
                    continue; // a keep-alive comment
                }
                events.push(SseEvent {
                    kind,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
                if done(&events) {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the stream did not deliver within 30 s");
    events
}

fn is_end(e: &Value) -> bool {
    e["type"] == "EVENT_TYPE_PHASE_CHANGED"
        && ["OPERATION_PHASE_SUCCEEDED", "OPERATION_PHASE_FAILED"]
            .contains(&e["phase"].as_str().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_as_json_and_its_streams_as_server_sent_events() {
    let (mut server, base) = start(&[], false).await;
    let (status, m) = post(
        &base,
        "MachineService/RegisterMachine",
        machine("m-1", 1),
        None,
    )
    .await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["effectiveState"], "EFFECTIVE_STATE_NEW");
    let (status, op) = post(
        &base,
        "MachineService/EnterMaintenance",
        json!({"machineId": "m-1", "requestId": "enter-1"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{op}");
    let enter = op["id"].as_str().unwrap().to_owned();
    // The watch of that operation, from the start, ends with it.
    let events = read_sse(
        &format!("{base}/watch?operation_id={enter}&after_revision=0"),
        None,
        |_| false,
    )
    .await;
    assert!(events.iter().all(|e| e.kind == "events"), "{events:?}");
    let all: Vec<&Value> = events
        .iter()
        .flat_map(|e| e.data["events"].as_array().unwrap())
        .collect();
    assert!(all.iter().any(|e| is_end(e)), "{all:?}");

    // A reimage: its events live, then a reconnect resumes after the last id it saw.
    let (status, op) = post(
        &base,
        "MachineService/Reimage",
        json!({"machineId": "m-1", "requestId": "reimage-1"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{op}");
    let reimage = op["id"].as_str().unwrap().to_owned();
    let url = format!("{base}/watch?operation_id={reimage}&after_revision=0");
    let revisions = |events: &[SseEvent]| -> Vec<u64> {
        events
            .iter()
            .flat_map(|e| e.data["events"].as_array().unwrap().clone())
            .map(|e| e["revision"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let whole = read_sse(&url, None, |_| false).await;
    let all = revisions(&whole);
    assert!(all.len() >= 3, "{all:?}");
    // Every event's id is the revision of the last event of its batch.
    for e in &whole {
        assert_eq!(
            e.id,
            revisions(std::slice::from_ref(e))
                .last()
                .map(u64::to_string)
        );
    }
    // A reconnect that says it saw the first event gets the rest, once each.
    let first = all[0].to_string();
    let rest = read_sse(&url, Some(&first), |_| false).await;
    assert_eq!(revisions(&rest), all[1..], "resumed after {first}");
    // The log stream of the ended reimage: every line, then the end.
    let lines = read_sse(&format!("{base}/logs?operation_id={reimage}"), None, |_| {
        false
    })
    .await;
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|e| e.kind == "lines" && e.id.is_some()));

    let (status, got) = post(
        &base,
        "OperationService/GetOperation",
        json!({"operationId": reimage}),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got["phase"], "OPERATION_PHASE_SUCCEEDED", "{got}");
    // A watch open on the gateway does not hold up a graceful stop.
    let mut open = reqwest::get(format!("{base}/watch")).await.unwrap();
    assert_eq!(open.status().as_u16(), 200);
    let (status, took) = server.terminate();
    assert!(status.success(), "{}", server.log());
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The stream ended with the server.
    while let Ok(Some(_)) = open.chunk().await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_the_api_s_codes_with_http_statuses_and_clear_messages() {
    let (_server, base) = start(&[], false).await;
    let (status, e) = post(
        &base,
        "MachineService/GetMachine",
        json!({"machineId": "nope"}),
        None,
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{e}"
    );
    let (status, e) = post(
        &base,
        "MachineService/GetMachine",
        json!({"machineId": 5}),
        None,
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("GetMachineRequest"),
        "{e}"
    );
    let (status, e) = post(&base, "MachineService/Nope", json!({}), None).await;
    assert_eq!(status, 404, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("MachineService/Nope"),
        "{e}"
    );
    // A stream that cannot start is an HTTP error, not an empty stream.
    let r = reqwest::get(format!("{base}/logs?operation_id=op-nope"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = reqwest::get(format!("{base}/watch?after_revision=soon"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let e: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert!(
        e["message"].as_str().unwrap().contains("after_revision"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_asks_for_the_api_s_tokens_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let viewer = bm_server::create_token(&tokens, "v", &["viewer".into()], None, false).unwrap();
    let operator =
        bm_server::create_token(&tokens, "o", &["operator".into()], None, false).unwrap();
    let admin = bm_server::create_token(&tokens, "a", &["admin".into()], None, false).unwrap();
    let tokens = tokens.to_str().unwrap().to_owned();
    let (_server, base) = start(&["--tokens-file", &tokens], true).await;

    let (status, e) = post(&base, "MachineService/ListMachines", json!({}), None).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (401, Some("UNAUTHENTICATED")),
        "{e}"
    );
    let (status, m) = post(
        &base,
        "MachineService/RegisterMachine",
        machine("m-1", 1),
        Some(&admin),
    )
    .await;
    assert_eq!(status, 200, "{m}");
    let (status, list) = post(
        &base,
        "MachineService/ListMachines",
        json!({}),
        Some(&viewer),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(list["machines"][0]["id"], "m-1", "{list}");
    // A viewer sees, an operator acts.
    let enter = json!({"machineId": "m-1", "requestId": "enter"});
    let (status, e) = post(
        &base,
        "MachineService/EnterMaintenance",
        enter.clone(),
        Some(&viewer),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("PERMISSION_DENIED")),
        "{e}"
    );
    let (status, op) = post(
        &base,
        "MachineService/EnterMaintenance",
        enter,
        Some(&operator),
    )
    .await;
    assert_eq!(status, 200, "{op}");
    // The audit trail names the token's owner.
    assert_eq!(op["requestedBy"]["name"], "o", "{op}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_the_gateway_serves_https_with_the_api_s_certificate() {
    let ca = crate::pki::Ca::new("gateway CA");
    let tls_dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::pki::write(tls_dir.path(), &ca.server());
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let server = Server::start_with(&[
        "--fake-timing",
        "instant",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let addr = server.logged_address("HTTP API on https://").await;
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let r = client
        .post(format!("https://{addr}/api/v1/MachineService/ListMachines"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Plain HTTP gets no answer from it.
    assert!(
        reqwest::get(format!("http://{addr}/api/v1/watch"))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_dashboard_s_pages() {
    let (_server, base) = start(&[], false).await;
    let root = base.trim_end_matches("/api/v1");
    let page = reqwest::get(format!("{root}/")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"src="/assets/app.js""#), "{html}");
    for (name, media_type) in [
        ("app.js", "text/javascript"),
        ("api.js", "text/javascript"),
        ("style.css", "text/css"),
    ] {
        let r = reqwest::get(format!("{root}/assets/{name}")).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{name}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(media_type),
            "{name}"
        );
    }
    let missing = reqwest::get(format!("{root}/assets/nothing.js"))
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
}

/// Each stream has an in-process connection of its own: open streams never hold up calls,
/// and past the limit a stream is refused clearly, until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_limited_and_never_starve_the_calls() {
    // Three streams for the gateway, and as many on the in-process connection of the calls:
    // the calls do not wait behind the streams.
    let (_server, base) = start(
        &["--http-max-streams", "3", "--max-concurrent-streams", "3"],
        false,
    )
    .await;
    let client = reqwest::Client::new();
    let mut open = Vec::new();
    for _ in 0..3 {
        let r = client.get(format!("{base}/watch")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        open.push(r);
    }
    // A call goes through while the streams are open.
    let (status, page) = post(&base, "MachineService/ListMachines", json!({}), None).await;
    assert_eq!(status, 200, "{page}");
    let refused = client.get(format!("{base}/watch")).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let body: Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "RESOURCE_EXHAUSTED");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("--http-max-streams"),
        "{body}"
    );
    // Once a dashboard goes away, its place is free again.
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.get(format!("{base}/watch")).send().await.unwrap();
        if r.status().as_u16() == 200 {
            break;
        }
        assert_eq!(r.status().as_u16(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "a closed stream's place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
