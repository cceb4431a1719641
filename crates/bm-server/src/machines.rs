//! `MachineService`: the inventory and the lifecycle operations, adapted to the engine.

use bm_domain::{Labels, MachinePatch, OperationType, snippet};
use bm_proto::v1 as pb;
use bm_store::{ImportOutcome, MachineQuery, StoreError};
use bm_workflow::{Engine, OperationRequest};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::{ApiError, code_name, respond};
use crate::paging;

/// The most rows one import request may carry; larger inventories are sent in batches.
pub(crate) const MAX_IMPORT_ROWS: usize = 10_000;

pub(crate) struct Machines {
    pub(crate) engine: Engine,
}

impl Machines {
    async fn register(&self, req: pb::RegisterMachineRequest) -> Result<pb::Machine, ApiError> {
        let m = req
            .machine
            .as_ref()
            .ok_or_else(|| ApiError::invalid("machine: is required"))?;
        let (id, spec, labels) = convert::new_machine("machine", m)?;
        let m = self.engine.register_machine(id, spec, labels).await?;
        tracing::info!(machine_id = %m.id, provider = %m.spec.provider, "machine registered");
        Ok(convert::machine(m))
    }

    async fn import(
        &self,
        req: pb::ImportMachinesRequest,
    ) -> Result<pb::ImportMachinesResponse, ApiError> {
        if req.machines.len() > MAX_IMPORT_ROWS {
            return Err(ApiError::invalid(format!(
                "machines: {} rows in one request; send at most {MAX_IMPORT_ROWS} per request",
                req.machines.len()
            )));
        }
        // Rows that do not convert fail on their own; the others go to the engine.
        let mut rows = Vec::with_capacity(req.machines.len());
        let mut early: Vec<Option<ApiError>> = Vec::with_capacity(req.machines.len());
        for (i, m) in req.machines.iter().enumerate() {
            match convert::new_machine(&format!("machines[{i}]"), m) {
                Ok(row) => {
                    rows.push(row);
                    early.push(None);
                }
                Err(e) => early.push(Some(e)),
            }
        }
        let mut engine_results = self
            .engine
            .import_machines(rows, req.validate_only)
            .await?
            .into_iter();
        let mut out = pb::ImportMachinesResponse::default();
        for (i, (m, early)) in req.machines.iter().zip(early).enumerate() {
            let result = match early {
                Some(e) => Err(e),
                None => engine_results
                    .next()
                    .ok_or_else(|| {
                        ApiError::from(StoreError::Corrupt(
                            "the engine returned fewer results than rows".into(),
                        ))
                    })?
                    .map_err(ApiError::from),
            };
            let mut row = pb::ImportResult {
                index: i32::try_from(i).unwrap_or(i32::MAX),
                machine_id: echoed_id(&m.id),
                ..Default::default()
            };
            match result {
                Ok(ImportOutcome::Created) => {
                    row.outcome = pb::ImportOutcome::Created.into();
                    out.created_count += 1;
                }
                Ok(ImportOutcome::Unchanged) => {
                    row.outcome = pb::ImportOutcome::Unchanged.into();
                    out.unchanged_count += 1;
                }
                Err(e) => {
                    let code = e.code();
                    if code == tonic::Code::Internal {
                        // A storage failure is not a bad row: fail the whole call.
                        return Err(e);
                    }
                    row.outcome = pb::ImportOutcome::Failed.into();
                    row.error_code = code_name(code).to_owned();
                    row.error_message = e.to_string();
                    out.failed_count += 1;
                }
            }
            out.results.push(row);
        }
        tracing::info!(
            source = %snippet(&req.source),
            validate_only = req.validate_only,
            created = out.created_count,
            unchanged = out.unchanged_count,
            failed = out.failed_count,
            "import"
        );
        Ok(out)
    }

    async fn get(&self, req: pb::GetMachineRequest) -> Result<pb::Machine, ApiError> {
        let id = convert::machine_id("machine_id", &req.machine_id)?;
        Ok(convert::machine(self.engine.get_machine(&id).await?))
    }

