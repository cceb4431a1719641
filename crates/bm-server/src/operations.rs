//! `OperationService`: history, cancel, and the two streams, adapted to the engine.

use std::pin::Pin;

use bm_proto::v1 as pb;
use bm_store::{EventFilter, OperationQuery};
use bm_workflow::Engine;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::convert;
use crate::error::{ApiError, respond};
use crate::fanout::EncodedEvents;
use crate::paging;

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
        let limit = paging::page_size(req.page_size)?;
        let machine_id = if req.machine_id.is_empty() {
            None
        } else {
            Some(convert::machine_id("machine_id", &req.machine_id)?)
        };
        let op_type = convert::operation_type_filter("type", req.r#type)?;
        let phase = convert::operation_phase_filter("phase", req.phase)?;
        let filters = format!("{machine_id:?}|{op_type:?}|{phase:?}");
        let before = paging::decode(&req.page_token, "operations", &filters)?
            .map(|k| convert::operation_id("page_token", &k))
            .transpose()?;
        let page = self
            .engine
            .list_operations(&OperationQuery {
                before,
                limit,
                machine_id,
                op_type,
                phase,
            })
            .await?;
        let mut operations: Vec<pb::Operation> =
            page.items.into_iter().map(convert::operation).collect();
        let cut = paging::fit(&mut operations);
        let next_page_token = match operations.last() {
            Some(last) if page.more || cut => paging::encode("operations", &last.id, &filters),
            _ => String::new(),
        };
        Ok(pb::ListOperationsResponse {
            operations,
            next_page_token,
        })
    }

    async fn cancel(&self, req: pb::CancelOperationRequest) -> Result<pb::Operation, ApiError> {
        let id = convert::operation_id("operation_id", &req.operation_id)?;
        let op = self.engine.cancel(id).await?;
        tracing::info!(operation_id = %id, phase = %op.phase, "cancel requested");
        Ok(convert::operation(op))
    }

    async fn watch(
        &self,
        req: pb::WatchOperationsRequest,
    ) -> Result<BoxStream<pb::WatchOperationsResponse>, ApiError> {
        let filter = EventFilter {
            machine_id: if req.machine_id.is_empty() {
                None
            } else {
                Some(convert::machine_id("machine_id", &req.machine_id)?)
            },
            operation_id: if req.operation_id.is_empty() {
                None
            } else {
                Some(convert::operation_id("operation_id", &req.operation_id)?)
            },
        };
        let rx = self.engine.watch(filter, req.after_revision).await?;
        let encoded = self.encoded.clone();
        Ok(Box::pin(ReceiverStream::new(rx).map(
            move |batch| match batch {
                Ok(events) => Ok(pb::WatchOperationsResponse {
                    events: Vec::new(),
                    encoded_events: events.iter().map(|e| encoded.get(e)).collect(),
                }),
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
            Ok(lines) => Ok(pb::StreamLogsResponse {
                lines: lines.iter().map(|l| convert::log_line(l)).collect(),
            }),
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
}
