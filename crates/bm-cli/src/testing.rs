//! A scripted `OperationService` for tests of the streams: each call of a stream RPC plays
//! the next script given to it (items, then the end of the stream), and every request is
//! recorded. Calls past the scripts get a stream that never ends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bm_proto::v1 as pb;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use bm_proto::v1::operation_service_server::{OperationService, OperationServiceServer};
use futures::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};

use crate::connect::{Credentials, Transport};
use tonic::{Request, Response, Status};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One call's stream: batches of items, or an error that ends the stream.
type Script<T> = Vec<Result<Vec<T>, Status>>;

/// The fake service. Its one operation is `op-1` on `machine-1`, SUCCEEDED.
#[derive(Default)]
pub(crate) struct Scripted {
    watches: Mutex<VecDeque<Script<pb::OperationEvent>>>,
    logs: Mutex<VecDeque<Script<pb::LogLine>>>,
    watch_requests: Mutex<Vec<pb::WatchOperationsRequest>>,
    log_requests: Mutex<Vec<pb::StreamLogsRequest>>,
}

impl Scripted {
    /// What the next WatchOperations call streams.
    pub(crate) fn script_watch(&self, s: Script<pb::OperationEvent>) {
        self.watches.lock().unwrap().push_back(s);
    }

    /// What the next StreamLogs call streams.
    pub(crate) fn script_logs(&self, s: Script<pb::LogLine>) {
        self.logs.lock().unwrap().push_back(s);
    }

    /// The WatchOperations requests so far.
    pub(crate) fn watch_requests(&self) -> Vec<pb::WatchOperationsRequest> {
        self.watch_requests.lock().unwrap().clone()
    }

    /// The StreamLogs requests so far.
    pub(crate) fn log_requests(&self) -> Vec<pb::StreamLogsRequest> {
        self.log_requests.lock().unwrap().clone()
    }
}

/// Plays a script as a stream; past the scripts, a stream that never ends.
fn play<T: Send + 'static, R: Send + 'static>(
    script: Option<Script<T>>,
    wrap: fn(Vec<T>) -> R,
) -> BoxStream<R> {
    match script {
        Some(s) => Box::pin(futures::stream::iter(
            s.into_iter().map(move |batch| batch.map(wrap)),
        )),
        None => Box::pin(futures::stream::pending()),
    }
}

/// An event of `op-1` at `revision`; revision 7 ends it (SUCCEEDED).
pub(crate) fn event(revision: u64) -> pb::OperationEvent {
    let ends = revision == 7;
    pb::OperationEvent {
        revision,
        operation_id: "op-1".into(),
        machine_id: "machine-1".into(),
        r#type: if ends {
            pb::EventType::PhaseChanged
        } else {
            pb::EventType::StageStarted
        }
        .into(),
        phase: if ends {
            pb::OperationPhase::Succeeded
        } else {
            pb::OperationPhase::Running
        }
        .into(),
        ..Default::default()
    }
}

/// A log line of `op-1`.
pub(crate) fn line(sequence: u64) -> pb::LogLine {
    pb::LogLine {
        sequence,
        operation_id: "op-1".into(),
        tag: "test".into(),
        message: format!("line {sequence}"),
        ..Default::default()
    }
}

/// The status with which bm-server cuts a stream off when it shuts down.
pub(crate) fn shutting_down(field: &str, after: u64) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    Status::with_error_details(
        tonic::Code::Unavailable,
        format!("the server is shutting down; resume with {field}={after}"),
        ErrorDetails::with_error_info(
            "SERVER_SHUTTING_DOWN",
            "baremetal.v1",
            [(field.to_owned(), after.to_string())],
        ),
    )
}

/// Serves `fake` on a loopback port; returns a client of it and the fake, to look at.
pub(crate) async fn serve(fake: Scripted) -> (OperationServiceClient<Transport>, Arc<Scripted>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Arc::new(fake);
    tokio::spawn(
        Server::builder()
            .add_service(OperationServiceServer::from_arc(fake.clone()))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        OperationServiceClient::with_interceptor(channel, Credentials::default()),
        fake,
    )
}

#[tonic::async_trait]
impl OperationService for Scripted {
    async fn get_operation(
        &self,
        _: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        Ok(Response::new(pb::Operation {
            id: "op-1".into(),
            machine_id: "machine-1".into(),
            phase: pb::OperationPhase::Succeeded.into(),
            ..Default::default()
        }))
    }

    async fn list_operations(
        &self,
        _: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn cancel_operation(
        &self,
        _: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    type WatchOperationsStream = BoxStream<pb::WatchOperationsResponse>;

    async fn watch_operations(
        &self,
        r: Request<pb::WatchOperationsRequest>,
    ) -> Result<Response<Self::WatchOperationsStream>, Status> {
        self.watch_requests.lock().unwrap().push(r.into_inner());
        let script = self.watches.lock().unwrap().pop_front();
        Ok(Response::new(play(script, |events| {
            pb::WatchOperationsResponse {
                events,
                ..Default::default()
            }
        })))
    }

    type StreamLogsStream = BoxStream<pb::StreamLogsResponse>;

    async fn stream_logs(
        &self,
        r: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        self.log_requests.lock().unwrap().push(r.into_inner());
        let script = self.logs.lock().unwrap().pop_front();
        Ok(Response::new(play(script, |lines| {
            pb::StreamLogsResponse { lines }
        })))
    }

    async fn list_operation_types(
        &self,
        _: Request<pb::ListOperationTypesRequest>,
    ) -> Result<Response<pb::ListOperationTypesResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}
