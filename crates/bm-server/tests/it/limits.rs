//! Connection and stream limits against a real server process: streams per connection,
//! handshake and idle timeouts, the connection limit, and the open files limit.

use std::time::{Duration, Instant};

use bm_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{Server, fake_machine};

/// The HTTP/2 client preface and an empty SETTINGS frame: a finished handshake.
const HANDSHAKE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

async fn health(channel: &Channel) -> Result<ServingStatus, tonic::Status> {
    let r = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(r.into_inner().status())
}

async fn connect(server: &Server) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
}

/// Reads (and drops) what the server sends until it closes the connection.
async fn until_closed(mut socket: TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn calls_beyond_the_stream_limit_wait_and_other_connections_go_on() {
    let server = Server::start_with(&["--fake-timing", "instant", "--max-concurrent-streams", "4"]);
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    // Four live watch streams on one connection.
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(
            c.operations
                .watch_operations(pb::WatchOperationsRequest::default())
                .await
                .expect("watch")
                .into_inner(),
        );
    }
    server
        .wait_for_log("reached its limit of 4 concurrent streams", 1)
        .await;
    // A fifth call on that connection waits for a stream to end...
    let mut machines = c.machines.clone();
    let mut fifth = tokio::spawn(async move {
        machines
            .get_machine(pb::GetMachineRequest {
                machine_id: "m-1".into(),
            })
            .await
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut fifth)
            .await
            .is_err(),
        "the fifth call did not wait"
    );
    // ... while another connection is served.
    let mut other = server.clients().await;
    assert_eq!(other.machine("m-1").await.id, "m-1");
    assert_eq!(
        health(&other.channel).await.unwrap(),
        ServingStatus::Serving
    );
    drop(streams.pop());
    let got = tokio::time::timeout(Duration::from_secs(20), fifth)
        .await
        .expect("the fifth call goes once a stream ended")
        .expect("task")
        .expect("get machine");
    assert_eq!(got.into_inner().id, "m-1");
}

#[tokio::test]
async fn connections_that_never_finish_their_handshake_are_closed_after_the_timeout() {
    let server = Server::start_with(&["--handshake-timeout", "500ms"]);
    let started = Instant::now();
    let mut silent = Vec::new();
    for i in 0..45 {
        let mut s = TcpStream::connect(&server.addr).await.expect("connect");
        if i % 9 == 0 {
            // Half a preface, then nothing.
            s.write_all(&HANDSHAKE[..16]).await.unwrap();
        }
        silent.push(s);
    }
    let mut good = TcpStream::connect(&server.addr).await.expect("connect");
    good.write_all(HANDSHAKE).await.unwrap();

    let closed = futures::future::join_all(silent.into_iter().map(until_closed));
    tokio::time::timeout(Duration::from_secs(30), closed)
        .await
        .expect("every connection without a handshake was closed");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed by the timeout, not at once"
    );
    // The connection that finished its handshake is still open.
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_millis(200), good.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(n)) => assert!(n > 0, "the connection with a handshake was closed"),
            Ok(Err(e)) => panic!("the connection with a handshake failed: {e}"),
        }
    }
    let c = server.clients().await;
    assert_eq!(health(&c.channel).await.unwrap(), ServingStatus::Serving);
    let warnings = server
        .log()
        .matches("did not finish its HTTP/2 handshake")
        .count();
    assert!(
        (1..45).contains(&warnings),
        "{warnings} warnings for 45 connections: they are rate-limited"
    );
}

