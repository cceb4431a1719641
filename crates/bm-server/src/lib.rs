//! The gRPC server of the control plane: `MachineService` and `OperationService` over the
//! workflow engine, with gRPC health checking and server reflection.
//!
//! [`serve`] takes an already-bound listener and a shutdown future, so the binary and the
//! tests run the same code.
//!
//! # Architecture invariant
//!
//! This crate only adapts: it converts wire types to domain types (in `convert.rs`, the one
//! module that knows both), calls the [`Engine`], and maps errors to status codes (in
//! `error.rs`, the one place that does). No rule of the lifecycle lives here.

mod convert;
mod error;
mod fanout;
mod machines;
mod operations;
mod paging;

use std::future::Future;
use std::time::Duration;

use bm_proto::v1::machine_service_server::MachineServiceServer;
use bm_proto::v1::operation_service_server::OperationServiceServer;
use bm_workflow::Engine;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

/// What the server serves.
#[derive(Clone, Debug)]
pub struct Deps {
    /// The engine, already started.
    pub engine: Engine,
    /// How long a shutdown waits for running operations to stop before it gives up on them.
    pub shutdown_grace: Duration,
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from the descriptor sets.
    #[error("building the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("serving gRPC")]
    Transport(#[from] tonic::transport::Error),
}

/// The largest request the server decodes, in bytes: an import of
/// 10,000 machines fits with room to spare.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// Serves the API on `listener` until `shutdown` completes, then shuts down gracefully:
/// health turns NOT_SERVING, the engine interrupts running operations and releases their
/// leases (they resume at the next start), streams end, and in-flight calls finish.
///
/// # Errors
///
/// [`ServeError`] if the transport fails.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    deps: Deps,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<MachineServiceServer<machines::Machines>>()
        .await;
    health
        .set_serving::<OperationServiceServer<operations::Operations>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(bm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let machines = MachineServiceServer::new(machines::Machines {
        engine: deps.engine.clone(),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let operations = OperationServiceServer::new(operations::Operations {
        engine: deps.engine.clone(),
        encoded: std::sync::Arc::new(fanout::EncodedEvents::new(bm_store::BROADCAST_CAPACITY)),
    });

    let engine = deps.engine.clone();
    let grace = deps.shutdown_grace;
    let signal = async move {
        shutdown.await;
        tracing::info!(
            "shutting down: no new work, interrupting running operations, ending streams"
        );
        health
            .set_not_serving::<MachineServiceServer<machines::Machines>>()
            .await;
        health
            .set_not_serving::<OperationServiceServer<operations::Operations>>()
            .await;
        engine.shutdown(grace).await;
    };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(machines)
        .add_service(operations)
        .serve_with_incoming_shutdown(incoming, signal)
        .await?;
    tracing::info!("server stopped");
    Ok(())
}