    async fn list(
        &self,
        req: pb::ListMachinesRequest,
    ) -> Result<pb::ListMachinesResponse, ApiError> {
        let limit = paging::page_size(req.page_size)?;
        let phase = convert::phase_filter("phase", req.phase)?;
        let effective_state =
            convert::effective_state_filter("effective_state", req.effective_state)?;
        let selector = req
            .label_selector
            .parse()
            .map_err(|e| ApiError::invalid(format!("label_selector: {e}")))?;
        let filters = format!(
            "{:?}|{:?}|{}",
            phase,
            effective_state,
            req.label_selector.trim()
        );
        let after = paging::decode(&req.page_token, "machines", &filters)?
            .map(|k| convert::machine_id("page_token", &k))
            .transpose()?;
        let page = self
            .engine
            .list_machines(&MachineQuery {
                after,
                limit,
                phase,
                effective_state,
                selector,
            })
            .await?;
        let mut machines: Vec<pb::Machine> = page.items.into_iter().map(convert::machine).collect();
        let cut = paging::fit(&mut machines);
        let next_page_token = match machines.last() {
            Some(last) if page.more || cut => paging::encode("machines", &last.id, &filters),
            _ => String::new(),
        };
        Ok(pb::ListMachinesResponse {
            machines,
            next_page_token,
        })
    }

    async fn update(&self, req: pb::UpdateMachineRequest) -> Result<pb::Machine, ApiError> {
        let m = req
            .machine
            .as_ref()
            .ok_or_else(|| ApiError::invalid("machine: is required"))?;
        let id = convert::machine_id("machine.id", &m.id)?;
        let paths: Vec<String> = match &req.update_mask {
            Some(mask) if !mask.paths.is_empty() => mask.paths.clone(),
            // AIP-134: no mask means every populated field.
            _ => {
                let mut implied = Vec::new();
                if m.spec.is_some() {
                    implied.push("spec".to_owned());
                }
                if !m.labels.is_empty() {
                    implied.push("labels".to_owned());
                }
                if m.status.is_some() {
                    implied.push("status".to_owned());
                }
                implied
            }
        };
        if paths.is_empty() {
            return Err(ApiError::invalid(
                "update_mask: names no field and the machine has no spec or labels to write",
            ));
        }
        // The mask becomes a patch that the store applies to the record as it is when it
        // writes, so that concurrent updates of different fields both land.
        let given = m.spec.clone().unwrap_or_default();
        let mut patch = MachinePatch::default();
        for path in &paths {
            let path = path.trim();
            match path {
                "spec" => {
                    let spec = convert::spec_from("machine.spec", &given)?;
                    patch.provider = Some(spec.provider);
                    patch.mac_addresses = Some(spec.mac_addresses);
                    patch.ssh_endpoint = Some(spec.ssh_endpoint);
                    patch.bmc_endpoint = Some(spec.bmc_endpoint);
                    patch.image = Some(spec.image);
                    patch.target_cluster = Some(spec.target_cluster);
                    patch.network_config = Some(spec.network_config);
                }
                "spec.provider" => patch.provider = Some(given.provider.clone()),
                "spec.mac_addresses" => {
                    patch.mac_addresses =
                        Some(convert::macs_from("machine.spec", &given.mac_addresses)?);
                }
                "spec.ssh_endpoint" => patch.ssh_endpoint = Some(given.ssh_endpoint.clone()),
                "spec.bmc_endpoint" => patch.bmc_endpoint = Some(given.bmc_endpoint.clone()),
                "spec.image" => patch.image = Some(given.image.clone()),
                "spec.target_cluster" => patch.target_cluster = Some(given.target_cluster.clone()),
                "spec.network_config" => patch.network_config = Some(given.network_config.clone()),
                "labels" => patch.labels = Some(convert::labels_from("machine.labels", &m.labels)?),
                p if p.starts_with("labels.") => {
                    // AIP-134: one label; present in the request sets it, absent removes it.
                    let key = &p["labels.".len()..];
                    Labels::validate_key(key)
                        .map_err(|e| ApiError::invalid(format!("update_mask: {e}")))?;
                    match m.labels.get(key) {
                        Some(v) => {
                            patch.set_labels.insert(key.to_owned(), v.clone());
                        }
                        None => patch.remove_labels.push(key.to_owned()),
                    }
                }
                p if p == "status"
                    || p.starts_with("status.")
                    || matches!(p, "effective_state" | "create_time" | "update_time" | "id") =>
                {
                    return Err(ApiError::invalid(format!(
                        "update_mask: {} is owned by the server; only spec and labels can be updated (status changes only through operations)",
                        snippet(p)
                    )));
                }
                p => {
                    return Err(ApiError::invalid(format!(
                        "update_mask: unknown field {}; use spec, spec.<field>, labels or labels.<key>",
                        snippet(p)
                    )));
                }
            }
        }
        let m = self.engine.update_machine(&id, &patch).await?;
        tracing::info!(machine_id = %m.id, fields = %snippet(&paths.join(",")).max_chars(200), "machine updated");
        Ok(convert::machine(m))
    }

