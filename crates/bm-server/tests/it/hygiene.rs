//! Hostile client strings: every RPC answers INVALID_ARGUMENT with a short message when a
//! field is huge, and nothing a client sends forges or floods the server's log.

use bm_proto::pbjson_types::FieldMask;
use bm_proto::v1 as pb;
use tonic::Code;

use crate::support::{Server, fake_machine};

/// What a status message may grow to: a few quoted snippets and a sentence.
const MAX_MESSAGE: usize = 1024;

/// 15 KB of input that also tries to forge a log line and colour the terminal.
fn hostile() -> String {
    format!(
        "{}\n2026-01-01T00:00:00.000000Z ERROR bm_server: forged\u{1b}[31m",
        "x".repeat(15_000)
    )
}

#[track_caller]
fn check<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) {
    let s = match r {
        Ok(v) => panic!("{what}: expected INVALID_ARGUMENT, got {v:?}"),
        Err(s) => s,
    };
    assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
    assert!(
        s.message().len() <= MAX_MESSAGE,
        "{what}: a {}-byte message: {:.200}",
        s.message().len(),
        s.message()
    );
    assert!(
        !s.message().chars().any(char::is_control),
        "{what}: control characters are echoed: {:?}",
        s.message()
    );
}

#[tokio::test]
async fn huge_inputs_get_invalid_argument_with_a_short_message() {
    let server = Server::start();
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    let bad = hostile();
    let m = &mut c.machines;
    let o = &mut c.operations;

    check(
        "GetMachine.machine_id",
        m.get_machine(pb::GetMachineRequest {
            machine_id: bad.clone(),
        })
        .await,
    );
    let mut machine = fake_machine("m-2", 2, &[]);
    machine.id = bad.clone();
    check(
        "RegisterMachine.machine.id",
        m.register_machine(pb::RegisterMachineRequest {
            machine: Some(machine),
        })
        .await,
    );
    for field in ["provider", "ssh", "bmc", "image", "cluster", "label"] {
        let mut machine = fake_machine("m-2", 2, &[]);
        let spec = machine.spec.as_mut().unwrap();
        match field {
            "provider" => spec.provider = bad.clone(),
            "ssh" => spec.ssh_endpoint = bad.clone(),
            "bmc" => spec.bmc_endpoint = bad.clone(),
            "image" => spec.image = bad.clone(),
            "cluster" => spec.target_cluster = bad.clone(),
            _ => {
                machine.labels.insert(bad.clone(), bad.clone());
            }
        }
        check(
            &format!("RegisterMachine {field}"),
            m.register_machine(pb::RegisterMachineRequest {
                machine: Some(machine),
            })
            .await,
        );
    }
    let mut row = fake_machine("m-3", 3, &[]);
    row.id = bad.clone();
    let imported = m
        .import_machines(pb::ImportMachinesRequest {
            machines: vec![row],
            source: bad.clone(),
            validate_only: true,
        })
        .await
        .expect("an import reports bad rows in its response")
        .into_inner();
    let result = &imported.results[0];
    assert_eq!(result.error_code, "INVALID_ARGUMENT");
    assert!(
        result.machine_id.len() < 200 && result.error_message.len() < MAX_MESSAGE,
        "the row echoes a snippet: {result:?}"
    );
    for (what, selector, token) in [
        ("label_selector", bad.clone(), String::new()),
        (
            "label_selector (a huge valid-looking one)",
            "a,".repeat(200_000) + "a",
            String::new(),
        ),
        ("page_token", String::new(), bad.clone()),
    ] {
        check(
            &format!("ListMachines.{what}"),
            m.list_machines(pb::ListMachinesRequest {
                label_selector: selector,
                page_token: token,
                ..Default::default()
            })
            .await,
        );
    }
    for (what, id, path) in [
        ("machine.id", bad.clone(), "labels".to_owned()),
        ("unknown path", "m-1".to_owned(), bad.clone()),
        ("labels.<key>", "m-1".to_owned(), format!("labels.{bad}")),
        (
            "a server-owned path",
            "m-1".to_owned(),
            format!("status.{bad}"),
        ),
    ] {
        check(
            &format!("UpdateMachine {what}"),
            m.update_machine(pb::UpdateMachineRequest {
                machine: Some(pb::Machine {
                    id,
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec![path] }),
            })
            .await,
        );
    }
    for (what, machine_id, request_id, note) in [
        ("machine_id", bad.clone(), String::new(), String::new()),
        ("request_id", "m-1".to_owned(), bad.clone(), String::new()),
        ("note", "m-1".to_owned(), String::new(), bad.clone()),
    ] {
        check(
            &format!("Reboot.{what}"),
            m.reboot(pb::RebootRequest {
                machine_id: machine_id.clone(),
                request_id: request_id.clone(),
                note: note.clone(),
            })
            .await,
        );
        check(
            &format!("ClearIntervention.{what}"),
            m.clear_intervention(pb::ClearInterventionRequest {
                machine_id,
                request_id,
                note,
            })
            .await,
        );
    }
    check(
        "GetOperation.operation_id",
        o.get_operation(pb::GetOperationRequest {
            operation_id: bad.clone(),
        })
        .await,
    );
    check(
        "CancelOperation.operation_id",
        o.cancel_operation(pb::CancelOperationRequest {
            operation_id: bad.clone(),
        })
        .await,
    );
    for (what, machine_id, token) in [
        ("machine_id", bad.clone(), String::new()),
        ("page_token", String::new(), bad.clone()),
    ] {
        check(
            &format!("ListOperations.{what}"),
            o.list_operations(pb::ListOperationsRequest {
                machine_id,
                page_token: token,
                ..Default::default()
            })
            .await,
        );
    }
    check(
        "WatchOperations.machine_id",
        o.watch_operations(pb::WatchOperationsRequest {
            machine_id: bad.clone(),
            ..Default::default()
        })
        .await,
    );
    check(
        "WatchOperations.operation_id",
        o.watch_operations(pb::WatchOperationsRequest {
            operation_id: bad.clone(),
            ..Default::default()
        })
        .await,
    );
    check(
        "StreamLogs.operation_id",
        o.stream_logs(pb::StreamLogsRequest {
            operation_id: bad.clone(),
            ..Default::default()
        })
        .await,
    );
}

