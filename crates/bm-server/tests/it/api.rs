//! The API through the generated client, against a server in this process: resources,
//! errors and their status codes.

use bm_proto::pbjson_types::FieldMask;
use bm_proto::v1 as pb;
use bm_provider_fake::{LABEL_FAIL_ACTION, LABEL_HANG_ACTION};
use tonic::Code;

use crate::inproc::{FaultyStore, InProcess};
use crate::support::{Server, condition, fake_machine, phase};

fn check(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, contains: &str) {
    match r {
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(
                s.message().contains(contains),
                "{:?} lacks {contains:?}",
                s.message()
            );
        }
    }
}

#[tokio::test]
async fn inventory_pages_filters_and_updates() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    for n in 1..=12 {
        let labels: &[(&str, &str)] = if n % 3 == 0 {
            &[("rack", "r3")]
        } else {
            &[("rack", "r1")]
        };
        c.register(fake_machine(&format!("m-{n:02}"), n, labels))
            .await;
    }
    // Pages of 5 cover everything once.
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .machines
            .list_machines(pb::ListMachinesRequest {
                page_size: 5,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.machines.into_iter().map(|m| m.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        ids,
        (1..=12).map(|n| format!("m-{n:02}")).collect::<Vec<_>>()
    );

    let r3 = c
        .machines
        .list_machines(pb::ListMachinesRequest {
            label_selector: "rack=r3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r3.machines.len(), 4);
    assert!(
        r3.machines
            .iter()
            .all(|m| m.effective_state() == pb::EffectiveState::New)
    );

    // A token made for other filters is refused.
    let first = c
        .machines
        .list_machines(pb::ListMachinesRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    check(
        c.machines
            .list_machines(pb::ListMachinesRequest {
                page_size: 2,
                page_token: first.next_page_token.clone(),
                label_selector: "rack=r3".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    check(
        c.machines
            .list_machines(pb::ListMachinesRequest {
                label_selector: "rack in r1".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "label_selector",
    );

    // Update with a mask: spec fields and labels, never status.
    let m = c
        .machines
        .update_machine(pb::UpdateMachineRequest {
            machine: Some(pb::Machine {
                id: "m-01".into(),
                spec: Some(pb::MachineSpec {
                    image: "ubuntu-26.04".into(),
                    ..Default::default()
                }),
                labels: [("rack".to_owned(), "r9".to_owned())].into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["spec.image".into(), "labels".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let spec = m.spec.clone().unwrap();
    assert_eq!(spec.image, "ubuntu-26.04");
    assert_eq!(spec.provider, "fake", "fields outside the mask are kept");
    assert_eq!(m.labels.get("rack").map(String::as_str), Some("r9"));
    for path in ["status", "status.phase", "effective_state"] {
        check(
            c.machines
                .update_machine(pb::UpdateMachineRequest {
                    machine: Some(pb::Machine {
                        id: "m-01".into(),
                        ..Default::default()
                    }),
                    update_mask: Some(FieldMask {
                        paths: vec![path.into()],
                    }),
                })
                .await,
            Code::InvalidArgument,
            "owned by the server",
        );
    }
    check(
        c.machines
            .update_machine(pb::UpdateMachineRequest {
                machine: Some(pb::Machine {
                    id: "m-01".into(),
                    status: Some(pb::MachineStatus {
                        phase: pb::Phase::Ready.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await,
        Code::InvalidArgument,
        "owned by the server",
    );
    check(
        c.machines
            .update_machine(pb::UpdateMachineRequest {
                machine: Some(pb::Machine {
                    id: "m-01".into(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["spec.colour".into()],
                }),
            })
            .await,
        Code::InvalidArgument,
        "unknown field",
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    c.register(fake_machine("machine-1", 1, &[])).await;
    check(
        c.machines
            .register_machine(pb::RegisterMachineRequest {
                machine: Some(fake_machine("machine-1", 2, &[])),
            })
            .await,
        Code::AlreadyExists,
        "already exists",
    );
    check(
        c.machines
            .register_machine(pb::RegisterMachineRequest {
                machine: Some(fake_machine("machine-2", 1, &[])),
            })
            .await,
        Code::AlreadyExists,
        "02:00:00:00:00:01 already belongs to machine machine-1",
    );
    let mut bad = fake_machine("Machine_2", 2, &[]);
    check(
        c.machines
            .register_machine(pb::RegisterMachineRequest {
                machine: Some(bad.clone()),
            })
            .await,
        Code::InvalidArgument,
        "machine.id",
    );
    bad.id = "machine-2".into();
    bad.spec.as_mut().unwrap().mac_addresses = vec!["02:00:00:00:00:zz".into()];
    check(
        c.machines
            .register_machine(pb::RegisterMachineRequest {
                machine: Some(bad.clone()),
            })
            .await,
        Code::InvalidArgument,
        "machine.spec.mac_addresses[0]",
    );
    bad.spec.as_mut().unwrap().mac_addresses = vec![];
    bad.spec.as_mut().unwrap().provider = "ipmi".into();
    check(
        c.machines
            .register_machine(pb::RegisterMachineRequest { machine: Some(bad) })
            .await,
        Code::InvalidArgument,
        "unknown provider",
    );
    check(
        c.machines
            .get_machine(pb::GetMachineRequest {
                machine_id: "nope".into(),
            })
            .await,
        Code::NotFound,
        "machine nope not found",
    );
    check(
        c.machines
            .get_machine(pb::GetMachineRequest {
                machine_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "machine_id: is required",
    );
    check(
        c.operations
            .get_operation(pb::GetOperationRequest {
                operation_id: "op-x".into(),
            })
            .await,
        Code::InvalidArgument,
        "operation_id",
    );
    check(
        c.operations
            .get_operation(pb::GetOperationRequest {
                operation_id: "op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM".into(),
            })
            .await,
        Code::NotFound,
        "not found",
    );
    check(
        c.machines
            .reboot(pb::RebootRequest {
                machine_id: "machine-1".into(),
                request_id: "has space".into(),
                note: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "request_id",
    );
    check(
        c.machines
            .list_machines(pb::ListMachinesRequest {
                phase: 42,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "phase: unknown phase 42",
    );
    // Reimage on a machine that is not in maintenance.
    check(
        c.reimage("machine-1", "r").await,
        Code::FailedPrecondition,
        "enter maintenance first",
    );
}

#[tokio::test]
async fn one_active_operation_and_idempotency() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    c.register(fake_machine(
        "machine-1",
        1,
        &[(LABEL_HANG_ACTION, "repave")],
    ))
    .await;
    c.enter_maintenance("machine-1").await;
    let first = c.reimage("machine-1", "key-1").await.unwrap();
    let again = c.reimage("machine-1", "key-1").await.unwrap();
    assert_eq!(again.id, first.id);
    let second = c
        .machines
        .reboot(pb::RebootRequest {
            machine_id: "machine-1".into(),
            request_id: "key-2".into(),
            note: String::new(),
        })
        .await;
    check(second, Code::FailedPrecondition, &first.id);
    check(
        c.machines
            .reboot(pb::RebootRequest {
                machine_id: "machine-1".into(),
                request_id: "key-1".into(),
                note: String::new(),
            })
            .await,
        Code::AlreadyExists,
        "request id key-1 was already used",
    );
    let m = c.machine("machine-1").await;
    assert_eq!(m.effective_state(), pb::EffectiveState::Busy);
    assert_eq!(m.status.unwrap().active_operation_id, first.id);
    // Cancel ends it; a second cancel is refused.
    let canceled = c
        .operations
        .cancel_operation(pb::CancelOperationRequest {
            operation_id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(canceled.phase(), pb::OperationPhase::Canceled);
    check(
        c.operations
            .cancel_operation(pb::CancelOperationRequest {
                operation_id: first.id.clone(),
            })
            .await,
        Code::FailedPrecondition,
        "already ended",
    );
    let m = c.machine("machine-1").await;
    assert!(condition(&m, "OperationCanceled"));
    assert!(!condition(&m, "NeedsIntervention"));
    assert_eq!(phase(&m), pb::Phase::Maintenance);
}

#[tokio::test]
async fn failure_attention_and_clearing() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    c.register(fake_machine(
        "machine-4",
        4,
        &[(LABEL_FAIL_ACTION, "repave")],
    ))
    .await;
    c.enter_maintenance("machine-4").await;
    let op = c.reimage("machine-4", "r").await.unwrap();
    let done = c.wait_end(&op.id).await;
    assert_eq!(done.phase(), pb::OperationPhase::Failed);
    assert!(done.error.contains("repave-image"), "{}", done.error);
    let m = c.machine("machine-4").await;
    assert_eq!(m.effective_state(), pb::EffectiveState::Attention);
    check(
        c.reimage("machine-4", "again").await,
        Code::FailedPrecondition,
        "needs intervention",
    );
    let clear = c
        .machines
        .clear_intervention(pb::ClearInterventionRequest {
            machine_id: "machine-4".into(),
            request_id: "fixed".into(),
            note: "reseated the disk".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let clear = c.wait_end(&clear.id).await;
    assert_eq!(clear.note, "reseated the disk");
    let m = c.machine("machine-4").await;
    assert_eq!(m.effective_state(), pb::EffectiveState::MaintenanceIdle);
    let cond = m
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NeedsIntervention")
        .unwrap();
    assert!(
        cond.message.contains("reseated the disk"),
        "{}",
        cond.message
    );
}

#[tokio::test]
async fn import_reports_each_row() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    let mut bad_mac = fake_machine("bad", 9, &[]);
    bad_mac.spec.as_mut().unwrap().mac_addresses = vec!["not-a-mac".into()];
    let rows = vec![
        fake_machine("a", 1, &[]),
        bad_mac,
        fake_machine("b", 1, &[]),
        fake_machine("c", 3, &[]),
    ];
    let r = c
        .machines
        .import_machines(pb::ImportMachinesRequest {
            machines: rows.clone(),
            source: "test".into(),
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.created_count, r.unchanged_count, r.failed_count),
        (2, 0, 2)
    );
    assert_eq!(r.results[1].error_code, "INVALID_ARGUMENT");
    assert!(
        r.results[1]
            .error_message
            .starts_with("machines[1].spec.mac_addresses[0]"),
        "{}",
        r.results[1].error_message
    );
    assert_eq!(r.results[2].error_code, "ALREADY_EXISTS");
    // Again: the good rows are unchanged now.
    let r = c
        .machines
        .import_machines(pb::ImportMachinesRequest {
            machines: rows,
            source: "test".into(),
            validate_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.created_count, r.unchanged_count, r.failed_count),
        (0, 2, 2)
    );
}

/// Endpoints that could be read as something else (an ssh option, a second host,
/// credentials) or that no provider could use are refused at registration, update and
/// import, with INVALID_ARGUMENT and what is wrong.
#[tokio::test]
async fn endpoints_are_checked_fully() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    let with = |ssh: &str, bmc: &str| {
        let mut m = fake_machine("machine-9", 9, &[]);
        let spec = m.spec.as_mut().unwrap();
        if !ssh.is_empty() {
            spec.ssh_endpoint = ssh.into();
        }
        spec.bmc_endpoint = bmc.into();
        m
    };
    let cases = [
        (with("-oProxyCommand=evil", ""), "must not start with '-'"),
        (with("a@b@c", ""), "at most one '@'"),
        (with("", "redfish+https://[::1"), "[addr]:port"),
        (with("", "redfish+https://bmc:99999/"), "from 1 to 65535"),
        (with("", "ipmi://10.0.1.5"), "redfish+https://"),
        (with("", "redfish+https://admin:pw@bmc/"), "credentials"),
    ];
    for (machine, want) in &cases {
        check(
            c.machines
                .register_machine(pb::RegisterMachineRequest {
                    machine: Some(machine.clone()),
                })
                .await,
            Code::InvalidArgument,
            want,
        );
    }
    let r = c
        .machines
        .import_machines(pb::ImportMachinesRequest {
            machines: cases.iter().map(|(m, _)| m.clone()).collect(),
            source: "test".into(),
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.failed_count, 6, "{r:?}");
    for (result, (_, want)) in r.results.iter().zip(&cases) {
        assert_eq!(result.error_code, "INVALID_ARGUMENT");
        assert!(result.error_message.contains(want), "{result:?}");
    }
    c.register(fake_machine("machine-1", 1, &[])).await;
    let mut update = with("", "redfish+https://bmc:0/");
    update.id = "machine-1".into();
    check(
        c.machines
            .update_machine(pb::UpdateMachineRequest {
                machine: Some(update),
                update_mask: Some(FieldMask {
                    paths: vec!["spec.bmc_endpoint".into()],
                }),
            })
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        "from 1 to 65535",
    );
}

#[tokio::test]
async fn health_and_reflection() {
    let server = InProcess::start().await;
    let c = server.clients().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel.clone());
    for service in [
        "",
        "baremetal.v1.MachineService",
        "baremetal.v1.OperationService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    // Reflection lists the API's services, so grpcurl works without the proto file.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(c.channel.clone());
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "baremetal.v1.MachineService",
        "baremetal.v1.OperationService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

/// A message that is not a GetMachineRequest: field 1 as a varint instead of a string.
#[derive(Clone, PartialEq, prost::Message)]
struct NotARequest {
    #[prost(uint64, tag = "1")]
    machine_id: u64,
}

#[tokio::test]
async fn a_malformed_request_is_invalid_not_internal() {
    let server = InProcess::start().await;
    let c = server.clients().await;
    let mut grpc = tonic::client::Grpc::new(c.channel.clone());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/baremetal.v1.MachineService/GetMachine",
    );
    let codec: tonic_prost::ProstCodec<NotARequest, pb::Machine> =
        tonic_prost::ProstCodec::default();
    let r = grpc
        .unary(
            tonic::Request::new(NotARequest { machine_id: 7 }),
            path,
            codec,
        )
        .await;
    check(r, Code::InvalidArgument, "decode");
}

#[tokio::test]
async fn single_labels_can_be_set_and_removed_by_path() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[("rack", "r1"), ("gpu", "")]))
        .await;
    let m = c
        .machines
        .update_machine(pb::UpdateMachineRequest {
            machine: Some(pb::Machine {
                id: "m-1".into(),
                labels: [("zone".to_owned(), "a".to_owned())].into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["labels.zone".into(), "labels.gpu".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut labels: Vec<(String, String)> = m.labels.into_iter().collect();
    labels.sort();
    assert_eq!(
        labels,
        [
            ("rack".to_owned(), "r1".to_owned()),
            ("zone".to_owned(), "a".to_owned())
        ]
    );
}

/// The server answers a storage fault by the engine's kind of it, without knowing the
/// store: a full disk is UNAVAILABLE and says so, any other failure is INTERNAL without its
/// details; reads keep working, and writes work again once the fault is gone.
#[tokio::test]
async fn storage_faults_get_the_code_of_their_kind() {
    let store = std::sync::Arc::new(FaultyStore::new());
    let server = InProcess::with_store(store.clone()).await;
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;

    store.set_fault(Some(|| bm_store::StoreError::DiskFull));
    check(
        c.machines
            .register_machine(pb::RegisterMachineRequest {
                machine: Some(fake_machine("m-2", 2, &[])),
            })
            .await,
        Code::Unavailable,
        "the data directory's disk is full",
    );
    check(
        c.machines
            .enter_maintenance(pb::EnterMaintenanceRequest {
                machine_id: "m-1".into(),
                ..Default::default()
            })
            .await,
        Code::Unavailable,
        "the data directory's disk is full",
    );
    assert_eq!(c.machine("m-1").await.id, "m-1", "reads still work");

    store.set_fault(Some(|| {
        bm_store::StoreError::backend(std::io::Error::other("EIO on /var/lib/secret/db"))
    }));
    let s = c
        .machines
        .register_machine(pb::RegisterMachineRequest {
            machine: Some(fake_machine("m-2", 2, &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Internal, "{s:?}");
    assert!(!s.message().contains("secret"), "{s:?}");

    store.set_fault(None);
    c.register(fake_machine("m-2", 2, &[])).await;
    let op = c.enter_maintenance("m-2").await;
    assert_eq!(op.phase(), pb::OperationPhase::Succeeded);
}

#[tokio::test]
async fn operation_types_name_the_stages_operations_run() {
    let server = InProcess::start().await;
    let mut c = server.clients().await;
    let types = c
        .operations
        .list_operation_types(pb::ListOperationTypesRequest {})
        .await
        .unwrap()
        .into_inner()
        .operation_types;
    let listed: Vec<pb::OperationType> = types.iter().map(|t| t.r#type()).collect();
    let every: Vec<pb::OperationType> = (1..=10)
        .map(|v| pb::OperationType::try_from(v).unwrap())
        .collect();
    assert_eq!(listed, every, "every type once, in the enum's order");
    assert!(types.iter().all(|t| !t.description.is_empty()), "{types:?}");
    let stages = |t: pb::OperationType| -> Vec<String> {
        types
            .iter()
            .find(|i| i.r#type() == t)
            .unwrap()
            .stages
            .clone()
    };
    // Spec 000's five steps of a reimage.
    assert_eq!(
        stages(pb::OperationType::Reimage),
        [
            "set-netboot",
            "reboot-to-netboot",
            "repave-image",
            "join-cluster",
            "verify-in-cluster"
        ]
    );
    assert!(stages(pb::OperationType::Readmit).is_empty());
    // The names are those an operation reports as it runs.
    c.register(fake_machine("machine-1", 1, &[])).await;
    let entered = c.enter_maintenance("machine-1").await;
    let ran =
        |op: &pb::Operation| -> Vec<String> { op.stages.iter().map(|s| s.name.clone()).collect() };
    assert_eq!(ran(&entered), stages(pb::OperationType::EnterMaintenance));
    let op = c.reimage("machine-1", "r1").await.unwrap();
    let reimaged = c.wait_end(&op.id).await;
    assert_eq!(reimaged.phase(), pb::OperationPhase::Succeeded);
    assert_eq!(ran(&reimaged), stages(pb::OperationType::Reimage));
}

/// Issue 13: a power change the status poll sees outside any operation is a machine event,
/// listed by ListMachineEvents (and an unknown machine is NOT_FOUND).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_change_outside_operations_is_a_machine_event() {
    let server = Server::start_with(&["--fake-timing", "instant", "--status-poll-interval", "1s"]);
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    let events = |c: &mut crate::support::Clients| {
        let mut machines = c.machines.clone();
        async move {
            machines
                .list_machine_events(pb::ListMachineEventsRequest {
                    machine_id: "m-1".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .events
        }
    };
    // Nothing is known to have happened: no event.
    assert!(events(&mut c).await.is_empty());
    // The poll has read the machine (on) before someone powers it off.
    wait_until(&mut c, |m| {
        m.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.r#type == "PoweredOn" && c.status)
        })
    })
    .await;
    let mut labels = std::collections::HashMap::new();
    labels.insert("fake.baremetal.dev/power".to_owned(), "off".to_owned());
    c.machines
        .update_machine(pb::UpdateMachineRequest {
            machine: Some(pb::Machine {
                id: "m-1".into(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["labels".into()],
            }),
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let seen = loop {
        let seen = events(&mut c).await;
        if !seen.is_empty() {
            break seen;
        }
        assert!(std::time::Instant::now() < deadline, "no event within 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].sequence, 1);
    assert_eq!(seen[0].r#type(), pb::MachineEventType::PowerChanged);
    assert!(seen[0].message.contains("from On to Off"), "{seen:?}");
    let missing = c
        .machines
        .list_machine_events(pb::ListMachineEventsRequest {
            machine_id: "m-404".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
}

/// Reads the machine until `ok` holds (30 s at most): nothing announces a poll's reading
/// but the record.
async fn wait_until(c: &mut crate::support::Clients, ok: impl Fn(&pb::Machine) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = c.machine("m-1").await;
        if ok(&m) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within 30 s: {m:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
