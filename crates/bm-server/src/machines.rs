//! `MachineService`: the inventory and the lifecycle operations, adapted to the engine.
//!
//! Every handler checks the machines it touches against the caller's scoped grants
//! ([`Caller`]): lists are filtered, a machine outside every scope is NOT_FOUND, one the
//! caller sees without the role the call needs is PERMISSION_DENIED.

use crate::auth::{Caller, Role};

use bm_proto::v1 as pb;
use bm_workflow::Engine;
use tonic::{Request, Response, Status};

use crate::convert::{self, StartOperation};
use crate::error::{ApiError, respond};
use crate::paging;

/// The most rows one import request may carry; larger inventories are sent in batches.
pub(crate) const MAX_IMPORT_ROWS: usize = 10_000;

pub(crate) struct Machines {
    pub(crate) engine: Engine,
}

impl Machines {
    async fn register(
        &self,
        caller: &Caller,
        req: pb::RegisterMachineRequest,
    ) -> Result<pb::Machine, ApiError> {
        let m = req
            .machine
            .as_ref()
            .ok_or_else(|| ApiError::invalid("machine: is required"))?;
        let mut new = convert::new_machine("machine", m)?;
        new.registered_by = caller.actor();
        caller.check_new_labels(Role::Admin, &new.id, &new.labels)?;
        let m = self.engine.register_machine(new).await?;
        tracing::info!(machine_id = %m.id, provider = %m.spec.provider, "machine registered");
        Ok(convert::machine(m))
    }

    async fn import(
        &self,
        caller: &Caller,
        req: pb::ImportMachinesRequest,
    ) -> Result<pb::ImportMachinesResponse, ApiError> {
        if req.machines.len() > MAX_IMPORT_ROWS {
            return Err(ApiError::invalid(format!(
                "machines: {} rows in one request; send at most {MAX_IMPORT_ROWS} per request",
                req.machines.len()
            )));
        }
        // Rows that do not convert, or that the caller may not create, fail on their own;
        // the others go to the engine.
        let (mut import, mut early) = convert::import_request(&req);
        let mut rows = std::mem::take(&mut import.machines).into_iter();
        for slot in early.iter_mut().filter(|e| e.is_none()) {
            let Some(mut row) = rows.next() else { break };
            row.registered_by = caller.actor();
            match caller.check_new_labels(Role::Admin, &row.id, &row.labels) {
                Ok(()) => import.machines.push(row),
                Err(e) => *slot = Some(e),
            }
        }
        let results = self.engine.import_machines(import).await?;
        let out = convert::import_response(&req.machines, early, results)?;
        tracing::info!(
            source = %convert::snippet(&req.source),
            validate_only = req.validate_only,
            created = out.created_count,
            unchanged = out.unchanged_count,
            failed = out.failed_count,
            "import"
        );
        Ok(out)
    }

    async fn get(
        &self,
        caller: &Caller,
        req: pb::GetMachineRequest,
    ) -> Result<pb::Machine, ApiError> {
        let id = convert::machine_id("machine_id", &req.machine_id)?;
        let m = self.engine.get_machine(&id).await?;
        caller.check(Role::Viewer, &id, &m.labels)?;
        Ok(convert::machine(m))
    }

    async fn events(
        &self,
        caller: &Caller,
        req: pb::ListMachineEventsRequest,
    ) -> Result<pb::ListMachineEventsResponse, ApiError> {
        let id = convert::machine_id("machine_id", &req.machine_id)?;
        let limit = paging::page_size(req.page_size)?;
        let m = self.engine.get_machine(&id).await?;
        caller.check(Role::Viewer, &id, &m.labels)?;
        let events = self
            .engine
            .machine_events(&id, req.after_sequence, limit)
            .await?;
        Ok(pb::ListMachineEventsResponse {
            events: events.iter().map(convert::machine_event).collect(),
        })
    }

