//! The gRPC server of the control plane: `MachineService` and `OperationService` over the
//! workflow engine, with gRPC health checking and server reflection.
//!
//! [`serve`] takes an already-bound listener and a shutdown future, so the binary and the
//! tests run the same code.
//!
//! # Architecture invariant
//!
//! This crate only adapts: it converts wire types to domain types and the engine's requests
//! (in `convert.rs`, the one module that knows both), calls the [`Engine`], and maps the
//! engine's error kinds to status codes (in `error.rs`, the one place that does). No rule of
//! the lifecycle lives here. The library knows nothing of the store: the binary (`main.rs`)
//! opens one and hands it to the engine, and tests do the same with theirs.

mod auth;
mod boot;
mod convert;
mod dashboard;
mod error;
mod fanout;
#[doc(hidden)]
pub mod fuzzing;
mod gateway;
mod grpc_metrics;
mod health;
mod limits;
mod listener;
mod machines;
mod metrics;
mod operations;
mod otel;
mod paging;
mod quota;
mod rollouts;
mod tls;

use std::future::Future;
use std::time::Duration;

use bm_proto::v1::machine_service_server::MachineServiceServer;
use bm_proto::v1::operation_service_server::OperationServiceServer;
use bm_proto::v1::rollout_service_server::RolloutServiceServer;
use bm_workflow::Engine;
use tokio::net::TcpListener;
use tonic::transport::Server;

pub use auth::{
    Auth, AuthError, AuthMethod, Grant, INSECURE_HEADER, Principal, Role, create_token, role_table,
    write_private,
};
pub use boot::{BootService, router as boot_router, serve_boot};
pub use grpc_metrics::{GrpcMetrics, GrpcMetricsLayer};
pub use limits::Limits;
pub use metrics::{DEFAULT_MAX_BMC_HOSTS, Metrics, router as metrics_router};
pub use otel::{OtelTraceLinks, Otlp, OtlpConfig, OtlpError, RequestSpanLayer, RequestSpans};
pub use tls::{Tls, TlsError, TlsFiles};

/// What the server serves.
#[derive(Clone, Debug)]
pub struct Deps {
    /// The engine, already started.
    pub engine: Engine,
    /// How long a shutdown waits for running operations to stop before it gives up on them.
    pub shutdown_grace: Duration,
    /// The limits on connections and streams.
    pub limits: Limits,
    /// TLS on the listener, or plaintext when `None`. [`Tls::reload`] takes effect for the
    /// next handshakes.
    pub tls: Option<std::sync::Arc<Tls>>,
    /// Who may call; [`Auth::reload`] takes effect for the next calls.
    pub auth: std::sync::Arc<Auth>,
    /// Where gRPC calls are counted (`--metrics-listen`); nowhere when `None`.
    pub metrics: Option<std::sync::Arc<Metrics>>,
    /// Whether every call gets a `grpc request` span for the exported traces
    /// (`--otlp-endpoint`; see [`Otlp`]).
    pub traced: bool,
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
    serve_with_gateway(listener, None, shutdown, deps).await
}

