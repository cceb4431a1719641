//! The connection to bm-server: one HTTP/2 channel shared by the two service clients.

use std::time::Duration;

use anyhow::Context;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use tonic::transport::{Channel, Endpoint};

/// The largest response bmctl accepts: a page of machines with large network configs
/// exceeds tonic's default of 4 MiB.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The clients of the two services, over one channel.
pub(crate) struct Clients {
    pub(crate) machines: MachineServiceClient<Channel>,
    pub(crate) operations: OperationServiceClient<Channel>,
}

/// Connects to `server` (`host:port` or a URL). A server that cannot be reached is an
/// UNAVAILABLE status that says what to check.
pub(crate) async fn connect(server: &str) -> anyhow::Result<Clients> {
    let uri = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("--server {server:?} is not a valid address"))?
        .connect_timeout(Duration::from_secs(5))
        // A follow on a dead network notices within half a minute.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|e| {
        let cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
        tonic::Status::unavailable(format!(
            "cannot reach the server at {uri}: {cause} (is bm-server running? set --server or BM_SERVER)"
        ))
    })?;
    Ok(Clients {
        machines: MachineServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE),
        operations: OperationServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
    })
}
