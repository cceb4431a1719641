//! Who may call what: every RPC of the role table with every role, the table against the
//! API's descriptor set, tokens and client certificates through a real server.

use bm_server::{Auth, Role, role_table};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use crate::inproc::InProcess;
use crate::pki::{self, Ca};
use crate::support::Server;

/// Makes one token per role in a tokens file; returns the file's directory and the tokens.
fn tokens() -> (tempfile::TempDir, Auth, Vec<(Role, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let tokens = Role::ALL
        .iter()
        .map(|role| {
            let name = format!("{role}-token");
            let t =
                bm_server::create_token(&path, &name, &[role.to_string()], None, false).unwrap();
            (*role, t)
        })
        .collect();
    let auth = Auth::from_file(&path).unwrap();
    (dir, auth, tokens)
}

/// Calls `path` with an empty request (as unary or server streaming, as the API says) and
/// `token`, and returns the status code (OK for a call that got through).
async fn call(
    channel: Channel,
    path: &'static str,
    streaming: bool,
    token: Option<&str>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path = http::uri::PathAndQuery::from_static(path);
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let result = if streaming {
        grpc.server_streaming(req, path, codec).await.map(|_| ())
    } else {
        grpc.unary(req, path, codec).await.map(|_| ())
    };
    result.err().unwrap_or_else(|| tonic::Status::ok(""))
}

/// The methods of the API's descriptor set, by full path, with whether they stream.
fn api_methods() -> Vec<(String, bool)> {
    let set = prost_types::FileDescriptorSet::decode(bm_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in set.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                out.push((
                    format!("/{package}.{}/{}", service.name(), method.name()),
                    method.server_streaming(),
                ));
            }
        }
    }
    out
}

