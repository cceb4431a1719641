//! Scoped grants through a real server: a principal whose grants carry label selectors
//! sees and acts only on the machines they match. Every RPC of the role table is called
//! against machines in and out of the scope (generated from the table and the API's
//! descriptor set, so a new RPC cannot be forgotten); lists page through the filtered
//! fleet; watches leave out machines outside the scope, also once one leaves it.

use std::collections::{BTreeSet, HashMap};

use bm_proto::v1 as pb;
use bm_server::{Auth, Role, role_table};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use crate::inproc::InProcess;
use crate::support::{Clients, fake_machine};

/// The viewer scope is two selectors (OR), the operator scope one.
const SCOPED: &[&str] = &[
    "viewer on team=storage",
    "viewer on team=db",
    "operator on team=storage,rack in (r1,r2)",
];

/// In the operator scope.
const S1: &str = "m-s1";
/// Visible, outside the operator scope (rack r3).
const S2: &str = "m-s2";
/// Visible (viewer on team=db) only.
const D1: &str = "m-d1";
/// Outside every scope.
const W1: &str = "m-w1";

struct Fleet {
    server: InProcess,
    _dir: tempfile::TempDir,
    admin: String,
    scoped: String,
    storage_admin: String,
    /// An operation of each of S1, D1 and W1, made by the admin.
    ops: HashMap<&'static str, String>,
}

