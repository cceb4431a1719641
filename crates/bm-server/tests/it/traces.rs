//! Traces (`--otlp-endpoint`, issue 15) from the real server process to a real OTLP/gRPC
//! receiver that the test runs: the tree of one reimage, from the caller's span down to the
//! provider calls, and the same trace continued by the server that resumes the operation
//! after the first one was killed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bm_proto::v1 as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::sync::Notify;

use crate::support::{Clients, Server, fake_machine};

/// One received span, flattened.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    kind: SpanKind,
    /// `service.instance.id` of the process that sent it.
    instance: String,
    attributes: HashMap<String, String>,
}

/// An OTLP/gRPC trace receiver on an ephemeral port of 127.0.0.1.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    arrived: Arc<Notify>,
}

fn text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let instance = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.instance.id")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Span {
                    kind: span.kind(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    instance: instance.clone(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
        self.spans.lock().unwrap().extend(received);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Receiver {
    /// Serves on a free port; returns the endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// Waits until a received span satisfies `pred`; the spans so far.
    async fn until(&self, what: &str, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                {
                    let spans = self.spans.lock().unwrap();
                    if pred(&spans) {
                        return spans.clone();
                    }
                }
                arrived.await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), wait).await {
            Ok(spans) => spans,
            Err(_) => panic!(
                "no {what} within 60 s; received: {:#?}",
                self.spans.lock().unwrap()
            ),
        }
    }
}

/// The caller's own span, sent as `traceparent` with its requests.
const CALLER_TRACE: &str = "5b8efff798038103d269b633813fc60c";
const CALLER_SPAN: &str = "eee19b7ec3c1b174";