#[tokio::test]
async fn update_mask_label_keys_are_checked() {
    let server = Server::start();
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[("rack", "r1")])).await;
    for key in ["bad key!", &"k".repeat(5000), "", "Example.com/x"] {
        let r = c
            .machines
            .update_machine(pb::UpdateMachineRequest {
                machine: Some(pb::Machine {
                    id: "m-1".into(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec![format!("labels.{key}")],
                }),
            })
            .await;
        let s = r.expect_err(key);
        assert_eq!(s.code(), Code::InvalidArgument, "{key:.40}: {s:?}");
        assert!(
            s.message().starts_with("update_mask: invalid label key"),
            "{}",
            s.message()
        );
    }
    // A good key still works, and the bad masks changed nothing.
    let m = c.machine("m-1").await;
    assert_eq!(m.labels.get("rack").map(String::as_str), Some("r1"));
}

#[tokio::test]
async fn out_of_range_operation_ids_are_invalid_not_wrapped() {
    let server = Server::start();
    let mut c = server.clients().await;
    let s = c
        .operations
        .get_operation(pb::GetOperationRequest {
            operation_id: "op-8ZZZZZZZZZZZZZZZZZZZZZZZZZ".into(),
        })
        .await
        .expect_err("out of range");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("out of range"), "{}", s.message());
    assert!(!s.message().contains("op-0ZZZ"), "{}", s.message());
}

#[tokio::test]
async fn client_strings_cannot_forge_or_flood_the_log() {
    // Requests of 10 MB are above the default --max-request-bytes (4 MiB): let them in, it
    // is what the server logs of them that is under test.
    let server = Server::start_with(&[
        "--fake-timing",
        "instant",
        "--max-request-bytes",
        "16777216",
    ]);
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    let before = server.log().len();
    // 10 MB of source that tries to forge a line: the import is logged at info.
    let source = format!("{}{}", hostile(), "y".repeat(10 * 1024 * 1024));
    let r = c
        .machines
        .import_machines(pb::ImportMachinesRequest {
            machines: vec![fake_machine("m-2", 2, &[])],
            source,
            validate_only: false,
        })
        .await
        .expect("import")
        .into_inner();
    assert_eq!(r.created_count, 1);
    // Refused requests are logged at debug (the tests' level) with their message.
    let _ = c
        .machines
        .update_machine(pb::UpdateMachineRequest {
            machine: Some(pb::Machine {
                id: "m-1".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec![hostile()],
            }),
        })
        .await
        .expect_err("unknown path");
    // The import's line is written before its response; the refusal's before its status.
    let log = server.log();
    let added = &log[before..];
    assert!(
        added.contains("import") && added.contains("request refused"),
        "the requests were logged:\n{added:.2000}"
    );
    assert!(
        added.len() < 16 * 1024,
        "{} bytes of log for two requests",
        added.len()
    );
    assert!(!added.contains('\u{1b}'), "an ANSI escape reached the log");
    for line in added.lines() {
        assert!(
            !line.starts_with("2026-01-01T00:00:00.000000Z ERROR"),
            "a forged line: {line:.200}"
        );
    }
}