fn with<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let grants = |g: &[&str]| g.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let admin = bm_server::create_token(&path, "admin", &grants(&["admin"]), None, false).unwrap();
    let scoped = bm_server::create_token(&path, "scoped", &grants(SCOPED), None, false).unwrap();
    let storage_admin = bm_server::create_token(
        &path,
        "storage-admin",
        &grants(&["admin on team=storage"]),
        None,
        false,
    )
    .unwrap();
    let server = InProcess::start_with_auth(Auth::from_file(&path).unwrap()).await;
    let mut c = server.clients().await;
    for (i, (id, labels)) in [
        (S1, &[("team", "storage"), ("rack", "r1")][..]),
        (S2, &[("team", "storage"), ("rack", "r3")][..]),
        (D1, &[("team", "db")][..]),
        (W1, &[("team", "web")][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let m = fake_machine(id, 1000 + i as u32, labels);
        c.machines
            .register_machine(with(
                &admin,
                pb::RegisterMachineRequest { machine: Some(m) },
            ))
            .await
            .unwrap();
    }
    let mut ops = HashMap::new();
    // Oldest first: W1's, so that a watch reading up to D1's has passed it.
    for id in [W1, S1, D1] {
        let op = c
            .machines
            .enter_maintenance(with(
                &admin,
                pb::EnterMaintenanceRequest {
                    machine_id: id.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        c.wait_end_as(&admin, &op.id).await;
        ops.insert(id, op.id);
    }
    Fleet {
        server,
        _dir: dir,
        admin,
        scoped,
        storage_admin,
        ops,
    }
}

/// A request whose field 1 is a string: the machine or operation id of every RPC that
/// names one.
#[derive(Clone, PartialEq, prost::Message)]
struct Target {
    #[prost(string, tag = "1")]
    id: String,
}

async fn call(
    channel: Channel,
    path: &'static str,
    streaming: bool,
    token: &str,
    id: String,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let req = with(token, Target { id });
    let path = http::uri::PathAndQuery::from_static(path);
    let codec = tonic_prost::ProstCodec::<Target, ()>::default();
    let result = if streaming {
        grpc.server_streaming(req, path, codec).await.map(|_| ())
    } else {
        grpc.unary(req, path, codec).await.map(|_| ())
    };
    result.err().unwrap_or_else(|| tonic::Status::ok(""))
}

/// The RPCs of the API with whether they stream and the name of their request's field 1.
fn api_methods() -> HashMap<String, (bool, String)> {
    let set = prost_types::FileDescriptorSet::decode(bm_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut messages = HashMap::new();
    for file in &set.file {
        for m in &file.message_type {
            let first = m
                .field
                .iter()
                .find(|f| f.number() == 1)
                .map(|f| f.name().to_owned())
                .unwrap_or_default();
            messages.insert(format!(".{}.{}", file.package(), m.name()), first);
        }
    }
    let mut out = HashMap::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                out.insert(
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    (
                        method.server_streaming(),
                        messages[method.input_type()].clone(),
                    ),
                );
            }
        }
    }
    out
}

/// The id by which an RPC names a machine's target (the machine, or an operation of it).
type IdOf<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

fn refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::PermissionDenied | Code::NotFound | Code::Unauthenticated
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_with_a_scoped_grant_reaches_only_the_machines_of_its_scope() {
    let f = fleet().await;
    let channel = f.server.clients().await.channel;
    let methods = api_methods();
    // The RPCs that name no machine or operation by field 1 have tests of their own below.
    let elsewhere: BTreeSet<&str> = [
        "/baremetal.v1.MachineService/RegisterMachine",
        "/baremetal.v1.MachineService/ImportMachines",
        "/baremetal.v1.MachineService/ListMachines",
        "/baremetal.v1.MachineService/UpdateMachine",
        "/baremetal.v1.OperationService/ListOperations",
        "/baremetal.v1.OperationService/ListOperationTypes",
        // Field 1 is a machine filter: a watch of a machine outside the scope is a watch
        // of nothing, as for a machine that does not exist (see the watch test).
        "/baremetal.v1.OperationService/WatchOperations",
        // Rollouts: a scoped caller's target is resolved within its scope, and it sees its
        // own rollouts only (see the rollouts test).
        "/baremetal.v1.RolloutService/CreateRollout",
        "/baremetal.v1.RolloutService/GetRollout",
        "/baremetal.v1.RolloutService/ListRollouts",
        "/baremetal.v1.RolloutService/PauseRollout",
        "/baremetal.v1.RolloutService/ResumeRollout",
        "/baremetal.v1.RolloutService/AbortRollout",
        "/baremetal.v1.RolloutService/WatchRollout",
    ]
    .into();
    // What each principal holds, by role: the machines, or None without any grant of it.
    let all = [S1, S2, D1, W1];
    let holds = |token: &str, role: Role| -> Option<Vec<&str>> {
        if token == f.scoped {
            match role {
                Role::Viewer => Some(vec![S1, S2, D1]),
                Role::Operator => Some(vec![S1]),
                Role::Admin => None,
            }
        } else if token == f.storage_admin {
            Some(vec![S1, S2])
        } else {
            Some(all.to_vec())
        }
    };
    let mut checked = 0;
    for (path, needed) in role_table() {
        let (streams, field) = &methods[*path];
        // The id each machine's target is known by, and one that does not exist.
        let (target, missing): (IdOf<'_>, String) = match field.as_str() {
            "machine_id" if !elsewhere.contains(path) => {
                (Box::new(|m: &str| Some(m.to_owned())), "m-nope".to_owned())
            }
            "operation_id" => (
                Box::new(|m: &str| f.ops.get(m).cloned()),
                "op-01J00000000000000000000000".to_owned(),
            ),
            _ => {
                assert!(
                    elsewhere.contains(path),
                    "{path}: field 1 is {field:?}; decide how scopes apply to it and test it"
                );
                continue;
            }
        };
        checked += 1;
        for token in [&f.scoped, &f.storage_admin, &f.admin] {
            let nothing = call(channel.clone(), path, *streams, token, missing.clone()).await;
            for m in all {
                let Some(id) = target(m) else { continue };
                let status = call(channel.clone(), path, *streams, token, id.clone()).await;
                let at = format!(
                    "{path} on {m} ({id}) by {}",
                    token.split('.').next().unwrap()
                );
                match (holds(token, Role::Viewer), holds(token, *needed)) {
                    // No grant of the role at all: refused before any machine is read, so
                    // the same answer for every machine.
                    (_, None) => {
                        assert_eq!(status.code(), Code::PermissionDenied, "{at}: {status:?}");
                        assert!(
                            status
                                .message()
                                .contains(&format!("needs the {needed} role;")),
                            "{at}: {status:?}"
                        );
                        assert_eq!(status.message(), nothing.message(), "{at}");
                    }
                    // Outside every scope: worded as for what does not exist.
                    (Some(seen), Some(_)) if !seen.contains(&m) => {
                        assert_eq!(status.code(), Code::NotFound, "{at}: {status:?}");
                        assert_eq!(nothing.code(), Code::NotFound, "{at}: {nothing:?}");
                        assert_eq!(
                            status.message().replace(&id, "ID"),
                            nothing.message().replace(&missing, "ID"),
                            "{at}: a hidden machine must read like a missing one"
                        );
                    }
                    // Seen, but not in the scope of the role the call needs.
                    (_, Some(acted)) if !acted.contains(&m) => {
                        assert_eq!(status.code(), Code::PermissionDenied, "{at}: {status:?}");
                        assert!(
                            status
                                .message()
                                .contains(&format!("needs the {needed} role on machine {m}")),
                            "{at}: {status:?}"
                        );
                    }
                    _ => assert!(!refused(&status), "{at}: {status:?}"),
                }
            }
        }
    }
    assert!(checked >= 14, "only {checked} RPCs checked");
    f.server.stop().await.unwrap();
}

async fn list_ids(
    c: &mut Clients,
    token: &str,
    selector: &str,
    page_size: i32,
) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut token_in) = (Vec::new(), 0, String::new());
    loop {
        let page = c
            .machines
            .list_machines(with(
                token,
                pb::ListMachinesRequest {
                    page_size,
                    page_token: token_in.clone(),
                    label_selector: selector.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.machines.len() <= page_size as usize);
        ids.extend(page.machines.into_iter().map(|m| m.id));
        if page.next_page_token.is_empty() {
            return (ids, pages);
        }
        token_in = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_hold_only_the_machines_and_operations_of_the_scope_page_by_page() {
    let f = fleet().await;
    let mut c = f.server.clients().await;
    let teams = ["storage", "db", "web"];
    let racks = ["r1", "r3"];
    let rows: Vec<pb::Machine> = (0..30u32)
        .map(|i| {
            let labels = [
                ("team", teams[i as usize % 3]),
                ("rack", racks[i as usize % 2]),
            ];
            fake_machine(&format!("m-p{i:02}"), 2000 + i, &labels)
        })
        .collect();
    let expected = |filter: &dyn Fn(&pb::Machine) -> bool| -> Vec<String> {
        let mut ids: Vec<String> = rows
            .iter()
            .filter(|m| filter(m))
            .map(|m| m.id.clone())
            .collect();
        ids.extend(
            [
                (D1, "db", ""),
                (S1, "storage", "r1"),
                (S2, "storage", "r3"),
                (W1, "web", ""),
            ]
            .iter()
            .filter(|(_, team, rack)| {
                filter(&fake_machine("x", 0, &[("team", team), ("rack", rack)]))
            })
            .map(|(id, _, _)| (*id).to_owned()),
        );
        ids.sort();
        ids
    };
    c.machines
        .import_machines(with(
            &f.admin,
            pb::ImportMachinesRequest {
                machines: rows.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let team = |m: &pb::Machine| m.labels.get("team").cloned().unwrap_or_default();
    let rack = |m: &pb::Machine| m.labels.get("rack").cloned().unwrap_or_default();

    // Two viewer scopes (OR), read in pages of 4.
    let (ids, pages) = list_ids(&mut c, &f.scoped, "", 4).await;
    let want = expected(&|m| team(m) == "storage" || team(m) == "db");
    assert_eq!(ids, want);
    assert_eq!(pages, want.len().div_ceil(4));
    // The client's selector is ANDed with the scope.
    let (ids, _) = list_ids(&mut c, &f.scoped, "rack=r1", 3).await;
    assert_eq!(
        ids,
        expected(&|m| (team(m) == "storage" || team(m) == "db") && rack(m) == "r1")
    );
    // One scope (admin on team=storage covers viewing), in pages of 3.
    let (ids, _) = list_ids(&mut c, &f.storage_admin, "", 3).await;
    assert_eq!(ids, expected(&|m| team(m) == "storage"));
    // The unscoped admin sees everything.
    let (ids, _) = list_ids(&mut c, &f.admin, "", 7).await;
    assert_eq!(ids, expected(&|_| true));

    // Operations: the hidden machine's are left out, page by page.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .operations
            .list_operations(with(
                &f.scoped,
                pb::ListOperationsRequest {
                    page_size: 1,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.operations.into_iter().map(|o| o.machine_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, [D1, S1], "newest first, without {W1}'s");
    let hidden = c
        .operations
        .list_operations(with(
            &f.scoped,
            pb::ListOperationsRequest {
                machine_id: W1.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(hidden.operations.is_empty(), "{hidden:?}");
    f.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_watch_leaves_out_hidden_machines_and_one_that_leaves_the_scope() {
    let f = fleet().await;
    let mut c = f.server.clients().await;
    let mut watch = c
        .operations
        .watch_operations(with(
            &f.scoped,
            pb::WatchOperationsRequest {
                after_revision: Some(0),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // Reads events until one of `until`'s machine; returns the machines seen.
    async fn read_until(
        watch: &mut tonic::Streaming<pb::WatchOperationsResponse>,
        op: &str,
    ) -> BTreeSet<String> {
        let mut machines = BTreeSet::new();
        loop {
            let batch = watch.message().await.unwrap().expect("the watch ended");
            let mut done = false;
            for e in batch.events {
                done |= e.operation_id == op;
                machines.insert(e.machine_id);
            }
            if done {
                return machines;
            }
        }
    }
    // The history: S1's and D1's operations, never W1's (it came in between).
    let seen = read_until(&mut watch, &f.ops[D1]).await;
    assert_eq!(seen, [D1.to_owned(), S1.to_owned()].into());
    // S2 leaves the scope (team=web); its next operation is not streamed, D1's is.
    let relabel = |id: &str, team: &str| {
        with(
            &f.admin,
            pb::UpdateMachineRequest {
                machine: Some(pb::Machine {
                    id: id.into(),
                    labels: [("team".to_owned(), team.to_owned())].into(),
                    ..Default::default()
                }),
                update_mask: Some(bm_proto::pbjson_types::FieldMask {
                    paths: vec!["labels".into()],
                }),
            },
        )
    };
    let start = |id: &str| {
        with(
            &f.admin,
            pb::EnterMaintenanceRequest {
                machine_id: id.into(),
                ..Default::default()
            },
        )
    };
    c.machines.update_machine(relabel(S2, "web")).await.unwrap();
    let s2_op = c
        .machines
        .enter_maintenance(start(S2))
        .await
        .unwrap()
        .into_inner();
    c.wait_end_as(&f.admin, &s2_op.id).await;
    let d1_op = c
        .machines
        .exit_maintenance(with(
            &f.admin,
            pb::ExitMaintenanceRequest {
                machine_id: D1.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let seen = read_until(&mut watch, &d1_op.id).await;
    assert!(
        seen.contains(D1) && !seen.contains(S2) && !seen.contains(W1),
        "S2 left the scope: {seen:?}"
    );
    // And back: team=storage again, and its events are streamed again.
    c.machines
        .update_machine(relabel(S2, "storage"))
        .await
        .unwrap();
    let back = c
        .machines
        .exit_maintenance(with(
            &f.admin,
            pb::ExitMaintenanceRequest {
                machine_id: S2.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let seen = read_until(&mut watch, &back.id).await;
    assert!(seen.contains(S2) && !seen.contains(W1), "{seen:?}");
    f.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_admin_creates_and_changes_machines_of_its_scope_only() {
    let f = fleet().await;
    let mut c = f.server.clients().await;
    let admin = &f.storage_admin;
    let register = |id: &str, n: u32, team: &str| {
        with(
            admin,
            pb::RegisterMachineRequest {
                machine: Some(fake_machine(id, n, &[("team", team)])),
            },
        )
    };
    let err = c
        .machines
        .register_machine(register("m-new-web", 3001, "web"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("needs the admin role") && err.message().contains("team=storage"),
        "{err:?}"
    );
    c.machines
        .register_machine(register("m-new-storage", 3002, "storage"))
        .await
        .unwrap();
    // An import: each row on its own.
    let out = c
        .machines
        .import_machines(with(
            admin,
            pb::ImportMachinesRequest {
                machines: vec![
                    fake_machine("m-i1", 3003, &[("team", "storage")]),
                    fake_machine("m-i2", 3004, &[("team", "web")]),
                ],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((out.created_count, out.failed_count), (1, 1), "{out:?}");
    assert_eq!(out.results[1].error_code, "PERMISSION_DENIED", "{out:?}");
    let missing = c
        .machines
        .get_machine(with(
            &f.admin,
            pb::GetMachineRequest {
                machine_id: "m-i2".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let labels = |id: &str, pairs: &[(&str, &str)]| {
        with(
            admin,
            pb::UpdateMachineRequest {
                machine: Some(pb::Machine {
                    id: id.into(),
                    labels: pairs
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    ..Default::default()
                }),
                update_mask: Some(bm_proto::pbjson_types::FieldMask {
                    paths: vec!["labels".into()],
                }),
            },
        )
    };
    // Not out of the scope...
    let err = c
        .machines
        .update_machine(labels(S2, &[("team", "web")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(c.machine_as(&f.admin, S2).await.labels["team"], "storage");
    // ...but within it, yes.
    let m = c
        .machines
        .update_machine(labels(S2, &[("team", "storage"), ("rack", "r9")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.labels["rack"], "r9");
    // A machine outside the scope is not found.
    let err = c
        .machines
        .update_machine(labels(W1, &[("team", "storage")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(c.machine_as(&f.admin, W1).await.labels["team"], "web");
    f.server.stop().await.unwrap();
}

impl Clients {
    async fn machine_as(&mut self, token: &str, id: &str) -> pb::Machine {
        self.machines
            .get_machine(with(
                token,
                pb::GetMachineRequest {
                    machine_id: id.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits for operation `op` to end (its watch ends with it).
    async fn wait_end_as(&mut self, token: &str, op: &str) {
        let mut stream = self
            .operations
            .watch_operations(with(
                token,
                pb::WatchOperationsRequest {
                    operation_id: op.into(),
                    after_revision: Some(0),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        while stream.message().await.unwrap().is_some() {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_import_endpoint_changes_and_cancel_record_their_actor() {
    use bm_provider_fake::LABEL_HANG_ACTION;
    let f = fleet().await;
    let mut c = f.server.clients().await;
    let actor = |name: &str| {
        Some(pb::Actor {
            name: name.into(),
            method: "token".into(),
        })
    };
    let labels = [
        ("team", "storage"),
        ("rack", "r1"),
        (LABEL_HANG_ACTION, "repave"),
    ];
    let m = c
        .machines
        .register_machine(with(
            &f.storage_admin,
            pb::RegisterMachineRequest {
                machine: Some(fake_machine("m-a1", 4001, &labels)),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.updated_by, actor("storage-admin"));
    c.machines
        .import_machines(with(
            &f.storage_admin,
            pb::ImportMachinesRequest {
                machines: vec![fake_machine("m-a2", 4002, &labels)],
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        c.machine_as(&f.admin, "m-a2").await.updated_by,
        actor("storage-admin")
    );

    // An endpoint change needs admin (the operator is refused) and names its actor.
    let endpoint = |token: &str| {
        with(
            token,
            pb::UpdateMachineRequest {
                machine: Some(pb::Machine {
                    id: "m-a1".into(),
                    spec: Some(pb::MachineSpec {
                        ssh_endpoint: "root@10.9.9.9:22".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: Some(bm_proto::pbjson_types::FieldMask {
                    paths: vec!["spec.ssh_endpoint".into()],
                }),
            },
        )
    };
    let err = c
        .machines
        .update_machine(endpoint(&f.scoped))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let m = c
        .machines
        .update_machine(endpoint(&f.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.spec.unwrap().ssh_endpoint, "root@10.9.9.9:22");
    assert_eq!(m.updated_by, actor("admin"));

    // A cancel records who asked, beside who started the operation.
    let op = c
        .machines
        .enter_maintenance(with(
            &f.admin,
            pb::EnterMaintenanceRequest {
                machine_id: "m-a1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    c.wait_end_as(&f.admin, &op.id).await;
    let hung = c
        .machines
        .reimage(with(
            &f.admin,
            pb::ReimageRequest {
                machine_id: "m-a1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let canceled = c
        .operations
        .cancel_operation(with(
            &f.scoped,
            pb::CancelOperationRequest {
                operation_id: hung.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(canceled.canceled_by, actor("scoped"));
    assert_eq!(canceled.requested_by, actor("admin"));
    let again = c
        .operations
        .get_operation(with(
            &f.admin,
            pb::GetOperationRequest {
                operation_id: hung.id,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.canceled_by, actor("scoped"));
    f.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_rollout_targets_the_scope_and_is_seen_by_its_creator_and_unscoped_callers() {
    use bm_proto::v1::rollout_service_client::RolloutServiceClient;
    let f = fleet().await;
    let channel = f.server.clients().await.channel;
    let mut rollouts = RolloutServiceClient::new(channel);
    // Every machine with a team, asked by an operator of team=storage in racks r1 and r2:
    // S1 only.
    let create = pb::CreateRolloutRequest {
        target: Some(pb::RolloutTarget {
            label_selector: "team".into(),
            ..Default::default()
        }),
        spec: Some(pb::RolloutSpec {
            operation_type: pb::OperationType::Reboot.into(),
            max_in_flight: "1".into(),
            failure_budget: "1".into(),
            ..Default::default()
        }),
        request_id: "scoped-rollout".into(),
        note: String::new(),
    };
    let r = rollouts
        .create_rollout(with(&f.scoped, create.clone()))
        .await
        .unwrap()
        .into_inner();
    let targeted: Vec<_> = r.machines.iter().map(|m| m.machine_id.as_str()).collect();
    assert_eq!(targeted, [S1]);
    assert_eq!(r.created_by.as_ref().unwrap().name, "scoped");

    // Its creator and an unscoped admin see it; another scoped principal does not.
    let get = |id: &str| pb::GetRolloutRequest {
        rollout_id: id.to_owned(),
    };
    rollouts
        .get_rollout(with(&f.scoped, get(&r.id)))
        .await
        .unwrap();
    rollouts
        .get_rollout(with(&f.admin, get(&r.id)))
        .await
        .unwrap();
    let hidden = rollouts
        .get_rollout(with(&f.storage_admin, get(&r.id)))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    let paused = rollouts
        .pause_rollout(with(
            &f.storage_admin,
            pb::PauseRolloutRequest {
                rollout_id: r.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(paused.code(), Code::NotFound, "{paused:?}");
    let list = |token: &str| {
        let mut rollouts = rollouts.clone();
        let token = token.to_owned();
        async move {
            rollouts
                .list_rollouts(with(&token, pb::ListRolloutsRequest::default()))
                .await
                .unwrap()
                .into_inner()
                .rollouts
                .len()
        }
    };
    // Its request id is the creator's: another caller reusing it gets no rollout back.
    let e = rollouts
        .clone()
        .create_rollout(with(&f.storage_admin, create.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("use a new request id"), "{e:?}");
    assert_eq!(list(&f.scoped).await, 1);
    assert_eq!(list(&f.admin).await, 1);
    assert_eq!(list(&f.storage_admin).await, 0);
    // A target with nothing in the caller's scope selects nothing.
    let mut nothing = create;
    nothing.request_id = "scoped-nothing".into();
    nothing.target = Some(pb::RolloutTarget {
        label_selector: "team=db".into(),
        ..Default::default()
    });
    let e = rollouts
        .create_rollout(with(&f.scoped, nothing))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("selects no machine"), "{e:?}");
}