#[tokio::test]
async fn connections_without_a_stream_are_closed_when_idle_and_clients_reconnect() {
    let server =
        Server::start_with(&["--fake-timing", "instant", "--max-connection-idle", "300ms"]);
    // A client's connection closed for idleness...
    let first = server.clients().await;
    assert_eq!(
        health(&first.channel).await.unwrap(),
        ServingStatus::Serving
    );
    server
        .wait_for_log("closing a connection without a stream", 1)
        .await;
    // ... is opened again by its next call. The server's log line comes before the client has
    // read the GOAWAY: a call sent in that window meets the closing connection and fails at the
    // transport (as with any HTTP/2 server's idle close), and the one after it reconnects.
    let mut answers = Vec::new();
    for _ in 0..3 {
        let answer = health(&first.channel).await;
        let done = answer.is_ok();
        answers.push(answer);
        if done {
            break;
        }
    }
    let (last, refused) = answers.split_last().expect("one call at least");
    assert_eq!(last.clone().unwrap(), ServingStatus::Serving, "{answers:?}");
    assert!(
        refused.len() <= 1
            && refused.iter().all(|a| matches!(
                a.as_ref().map_err(tonic::Status::code),
                Err(tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown)
            )),
        "more than the one call racing the close failed: {answers:?}"
    );

    // A connection with a live stream stays open while a bare one is closed.
    let mut watcher = server.clients().await;
    let mut events = watcher
        .operations
        .watch_operations(pb::WatchOperationsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut bare = TcpStream::connect(&server.addr).await.expect("connect");
    bare.write_all(HANDSHAKE).await.unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), until_closed(bare))
        .await
        .expect("the bare connection was closed");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // On the watcher's own connection: its open stream keeps it from being idle, where a
    // fresh client's connection could be closed between two calls on a loaded machine.
    watcher.register(fake_machine("m-1", 1, &[])).await;
    let op = watcher.enter_maintenance("m-1").await;
    let batch = tokio::time::timeout(Duration::from_secs(20), events.message())
        .await
        .expect("the watcher's connection is still open")
        .expect("watch message")
        .expect("not ended");
    assert!(
        !batch.events.is_empty() && batch.events.iter().all(|e| e.operation_id == op.id),
        "{batch:?}"
    );
}

#[tokio::test]
async fn at_the_connection_limit_new_connections_are_refused_and_open_ones_served() {
    let server = Server::start_with(&["--max-connections", "2"]);
    let one = connect(&server).await.expect("first");
    let two = connect(&server).await.expect("second");
    assert_eq!(health(&one).await.unwrap(), ServingStatus::Serving);
    assert_eq!(health(&two).await.unwrap(), ServingStatus::Serving);
    let third = match connect(&server).await {
        Ok(channel) => health(&channel).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(third.is_err(), "a third connection was served");
    server
        .wait_for_log("refusing a connection: 2 are open", 1)
        .await;
    assert_eq!(health(&one).await.unwrap(), ServingStatus::Serving);
    // Once one closes, a new one gets its slot.
    drop(two);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = connect(&server).await
            && health(&channel).await.is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The CPU time the process has used, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // After the command name, in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .expect("stat format")
        .1
        .split(' ')
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn at_the_open_files_limit_the_server_backs_off_warns_and_serves_its_connections() {
    let server = Server::start_with(&[
        "--store",
        "memory",
        "--open-files-limit",
        "64",
        "--handshake-timeout",
        "1h",
    ]);
    let existing = connect(&server).await.expect("connect");
    assert_eq!(health(&existing).await.unwrap(), ServingStatus::Serving);
    // More sockets than the server has descriptors left: they pile up in the backlog.
    let mut sockets = Vec::new();
    for _ in 0..100 {
        sockets.push(TcpStream::connect(&server.addr).await.expect("connect"));
    }
    server.wait_for_log("cannot accept connections", 1).await;
    assert!(
        server.log().contains("Too many open files"),
        "the warning names the cause"
    );
    // The existing connection is served, and the server does not spin meanwhile.
    let before = cpu_ticks(&server.pid());
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(1) {
        assert_eq!(health(&existing).await.unwrap(), ServingStatus::Serving);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let used = cpu_ticks(&server.pid()) - before;
    assert!(
        used < 30,
        "the server used {used} ticks of CPU in a second at its open files limit"
    );
    assert!(
        server.log().matches("cannot accept connections").count() <= 2,
        "the warning is rate-limited"
    );
    // Once descriptors are free again, new clients are served.
    drop(sockets);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = connect(&server).await
            && health(&channel).await.is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new clients are not served again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_page_of_machines_is_bounded_by_bytes_and_the_rest_follows() {
    let server = Server::start();
    let mut c = server.clients().await;
    let config = "n".repeat(bm_domain::MachineSpec::MAX_NETWORK_CONFIG);
    for n in 1..=40 {
        let mut m = fake_machine(&format!("m-{n:02}"), n, &[]);
        m.spec.as_mut().unwrap().network_config = config.clone();
        c.register(m).await;
    }
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .machines
            .list_machines(pb::ListMachinesRequest {
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        pages += 1;
        let size = prost::Message::encoded_len(&page);
        assert!(size <= 2 * 1024 * 1024 + 1024, "a page of {size} bytes");
        assert!(!page.machines.is_empty());
        ids.extend(page.machines.into_iter().map(|m| m.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 2, "40 machines of 64 KiB take two pages of 2 MiB");
    assert_eq!(
        ids,
        (1..=40).map(|n| format!("m-{n:02}")).collect::<Vec<_>>()
    );
}
