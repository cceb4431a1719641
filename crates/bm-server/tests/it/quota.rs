//! The limits against abuse (issue 11) through a real server process and real clients: the
//! request size, server streams per principal, operation requests per principal per second.

use std::time::{Duration, Instant};

use bm_proto::v1 as pb;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use prost::Message;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::support::{Server, fake_machine};

type Bearer =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

/// Clients that send `token`, on a new connection to `addr`.
async fn as_principal(
    addr: &str,
    token: &str,
) -> (
    MachineServiceClient<InterceptedService<Channel, Bearer>>,
    OperationServiceClient<InterceptedService<Channel, Bearer>>,
) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connecting");
    let bearer = |token: &str| -> Bearer {
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        Box::new(move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", value.clone());
            Ok(r)
        })
    };
    (
        MachineServiceClient::with_interceptor(channel.clone(), bearer(token)),
        OperationServiceClient::with_interceptor(channel, bearer(token)),
    )
}

/// A server with a tokens file holding `alice` and `bob`, both admins; returns their tokens.
fn server_with_two_principals(args: &[&str]) -> (Server, tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let alice = bm_server::create_token(&path, "alice", &["admin".into()], None, false).unwrap();
    let bob = bm_server::create_token(&path, "bob", &["admin".into()], None, false).unwrap();
    let path = path.to_str().unwrap().to_owned();
    let mut all = vec!["--fake-timing", "instant", "--tokens-file", &path];
    all.extend_from_slice(args);
    (Server::start_secure(&all), dir, alice, bob)
}

fn import(rows: u32) -> pb::ImportMachinesRequest {
    pb::ImportMachinesRequest {
        machines: (0..rows)
            .map(|i| fake_machine(&format!("m-{i}"), i, &[("rack", "r1")]))
            .collect(),
        source: "quota test".into(),
        validate_only: true,
    }
}

#[tokio::test]
async fn a_request_over_the_size_limit_is_refused_naming_the_flag_and_the_server_goes_on() {
    let server = Server::start_with(&["--fake-timing", "instant", "--max-request-bytes", "65536"]);
    let mut c = server.clients().await;
    let small = import(200);
    let big = import(1000);
    assert!(small.encoded_len() < 65536 && big.encoded_len() > 65536);
    let r = c
        .machines
        .import_machines(small)
        .await
        .expect("a small import");
    assert_eq!(r.into_inner().failed_count, 0);
    let e = c.machines.import_machines(big).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--max-request-bytes") && e.message().contains("65536"),
        "{e:?}"
    );
    // The connection and the server serve on.
    c.register(fake_machine("m-1", 1, &[])).await;
    assert_eq!(c.machine("m-1").await.id, "m-1");
    server
        .wait_for_log("limit hit: the request message is", 1)
        .await;
    assert!(server.log().contains("anonymous"), "{}", server.log());
}

#[tokio::test]
async fn the_default_size_limit_takes_a_bmctl_import_batch_and_refuses_more_than_4_mib() {
    let server = Server::start();
    let mut c = server.clients().await;
    // bmctl sends 1,000 rows per request.
    let r = c
        .machines
        .import_machines(import(1000))
        .await
        .expect("import");
    assert_eq!(r.into_inner().failed_count, 0);
    let mut huge = import(1);
    huge.source = "x".repeat(4 * 1024 * 1024);
    let e = c.machines.import_machines(huge).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("at most 4194304 bytes (--max-request-bytes)"),
        "{e:?}"
    );
}

/// A TCP relay between a client and the server that the test can cut, as a client that
/// vanishes (no RST_STREAM, no GOAWAY: the connection just ends).
async fn relay(to: &str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let to = to.to_owned();
    let task = tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut server = tokio::net::TcpStream::connect(&to).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    (addr, task)
}

fn watch() -> pb::WatchOperationsRequest {
    pb::WatchOperationsRequest::default()
}

