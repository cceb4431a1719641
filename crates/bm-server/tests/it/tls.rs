//! TLS on the listener: mutual TLS, clients that speak the wrong protocol, and certificate
//! rotation by SIGHUP while a stream stays open.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bm_proto::v1 as pb;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::inproc::InProcess;
use crate::pki::{self, Ca, Leaf};
use crate::support::{Server, fake_machine};

/// A channel to `addr` over TLS that trusts `ca`, with a client certificate if given.
pub(crate) async fn tls_channel(
    addr: &str,
    ca: &str,
    client: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// One call over `channel`.
async fn list(channel: Channel) -> Result<pb::ListMachinesResponse, tonic::Status> {
    MachineServiceClient::new(channel)
        .list_machines(pb::ListMachinesRequest::default())
        .await
        .map(tonic::Response::into_inner)
}

/// Waits until the server's log has `n` lines containing `what`.
fn wait_log(server: &Server, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.log().matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn mutual_tls_admits_the_ca_s_clients_and_refuses_others_and_plaintext() {
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki::write(dir.path(), &ca.server());
    let client_ca = dir.path().join("client-ca.pem");
    std::fs::write(&client_ca, ca.pem()).unwrap();
    let tls = bm_server::Tls::load(bm_server::TlsFiles {
        cert,
        key,
        client_ca: Some(client_ca),
    })
    .unwrap();
    let server = InProcess::start_tls(Arc::new(tls)).await;

    // The CA's client, and a client without a certificate (it may still use a token).
    let ours = tls_channel(&server.addr, &ca.pem(), Some(&ca.client("alice")))
        .await
        .unwrap();
    list(ours).await.unwrap();
    let anonymous = tls_channel(&server.addr, &ca.pem(), None).await.unwrap();
    list(anonymous).await.unwrap();

    // A certificate from another CA is refused in the handshake.
    let theirs = match tls_channel(&server.addr, &ca.pem(), Some(&other.client("mallory"))).await {
        Ok(channel) => list(channel).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(format!("{e:?}"))),
    };
    assert!(theirs.is_err(), "a client of another CA got in");

    // A plaintext client is told to use TLS.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = list(plain).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("requires TLS"), "{status:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_tls_client_on_the_plaintext_listener_is_refused_and_logged() {
    let ca = Ca::new("test CA");
    let server = Server::start();
    let result = match tls_channel(&server.addr, &ca.pem(), None).await {
        Ok(channel) => list(channel).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(format!("{e:?}"))),
    };
    assert!(
        result.is_err(),
        "a TLS client got an answer from a plaintext server"
    );
    wait_log(
        &server,
        "a TLS client connected to this plaintext listener",
        1,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_and_open_streams_stay_open() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let tls_dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki::write(tls_dir.path(), &old_ca.server());
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let server = Server::start_with(&[
        "--fake-timing",
        "instant",
        "--tls-cert",
        &cert_s,
        "--tls-key",
        &key_s,
    ]);
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &server.pid()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let old = tls_channel(&server.addr, &old_ca.pem(), None)
        .await
        .unwrap();
    let mut watch = OperationServiceClient::new(old.clone())
        .watch_operations(pb::WatchOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();

    // A bad key is refused and the old material stays in use.
    std::fs::write(&key, "not a key").unwrap();
    hup();
    wait_log(&server, "TLS material NOT reloaded", 1);
    list(
        tls_channel(&server.addr, &old_ca.pem(), None)
            .await
            .unwrap(),
    )
    .await
    .unwrap();

    // The new certificate: new connections get it, the old connection and its stream stay.
    pki::write(tls_dir.path(), &new_ca.server());
    hup();
    wait_log(&server, "TLS material reloaded", 1);
    let new = tls_channel(&server.addr, &new_ca.pem(), None)
        .await
        .unwrap();
    list(new.clone()).await.unwrap();
    let stale = match tls_channel(&server.addr, &old_ca.pem(), None).await {
        Ok(channel) => list(channel).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(format!("{e:?}"))),
    };
    assert!(
        stale.is_err(),
        "the old certificate is still served to new connections"
    );

    let mut machines = MachineServiceClient::new(new);
    machines
        .register_machine(pb::RegisterMachineRequest {
            machine: Some(fake_machine("m-1", 1, &[])),
        })
        .await
        .unwrap();
    machines
        .enter_maintenance(pb::EnterMaintenanceRequest {
            machine_id: "m-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), watch.message())
        .await
        .expect("no event on the stream opened before the rotation")
        .expect("the stream opened before the rotation failed")
        .expect("the stream opened before the rotation ended");
    assert_eq!(event.events[0].machine_id, "m-1");
    list(old).await.unwrap();
}
