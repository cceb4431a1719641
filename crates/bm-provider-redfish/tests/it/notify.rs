//! Repair tickets through a webhook (a stub HTTP server), and without one.

use bm_provider::{ErrorKind, Notice, NoticeKind, Provider};
use bm_provider_redfish::{NotifyConfig, RedfishConfig, RedfishProvider};
use serde_json::Value;

use crate::support::{Harness, HttpStub, machine};

const BMC: &str = "redfish+https://10.0.0.5/redfish/v1/Systems/1";

fn notice() -> Notice {
    Notice {
        kind: NoticeKind::RmaTicket,
        summary: "disk /dev/sdb failed SMART".into(),
    }
}

fn provider(webhook: Option<String>) -> RedfishProvider {
    RedfishProvider::new(RedfishConfig {
        notify: NotifyConfig {
            webhook_url: webhook,
            ..NotifyConfig::default()
        },
        ..RedfishConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn a_ticket_is_posted_with_the_operation_as_idempotency_key() {
    let hook = HttpStub::start(201, br#"{"reference":"RMA-1234"}"#.to_vec()).await;
    let p = provider(Some(hook.url("/hooks/rma")));
    let h = Harness::new(machine(BMC, "", &[]));
    assert_eq!(p.notify(h.ctx(), &notice()).await.unwrap(), "RMA-1234");
    let reqs = hook.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hooks/rma"));
    let op = h.operation_id.to_string();
    assert_eq!(r.headers.get("idempotency-key"), Some(&op));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["kind"], "rma_ticket");
    assert_eq!(body["summary"], "disk /dev/sdb failed SMART");
    assert_eq!(body["machine_id"], "node-1");
    assert_eq!(body["operation_id"], op.as_str());
    assert!(h.logged("[ticket] ticket RMA-1234"), "{:#?}", h.lines());
}

#[tokio::test]
async fn webhook_failures_say_whether_to_retry() {
    let h = Harness::new(machine(BMC, "", &[]));
    let down = HttpStub::start(503, b"maintenance".to_vec()).await;
    let e = provider(Some(down.url("/")))
        .notify(h.ctx(), &notice())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    assert!(e.to_string().contains("HTTP 503: maintenance"), "{e}");
    let refused =
        HttpStub::start(400, br#"{"error":{"message":"unknown project"}}"#.to_vec()).await;
    let e = provider(Some(refused.url("/")))
        .notify(h.ctx(), &notice())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert!(e.to_string().contains("unknown project"), "{e}");
}

#[tokio::test]
async fn without_a_webhook_the_notice_is_logged() {
    let h = Harness::new(machine(BMC, "", &[]));
    let reference = provider(None).notify(h.ctx(), &notice()).await.unwrap();
    assert_eq!(reference, format!("notice-{}", h.operation_id));
    assert!(h.logged("disk /dev/sdb failed SMART"), "{:#?}", h.lines());
}

/// The error and its whole source chain, as a log would show them.
fn full_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{e} / {e:?}");
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(&format!(" / {s} / {s:?}"));
        src = s.source();
    }
    out
}

#[tokio::test]
async fn a_webhook_error_does_not_show_the_secret_in_its_path() {
    // A port nobody listens on: the request fails before any answer.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = "T0KEN-s3cr3t-path";
    let url = format!("http://127.0.0.1:{port}/hooks/{secret}?key={secret}");
    let h = Harness::new(machine(BMC, "", &[]));
    let e = provider(Some(url))
        .notify(h.ctx(), &notice())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    let shown = full_error(&e);
    assert!(
        shown.contains(&format!(
            "the ticket webhook http://127.0.0.1:{port} failed"
        )),
        "{shown}"
    );
    assert!(!shown.contains(secret), "{shown}");
}
