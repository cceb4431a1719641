//! `OperationService`: history, cancel, and the two streams, adapted to the engine.

use std::pin::Pin;

use bm_proto::v1 as pb;
use bm_workflow::Engine;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::convert;
use crate::error::{ApiError, respond};
use crate::fanout::EncodedEvents;

pub(crate) struct Operations {
    pub(crate) engine: Engine,
    /// Events encoded once for every watcher.
    pub(crate) encoded: Arc<EncodedEvents>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Operations {
    async fn get(&self, req: pb::GetOperationRequest) -> Result<pb::Operation, ApiError> {
        let id = convert::operation_id("operation_id", &req.operation_id)?;
        Ok(convert::operation(self.engine.get_operation(id).await?))
    }

    async fn list(
        &self,
        req: pb::ListOperationsRequest,
    ) -> Result<pb::ListOperationsResponse, ApiError> {
        let (query, filters) = convert::operation_query(&req)?;
        let page = self.engine.list_operations(&query).await?;
        Ok(convert::operation_page(page, &filters))
    }

    async fn cancel(&self, req: pb::CancelOperationRequest) -> Result<pb::Operation, ApiError> {
        let cancel = convert::cancel_request(&req)?;
        let op = self.engine.cancel(cancel).await?;
        tracing::info!(operation_id = %op.id, phase = %op.phase, "cancel requested");
        Ok(convert::operation(op))
    }

    async fn watch(
        &self,
        req: pb::WatchOperationsRequest,
    ) -> Result<BoxStream<pb::WatchOperationsResponse>, ApiError> {
        let (filter, after) = convert::watch_request(&req)?;
        let rx = self.engine.watch(filter, after).await?;
        let encoded = self.encoded.clone();
        Ok(Box::pin(ReceiverStream::new(rx).map(
            move |batch| match batch {
                Ok(events) => Ok(convert::watch_response(&events, &encoded)),
                Err(e) => Err(Status::from(ApiError::from(e))),
            },
        )))
    }

    async fn logs(
        &self,
        req: pb::StreamLogsRequest,
    ) -> Result<BoxStream<pb::StreamLogsResponse>, ApiError> {
        let id = convert::operation_id("operation_id", &req.operation_id)?;
        let rx = self.engine.logs(id, req.after_sequence).await?;
        Ok(Box::pin(ReceiverStream::new(rx).map(|batch| match batch {
            Ok(lines) => Ok(convert::logs_response(&lines)),
            Err(e) => Err(Status::from(ApiError::from(e))),
        })))
    }
}

#[tonic::async_trait]
impl pb::operation_service_server::OperationService for Operations {
    async fn get_operation(
        &self,
        r: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        respond(self.get(r.into_inner()).await)
    }

    async fn list_operations(
        &self,
        r: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        respond(self.list(r.into_inner()).await)
    }

    async fn cancel_operation(
        &self,
        r: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        respond(self.cancel(r.into_inner()).await)
    }

    type WatchOperationsStream = BoxStream<pb::WatchOperationsResponse>;

    async fn watch_operations(
        &self,
        r: Request<pb::WatchOperationsRequest>,
    ) -> Result<Response<Self::WatchOperationsStream>, Status> {
        respond(self.watch(r.into_inner()).await)
    }

    type StreamLogsStream = BoxStream<pb::StreamLogsResponse>;

    async fn stream_logs(
        &self,
        r: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        respond(self.logs(r.into_inner()).await)
    }

    async fn list_operation_types(
        &self,
        _: Request<pb::ListOperationTypesRequest>,
    ) -> Result<Response<pb::ListOperationTypesResponse>, Status> {
        Ok(Response::new(pb::ListOperationTypesResponse {
            operation_types: convert::operation_types(),
        }))
    }
}