#[tokio::test]
async fn streams_are_limited_per_principal_and_released_when_they_end_or_the_client_goes() {
    let (server, _dir, alice, bob) =
        server_with_two_principals(&["--max-streams-per-principal", "2", "--log-level", "debug"]);
    let (_, mut a_ops) = as_principal(&server.addr, &alice).await;
    let first = a_ops.watch_operations(watch()).await.expect("first stream");
    let second = a_ops
        .watch_operations(watch())
        .await
        .expect("second stream");
    let e = a_ops.watch_operations(watch()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("alice has 2 streams open")
            && e.message().contains("--max-streams-per-principal"),
        "{e:?}"
    );
    // StreamLogs counts too, and so does another connection of the same principal.
    let (_, mut a_ops2) = as_principal(&server.addr, &alice).await;
    let e = a_ops2
        .stream_logs(pb::StreamLogsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    server
        .wait_for_log("limit hit: alice has 2 streams open", 1)
        .await;
    // Bob is not held to Alice's streams.
    let (_, mut b_ops) = as_principal(&server.addr, &bob).await;
    let _bob_stream = b_ops.watch_operations(watch()).await.expect("bob's stream");

    // A stream the client drops (RST_STREAM) gives its slot back.
    drop(first);
    server
        .wait_for_log("a server stream ended principal=alice open=1", 1)
        .await;
    let third = a_ops2
        .watch_operations(watch())
        .await
        .expect("a stream in the slot given back");

    // A client that vanishes with its streams open gives them back too.
    drop((second, third, a_ops, a_ops2));
    server
        .wait_for_log("a server stream ended principal=alice open=0", 1)
        .await;
    let (relayed, cut) = relay(&server.addr).await;
    let (_, mut vanishing) = as_principal(&relayed, &alice).await;
    let held = [
        vanishing.watch_operations(watch()).await.expect("held 1"),
        vanishing.watch_operations(watch()).await.expect("held 2"),
    ];
    let (_, mut a_ops) = as_principal(&server.addr, &alice).await;
    assert_eq!(
        a_ops.watch_operations(watch()).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    cut.abort();
    let _ = cut.await;
    server
        .wait_for_log("a server stream ended principal=alice open=0", 2)
        .await;
    let _again = a_ops
        .watch_operations(watch())
        .await
        .expect("the vanished client's slots are free");
    drop(held);
}

#[tokio::test]
async fn operation_requests_are_rate_limited_per_principal_and_say_when_to_retry() {
    let (server, _dir, alice, bob) = server_with_two_principals(&[
        "--op-rate-per-principal",
        "1",
        "--op-burst-per-principal",
        "3",
    ]);
    let (mut a, _) = as_principal(&server.addr, &alice).await;
    let started = Instant::now();
    let mut admitted = 0u32;
    let refused = loop {
        let m = fake_machine(&format!("m-{admitted}"), admitted, &[]);
        match a
            .register_machine(pb::RegisterMachineRequest { machine: Some(m) })
            .await
        {
            Ok(_) => admitted += 1,
            Err(e) => break e,
        }
        assert!(admitted < 100, "never refused");
    };
    // The burst, and at most one more per second since.
    let bound = 3 + u32::try_from(started.elapsed().as_secs()).unwrap() + 1;
    assert!((3..=bound).contains(&admitted), "{admitted} admitted");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("alice requested operations faster than 1 per second")
            && refused.message().contains("--op-rate-per-principal")
            && refused.message().contains("--op-burst-per-principal")
            && refused.message().contains("retry in"),
        "{refused:?}"
    );
    let retry = tonic_types::StatusExt::get_details_retry_info(&refused)
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo with a delay");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    // Reads are not operation requests.
    a.get_machine(pb::GetMachineRequest {
        machine_id: "m-0".into(),
    })
    .await
    .expect("a read goes through");
    // Bob has a bucket of his own.
    let (mut b, _) = as_principal(&server.addr, &bob).await;
    b.register_machine(pb::RegisterMachineRequest {
        machine: Some(fake_machine("b-1", 200, &[])),
    })
    .await
    .expect("bob registers");
    server
        .wait_for_log("limit hit: alice requested operations faster", 1)
        .await;
    // After the delay it said, Alice may go on.
    tokio::time::sleep(retry).await;
    a.register_machine(pb::RegisterMachineRequest {
        machine: Some(fake_machine("m-after", 201, &[])),
    })
    .await
    .expect("a retry after the delay it was told");
}
