//! `OperationService`: history, cancel, and the two streams, adapted to the engine.
//!
//! Operations are checked through their machine against the caller's scoped grants
//! ([`Caller`]); streams leave out, or end for, machines outside the scope.

use std::collections::HashMap;
use std::pin::Pin;

use bm_proto::v1 as pb;
use bm_workflow::{Engine, WorkflowError};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::auth::{Caller, Role};
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
    async fn get(
        &self,
        caller: &Caller,
        req: pb::GetOperationRequest,
    ) -> Result<pb::Operation, ApiError> {
        let id = convert::operation_id("operation_id", &req.operation_id)?;
        let op = caller.operation(&self.engine, Role::Viewer, id).await?;
        Ok(convert::operation(op))
    }

    async fn list(
        &self,
        caller: &Caller,
        req: pb::ListOperationsRequest,
    ) -> Result<pb::ListOperationsResponse, ApiError> {
        let (mut query, filters) = convert::operation_query(&req)?;
        // The operations of a machine outside the scope are left out, so asking for that
        // machine's gives an empty list, as for a machine that does not exist.
        query.scope = caller.scope(Role::Viewer);
        let page = self.engine.list_operations(&query).await?;
        Ok(convert::operation_page(page, &filters))
    }

    async fn cancel(
        &self,
        caller: &Caller,
        req: pb::CancelOperationRequest,
    ) -> Result<pb::Operation, ApiError> {
        let mut cancel = convert::cancel_request(&req)?;
        cancel.requested_by = caller.actor();
        caller
            .operation(&self.engine, caller.role(), cancel.operation_id)
            .await?;
        let op = self.engine.cancel(cancel).await?;
        tracing::info!(operation_id = %op.id, phase = %op.phase, "cancel requested");
        Ok(convert::operation(op))
    }

    async fn watch(
        &self,
        caller: &Caller,
        req: pb::WatchOperationsRequest,
    ) -> Result<BoxStream<pb::WatchOperationsResponse>, ApiError> {
        let (filter, after) = convert::watch_request(&req)?;
        let rx = self.engine.watch(filter, after).await?;
        let encoded = self.encoded.clone();
        let scope = caller.scope(Role::Viewer);
        if scope.is_all() {
            return Ok(Box::pin(ReceiverStream::new(rx).map(
                move |batch| match batch {
                    Ok(events) => Ok(convert::watch_response(&events, &encoded)),
                    Err(e) => Err(Status::from(ApiError::from(e))),
                },
            )));
        }
        // A scoped caller: each event is checked against its machine's labels as they are
        // when the event is sent, so a machine that leaves the scope stops being streamed.
        let engine = self.engine.clone();
        let state = (ReceiverStream::new(rx), engine, scope, encoded);
        Ok(Box::pin(futures::stream::unfold(
            Some(state),
            |state| async move {
                let (mut rx, engine, scope, encoded) = state?;
                loop {
                    let events = match rx.next().await? {
                        Ok(events) => events,
                        Err(e) => return Some((Err(Status::from(ApiError::from(e))), None)),
                    };
                    let mut shown: HashMap<convert::MachineId, bool> = HashMap::new();
                    let mut kept = Vec::with_capacity(events.len());
                    for e in events.iter() {
                        let visible = match shown.get(&e.machine_id) {
                            Some(v) => *v,
                            None => match engine.machine_in_scope(&e.machine_id, &scope).await {
                                Ok(v) => {
                                    shown.insert(e.machine_id.clone(), v);
                                    v
                                }
                                Err(err) => {
                                    return Some((Err(Status::from(ApiError::from(err))), None));
                                }
                            },
                        };
                        if visible {
                            kept.push(e.clone());
                        }
                    }
                    drop(events);
                    if !kept.is_empty() {
                        let out = convert::watch_response(&kept, &encoded);
                        return Some((Ok(out), Some((rx, engine, scope, encoded))));
                    }
                }
            },
        )))
    }

    async fn logs(
        &self,
        caller: &Caller,
        req: pb::StreamLogsRequest,
    ) -> Result<BoxStream<pb::StreamLogsResponse>, ApiError> {
        let id = convert::operation_id("operation_id", &req.operation_id)?;
        let op = caller.operation(&self.engine, Role::Viewer, id).await?;
        let rx = self.engine.logs(id, req.after_sequence).await?;
        let scope = caller.scope(Role::Viewer);
        if scope.is_all() {
            return Ok(Box::pin(ReceiverStream::new(rx).map(|batch| match batch {
                Ok(lines) => Ok(convert::logs_response(&lines)),
                Err(e) => Err(Status::from(ApiError::from(e))),
            })));
        }
        // A scoped caller: before each batch, the machine is checked again; once it has
        // left the scope, the stream ends as if the operation did not exist.
        let state = (
            ReceiverStream::new(rx),
            self.engine.clone(),
            scope,
            op.machine_id,
        );
        Ok(Box::pin(futures::stream::unfold(
            Some(state),
            move |state| async move {
                let (mut rx, engine, scope, machine) = state?;
                let lines = match rx.next().await? {
                    Ok(lines) => lines,
                    Err(e) => return Some((Err(Status::from(ApiError::from(e))), None)),
                };
                match engine.machine_in_scope(&machine, &scope).await {
                    Ok(true) => {
                        let out = convert::logs_response(&lines);
                        Some((Ok(out), Some((rx, engine, scope, machine))))
                    }
                    Ok(false) => {
                        let gone = ApiError::from(WorkflowError::operation_not_found(id));
                        Some((Err(Status::from(gone)), None))
                    }
                    Err(e) => Some((Err(Status::from(ApiError::from(e))), None)),
                }
            },
        )))
    }
}

#[tonic::async_trait]
impl pb::operation_service_server::OperationService for Operations {
    async fn get_operation(
        &self,
        r: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        respond(self.get(&Caller::of(&r), r.into_inner()).await)
    }

    async fn list_operations(
        &self,
        r: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        respond(self.list(&Caller::of(&r), r.into_inner()).await)
    }

    async fn cancel_operation(
        &self,
        r: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        respond(self.cancel(&Caller::of(&r), r.into_inner()).await)
    }

    type WatchOperationsStream = BoxStream<pb::WatchOperationsResponse>;

    async fn watch_operations(
        &self,
        r: Request<pb::WatchOperationsRequest>,
    ) -> Result<Response<Self::WatchOperationsStream>, Status> {
        respond(self.watch(&Caller::of(&r), r.into_inner()).await)
    }

    type StreamLogsStream = BoxStream<pb::StreamLogsResponse>;

    async fn stream_logs(
        &self,
        r: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        respond(self.logs(&Caller::of(&r), r.into_inner()).await)
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