async fn start(timing: &str) -> (Receiver, Server, String) {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let server = Server::start_with_env(
        &["--fake-timing", timing, "--otlp-endpoint", &endpoint],
        // Batches leave every 100 ms instead of every 5 s.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    (receiver, server, endpoint)
}

async fn reimage_traced(c: &mut Clients, machine: &str) -> pb::Operation {
    reimage_with_parent(c, machine, &format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")).await
}

async fn reimage_with_parent(c: &mut Clients, machine: &str, parent: &str) -> pb::Operation {
    let mut req = tonic::Request::new(pb::ReimageRequest {
        machine_id: machine.into(),
        request_id: format!("traced-{machine}"),
        note: String::new(),
    });
    req.metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    c.machines.reimage(req).await.unwrap().into_inner()
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.parent == parent.span_id && s.trace_id == parent.trace_id)
        .collect()
}

fn the_request(spans: &[Span]) -> Option<&Span> {
    spans
        .iter()
        .find(|s| s.name == "baremetal.v1.MachineService/Reimage")
}

/// Checks the stage spans under one `operation` span: the stages `expected` in order, each
/// with its provider call(s) below it.
fn check_stages(spans: &[Span], operation: &Span, expected: &[String]) {
    let stages: Vec<&Span> = children(spans, operation)
        .into_iter()
        .filter(|s| s.name.starts_with("stage "))
        .collect();
    let mut names: Vec<&str> = stages
        .iter()
        .map(|s| s.attributes["stage"].as_str())
        .collect();
    names.dedup();
    assert_eq!(names, expected, "stage spans under {operation:?}");
    for stage in &stages {
        let calls = children(spans, stage);
        assert!(
            calls
                .iter()
                .any(|c| c.name.starts_with("fake ") && c.kind == SpanKind::Client),
            "no provider call under {stage:?}: {calls:?}"
        );
        for c in calls {
            assert_eq!(c.attributes["provider"], "fake", "{c:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimage_is_one_tree_from_the_caller_to_the_provider_calls() {
    let (receiver, mut server, _) = start("instant").await;
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    c.enter_maintenance("m-1").await;
    let admitted = reimage_traced(&mut c, "m-1").await;
    // The caller's trace id is the operation's, and the API says so.
    assert_eq!(admitted.trace_id, CALLER_TRACE);
    let op = c.wait_end(&admitted.id).await;
    assert_eq!(op.phase(), pb::OperationPhase::Succeeded);
    // A graceful stop exports what is left.
    let (status, _) = server.terminate();
    assert!(status.success(), "{}", server.log());

    let spans = receiver
        .until("ended operation span", |spans| {
            spans.iter().any(|s| {
                s.name == "operation"
                    && s.attributes.get("operation_id") == Some(&op.id)
                    && s.attributes.contains_key("phase")
            })
        })
        .await;
    let request = the_request(&spans).expect("the Reimage call's span");
    assert_eq!(request.trace_id, CALLER_TRACE);
    assert_eq!(request.parent, CALLER_SPAN);
    assert_eq!(request.kind, SpanKind::Server);
    assert_eq!(request.attributes["rpc.grpc.status_code"], "0");

    let operations: Vec<&Span> = children(&spans, request)
        .into_iter()
        .filter(|s| s.name == "operation")
        .collect();
    assert_eq!(operations.len(), 1, "{operations:#?}");
    let operation = operations[0];
    assert_eq!(operation.attributes["operation_id"], op.id);
    assert_eq!(operation.attributes["machine_id"], "m-1");
    assert_eq!(operation.attributes["phase"], "SUCCEEDED");
    let stages: Vec<String> = op.stages.iter().map(|s| s.name.clone()).collect();
    assert!(stages.len() >= 3, "{op:?}");
    check_stages(&spans, operation, &stages);

    // The enter-maintenance before it came without a traceparent: a trace of its own.
    let other = spans
        .iter()
        .find(|s| s.name == "baremetal.v1.MachineService/EnterMaintenance")
        .expect("the EnterMaintenance call's span");
    assert_ne!(other.trace_id, CALLER_TRACE);
    assert!(other.parent.is_empty(), "{other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_resumed_after_a_crash_continues_the_trace_of_the_request() {
    // Normal timing: a reimage takes seconds, so the kill lands mid-operation.
    let (receiver, mut server, _) = start("normal").await;
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    c.enter_maintenance("m-1").await;
    let op = reimage_traced(&mut c, "m-1").await;
    c.wait_stage(&op.id, "repave-image").await;
    // What the first process exported before it died: the call's span (it ended at once).
    receiver
        .until("Reimage call span", |spans| the_request(spans).is_some())
        .await;
    server.kill();

    server.spawn();
    let mut c = server.clients().await;
    let ended = c.wait_end(&op.id).await;
    assert_eq!(ended.phase(), pb::OperationPhase::Succeeded, "{ended:?}");
    assert_eq!(ended.trace_id, CALLER_TRACE);
    let (status, _) = server.terminate();
    assert!(status.success(), "{}", server.log());

    let spans = receiver
        .until("ended resumed operation span", |spans| {
            spans.iter().any(|s| {
                s.name == "operation"
                    && s.attributes.get("phase").map(String::as_str) == Some("SUCCEEDED")
            })
        })
        .await;
    let request = the_request(&spans).expect("the Reimage call's span");
    let runs: Vec<&Span> = children(&spans, request)
        .into_iter()
        .filter(|s| s.name == "operation")
        .collect();
    // The killed run never ended, so it never left; the resumed one is the request's child
    // although another process ran it.
    assert_eq!(runs.len(), 1, "{runs:#?}");
    let resumed = runs[0];
    assert_ne!(
        resumed.instance, request.instance,
        "another process resumed it"
    );
    assert!(!resumed.instance.is_empty());
    // It ran the stages from the interrupted one on.
    let at = ended
        .stages
        .iter()
        .position(|s| s.interruptions > 0)
        .expect("an interrupted stage");
    let rest: Vec<String> = ended.stages[at..].iter().map(|s| s.name.clone()).collect();
    check_stages(&spans, resumed, &rest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_does_not_sample_gets_no_spans_of_its_operation() {
    let (receiver, mut server, _) = start("instant").await;
    let mut c = server.clients().await;
    for (id, n) in [("m-1", 1), ("m-2", 2)] {
        c.register(fake_machine(id, n, &[])).await;
        c.enter_maintenance(id).await;
    }
    // The caller decided not to sample: flags 00.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let quiet = reimage_with_parent(
        &mut c,
        "m-1",
        &format!("00-{unsampled_trace}-b7ad6b7169203331-00"),
    )
    .await;
    let quiet = c.wait_end(&quiet.id).await;
    assert_eq!(quiet.phase(), pb::OperationPhase::Succeeded);
    // No backend has its trace: the API gives no id to look for.
    assert!(quiet.trace_id.is_empty(), "{quiet:?}");
    let traced = reimage_traced(&mut c, "m-2").await;
    c.wait_end(&traced.id).await;
    let (status, _) = server.terminate();
    assert!(status.success(), "{}", server.log());
    // Once the sampled operation's spans are in, the other's would be too.
    let spans = receiver
        .until("the sampled operation's span", |spans| {
            spans.iter().any(|s| {
                s.name == "operation" && s.attributes.get("operation_id") == Some(&traced.id)
            })
        })
        .await;
    let leaked: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == unsampled_trace)
        .collect();
    assert!(leaked.is_empty(), "{leaked:#?}");
    // Nor a trace of its own, as a root.
    let runs: Vec<&Span> = spans
        .iter()
        .filter(|s| s.attributes.get("operation_id") == Some(&quiet.id))
        .collect();
    assert!(runs.is_empty(), "{runs:#?}");
    assert!(spans.iter().any(|s| s.name.starts_with("stage ")));
}

#[test]
fn a_bad_endpoint_or_sample_ratio_is_refused_at_start_naming_it() {
    for (flags, expected) in [
        (
            [
                "--otlp-endpoint",
                "http://127.0.0.1:4317",
                "--otlp-sample-ratio",
                "1.5",
            ],
            "--otlp-sample-ratio (BM_OTLP_SAMPLE_RATIO) must be within 0 and 1, not 1.5",
        ),
        (
            ["--otlp-endpoint", "not a url", "--otlp-sample-ratio", "1"],
            "refused the endpoint \"not a url\"",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(crate::support::bin("bm-server", "bm-server"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}