#[test]
fn every_rpc_of_the_api_is_in_the_role_table_and_nothing_else_is() {
    let api: Vec<String> = api_methods().into_iter().map(|(p, _)| p).collect();
    assert!(
        api.len() > 10,
        "the descriptor set has {} methods",
        api.len()
    );
    for path in &api {
        assert!(
            role_table().iter().any(|(p, _)| p == path),
            "{path} is not in the role table (crates/bm-server/src/auth.rs): every RPC needs a role"
        );
    }
    for (path, _) in role_table() {
        assert!(
            api.contains(&(*path).to_owned()),
            "{path} is in the role table but not in the API"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_with_every_role_is_allowed_or_denied_as_the_table_says() {
    let (_dir, auth, tokens) = tokens();
    let server = InProcess::start_with_auth(auth).await;
    let channel = server.clients().await.channel;
    let streaming: std::collections::HashMap<String, bool> = api_methods().into_iter().collect();
    for (path, needed) in role_table() {
        let streams = streaming[*path];
        for (role, token) in &tokens {
            let status = call(channel.clone(), path, streams, Some(token)).await;
            if role >= needed {
                assert!(
                    !matches!(
                        status.code(),
                        Code::PermissionDenied | Code::Unauthenticated
                    ),
                    "{role} was refused {path}: {status:?}"
                );
            } else {
                assert_eq!(
                    status.code(),
                    Code::PermissionDenied,
                    "{role} on {path}: {status:?}"
                );
                assert!(
                    status
                        .message()
                        .contains(&format!("needs the {needed} role")),
                    "{status:?}"
                );
            }
        }
        // Nobody without a credential, and nobody with a garbage one.
        let status = call(channel.clone(), path, streams, None).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{path}: {status:?}");
        assert!(status.message().contains("no credentials"), "{status:?}");
        let status = call(channel.clone(), path, streams, Some("admin-token.0000")).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{path}: {status:?}");
    }
    // Health is open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_certificate_is_a_principal_with_the_grants_of_its_cert_entry() {
    let ca = Ca::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki::write(dir.path(), &ca.server());
    let client_ca = dir.path().join("client-ca.pem");
    std::fs::write(&client_ca, ca.pem()).unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[cert]]\nname = \"alice\"\ngrants = [\"viewer\"]\n",
    )
    .unwrap();
    let (cert_s, key_s, ca_s, tokens_s) = (
        cert.display().to_string(),
        key.display().to_string(),
        client_ca.display().to_string(),
        tokens.display().to_string(),
    );
    let server = Server::start_secure(&[
        "--fake-timing",
        "instant",
        "--tls-cert",
        &cert_s,
        "--tls-key",
        &key_s,
        "--client-ca",
        &ca_s,
        "--tokens-file",
        &tokens_s,
    ]);
    let alice = crate::tls::tls_channel(&server.addr, &ca.pem(), Some(&ca.client("alice")))
        .await
        .unwrap();
    let view = call(
        alice.clone(),
        "/baremetal.v1.MachineService/ListMachines",
        false,
        None,
    )
    .await;
    assert_eq!(view.code(), Code::Ok, "{view:?}");
    let reboot = call(alice, "/baremetal.v1.MachineService/Reboot", false, None).await;
    assert_eq!(reboot.code(), Code::PermissionDenied, "{reboot:?}");
    assert!(
        reboot.message().contains("alice (cert) has viewer"),
        "{reboot:?}"
    );
    // A certificate of the CA without an entry is not anybody.
    let bob = crate::tls::tls_channel(&server.addr, &ca.pem(), Some(&ca.client("bob")))
        .await
        .unwrap();
    let status = call(
        bob,
        "/baremetal.v1.MachineService/ListMachines",
        false,
        None,
    )
    .await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn on_loopback_the_server_writes_a_local_admin_token_and_requires_it() {
    let server = Server::start_secure(&["--fake-timing", "instant"]);
    let token_file = server.dir.join("data").join("admin-token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", token_file.display());
    }
    let token = std::fs::read_to_string(&token_file).unwrap();
    let channel = server.clients().await.channel;
    let path = "/baremetal.v1.MachineService/ListMachines";
    assert_eq!(
        call(channel.clone(), path, false, None).await.code(),
        Code::Unauthenticated
    );
    assert_eq!(
        call(channel, path, false, Some(token.trim())).await.code(),
        Code::Ok
    );
    assert!(
        !server.log().contains(token.trim()),
        "the token is in the log"
    );
}

#[test]
fn a_non_loopback_listen_without_tls_and_auth_is_refused() {
    let out = std::process::Command::new(crate::support::bin("bm-server", "bm-server"))
        .args(["--listen", "0.0.0.0:0", "--store", "memory"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
}

#[test]
fn bmctl_finds_the_local_admin_token_and_says_clearly_when_it_has_none() {
    let server = Server::start_secure(&["--fake-timing", "instant"]);
    let empty = tempfile::tempdir().unwrap();
    let bmctl = |data_dir: &std::path::Path| {
        crate::support::bmctl_command(&server.addr, &["list"])
            .env("BM_DATA_DIR", data_dir)
            .env("BMCTL_CONFIG", empty.path().join("config.toml"))
            .current_dir(empty.path())
            .output()
            .unwrap()
    };
    let ok = bmctl(&server.dir.join("data"));
    assert!(ok.status.success(), "{}", crate::support::err_text(&ok));
    let refused = bmctl(empty.path());
    assert!(!refused.status.success());
    let err = crate::support::err_text(&refused);
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("no credentials"),
        "{err}"
    );
}

#[test]
fn bmctl_contexts_carry_the_server_ca_and_token() {
    let ca = Ca::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki::write(dir.path(), &ca.server());
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let tokens = dir.path().join("tokens.toml");
    let token = bm_server::create_token(&tokens, "ops", &["viewer".into()], None, false).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let s = |p: &std::path::Path| p.display().to_string();
    let server = Server::start_secure(&[
        "--fake-timing",
        "instant",
        "--tls-cert",
        &s(&cert),
        "--tls-key",
        &s(&key),
        "--tokens-file",
        &s(&tokens),
    ]);
    let config = dir.path().join("config.toml");
    let bmctl = |args: &[&str]| {
        let mut cmd = std::process::Command::new(crate::support::bin("bm-cli", "bmctl"));
        cmd.args(args)
            .env_remove("BM_SERVER")
            .env("BMCTL_CONFIG", &config)
            .env("NO_COLOR", "1")
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let https = format!(
        "https://localhost:{}",
        server.addr.rsplit_once(':').unwrap().1
    );
    let set = bmctl(&[
        "config",
        "set-context",
        "prod",
        "--server",
        &https,
        "--ca",
        &s(&ca_file),
        "--token-file",
        &s(&token_file),
    ]);
    assert!(set.status.success(), "{}", crate::support::err_text(&set));
    let contexts = crate::support::text(&bmctl(&["config", "get-contexts"]));
    assert!(contexts.contains("* prod"), "{contexts}");
    let list = bmctl(&["list"]);
    assert!(list.status.success(), "{}", crate::support::err_text(&list));
    // A viewer may not register; the refusal names the role needed.
    let import = bmctl(&["import", "1"]);
    let err = crate::support::err_text(&import);
    assert!(
        err.contains("PERMISSION_DENIED") && err.contains("needs the admin role"),
        "{err}"
    );
    // Plaintext against the TLS server: told to use TLS.
    let plain = bmctl(&["list", "--server", &format!("http://{}", server.addr)]);
    let err = crate::support::err_text(&plain);
    assert!(err.contains("requires TLS"), "{err}");
}

#[test]
fn bmctl_with_tls_against_a_plaintext_server_says_the_server_does_not_speak_tls() {
    let ca = Ca::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server = Server::start();
    let out = crate::support::bmctl_command(
        &server.addr,
        &["list", "--ca", &ca_file.display().to_string()],
    )
    .output()
    .unwrap();
    let err = crate::support::err_text(&out);
    assert!(!out.status.success());
    assert!(err.contains("does not speak TLS"), "{err}");
}

#[tokio::test]
async fn the_actor_of_operations_and_machine_changes_is_stored_returned_and_kept() {
    use bm_proto::v1 as pb;
    use bm_proto::v1::machine_service_client::MachineServiceClient;
    use bm_proto::v1::operation_service_client::OperationServiceClient;
    let mut server = Server::start_secure(&["--fake-timing", "instant"]);
    let token = std::fs::read_to_string(server.dir.join("data").join("admin-token")).unwrap();
    let header: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token.trim()).parse().unwrap();
    let with_token = move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    };
    let channel = server.clients().await.channel;
    let mut machines = MachineServiceClient::with_interceptor(channel.clone(), with_token.clone());
    machines
        .register_machine(pb::RegisterMachineRequest {
            machine: Some(crate::support::fake_machine("m-1", 1, &[])),
        })
        .await
        .unwrap();
    let op = machines
        .enter_maintenance(pb::EnterMaintenanceRequest {
            machine_id: "m-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let local = Some(pb::Actor {
        name: "local-admin".into(),
        method: "local-admin".into(),
    });
    assert_eq!(op.requested_by, local);
    let m = machines
        .update_machine(pb::UpdateMachineRequest {
            machine: Some(pb::Machine {
                id: "m-1".into(),
                labels: [("team".to_owned(), "a".to_owned())].into(),
                ..Default::default()
            }),
            update_mask: Some(bm_proto::pbjson_types::FieldMask {
                paths: vec!["labels".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.updated_by, local);

    // Kept across a restart, and shown by bmctl.
    server.terminate();
    server.spawn();
    let channel = server.clients().await.channel;
    let mut ops = OperationServiceClient::with_interceptor(channel.clone(), with_token.clone());
    let again = ops
        .get_operation(pb::GetOperationRequest {
            operation_id: op.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.requested_by, local);
    let m = MachineServiceClient::with_interceptor(channel, with_token)
        .get_machine(pb::GetMachineRequest {
            machine_id: "m-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.updated_by, local);
    let out = crate::support::bmctl_command(&server.addr, &["ops"])
        .env("BM_DATA_DIR", server.dir.join("data"))
        .output()
        .unwrap();
    let text = crate::support::text(&out);
    assert!(
        text.contains("local-admin (local-admin)"),
        "{text}{}",
        crate::support::err_text(&out)
    );
}

#[tokio::test]
async fn an_insecure_server_says_so_in_every_answer_health_checks_included() {
    let check = |channel: Channel| async move {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let r = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        r.metadata()
            .get(bm_server::INSECURE_HEADER)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let insecure = InProcess::start().await;
    let said = check(insecure.clients().await.channel).await;
    assert!(
        said.as_deref()
            .is_some_and(|s| s.contains("no authentication")),
        "{said:?}"
    );
    // API answers too.
    let mut c = insecure.clients().await;
    let r = c
        .operations
        .list_operation_types(bm_proto::v1::ListOperationTypesRequest {})
        .await
        .unwrap();
    assert!(r.metadata().get(bm_server::INSECURE_HEADER).is_some());
    insecure.stop().await.unwrap();

    let (_dir, auth, _tokens) = tokens();
    let secure = InProcess::start_with_auth(auth).await;
    assert_eq!(check(secure.clients().await.channel).await, None);
    secure.stop().await.unwrap();
}

#[test]
fn bmctl_version_shows_whether_the_server_runs_insecure() {
    let insecure = Server::start();
    let out = insecure.bmctl(&["version"]);
    let text = crate::support::text(&out);
    assert!(out.status.success(), "{}", crate::support::err_text(&out));
    assert!(
        text.contains("bmctl ") && text.contains("server: INSECURE (--insecure)"),
        "{text}"
    );
    let secure = Server::start_secure(&["--fake-timing", "instant"]);
    let out = crate::support::bmctl_command(&secure.addr, &["version"])
        .env("BM_DATA_DIR", secure.dir.join("data"))
        .output()
        .unwrap();
    let text = crate::support::text(&out);
    assert!(out.status.success(), "{}", crate::support::err_text(&out));
    assert!(
        text.contains("server: authentication required") && !text.contains("INSECURE"),
        "{text}"
    );
}

#[tokio::test]
async fn denied_calls_are_logged_at_warn_once_per_period_without_secrets() {
    use bm_proto::v1 as pb;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let viewer =
        bm_server::create_token(&path, "ro", &["viewer on team=a".into()], None, false).unwrap();
    let tokens = path.display().to_string();
    let server = Server::start_secure(&["--fake-timing", "instant", "--tokens-file", &tokens]);
    let channel = server.clients().await.channel;
    let mut machines = bm_proto::v1::machine_service_client::MachineServiceClient::new(channel);
    let get = |id: &str| {
        let mut r = tonic::Request::new(pb::GetMachineRequest {
            machine_id: id.into(),
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {viewer}").parse().unwrap());
        r
    };
    // Refused by the table first (no operator grant), then a hidden machine (NOT_FOUND
    // here would be the same for any machine, so only the log says which).
    let mut reboot = tonic::Request::new(pb::RebootRequest {
        machine_id: "m-9".into(),
        ..Default::default()
    });
    reboot
        .metadata_mut()
        .insert("authorization", format!("Bearer {viewer}").parse().unwrap());
    let err = machines.reboot(reboot).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    for _ in 0..5 {
        let err = machines.get_machine(get("m-9")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    // The log is written by the server process; wait for the line, not for a time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let log = loop {
        let log = server.log();
        if log.contains("call denied") || std::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("call denied")).collect();
    assert_eq!(lines.len(), 1, "one line per period: {lines:?}");
    assert!(
        lines[0].contains("WARN")
            && lines[0].contains("ro")
            && lines[0].contains("/baremetal.v1.MachineService/Reboot"),
        "{lines:?}"
    );
    assert!(
        !log.contains(viewer.split('.').nth(1).unwrap()),
        "the secret is in the log"
    );
}
