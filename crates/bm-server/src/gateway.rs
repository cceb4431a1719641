//! The HTTP gateway (`--http-listen`): the gRPC API as JSON and Server-Sent Events, for the
//! web dashboard and for scripts without a gRPC client.
//!
//! It decides nothing: every call goes to the same gRPC services, through the same layers
//! (authentication and roles, limits, quotas, metrics, spans), over an in-process connection
//! ([`InProcess`]); the caller's `Authorization: Bearer` header goes with it. Messages are
//! the API's own, in the canonical protobuf JSON mapping (pbjson).
//!
//! - `POST /api/v1/{Service}/{Method}`: a unary call (`MachineService/GetMachine`, ...), the
//!   request as the JSON body, the response as JSON; an error is `{"code", "message"}` with
//!   the HTTP status of its gRPC code.
//! - `GET /api/v1/watch?machine_id=&operation_id=&after_revision=`: `WatchOperations` as
//!   SSE, one `events` event per batch, its id the last revision; a reconnect's
//!   `Last-Event-ID` resumes after it.
//! - `GET /api/v1/logs?operation_id=&after_sequence=`: `StreamLogs` likewise, `lines`
//!   events, ids the log sequence.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bm_proto::v1 as pb;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use bm_proto::v1::rollout_service_client::RolloutServiceClient;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint};

use crate::Tls;

/// The in-process connections of the gateway to the gRPC server: each connect makes a
/// duplex pipe and hands its server end to the server's incoming stream.
#[derive(Clone, Debug)]
pub(crate) struct InProcess {
    conns: tokio::sync::mpsc::Sender<tokio::io::DuplexStream>,
}

/// Bytes buffered in each direction of an in-process connection.
const PIPE_BYTES: usize = 256 * 1024;

impl InProcess {
    /// The pipe factory and the server ends it makes, for `serve_with_incoming`.
    pub(crate) fn new() -> (
        InProcess,
        impl Stream<Item = Result<tokio::io::DuplexStream, std::io::Error>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        (InProcess { conns: tx }, incoming)
    }

    /// A channel to the in-process server: one HTTP/2 connection, opened on first use and
    /// closed when the last clone of the channel is dropped.
    fn channel(&self) -> Channel {
        let conns = self.conns.clone();
        Endpoint::from_static("http://bm-server.in-process").connect_with_connector_lazy(
            tower::service_fn(move |_: http::Uri| {
                let conns = conns.clone();
                async move {
                    let (client, server) = tokio::io::duplex(PIPE_BYTES);
                    conns.send(server).await.map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "the server is shutting down",
                        )
                    })?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
                }
            }),
        )
    }
}

/// The gateway's clients of the API.
#[derive(Clone, Debug)]
struct Gateway {
    /// Unary calls share one connection: they are short, and HTTP/2 multiplexes them.
    machines: MachineServiceClient<Channel>,
    operations: OperationServiceClient<Channel>,
    rollouts: RolloutServiceClient<Channel>,
    /// Each stream gets a connection of its own, so that open dashboards never use up the
    /// streams one connection may carry (`--max-concurrent-streams`) and starve the calls.
    /// They are bounded over all callers by `--http-max-streams`.
    pipes: InProcess,
    /// The streams open at once, over all callers; one more is RESOURCE_EXHAUSTED.
    streams: Arc<tokio::sync::Semaphore>,
    max_streams: usize,
}

impl Gateway {
    /// A client of its own for one stream, with its place among the open streams.
    fn stream_client(
        &self,
    ) -> Result<
        (
            OperationServiceClient<Channel>,
            tokio::sync::OwnedSemaphorePermit,
        ),
        Failure,
    > {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Failure::new(
                tonic::Code::ResourceExhausted,
                format!(
                    "the HTTP API has {} streams open, its limit (--http-max-streams): close a dashboard or retry later",
                    self.max_streams
                ),
            )
        })?;
        Ok((OperationServiceClient::new(self.pipes.channel()), permit))
    }
}

/// The gateway's routes over the in-process server `to`: the API, and the dashboard's
/// pages at `/`. At most `max_streams` streams are open at once.
pub(crate) fn router(to: &InProcess, max_streams: usize) -> Router {
    let channel = to.channel();
    let gateway = Gateway {
        machines: MachineServiceClient::new(channel.clone()),
        operations: OperationServiceClient::new(channel.clone()),
        // A rollout holds its machines: 10,000 of them pass the default 4 MiB.
        rollouts: RolloutServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        pipes: to.clone(),
        streams: Arc::new(tokio::sync::Semaphore::new(max_streams)),
        max_streams,
    };
    Router::new()
        .route("/api/v1/watch", get(watch))
        .route("/api/v1/logs", get(logs))
        .route("/api/v1/{service}/{method}", post(unary))
        .merge(crate::dashboard::router())
        .with_state(gateway)
}

