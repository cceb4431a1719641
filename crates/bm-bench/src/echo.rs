//! The bare tonic echo: server and client baselines with bm-server's transport settings.

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tonic::transport::{Channel, Server};

use crate::stats::Latency;

/// Generated from `proto/echo.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
pub(crate) mod pb {
    tonic::include_proto!("bench.v1");
}

struct EchoService;

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        r: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<pb::EchoResponse>, tonic::Status> {
        let size = r.into_inner().response_size.min(1 << 20) as usize;
        Ok(tonic::Response::new(pb::EchoResponse {
            payload: vec![7u8; size],
        }))
    }
}

/// Serves the echo on a free loopback port and prints `echo listening on ADDR`, with the
/// transport settings of `bm_server::serve`.
pub(crate) async fn serve() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    #[allow(
        clippy::print_stdout,
        reason = "the address is the protocol with the parent"
    )]
    {
        println!("echo listening on {}", listener.local_addr()?);
    }
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(pb::echo_server::EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// The size of the echo's answer: about an encoded `Machine`.
pub(crate) const RESPONSE_SIZE: u32 = 420;

/// Sequential round trips.
pub(crate) async fn sequential(channel: Channel, calls: usize) -> anyhow::Result<Latency> {
    let mut client = pb::echo_client::EchoClient::new(channel);
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls + calls / 10 {
        let t = Instant::now();
        client
            .echo(pb::EchoRequest {
                key: format!("machine-{i}"),
                response_size: RESPONSE_SIZE,
            })
            .await?;
        if i >= calls / 10 {
            samples.push(t.elapsed());
        }
    }
    Ok(Latency::of(&mut samples))
}

/// Calls per second with `in_flight` calls outstanding on one channel.
pub(crate) async fn throughput(
    channel: Channel,
    in_flight: usize,
    run_for: Duration,
) -> anyhow::Result<f64> {
    let client = pb::echo_client::EchoClient::new(channel);
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut done = 0u64;
    let mut i = 0u64;
    let call = |mut c: pb::echo_client::EchoClient<Channel>, i: u64| async move {
        c.echo(pb::EchoRequest {
            key: format!("machine-{i}"),
            response_size: RESPONSE_SIZE,
        })
        .await
    };
    for _ in 0..in_flight {
        pending.push(call(client.clone(), i));
        i += 1;
    }
    while let Some(r) = pending.next().await {
        r?;
        done += 1;
        if started.elapsed() < run_for {
            pending.push(call(client.clone(), i));
            i += 1;
        }
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}
