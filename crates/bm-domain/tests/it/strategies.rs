//! Proptest strategies for domain values.

use bm_domain::{
    ConditionType, Conditions, Labels, MacAddress, Machine, MachineId, MachineSpec, Operation,
    OperationId, OperationPhase, OperationType, Phase, RequestId, StageOutcome, StageRecord,
    Timestamp,
};
use proptest::prelude::*;

pub(crate) fn phase() -> impl Strategy<Value = Phase> {
    prop::sample::select(Phase::ALL.to_vec())
}

pub(crate) fn op_type() -> impl Strategy<Value = OperationType> {
    prop::sample::select(OperationType::ALL.to_vec())
}

pub(crate) fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0i64..4_000_000_000_000_000).prop_map(Timestamp::from_unix_micros)
}

fn condition_type() -> impl Strategy<Value = ConditionType> {
    prop_oneof![
        8 => prop::sample::select(ConditionType::KNOWN.to_vec()),
        1 => "[A-Z][A-Za-z0-9]{0,20}".prop_map(|s| s.parse().unwrap()),
    ]
}

/// Conditions with any subset of types, each true or false.
pub(crate) fn conditions() -> impl Strategy<Value = Conditions> {
    prop::collection::vec(
        (
            condition_type(),
            any::<bool>(),
            "[A-Za-z]{0,12}",
            ".{0,30}",
            timestamp(),
        ),
        0..10,
    )
    .prop_map(|entries| {
        let mut c = Conditions::new();
        for (t, status, reason, message, at) in entries {
            c.set(t, status, reason, message, at);
        }
        c
    })
}

pub(crate) fn mac() -> impl Strategy<Value = MacAddress> {
    any::<[u8; 6]>().prop_filter_map("NIC address", |mut o| {
        o[0] &= 0xfe;
        MacAddress::from_octets(o).ok()
    })
}

pub(crate) fn labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(
        "([a-z]{1,8}\\.io/)?[a-zA-Z0-9]([a-z0-9_.-]{0,10}[a-z0-9])?",
        "([A-Za-z0-9]([a-z0-9_.-]{0,10}[a-z0-9])?)?",
        0..6,
    )
    .prop_map(|m| Labels::new(m).unwrap())
}

pub(crate) fn operation_id() -> impl Strategy<Value = OperationId> {
    (0u64..(1 << 47), any::<u128>()).prop_map(|(ms, r)| OperationId::from_parts(ms, r))
}

pub(crate) fn spec() -> impl Strategy<Value = MachineSpec> {
    (
        prop::collection::btree_set(mac(), 0..4),
        // RFC 1123 host names whose last label is not a number (that would be an address).
        "([a-z]{1,8}@)?([a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?\\.){0,2}[a-z]([a-z0-9-]{0,6}[a-z0-9])?(:[1-9][0-9]{0,3})?",
        "(redfish\\+https://([a-z0-9]{1,8}\\.){0,2}[a-z][a-z0-9]{0,8}/redfish/v1/Systems/[0-9])?",
        "[a-z0-9.:/-]{0,30}",
        "[a-z0-9-]{0,20}",
        "(?s).{0,100}",
    )
        .prop_map(|(macs, ssh, bmc, image, cluster, net)| MachineSpec {
            provider: "fake".into(),
            mac_addresses: macs.into_iter().collect(),
            ssh_endpoint: ssh,
            bmc_endpoint: bmc,
            image,
            target_cluster: cluster,
            network_config: net,
        })
}

pub(crate) fn machine() -> impl Strategy<Value = Machine> {
    (
        "[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?",
        spec(),
        labels(),
        phase(),
        conditions(),
        prop::option::of(operation_id()),
        timestamp(),
    )
        .prop_map(|(id, spec, labels, phase, conditions, active, now)| {
            let mut m = Machine::register(MachineId::new(id).unwrap(), spec, labels, now).unwrap();
            m.status.phase = phase;
            m.status.conditions = conditions;
            m.status.active_operation_id = active;
            m
        })
}

fn stage() -> impl Strategy<Value = StageRecord> {
    (
        "[a-z-]{1,20}",
        prop::sample::select(vec![
            StageOutcome::Running,
            StageOutcome::Succeeded,
            StageOutcome::Failed,
            StageOutcome::Canceled,
        ]),
        1u32..10,
        0u32..3,
        timestamp(),
        prop::option::of(timestamp()),
        prop::option::of(".{0,40}"),
    )
        .prop_map(
            |(name, outcome, attempts, interruptions, started_at, finished_at, last_error)| {
                StageRecord {
                    name,
                    outcome,
                    attempts,
                    interruptions,
                    released: interruptions % 2 == 1,
                    started_at,
                    finished_at,
                    last_error,
                }
            },
        )
}

pub(crate) fn operation() -> impl Strategy<Value = Operation> {
    (
        operation_id(),
        "[a-z0-9]{1,10}",
        op_type(),
        prop::sample::select(OperationPhase::ALL.to_vec()),
        "[A-Za-z0-9._:-]{1,40}",
        ".{0,40}",
        prop::collection::vec(stage(), 0..6),
        (
            timestamp(),
            prop::option::of(timestamp()),
            prop::option::of(timestamp()),
        ),
        prop::option::of(".{0,40}"),
        any::<bool>(),
    )
        .prop_map(
            |(
                id,
                mid,
                t,
                phase,
                rid,
                note,
                stages,
                (created, started, finished),
                error,
                cancel,
            )| {
                let mut op = Operation::new(
                    id,
                    MachineId::new(mid).unwrap(),
                    t,
                    RequestId::new(rid).unwrap(),
                    note,
                    created,
                )
                .unwrap();
                op.phase = phase;
                op.current_stage = stages.last().map(|s| s.name.clone()).unwrap_or_default();
                op.stages = stages;
                op.started_at = started;
                op.finished_at = finished;
                op.error = error;
                op.cancel_requested = cancel;
                op
            },
        )
}