/// An error answer: the gRPC code's name and the message, with the HTTP status of the code.
#[derive(Debug)]
struct Failure {
    code: tonic::Code,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

impl Failure {
    fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "code": bm_proto::code_name(self.code),
            "message": self.message,
        })
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        use tonic::Code as C;
        let status = match self.code {
            C::Ok => StatusCode::OK,
            C::InvalidArgument | C::OutOfRange => StatusCode::BAD_REQUEST,
            C::Unauthenticated => StatusCode::UNAUTHORIZED,
            C::PermissionDenied => StatusCode::FORBIDDEN,
            C::NotFound => StatusCode::NOT_FOUND,
            C::AlreadyExists | C::Aborted | C::FailedPrecondition => StatusCode::CONFLICT,
            C::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            C::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            C::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            C::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            C::Cancelled | C::Unknown | C::Internal | C::DataLoss => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, axum::Json(self.json())).into_response()
    }
}

/// `request` with the caller's credentials.
fn with_auth<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        request.metadata_mut().insert("authorization", v);
    }
    request
}

/// The body as the request message `T` (named `what` in the error).
fn decode<T: serde::de::DeserializeOwned + Default>(
    body: &Bytes,
    what: &str,
) -> Result<T, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        Failure::new(
            tonic::Code::InvalidArgument,
            format!("the body is not a {what} in the API's JSON form: {e}"),
        )
    })
}

/// `POST /api/v1/{Service}/{Method}`.
async fn unary(
    State(gw): State<Gateway>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    macro_rules! route {
        ($($service:literal, $client:ident { $($method:literal => $call:ident($request:ident)),* $(,)? })*) => {
            match (service.as_str(), method.as_str()) {
                $($(
                    ($service, $method) => {
                        let request: pb::$request = decode(&body, stringify!($request))?;
                        let response = gw.$client.clone().$call(with_auth(&headers, request)).await?;
                        Ok(axum::Json(response.into_inner()).into_response())
                    }
                )*)*
                _ => Err(Failure::new(
                    tonic::Code::NotFound,
                    format!("no unary method {service}/{method}: POST /api/v1/MachineService/<Method>, /api/v1/OperationService/<Method> or /api/v1/RolloutService/<Method>, as in proto/baremetal/v1/baremetal.proto; streams are GET /api/v1/watch and /api/v1/logs"),
                )),
            }
        };
    }
    route! {
        "MachineService", machines {
            "RegisterMachine" => register_machine(RegisterMachineRequest),
            "ImportMachines" => import_machines(ImportMachinesRequest),
            "GetMachine" => get_machine(GetMachineRequest),
            "ListMachines" => list_machines(ListMachinesRequest),
            "ListMachineEvents" => list_machine_events(ListMachineEventsRequest),
            "UpdateMachine" => update_machine(UpdateMachineRequest),
            "EnterMaintenance" => enter_maintenance(EnterMaintenanceRequest),
            "ExitMaintenance" => exit_maintenance(ExitMaintenanceRequest),
            "Reimage" => reimage(ReimageRequest),
            "Reboot" => reboot(RebootRequest),
            "Rma" => rma(RmaRequest),
            "Retire" => retire(RetireRequest),
            "Upgrade" => upgrade(UpgradeRequest),
            "ReconfigureNetwork" => reconfigure_network(ReconfigureNetworkRequest),
            "ClearIntervention" => clear_intervention(ClearInterventionRequest),
            "Readmit" => readmit(ReadmitRequest),
        }
        "OperationService", operations {
            "GetOperation" => get_operation(GetOperationRequest),
            "ListOperations" => list_operations(ListOperationsRequest),
            "CancelOperation" => cancel_operation(CancelOperationRequest),
            "ListOperationTypes" => list_operation_types(ListOperationTypesRequest),
        }
        "RolloutService", rollouts {
            "CreateRollout" => create_rollout(CreateRolloutRequest),
            "GetRollout" => get_rollout(GetRolloutRequest),
            "ListRollouts" => list_rollouts(ListRolloutsRequest),
            "PauseRollout" => pause_rollout(PauseRolloutRequest),
            "ResumeRollout" => resume_rollout(ResumeRolloutRequest),
            "AbortRollout" => abort_rollout(AbortRolloutRequest),
        }
    }
}

