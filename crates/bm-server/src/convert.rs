//! Conversions between the wire types of bm-proto and the types of bm-domain and of the
//! engine's API: the only module that knows both sides. A request becomes the engine's
//! request here (field masks, filters, page tokens, the operation an RPC starts), and an
//! engine result becomes the response. A request field that does not convert is
//! INVALID_ARGUMENT, with the field's path in the message.

use std::collections::BTreeMap;
use std::sync::Arc;

pub(crate) use bm_domain::MachineId;
pub(crate) use bm_domain::snippet;
use bm_domain::{
    Condition, EffectiveState, EventKind, Labels, LogLine, MacAddress, Machine, MachineEvent,
    MachineEventKind, MachinePatch, MachineSpec, Operation, OperationEvent, OperationId,
    OperationPhase, OperationType, Phase, RequestId, StageOutcome, StageRecord, Timestamp,
};
pub(crate) use bm_domain::{Rollout, RolloutId};
use bm_proto::code_name;
use bm_proto::v1 as pb;
use bm_workflow::{
    CancelRequest, EventFilter, ImportOutcome, ImportRequest, MachineQuery, MachineUpdate,
    NewMachine, OperationQuery, OperationRequest, Page, WorkflowError,
};
use prost::Message;
use prost::bytes::Bytes;

use crate::error::ApiError;
use crate::fanout::EncodedEvents;
use crate::paging;

/// Prefixes a conversion error with the path of the field.
fn at(field: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("{field}: {e}"))
}