/// Like [`serve`], and the HTTP gateway (the API as JSON and Server-Sent Events, see
/// `gateway.rs`) on `http`, over the same TLS, through the same authentication and limits.
///
/// # Errors
///
/// [`ServeError`] if the transport fails.
pub async fn serve_with_gateway(
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
    deps: Deps,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Every service's status is set before the first connection is accepted, so that a
    // health watch never finds one unregistered.
    health::apply_current(&health, &deps.engine).await;
    let store_health = tokio::spawn(health::follow_store(health.clone(), deps.engine.clone()));
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
    .max_decoding_message_size(deps.limits.max_request_bytes);
    let operations = OperationServiceServer::new(operations::Operations {
        engine: deps.engine.clone(),
        encoded: std::sync::Arc::new(fanout::EncodedEvents::new(deps.engine.live_event_window())),
    })
    .max_decoding_message_size(deps.limits.max_request_bytes);
    let rollouts = RolloutServiceServer::new(rollouts::Rollouts {
        engine: deps.engine.clone(),
    })
    .max_decoding_message_size(deps.limits.max_request_bytes);

    let engine = deps.engine.clone();
    let grace = deps.shutdown_grace;
    let (stopped, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let (gateway_stop, gateway_stopped) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        store_health.abort();
        tracing::info!(
            "shutting down: no new work, interrupting running operations, ending streams"
        );
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<MachineServiceServer<machines::Machines>>()
            .await;
        health
            .set_not_serving::<OperationServiceServer<operations::Operations>>()
            .await;
        health
            .set_not_serving::<RolloutServiceServer<rollouts::Rollouts>>()
            .await;
        engine.shutdown(grace).await;
        let _ = gateway_stop.send(true);
        let _ = stopped.send(());
    };
    let limits = deps.limits;
    tracing::info!(?limits, "limits");
    let shared = std::sync::Arc::new(limits::Shared::new(limits.clone()));
    let quotas = std::sync::Arc::new(quota::Quotas::new(&limits));
    let incoming = listener::incoming(listener, shared.clone(), deps.tls.clone());
    // One stack of layers for the API's listener and for the gateway's in-process calls.
    macro_rules! grpc {
        () => {
            Server::builder()
                .max_concurrent_streams(Some(limits.max_concurrent_streams))
                .http2_keepalive_interval(Some(limits.keepalive_interval))
                .http2_keepalive_timeout(Some(limits.keepalive_timeout))
                .layer(grpc_metrics::GrpcMetricsLayer::new(deps.metrics.clone()))
                .layer(otel::RequestSpanLayer::new(deps.traced))
                .layer(limits::AdmissionLayer::new(shared.clone()))
                .layer(tower::util::MapResponseLayer::new(
                    decode_errors_are_invalid_arguments,
                ))
                .layer(auth::AuthLayer::new(deps.auth.clone()))
                .layer(quota::QuotaLayer::new(quotas.clone()))
        };
    }
    let gateway = match http {
        Some(http) => {
            let (pipes, conns) = gateway::InProcess::new();
            let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|stopped| *stopped).await;
            };
            let in_process = grpc!()
                .add_service(machines.clone())
                .add_service(operations.clone())
                .add_service(rollouts.clone())
                .serve_with_incoming_shutdown(conns, stop(gateway_stopped.clone()));
            tokio::spawn(async move {
                if let Err(e) = in_process.await {
                    tracing::error!(error = %e, "the gateway's in-process API stopped");
                }
            });
            let app = gateway::router(&pipes, limits.http_max_streams);
            let served = gateway::serve(http, app, deps.tls.clone(), stop(gateway_stopped));
            Some(tokio::spawn(served))
        }
        None => None,
    };
    let server = grpc!()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(machines)
        .add_service(operations)
        .add_service(rollouts)
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    // Once the engine has stopped, every stream has ended; a client that does not read its
    // last messages would hold its connection open until keepalive gives up (40 s). Give
    // the others a moment, then close what is left.
    let stragglers = async {
        if stopped_rx.await.is_ok() {
            tokio::time::sleep(STRAGGLER_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = &mut server => r?,
        () = stragglers => tracing::warn!("closing connections still open {STRAGGLER_GRACE:?} after the shutdown"),
    }
    if let Some(gateway) = gateway {
        match gateway.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the HTTP gateway failed"),
            Err(e) => tracing::error!(error = %e, "the HTTP gateway panicked"),
        }
    }
    tracing::info!("server stopped");
    Ok(())
}

/// How long connections may stay open after the engine stopped.
const STRAGGLER_GRACE: Duration = Duration::from_secs(2);

/// tonic answers a request whose body does not decode with INTERNAL; it is the client's
/// error, so it becomes INVALID_ARGUMENT (the message, which names the bad field, is kept).
/// The status travels in the response headers (trailers-only) or in its trailers.
fn decode_errors_are_invalid_arguments<B>(
    mut response: http::Response<B>,
) -> http::Response<DecodeErrorsAreInvalid<B>> {
    fix_status(response.headers_mut());
    response.map(DecodeErrorsAreInvalid)
}

fn fix_status(headers: &mut http::HeaderMap) {
    let is_decode_error = headers.get("grpc-status").is_some_and(|s| s == "13")
        && headers.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            m.starts_with(b"failed%20to%20decode") || m.starts_with(b"failed to decode")
        });
    if is_decode_error {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

/// A response body whose trailers get [`fix_status`].
struct DecodeErrorsAreInvalid<B>(B);

impl<B: http_body::Body + Unpin> http_body::Body for DecodeErrorsAreInvalid<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| match frame.into_trailers() {
                    Ok(mut trailers) => {
                        fix_status(&mut trailers);
                        http_body::Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}
