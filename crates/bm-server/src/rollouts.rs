//! `RolloutService`: rollouts, adapted to the engine.
//!
//! A caller with an unscoped grant sees and acts on every rollout; a caller whose grants are
//! scoped creates rollouts over machines in its scope only, and sees and acts on the
//! rollouts it created (another's is NOT_FOUND, as a machine outside the scope is).

use std::pin::Pin;
use std::time::Duration;

use bm_proto::v1 as pb;
use bm_workflow::{Engine, WorkflowError};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::auth::{Caller, Role};
use crate::convert::{self, Rollout, RolloutId};
use crate::error::{ApiError, respond};

pub(crate) struct Rollouts {
    pub(crate) engine: Engine,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How often a watch reads its rollout again when nothing was written here (a replica
/// sharing the store may be the one moving it on).
const WATCH_REREAD: Duration = Duration::from_secs(2);

/// Whether `caller` may see or act on `rollout` with `role`.
fn visible(caller: &Caller, role: Role, rollout: &Rollout) -> bool {
    caller.scope(role).is_all() || rollout.created_by.name == caller.actor().name
}

impl Rollouts {
    /// The rollout `id`, if the caller may have it with `role`.
    async fn read(&self, caller: &Caller, role: Role, id: RolloutId) -> Result<Rollout, ApiError> {
        let r = self.engine.get_rollout(id).await?;
        if !visible(caller, role, &r) {
            return Err(not_found(id));
        }
        Ok(r)
    }

    async fn create(
        &self,
        caller: &Caller,
        req: pb::CreateRolloutRequest,
    ) -> Result<pb::Rollout, ApiError> {
        let mut req = convert::rollout_request(req)?;
        req.requested_by = caller.actor();
        req.scope = caller.scope(Role::Operator);
        let (r, created) = self.engine.create_rollout(req).await?;
        if created {
            tracing::info!(rollout = %r.id, machines = r.machines.len(), "rollout created");
        }
        Ok(convert::rollout(r, true))
    }

    async fn get(
        &self,
        caller: &Caller,
        req: pb::GetRolloutRequest,
    ) -> Result<pb::Rollout, ApiError> {
        let id = convert::rollout_id("rollout_id", &req.rollout_id)?;
        Ok(convert::rollout(
            self.read(caller, Role::Viewer, id).await?,
            true,
        ))
    }

    async fn list(
        &self,
        caller: &Caller,
        req: pb::ListRolloutsRequest,
    ) -> Result<pb::ListRolloutsResponse, ApiError> {
        let (mut query, filters) = convert::rollout_query(&req)?;
        let limit = query.limit;
        if caller.scope(Role::Viewer).is_all() {
            let page = self.engine.list_rollouts(&query).await?;
            return Ok(convert::rollout_page(page, &filters));
        }
        // A scoped caller's own: pages are read until this one is full.
        query.limit = 100;
        let mut items = Vec::new();
        loop {
            let page = self.engine.list_rollouts(&query).await?;
            query.before = page.items.last().map(|r| r.id);
            for r in page.items {
                if !visible(caller, Role::Viewer, &r) {
                    continue;
                }
                if items.len() == limit {
                    let page = bm_workflow::Page { items, more: true };
                    return Ok(convert::rollout_page(page, &filters));
                }
                items.push(r);
            }
            if !page.more {
                let page = bm_workflow::Page { items, more: false };
                return Ok(convert::rollout_page(page, &filters));
            }
        }
    }

    /// Pause, resume or abort: checked like a read with the operator's role, then done.
    async fn change(
        &self,
        caller: &Caller,
        id: &str,
        what: fn(
            &Engine,
            RolloutId,
        ) -> futures::future::BoxFuture<'_, Result<Rollout, WorkflowError>>,
    ) -> Result<pb::Rollout, ApiError> {
        let id = convert::rollout_id("rollout_id", id)?;
        self.read(caller, Role::Operator, id).await?;
        let r = what(&self.engine, id).await?;
        tracing::info!(rollout = %r.id, phase = %r.phase, "rollout changed");
        Ok(convert::rollout(r, true))
    }

    async fn watch(
        &self,
        caller: &Caller,
        req: pb::WatchRolloutRequest,
    ) -> Result<BoxStream<pb::Rollout>, ApiError> {
        let id = convert::rollout_id("rollout_id", &req.rollout_id)?;
        let first = self.read(caller, Role::Viewer, id).await?;
        let engine = self.engine.clone();
        let writes = engine.rollout_writes();
        // State: the last rollout sent (None before the first), or done.
        let state = Some((engine, writes, None::<Rollout>, Some(first)));
        Ok(Box::pin(futures::stream::unfold(
            state,
            move |state| async move {
                let (engine, mut writes, last, next) = state?;
                let mut next = next;
                loop {
                    if let Some(r) = next.take()
                        && last.as_ref() != Some(&r)
                    {
                        let ended = r.phase.is_terminal();
                        let out = convert::rollout(r.clone(), true);
                        let state = (!ended).then_some((engine, writes, Some(r), None));
                        return Some((Ok(out), state));
                    }
                    if last.as_ref().is_some_and(|r| r.phase.is_terminal()) {
                        return None;
                    }
                    // A write here, or a while (for a replica's writes), or the end.
                    tokio::select! {
                        changed = writes.changed() => if changed.is_err() {
                            let gone = ApiError::from(WorkflowError::ShuttingDown);
                            return Some((Err(Status::from(gone)), None));
                        },
                        () = tokio::time::sleep(WATCH_REREAD) => {}
                    }
                    match engine.get_rollout(id).await {
                        Ok(r) => next = Some(r),
                        Err(e) => return Some((Err(Status::from(ApiError::from(e))), None)),
                    }
                }
            },
        )))
    }
}

fn not_found(id: RolloutId) -> ApiError {
    ApiError::from(WorkflowError::rollout_not_found(id))
}

#[tonic::async_trait]
impl pb::rollout_service_server::RolloutService for Rollouts {
    async fn create_rollout(
        &self,
        r: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        respond(self.create(&Caller::of(&r), r.into_inner()).await)
    }

    async fn get_rollout(
        &self,
        r: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        respond(self.get(&Caller::of(&r), r.into_inner()).await)
    }

    async fn list_rollouts(
        &self,
        r: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        respond(self.list(&Caller::of(&r), r.into_inner()).await)
    }

    async fn pause_rollout(
        &self,
        r: Request<pb::PauseRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let caller = Caller::of(&r);
        let id = r.into_inner().rollout_id;
        respond(
            self.change(&caller, &id, |e, id| Box::pin(e.pause_rollout(id)))
                .await,
        )
    }

    async fn resume_rollout(
        &self,
        r: Request<pb::ResumeRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let caller = Caller::of(&r);
        let id = r.into_inner().rollout_id;
        respond(
            self.change(&caller, &id, |e, id| Box::pin(e.resume_rollout(id)))
                .await,
        )
    }

    async fn abort_rollout(
        &self,
        r: Request<pb::AbortRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let caller = Caller::of(&r);
        let id = r.into_inner().rollout_id;
        respond(
            self.change(&caller, &id, |e, id| Box::pin(e.abort_rollout(id)))
                .await,
        )
    }

    type WatchRolloutStream = BoxStream<pb::Rollout>;

    async fn watch_rollout(
        &self,
        r: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        respond(self.watch(&Caller::of(&r), r.into_inner()).await)
    }
}