pub(crate) fn timestamp(t: Timestamp) -> bm_proto::pbjson_types::Timestamp {
    let micros = t.as_unix_micros();
    bm_proto::pbjson_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn opt_timestamp(t: Option<Timestamp>) -> Option<bm_proto::pbjson_types::Timestamp> {
    t.map(timestamp)
}

pub(crate) fn machine_id(field: &str, s: &str) -> Result<MachineId, ApiError> {
    if s.is_empty() {
        return Err(at(field, "is required"));
    }
    MachineId::new(s).map_err(|e| at(field, e))
}

pub(crate) fn operation_id(field: &str, s: &str) -> Result<OperationId, ApiError> {
    if s.is_empty() {
        return Err(at(field, "is required"));
    }
    s.parse().map_err(|e| at(field, e))
}

/// A request id, or a generated one when the client sent none (no idempotency then).
pub(crate) fn request_id(s: &str) -> Result<RequestId, ApiError> {
    if s.is_empty() {
        return RequestId::new(format!("auto-{}", ulid::Ulid::generate()))
            .map_err(|e| at("request_id", e));
    }
    RequestId::new(s).map_err(|e| at("request_id", e))
}

/// An operation's note, checked before any rule so that a bad note is always
/// INVALID_ARGUMENT, whatever the machine's state.
pub(crate) fn note(s: String) -> Result<String, ApiError> {
    if s.len() > Operation::MAX_NOTE {
        return Err(at(
            "note",
            bm_domain::DomainError::invalid(
                "note",
                &s,
                format!("must be at most {} bytes", Operation::MAX_NOTE),
            ),
        ));
    }
    Ok(s)
}

// ---- enums ----------------------------------------------------------------------------

pub(crate) fn phase(p: Phase) -> pb::Phase {
    match p {
        Phase::FactoryReady => pb::Phase::FactoryReady,
        Phase::Ready => pb::Phase::Ready,
        Phase::Maintenance => pb::Phase::Maintenance,
    }
}

/// A filter on an enum field: UNSPECIFIED (0) means any; any other value must be one that
/// the API defines and the domain knows, or the filter would silently match everything.
fn enum_filter<P, D>(
    field: &str,
    what: &str,
    v: i32,
    all: &[D],
    to_pb: fn(D) -> P,
) -> Result<Option<D>, ApiError>
where
    P: TryFrom<i32> + PartialEq,
    D: Copy,
{
    if v == 0 {
        return Ok(None);
    }
    let unknown = || at(field, format!("unknown {what} {v}"));
    let p = P::try_from(v).map_err(|_| unknown())?;
    all.iter()
        .copied()
        .find(|d| to_pb(*d) == p)
        .map(Some)
        .ok_or_else(unknown)
}

/// A phase filter: UNSPECIFIED means any.
pub(crate) fn phase_filter(field: &str, v: i32) -> Result<Option<Phase>, ApiError> {
    enum_filter(field, "phase", v, &Phase::ALL, phase)
}

pub(crate) fn effective_state(s: EffectiveState) -> pb::EffectiveState {
    match s {
        EffectiveState::Blocked => pb::EffectiveState::Blocked,
        EffectiveState::Attention => pb::EffectiveState::Attention,
        EffectiveState::Busy => pb::EffectiveState::Busy,
        EffectiveState::MaintenanceIdle => pb::EffectiveState::MaintenanceIdle,
        EffectiveState::New => pb::EffectiveState::New,
        EffectiveState::Idle => pb::EffectiveState::Idle,
    }
}

pub(crate) fn effective_state_filter(
    field: &str,
    v: i32,
) -> Result<Option<EffectiveState>, ApiError> {
    enum_filter(
        field,
        "effective state",
        v,
        &EffectiveState::ALL,
        effective_state,
    )
}

pub(crate) fn operation_type(t: OperationType) -> pb::OperationType {
    match t {
        OperationType::Reimage => pb::OperationType::Reimage,
        OperationType::Reboot => pb::OperationType::Reboot,
        OperationType::EnterMaintenance => pb::OperationType::EnterMaintenance,
        OperationType::ExitMaintenance => pb::OperationType::ExitMaintenance,
        OperationType::Rma => pb::OperationType::Rma,
        OperationType::Retire => pb::OperationType::Retire,
        OperationType::Upgrade => pb::OperationType::Upgrade,
        OperationType::NetReconfig => pb::OperationType::NetReconfig,
        OperationType::ClearIntervention => pb::OperationType::ClearIntervention,
        OperationType::Readmit => pb::OperationType::Readmit,
    }
}

pub(crate) fn operation_type_filter(
    field: &str,
    v: i32,
) -> Result<Option<OperationType>, ApiError> {
    enum_filter(
        field,
        "operation type",
        v,
        &OperationType::ALL,
        operation_type,
    )
}

/// Every operation type with its stage names and description, from bm-workflow's plans
/// (which stay private: only the names go out).
pub(crate) fn operation_types() -> Vec<pb::OperationTypeInfo> {
    OperationType::ALL
        .into_iter()
        .map(|t| pb::OperationTypeInfo {
            r#type: operation_type(t).into(),
            stages: bm_workflow::stage_names(t).map(str::to_owned).collect(),
            description: bm_workflow::describe(t).to_owned(),
        })
        .collect()
}

pub(crate) fn operation_phase(p: OperationPhase) -> pb::OperationPhase {
    match p {
        OperationPhase::Pending => pb::OperationPhase::Pending,
        OperationPhase::Running => pb::OperationPhase::Running,
        OperationPhase::Succeeded => pb::OperationPhase::Succeeded,
        OperationPhase::Failed => pb::OperationPhase::Failed,
        OperationPhase::Canceled => pb::OperationPhase::Canceled,
    }
}

pub(crate) fn operation_phase_filter(
    field: &str,
    v: i32,
) -> Result<Option<OperationPhase>, ApiError> {
    enum_filter(
        field,
        "operation phase",
        v,
        &OperationPhase::ALL,
        operation_phase,
    )
}

fn stage_outcome(o: StageOutcome) -> pb::StageOutcome {
    match o {
        StageOutcome::Running => pb::StageOutcome::Running,
        StageOutcome::Succeeded => pb::StageOutcome::Succeeded,
        StageOutcome::Failed => pb::StageOutcome::Failed,
        StageOutcome::Canceled => pb::StageOutcome::Canceled,
    }
}

fn event_type(k: EventKind) -> pb::EventType {
    match k {
        EventKind::Created => pb::EventType::Created,
        EventKind::PhaseChanged => pb::EventType::PhaseChanged,
        EventKind::StageStarted => pb::EventType::StageStarted,
        EventKind::StageSucceeded => pb::EventType::StageSucceeded,
        EventKind::StageFailed => pb::EventType::StageFailed,
        EventKind::StageRetrying => pb::EventType::StageRetrying,
        EventKind::CancelRequested => pb::EventType::CancelRequested,
    }
}

// ---- machines -------------------------------------------------------------------------

fn condition(c: Condition) -> pb::Condition {
    pb::Condition {
        r#type: c.type_.to_string(),
        status: c.status,
        reason: c.reason,
        message: c.message,
        last_transition_time: Some(timestamp(c.last_transition_time)),
    }
}

/// A machine for the wire. It takes the record, whose strings move into the message (a page
/// of machines may carry megabytes of network configuration).
pub(crate) fn machine(m: Machine) -> pb::Machine {
    let effective = effective_state(m.effective_state());
    let held_time = opt_timestamp(m.held_since());
    pb::Machine {
        id: m.id.to_string(),
        spec: Some(spec(m.spec)),
        labels: BTreeMap::from(m.labels).into_iter().collect(),
        status: Some(pb::MachineStatus {
            phase: phase(m.status.phase).into(),
            conditions: Vec::from(m.status.conditions)
                .into_iter()
                .map(condition)
                .collect(),
            active_operation_id: m
                .status
                .active_operation_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            state_time: opt_timestamp(m.status.state_since),
            held_time,
        }),
        effective_state: effective.into(),
        create_time: Some(timestamp(m.created_at)),
        update_time: Some(timestamp(m.updated_at)),
        updated_by: actor(m.updated_by),
    }
}

fn spec(s: MachineSpec) -> pb::MachineSpec {
    pb::MachineSpec {
        provider: s.provider,
        mac_addresses: s.mac_addresses.iter().map(ToString::to_string).collect(),
        ssh_endpoint: s.ssh_endpoint,
        bmc_endpoint: s.bmc_endpoint,
        image: s.image,
        target_cluster: s.target_cluster,
        network_config: s.network_config,
    }
}

/// The MAC addresses of a request's spec; `field` is the spec's path.
pub(crate) fn macs_from(field: &str, macs: &[String]) -> Result<Vec<MacAddress>, ApiError> {
    macs.iter()
        .enumerate()
        .map(|(i, m)| {
            m.parse::<MacAddress>()
                .map_err(|e| at(&format!("{field}.mac_addresses[{i}]"), e))
        })
        .collect()
}

/// The spec of a request; `field` is its path, e.g. `machine.spec`.
pub(crate) fn spec_from(field: &str, s: &pb::MachineSpec) -> Result<MachineSpec, ApiError> {
    let mac_addresses = macs_from(field, &s.mac_addresses)?;
    let spec = MachineSpec {
        provider: s.provider.clone(),
        mac_addresses,
        ssh_endpoint: s.ssh_endpoint.clone(),
        bmc_endpoint: s.bmc_endpoint.clone(),
        image: s.image.clone(),
        target_cluster: s.target_cluster.clone(),
        network_config: s.network_config.clone(),
    };
    spec.validate().map_err(|e| at(field, e))?;
    Ok(spec)
}

pub(crate) fn labels_from(
    field: &str,
    l: &std::collections::HashMap<String, String>,
) -> Result<Labels, ApiError> {
    let map: BTreeMap<String, String> = l.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    Labels::new(map).map_err(|e| at(field, e))
}

/// The id, spec and labels of a machine to register; its status must be empty, since the
/// server owns it.
pub(crate) fn new_machine(field: &str, m: &pb::Machine) -> Result<NewMachine, ApiError> {
    let id = machine_id(&format!("{field}.id"), &m.id)?;
    if m.status.is_some() || m.effective_state != 0 {
        return Err(at(
            &format!("{field}.status"),
            "is owned by the server and must be empty when registering a machine",
        ));
    }
    let spec = m
        .spec
        .as_ref()
        .ok_or_else(|| at(&format!("{field}.spec"), "is required"))?;
    let spec = spec_from(&format!("{field}.spec"), spec)?;
    let labels = labels_from(&format!("{field}.labels"), &m.labels)?;
    Ok(NewMachine {
        id,
        spec,
        labels,
        // The handler sets the caller.
        registered_by: bm_domain::Actor::default(),
    })
}

/// The machines of an import that convert, for the engine, and for each row of the request
/// the error of one that does not (it fails on its own; the others still go in).
pub(crate) fn import_request(
    req: &pb::ImportMachinesRequest,
) -> (ImportRequest, Vec<Option<ApiError>>) {
    let mut machines = Vec::with_capacity(req.machines.len());
    let mut early: Vec<Option<ApiError>> = Vec::with_capacity(req.machines.len());
    for (i, m) in req.machines.iter().enumerate() {
        match new_machine(&format!("machines[{i}]"), m) {
            Ok(row) => {
                machines.push(row);
                early.push(None);
            }
            Err(e) => early.push(Some(e)),
        }
    }
    let import = ImportRequest {
        machines,
        dry_run: req.validate_only,
    };
    (import, early)
}

/// The answer to an import: one result per row of the request, from the conversion errors
/// of [`import_request`] and the engine's results for the other rows, in order.
///
/// # Errors
///
/// An internal failure of any row fails the whole call: a storage failure is not a bad row.
pub(crate) fn import_response(
    machines: &[pb::Machine],
    early: Vec<Option<ApiError>>,
    results: Vec<Result<ImportOutcome, WorkflowError>>,
) -> Result<pb::ImportMachinesResponse, ApiError> {
    let mut engine_results = results.into_iter();
    let mut out = pb::ImportMachinesResponse::default();
    for (i, (m, early)) in machines.iter().zip(early).enumerate() {
        let result = match early {
            Some(e) => Err(e),
            None => engine_results
                .next()
                .ok_or_else(|| {
                    ApiError::Internal("the engine returned fewer results than rows".into())
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
    Ok(out)
}

/// A row's machine id as an import result gives it back: as sent when it is a possible id,
/// else its snippet (a result must not echo megabytes per row).
fn echoed_id(id: &str) -> String {
    if id.len() <= MachineId::MAX_LEN {
        id.to_owned()
    } else {
        snippet(id).to_string()
    }
}

/// The change an UpdateMachine asks for, with the field paths it names (for the log).
///
/// The mask becomes a patch that the store applies to the record as it is when it writes,
/// so that concurrent updates of different fields both land.
pub(crate) fn machine_update(
    req: &pb::UpdateMachineRequest,
) -> Result<(MachineUpdate, Vec<String>), ApiError> {
    let m = req
        .machine
        .as_ref()
        .ok_or_else(|| ApiError::invalid("machine: is required"))?;
    let id = machine_id("machine.id", &m.id)?;
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
    let given = m.spec.clone().unwrap_or_default();
    let mut patch = MachinePatch::default();
    for path in &paths {
        let path = path.trim();
        match path {
            "spec" => {
                let spec = spec_from("machine.spec", &given)?;
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
                patch.mac_addresses = Some(macs_from("machine.spec", &given.mac_addresses)?);
            }
            "spec.ssh_endpoint" => patch.ssh_endpoint = Some(given.ssh_endpoint.clone()),
            "spec.bmc_endpoint" => patch.bmc_endpoint = Some(given.bmc_endpoint.clone()),
            "spec.image" => patch.image = Some(given.image.clone()),
            "spec.target_cluster" => patch.target_cluster = Some(given.target_cluster.clone()),
            "spec.network_config" => patch.network_config = Some(given.network_config.clone()),
            "labels" => patch.labels = Some(labels_from("machine.labels", &m.labels)?),
            p if p.starts_with("labels.") => {
                // AIP-134: one label; present in the request sets it, absent removes it.
                let key = &p["labels.".len()..];
                Labels::validate_key(key).map_err(|e| at("update_mask", e))?;
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
    Ok((MachineUpdate { id, patch }, paths))
}

/// The query of a ListMachines, and the fingerprint of its filters that its page tokens
/// carry.
pub(crate) fn machine_query(
    req: &pb::ListMachinesRequest,
) -> Result<(MachineQuery, String), ApiError> {
    let limit = paging::page_size(req.page_size)?;
    let phase = phase_filter("phase", req.phase)?;
    let effective_state = effective_state_filter("effective_state", req.effective_state)?;
    let selector = req
        .label_selector
        .parse()
        .map_err(|e| at("label_selector", e))?;
    let filters = format!(
        "{:?}|{:?}|{}",
        phase,
        effective_state,
        req.label_selector.trim()
    );
    let after = paging::decode(&req.page_token, "machines", &filters)?
        .map(|k| machine_id("page_token", &k))
        .transpose()?;
    let query = MachineQuery {
        after,
        limit,
        phase,
        effective_state,
        selector,
        // The handler narrows it to the caller's.
        scope: bm_workflow::Scope::All,
    };
    Ok((query, filters))
}

/// A page of machines for the wire, with the token of the next page if there is one. The
/// page ends early when the machines would encode to more than [`paging::MAX_PAGE_BYTES`].
pub(crate) fn machine_page(page: Page<Machine>, filters: &str) -> pb::ListMachinesResponse {
    let mut machines: Vec<pb::Machine> = page.items.into_iter().map(machine).collect();
    let cut = paging::fit(&mut machines);
    let next_page_token = match machines.last() {
        Some(last) if page.more || cut => paging::encode("machines", &last.id, filters),
        _ => String::new(),
    };
    pb::ListMachinesResponse {
        machines,
        next_page_token,
    }
}

// ---- operations -----------------------------------------------------------------------

fn stage(s: StageRecord) -> pb::Stage {
    pb::Stage {
        name: s.name,
        outcome: stage_outcome(s.outcome).into(),
        attempts: i32::try_from(s.attempts).unwrap_or(i32::MAX),
        interruptions: i32::try_from(s.interruptions).unwrap_or(i32::MAX),
        start_time: Some(timestamp(s.started_at)),
        end_time: opt_timestamp(s.finished_at),
        last_error: s.last_error.unwrap_or_default(),
    }
}

/// An operation for the wire; like [`machine`], it takes the record.
/// The wire form of an actor; unset when unknown.
fn actor(a: bm_domain::Actor) -> Option<pb::Actor> {
    if a.is_unknown() {
        return None;
    }
    Some(pb::Actor {
        name: a.name,
        method: a.method,
    })
}

pub(crate) fn operation(o: Operation) -> pb::Operation {
    let trace_id = o.trace_id().unwrap_or_default().to_owned();
    pb::Operation {
        id: o.id.to_string(),
        machine_id: o.machine_id.to_string(),
        r#type: operation_type(o.op_type).into(),
        phase: operation_phase(o.phase).into(),
        request_id: o.request_id.to_string(),
        current_stage: o.current_stage,
        stages: o.stages.into_iter().map(stage).collect(),
        create_time: Some(timestamp(o.created_at)),
        start_time: opt_timestamp(o.started_at),
        end_time: opt_timestamp(o.finished_at),
        error: o.error.unwrap_or_default(),
        note: o.note,
        cancel_requested: o.cancel_requested,
        trace_id,
        requested_by: actor(o.requested_by),
        canceled_by: actor(o.canceled_by),
        rollout_id: o.rollout_id.map(|r| r.to_string()).unwrap_or_default(),
    }
}

/// The operation an RPC of `MachineService` starts: every operation RPC carries a machine,
/// a request id and a note, and the RPC says the type.
pub(crate) trait StartOperation {
    /// The engine's request.
    fn into_operation_request(self) -> Result<OperationRequest, ApiError>;
}

fn operation_request(
    op_type: OperationType,
    machine: &str,
    request: &str,
    note: String,
) -> Result<OperationRequest, ApiError> {
    Ok(OperationRequest {
        machine_id: machine_id("machine_id", machine)?,
        op_type,
        request_id: request_id(request)?,
        note: self::note(note)?,
        requested_by: bm_domain::Actor::default(),
    })
}

macro_rules! start_operation {
    ($($request:ident => $op_type:ident),* $(,)?) => {$(
        impl StartOperation for pb::$request {
            fn into_operation_request(self) -> Result<OperationRequest, ApiError> {
                operation_request(
                    OperationType::$op_type,
                    &self.machine_id,
                    &self.request_id,
                    self.note,
                )
            }
        }
    )*};
}

start_operation! {
    EnterMaintenanceRequest => EnterMaintenance,
    ExitMaintenanceRequest => ExitMaintenance,
    ReimageRequest => Reimage,
    RebootRequest => Reboot,
    RmaRequest => Rma,
    RetireRequest => Retire,
    UpgradeRequest => Upgrade,
    ReconfigureNetworkRequest => NetReconfig,
    ClearInterventionRequest => ClearIntervention,
    ReadmitRequest => Readmit,
}

pub(crate) fn cancel_request(req: &pb::CancelOperationRequest) -> Result<CancelRequest, ApiError> {
    Ok(CancelRequest {
        operation_id: operation_id("operation_id", &req.operation_id)?,
        // The handler sets the caller.
        requested_by: bm_domain::Actor::default(),
    })
}

/// An optional machine id: empty means any.
fn opt_machine_id(field: &str, s: &str) -> Result<Option<MachineId>, ApiError> {
    if s.is_empty() {
        Ok(None)
    } else {
        machine_id(field, s).map(Some)
    }
}

/// The query of a ListOperations, and the fingerprint of its filters that its page tokens
/// carry.
pub(crate) fn operation_query(
    req: &pb::ListOperationsRequest,
) -> Result<(OperationQuery, String), ApiError> {
    let limit = paging::page_size(req.page_size)?;
    let machine_id = opt_machine_id("machine_id", &req.machine_id)?;
    let op_type = operation_type_filter("type", req.r#type)?;
    let phase = operation_phase_filter("phase", req.phase)?;
    let filters = format!("{machine_id:?}|{op_type:?}|{phase:?}");
    let before = paging::decode(&req.page_token, "operations", &filters)?
        .map(|k| operation_id("page_token", &k))
        .transpose()?;
    let query = OperationQuery {
        before,
        limit,
        machine_id,
        op_type,
        phase,
        // The handler narrows it to the caller's.
        scope: bm_workflow::Scope::All,
    };
    Ok((query, filters))
}

/// A page of operations for the wire, with the token of the next page if there is one. The
/// page ends early when the operations would encode to more than [`paging::MAX_PAGE_BYTES`].
pub(crate) fn operation_page(page: Page<Operation>, filters: &str) -> pb::ListOperationsResponse {
    let mut operations: Vec<pb::Operation> = page.items.into_iter().map(operation).collect();
    let cut = paging::fit(&mut operations);
    let next_page_token = match operations.last() {
        Some(last) if page.more || cut => paging::encode("operations", &last.id, filters),
        _ => String::new(),
    };
    pb::ListOperationsResponse {
        operations,
        next_page_token,
    }
}

/// Which events a WatchOperations follows, and the revision it resumes after.
pub(crate) fn watch_request(
    req: &pb::WatchOperationsRequest,
) -> Result<(EventFilter, Option<u64>), ApiError> {
    let filter = EventFilter {
        machine_id: opt_machine_id("machine_id", &req.machine_id)?,
        operation_id: if req.operation_id.is_empty() {
            None
        } else {
            Some(operation_id("operation_id", &req.operation_id)?)
        },
    };
    Ok((filter, req.after_revision))
}

/// A batch of a watch for the wire: each event encoded once for every watcher, in `cache`.
pub(crate) fn watch_response(
    events: &[Arc<OperationEvent>],
    cache: &EncodedEvents,
) -> pb::WatchOperationsResponse {
    pb::WatchOperationsResponse {
        events: Vec::new(),
        encoded_events: events
            .iter()
            .map(|e| cache.get(e.revision, || Bytes::from(event(e).encode_to_vec())))
            .collect(),
    }
}

/// A batch of a log stream for the wire.
pub(crate) fn logs_response(lines: &[Arc<LogLine>]) -> pb::StreamLogsResponse {
    pb::StreamLogsResponse {
        lines: lines.iter().map(|l| log_line(l)).collect(),
    }
}

pub(crate) fn event(e: &OperationEvent) -> pb::OperationEvent {
    pb::OperationEvent {
        revision: e.revision,
        time: Some(timestamp(e.time)),
        operation_id: e.operation_id.to_string(),
        machine_id: e.machine_id.to_string(),
        operation_type: operation_type(e.operation_type).into(),
        r#type: event_type(e.kind).into(),
        phase: operation_phase(e.phase).into(),
        stage: e.stage.clone(),
        attempt: i32::try_from(e.attempt).unwrap_or(i32::MAX),
        message: e.message.clone(),
    }
}

pub(crate) fn machine_event(e: &MachineEvent) -> pb::MachineEvent {
    pb::MachineEvent {
        sequence: e.sequence,
        time: Some(timestamp(e.time)),
        machine_id: e.machine_id.to_string(),
        r#type: match e.kind {
            MachineEventKind::PowerChanged => pb::MachineEventType::PowerChanged,
        }
        .into(),
        message: e.message.clone(),
    }
}

pub(crate) fn log_line(l: &LogLine) -> pb::LogLine {
    pb::LogLine {
        sequence: l.sequence,
        time: Some(timestamp(l.time)),
        operation_id: l.operation_id.to_string(),
        stage: l.stage.clone(),
        tag: l.tag.clone(),
        message: l.message.clone(),
    }
}

// ---- rollouts ---------------------------------------------------------------------------

pub(crate) fn rollout_id(field: &str, s: &str) -> Result<bm_domain::RolloutId, ApiError> {
    if s.is_empty() {
        return Err(at(field, "is required"));
    }
    s.parse().map_err(|e| at(field, e))
}

/// `5` or `10%`.
fn amount(field: &str, s: &str) -> Result<bm_domain::Amount, ApiError> {
    if s.trim().is_empty() {
        return Err(at(
            field,
            "is required: a number of machines (\"5\") or a percentage of the target (\"10%\")",
        ));
    }
    s.parse().map_err(|e| at(field, e))
}

/// What CreateRollout asks for, as the engine's request (its caller and scope are the
/// handler's to fill in).
pub(crate) fn rollout_request(
    req: pb::CreateRolloutRequest,
) -> Result<bm_workflow::RolloutRequest, ApiError> {
    use bm_domain::{RolloutAction, RolloutSpec, WhenBusy};
    let target = req.target.unwrap_or_default();
    let spec = req.spec.ok_or_else(|| {
        at(
            "spec",
            "is required: the operation, max_in_flight and failure_budget",
        )
    })?;
    let op = operation_type_filter("spec.operation_type", spec.operation_type)?;
    let action = match (op, spec.maintenance_reimage) {
        (Some(op), false) => RolloutAction::Operation(op),
        (None, true) => RolloutAction::MaintenanceReimage,
        (Some(_), true) => {
            return Err(at(
                "spec",
                "give either operation_type or maintenance_reimage, not both",
            ));
        }
        (None, false) => {
            return Err(at(
                "spec.operation_type",
                "is required (or set maintenance_reimage for enter maintenance, reimage, exit maintenance)",
            ));
        }
    };
    let soak = match spec.soak {
        None => std::time::Duration::ZERO,
        Some(d) => {
            if d.seconds < 0 || d.nanos < 0 {
                return Err(at("spec.soak", "must not be negative"));
            }
            std::time::Duration::new(d.seconds.cast_unsigned(), d.nanos.cast_unsigned())
        }
    };
    let when_busy = match pb::WhenBusy::try_from(spec.when_busy) {
        Ok(pb::WhenBusy::Unspecified | pb::WhenBusy::Skip) => WhenBusy::Skip,
        Ok(pb::WhenBusy::Wait) => WhenBusy::Wait,
        Err(_) => {
            return Err(at(
                "spec.when_busy",
                format!("unknown value {}", spec.when_busy),
            ));
        }
    };
    let spec = RolloutSpec {
        action,
        max_in_flight: amount("spec.max_in_flight", &spec.max_in_flight)?,
        failure_budget: amount("spec.failure_budget", &spec.failure_budget)?,
        batch_by: (!spec.batch_by.trim().is_empty()).then(|| spec.batch_by.trim().to_owned()),
        soak,
        when_busy,
    };
    spec.validate().map_err(|e| at("spec", e))?;
    let machine_ids = target
        .machine_ids
        .iter()
        .map(|m| machine_id("target.machine_ids", m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(bm_workflow::RolloutRequest {
        target: bm_workflow::RolloutTarget {
            selector: target
                .label_selector
                .parse()
                .map_err(|e| at("target.label_selector", e))?,
            phase: phase_filter("target.phase", target.phase)?,
            effective_state: effective_state_filter(
                "target.effective_state",
                target.effective_state,
            )?,
            machine_ids,
        },
        spec,
        request_id: request_id(&req.request_id)?,
        note: note(req.note)?,
        requested_by: bm_domain::Actor::default(),
        scope: bm_workflow::Scope::All,
    })
}

fn rollout_phase(p: bm_domain::RolloutPhase) -> pb::RolloutPhase {
    use bm_domain::RolloutPhase as P;
    match p {
        P::Running => pb::RolloutPhase::Running,
        P::Paused => pb::RolloutPhase::Paused,
        P::Stopping => pb::RolloutPhase::Stopping,
        P::Aborting => pb::RolloutPhase::Aborting,
        P::Succeeded => pb::RolloutPhase::Succeeded,
        P::Failed => pb::RolloutPhase::Failed,
        P::Aborted => pb::RolloutPhase::Aborted,
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A rollout for the wire; its machines too when `machines` is set.
pub(crate) fn rollout(r: bm_domain::Rollout, machines: bool) -> pb::Rollout {
    use bm_domain::{Progress, RolloutAction, WhenBusy};
    let c = r.counts();
    let (max_in_flight, failure_limit) = (r.max_in_flight(), r.failure_limit());
    let spec = pb::RolloutSpec {
        operation_type: match r.spec.action {
            RolloutAction::Operation(op) => operation_type(op).into(),
            RolloutAction::MaintenanceReimage => 0,
        },
        maintenance_reimage: r.spec.action == RolloutAction::MaintenanceReimage,
        max_in_flight: r.spec.max_in_flight.to_string(),
        failure_budget: r.spec.failure_budget.to_string(),
        batch_by: r.spec.batch_by.clone().unwrap_or_default(),
        soak: (!r.spec.soak.is_zero()).then(|| bm_proto::pbjson_types::Duration {
            seconds: i64::try_from(r.spec.soak.as_secs()).unwrap_or(i64::MAX),
            nanos: r.spec.soak.subsec_nanos().cast_signed(),
        }),
        when_busy: match r.spec.when_busy {
            WhenBusy::Skip => pb::WhenBusy::Skip,
            WhenBusy::Wait => pb::WhenBusy::Wait,
        }
        .into(),
    };
    let machines = if machines {
        r.machines
            .into_iter()
            .map(|m| {
                let (state, step, reason) = match m.progress {
                    Progress::Pending => ("PENDING", 0, String::new()),
                    Progress::Active { step, .. } => ("ACTIVE", step, String::new()),
                    Progress::Succeeded => ("SUCCEEDED", 0, String::new()),
                    Progress::Failed { step, error } => ("FAILED", step, error),
                    Progress::Skipped { reason } => ("SKIPPED", 0, reason),
                    Progress::Canceled { step } => ("CANCELED", step, String::new()),
                };
                pb::RolloutMachine {
                    machine_id: m.machine_id.to_string(),
                    batch: count(m.batch as usize),
                    state: state.to_owned(),
                    step: count(step as usize),
                    reason,
                    operation_ids: m.operations.iter().map(ToString::to_string).collect(),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    pb::Rollout {
        id: r.id.to_string(),
        request_id: r.request_id.to_string(),
        spec: Some(spec),
        phase: rollout_phase(r.phase).into(),
        batches: r.batches,
        batch: count(r.batch as usize),
        soak_until: opt_timestamp(r.soak_until),
        counts: Some(pb::RolloutCounts {
            pending: count(c.pending as usize),
            active: count(c.active as usize),
            succeeded: count(c.succeeded as usize),
            failed: count(c.failed as usize),
            skipped: count(c.skipped as usize),
            canceled: count(c.canceled as usize),
        }),
        max_in_flight: count(max_in_flight),
        failure_limit: count(failure_limit),
        machines,
        created_by: actor(r.created_by),
        create_time: Some(timestamp(r.create_time)),
        update_time: Some(timestamp(r.update_time)),
        end_time: opt_timestamp(r.end_time),
        note: r.note,
    }
}

/// What ListRollouts asks for, and the filters its page token is bound to.
pub(crate) fn rollout_query(
    req: &pb::ListRolloutsRequest,
) -> Result<(bm_workflow::RolloutQuery, String), ApiError> {
    let limit = paging::page_size(req.page_size)?;
    let filters = format!("{}", req.active_only);
    let before = paging::decode(&req.page_token, "rollouts", &filters)?
        .map(|k| rollout_id("page_token", &k))
        .transpose()?;
    Ok((
        bm_workflow::RolloutQuery {
            before,
            limit,
            active_only: req.active_only,
        },
        filters,
    ))
}

/// A page of rollouts for the wire (without their machines).
pub(crate) fn rollout_page(
    page: Page<bm_domain::Rollout>,
    filters: &str,
) -> pb::ListRolloutsResponse {
    let mut rollouts: Vec<pb::Rollout> =
        page.items.into_iter().map(|r| rollout(r, false)).collect();
    let cut = paging::fit(&mut rollouts);
    let next_page_token = match rollouts.last() {
        Some(last) if page.more || cut => paging::encode("rollouts", &last.id, filters),
        _ => String::new(),
    };
    pb::ListRolloutsResponse {
        rollouts,
        next_page_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_keep_microseconds() {
        let t = Timestamp::from_unix_micros(1_795_437_965_123_456);
        let p = timestamp(t);
        assert_eq!((p.seconds, p.nanos), (1_795_437_965, 123_456_000));
        let before_epoch = timestamp(Timestamp::from_unix_micros(-1));
        assert_eq!(
            (before_epoch.seconds, before_epoch.nanos),
            (-1, 999_999_000)
        );
    }

    #[test]
    fn enum_mappings_are_total_and_distinct() {
        let phases: std::collections::BTreeSet<i32> =
            Phase::ALL.iter().map(|p| phase(*p) as i32).collect();
        assert_eq!(phases.len(), Phase::ALL.len());
        for p in Phase::ALL {
            assert_eq!(phase_filter("f", phase(p) as i32).unwrap(), Some(p));
        }
        for s in EffectiveState::ALL {
            assert_eq!(
                effective_state_filter("f", effective_state(s) as i32).unwrap(),
                Some(s)
            );
        }
        for t in OperationType::ALL {
            assert_eq!(
                operation_type_filter("f", operation_type(t) as i32).unwrap(),
                Some(t)
            );
        }
        for p in OperationPhase::ALL {
            assert_eq!(
                operation_phase_filter("f", operation_phase(p) as i32).unwrap(),
                Some(p)
            );
        }
        assert_eq!(phase_filter("f", 0).unwrap(), None);
        let e = phase_filter("phase", 99).unwrap_err().to_string();
        assert!(e.starts_with("phase: unknown phase 99"), "{e}");
    }

    #[test]
    fn each_operation_rpc_starts_its_own_type() {
        fn check(req: impl StartOperation, want: OperationType) {
            let r = req.into_operation_request().unwrap();
            assert_eq!(
                (r.op_type, r.machine_id.as_str(), r.request_id.as_str()),
                (want, "m-1", "r-1")
            );
            assert_eq!(r.note, "why");
        }
        macro_rules! case {
            ($request:ident, $want:ident) => {
                check(
                    pb::$request {
                        machine_id: "m-1".into(),
                        request_id: "r-1".into(),
                        note: "why".into(),
                    },
                    OperationType::$want,
                )
            };
        }
        case!(EnterMaintenanceRequest, EnterMaintenance);
        case!(ExitMaintenanceRequest, ExitMaintenance);
        case!(ReimageRequest, Reimage);
        case!(RebootRequest, Reboot);
        case!(RmaRequest, Rma);
        case!(RetireRequest, Retire);
        case!(UpgradeRequest, Upgrade);
        case!(ReconfigureNetworkRequest, NetReconfig);
        case!(ClearInterventionRequest, ClearIntervention);
        case!(ReadmitRequest, Readmit);
        // Without a request id the server makes one up (no idempotency then).
        let r = pb::RebootRequest {
            machine_id: "m-1".into(),
            ..Default::default()
        }
        .into_operation_request()
        .unwrap();
        assert!(r.request_id.as_str().starts_with("auto-"), "{r:?}");
        let e = pb::RebootRequest::default()
            .into_operation_request()
            .unwrap_err()
            .to_string();
        assert_eq!(e, "machine_id: is required");
    }

    #[test]
    fn bad_fields_are_named() {
        let m = pb::Machine {
            id: "machine-1".into(),
            spec: Some(pb::MachineSpec {
                provider: "fake".into(),
                mac_addresses: vec!["02:00:00:00:00:01".into(), "nope".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = new_machine("machine", &m).unwrap_err().to_string();
        assert!(
            e.starts_with("machine.spec.mac_addresses[1]: invalid MAC address"),
            "{e}"
        );
        let with_status = pb::Machine {
            status: Some(Default::default()),
            ..m
        };
        let e = new_machine("machine", &with_status)
            .unwrap_err()
            .to_string();
        assert!(e.contains("machine.status"), "{e}");
        let e = machine_id("machine_id", "").unwrap_err().to_string();
        assert_eq!(e, "machine_id: is required");
    }

    #[test]
    fn the_largest_machine_fits_in_a_page_and_under_the_clients_limit() {
        use bm_domain::SshEndpoint;
        let name = |c: char, n: usize| c.to_string().repeat(n);
        let machine = bm_proto::v1::Machine {
            id: name('m', MachineId::MAX_LEN),
            spec: Some(bm_proto::v1::MachineSpec {
                provider: name('p', 63),
                mac_addresses: vec!["02:00:00:00:00:01".into(); MachineSpec::MAX_MACS],
                ssh_endpoint: name('s', SshEndpoint::MAX_LEN),
                bmc_endpoint: name('b', 1024),
                image: name('i', 1024),
                target_cluster: name('c', 1024),
                network_config: name('n', MachineSpec::MAX_NETWORK_CONFIG),
            }),
            labels: (0..Labels::MAX_LABELS)
                .map(|i| (format!("{}/{i:0>63}", name('d', 253)), name('v', 63)))
                .collect(),
            status: Some(bm_proto::v1::MachineStatus {
                conditions: (0..32)
                    .map(|_| bm_proto::v1::Condition {
                        r#type: name('t', 64),
                        message: name('m', 4096),
                        reason: name('r', 256),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let len = prost::Message::encoded_len(&machine);
        assert!(len < paging::MAX_PAGE_BYTES / 8, "{len} bytes");
    }
}