/// Where a stream resumes: the `Last-Event-ID` of a reconnect, else the query's.
fn resume_after(headers: &HeaderMap, query: Option<u64>) -> Result<Option<u64>, Failure> {
    match headers.get("last-event-id") {
        None => Ok(query),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| {
                Failure::new(
                    tonic::Code::InvalidArgument,
                    "Last-Event-ID must be the id of an event this stream sent (a number)",
                )
            }),
    }
}

/// A query string that does not parse, as the API's error.
fn bad_query(e: QueryRejection) -> Failure {
    Failure::new(tonic::Code::InvalidArgument, e.body_text())
}

/// The query of `GET /api/v1/watch`.
#[derive(Debug, Default, Deserialize)]
struct WatchQuery {
    #[serde(default)]
    machine_id: String,
    #[serde(default)]
    operation_id: String,
    after_revision: Option<u64>,
}

/// The SSE events of a stream: `kind` events with the messages' JSON, each id from `id`;
/// an error that ends the stream is an `error` event with `{"code", "message"}`. The
/// stream's place among the open ones (`permit`) is given back when it ends.
fn sse<M: Send + 'static>(
    stream: tonic::Streaming<M>,
    permit: tokio::sync::OwnedSemaphorePermit,
    kind: &'static str,
    id: fn(&M) -> Option<u64>,
    json: fn(&M) -> String,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = futures::stream::unfold(Some((stream, permit)), move |state| async move {
        let (mut stream, permit) = state?;
        match stream.message().await {
            Ok(Some(message)) => {
                let data = json(&message);
                let mut event = Event::default().event(kind).data(data);
                if let Some(id) = id(&message) {
                    event = event.id(id.to_string());
                }
                Some((Ok(event), Some((stream, permit))))
            }
            Ok(None) => None,
            Err(status) => {
                let failure = Failure::from(status);
                let event = Event::default()
                    .event("error")
                    .data(failure.json().to_string());
                Some((Ok(event), None))
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// `GET /api/v1/watch`.
async fn watch(
    State(gw): State<Gateway>,
    q: Result<Query<WatchQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let Query(q) = q.map_err(bad_query)?;
    let request = pb::WatchOperationsRequest {
        machine_id: q.machine_id,
        operation_id: q.operation_id,
        after_revision: resume_after(&headers, q.after_revision)?,
    };
    let (mut client, permit) = gw.stream_client()?;
    let stream = client
        .watch_operations(with_auth(&headers, request))
        .await?
        .into_inner();
    Ok(sse(
        stream,
        permit,
        "events",
        |m: &pb::WatchOperationsResponse| m.events.last().map(|e| e.revision),
        // Written by hand (bm-proto's watch.rs), without serde: its one field.
        |m: &pb::WatchOperationsResponse| serde_json::json!({ "events": m.events }).to_string(),
    )
    .into_response())
}

/// The query of `GET /api/v1/logs`.
#[derive(Debug, Default, Deserialize)]
struct LogsQuery {
    #[serde(default)]
    operation_id: String,
    after_sequence: Option<u64>,
}

/// `GET /api/v1/logs`.
async fn logs(
    State(gw): State<Gateway>,
    q: Result<Query<LogsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let Query(q) = q.map_err(bad_query)?;
    let request = pb::StreamLogsRequest {
        operation_id: q.operation_id,
        after_sequence: resume_after(&headers, q.after_sequence)?.unwrap_or(0),
    };
    let (mut client, permit) = gw.stream_client()?;
    let stream = client
        .stream_logs(with_auth(&headers, request))
        .await?
        .into_inner();
    Ok(sse(
        stream,
        permit,
        "lines",
        |m: &pb::StreamLogsResponse| m.lines.last().map(|l| l.sequence),
        |m: &pb::StreamLogsResponse| serde_json::to_string(m).unwrap_or_default(),
    )
    .into_response())
}

/// Serves `app` on `listener` until `stop` ends, over TLS when `tls` is given (the API's
/// certificate: a browser trusts the dashboard as a client trusts the API).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<Tls>>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
        Some(tls) => {
            let listener = TlsListener::new(listener, tls)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    }
}

/// A listener whose connections have finished their TLS handshake; handshakes run in tasks
/// of their own, so that a slow client holds up nobody.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

/// How long a client has for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn new(listener: TcpListener, tls: Arc<Tls>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "the dashboard listener could not accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (tls.http1_acceptor(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, remote)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "dashboard TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%remote, "dashboard TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended: nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
