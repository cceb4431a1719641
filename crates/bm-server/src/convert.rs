//! Conversions between the wire types of bm-proto and the domain types of bm-domain: the
//! only place that knows both. A request field that does not convert is INVALID_ARGUMENT,
//! with the field's path in the message.

use std::collections::BTreeMap;

use bm_domain::{
    Condition, EffectiveState, EventKind, Labels, LogLine, MacAddress, Machine, MachineId,
    MachineSpec, Operation, OperationEvent, OperationId, OperationPhase, OperationType, Phase,
    RequestId, StageOutcome, StageRecord, Timestamp,
};
use bm_proto::v1 as pb;

use crate::error::ApiError;

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
        }),
        effective_state: effective.into(),
        create_time: Some(timestamp(m.created_at)),
        update_time: Some(timestamp(m.updated_at)),
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
pub(crate) fn new_machine(
    field: &str,
    m: &pb::Machine,
) -> Result<(MachineId, MachineSpec, Labels), ApiError> {
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
    Ok((id, spec, labels))
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
pub(crate) fn operation(o: Operation) -> pb::Operation {
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
}