    async fn start(
        &self,
        op_type: OperationType,
        machine_id: &str,
        request_id: &str,
        note: String,
    ) -> Result<Response<pb::Operation>, Status> {
        let run = async {
            let req = OperationRequest {
                machine_id: convert::machine_id("machine_id", machine_id)?,
                op_type,
                request_id: convert::request_id(request_id)?,
                note: convert::note(note)?,
            };
            let admission = self.engine.submit(req).await?;
            if admission.created {
                tracing::info!(
                    operation_id = %admission.operation.id,
                    machine_id = %admission.operation.machine_id,
                    r#type = %op_type,
                    "operation admitted"
                );
            }
            Ok::<_, ApiError>(convert::operation(admission.operation))
        };
        respond(run.await)
    }
}

/// A row's machine id as an import result gives it back: as sent when it is a possible id,
/// else its snippet (a result must not echo megabytes per row).
fn echoed_id(id: &str) -> String {
    if id.len() <= bm_domain::MachineId::MAX_LEN {
        id.to_owned()
    } else {
        snippet(id).to_string()
    }
}

#[tonic::async_trait]
impl pb::machine_service_server::MachineService for Machines {
    async fn register_machine(
        &self,
        r: Request<pb::RegisterMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        respond(self.register(r.into_inner()).await)
    }

    async fn import_machines(
        &self,
        r: Request<pb::ImportMachinesRequest>,
    ) -> Result<Response<pb::ImportMachinesResponse>, Status> {
        respond(self.import(r.into_inner()).await)
    }

    async fn get_machine(
        &self,
        r: Request<pb::GetMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        respond(self.get(r.into_inner()).await)
    }

    async fn list_machines(
        &self,
        r: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        respond(self.list(r.into_inner()).await)
    }

    async fn update_machine(
        &self,
        r: Request<pb::UpdateMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        respond(self.update(r.into_inner()).await)
    }

    async fn enter_maintenance(
        &self,
        r: Request<pb::EnterMaintenanceRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(
            OperationType::EnterMaintenance,
            &r.machine_id,
            &r.request_id,
            r.note,
        )
        .await
    }

    async fn exit_maintenance(
        &self,
        r: Request<pb::ExitMaintenanceRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(
            OperationType::ExitMaintenance,
            &r.machine_id,
            &r.request_id,
            r.note,
        )
        .await
    }

    async fn reimage(
        &self,
        r: Request<pb::ReimageRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(OperationType::Reimage, &r.machine_id, &r.request_id, r.note)
            .await
    }

    async fn reboot(
        &self,
        r: Request<pb::RebootRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(OperationType::Reboot, &r.machine_id, &r.request_id, r.note)
            .await
    }

    async fn rma(&self, r: Request<pb::RmaRequest>) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(OperationType::Rma, &r.machine_id, &r.request_id, r.note)
            .await
    }

    async fn retire(
        &self,
        r: Request<pb::RetireRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(OperationType::Retire, &r.machine_id, &r.request_id, r.note)
            .await
    }

    async fn upgrade(
        &self,
        r: Request<pb::UpgradeRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(OperationType::Upgrade, &r.machine_id, &r.request_id, r.note)
            .await
    }

    async fn reconfigure_network(
        &self,
        r: Request<pb::ReconfigureNetworkRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(
            OperationType::NetReconfig,
            &r.machine_id,
            &r.request_id,
            r.note,
        )
        .await
    }

    async fn clear_intervention(
        &self,
        r: Request<pb::ClearInterventionRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(
            OperationType::ClearIntervention,
            &r.machine_id,
            &r.request_id,
            r.note,
        )
        .await
    }

    async fn readmit(
        &self,
        r: Request<pb::ReadmitRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = r.into_inner();
        self.start(OperationType::Readmit, &r.machine_id, &r.request_id, r.note)
            .await
    }
}