    async fn list(
        &self,
        caller: &Caller,
        req: pb::ListMachinesRequest,
    ) -> Result<pb::ListMachinesResponse, ApiError> {
        let (mut query, filters) = convert::machine_query(&req)?;
        query.scope = caller.scope(Role::Viewer);
        let page = self.engine.list_machines(&query).await?;
        Ok(convert::machine_page(page, &filters))
    }

    async fn update(
        &self,
        caller: &Caller,
        req: pb::UpdateMachineRequest,
    ) -> Result<pb::Machine, ApiError> {
        let (mut update, paths) = convert::machine_update(&req)?;
        // A scoped admin changes machines of its scope, and may not move one out of it.
        if let Some(current) = caller
            .machine(&self.engine, caller.role(), &update.id)
            .await?
            && let (_, Some(labels)) = update
                .patch
                .apply(&current)
                .map_err(bm_workflow::WorkflowError::from)?
        {
            caller.check_new_labels(caller.role(), &update.id, &labels)?;
        }
        update.patch.actor = caller.actor();
        let m = self.engine.update_machine(update).await?;
        tracing::info!(
            machine_id = %m.id,
            fields = %convert::snippet(&paths.join(",")).max_chars(200),
            "machine updated"
        );
        Ok(convert::machine(m))
    }

    async fn start(
        &self,
        caller: Caller,
        req: impl StartOperation,
    ) -> Result<Response<pb::Operation>, Status> {
        let run = async {
            let mut req = req.into_operation_request()?;
            caller
                .machine(&self.engine, caller.role(), &req.machine_id)
                .await?;
            req.requested_by = caller.actor();
            let admission = self.engine.submit(req).await?;
            if admission.created {
                tracing::info!(
                    operation_id = %admission.operation.id,
                    machine_id = %admission.operation.machine_id,
                    r#type = %admission.operation.op_type,
                    "operation admitted"
                );
            }
            Ok::<_, ApiError>(convert::operation(admission.operation))
        };
        respond(run.await)
    }
}

#[tonic::async_trait]
impl pb::machine_service_server::MachineService for Machines {
    async fn register_machine(
        &self,
        r: Request<pb::RegisterMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        respond(self.register(&Caller::of(&r), r.into_inner()).await)
    }

    async fn import_machines(
        &self,
        r: Request<pb::ImportMachinesRequest>,
    ) -> Result<Response<pb::ImportMachinesResponse>, Status> {
        respond(self.import(&Caller::of(&r), r.into_inner()).await)
    }

    async fn get_machine(
        &self,
        r: Request<pb::GetMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        respond(self.get(&Caller::of(&r), r.into_inner()).await)
    }

    async fn list_machines(
        &self,
        r: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        respond(self.list(&Caller::of(&r), r.into_inner()).await)
    }

    async fn list_machine_events(
        &self,
        r: Request<pb::ListMachineEventsRequest>,
    ) -> Result<Response<pb::ListMachineEventsResponse>, Status> {
        respond(self.events(&Caller::of(&r), r.into_inner()).await)
    }

    async fn update_machine(
        &self,
        r: Request<pb::UpdateMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        respond(self.update(&Caller::of(&r), r.into_inner()).await)
    }

    async fn enter_maintenance(
        &self,
        r: Request<pb::EnterMaintenanceRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn exit_maintenance(
        &self,
        r: Request<pb::ExitMaintenanceRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn reimage(
        &self,
        r: Request<pb::ReimageRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn reboot(
        &self,
        r: Request<pb::RebootRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn rma(&self, r: Request<pb::RmaRequest>) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn retire(
        &self,
        r: Request<pb::RetireRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn upgrade(
        &self,
        r: Request<pb::UpgradeRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn reconfigure_network(
        &self,
        r: Request<pb::ReconfigureNetworkRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn clear_intervention(
        &self,
        r: Request<pb::ClearInterventionRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }

    async fn readmit(
        &self,
        r: Request<pb::ReadmitRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.start(Caller::of(&r), r.into_inner()).await
    }
}
