//! Values for the tests.

use bm_domain::{
    Labels, Machine, MachineId, MachineSpec, Operation, OperationId, OperationType, RequestId,
    Timestamp,
};

pub(crate) fn t(micros: i64) -> Timestamp {
    Timestamp::from_unix_micros(1_800_000_000_000_000 + micros)
}

pub(crate) fn mid(s: &str) -> MachineId {
    MachineId::new(s).unwrap()
}

pub(crate) fn machine(id: &str, n: u8) -> Machine {
    Machine::register(
        mid(id),
        MachineSpec {
            provider: "fake".into(),
            mac_addresses: vec![format!("02:00:00:00:00:{n:02x}").parse().unwrap()],
            ssh_endpoint: format!("root@10.0.0.{n}:22"),
            image: "ubuntu-24.04".into(),
            target_cluster: "prod".into(),
            ..MachineSpec::default()
        },
        Labels::from_pairs([("rack", if n.is_multiple_of(2) { "r2" } else { "r1" })]).unwrap(),
        t(0),
    )
    .unwrap()
}

/// A machine in MAINTENANCE (so that every operation type but readmit and clear can start).
pub(crate) fn maintenance_machine(id: &str, n: u8) -> Machine {
    let mut m = machine(id, n);
    m.status.phase = bm_domain::Phase::Maintenance;
    m
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub(crate) fn op(machine: &str, t_: OperationType, request: &str) -> Operation {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Operation::new(
        OperationId::from_parts(1_800_000_000_000 + n, u128::from(n)),
        mid(machine),
        t_,
        RequestId::new(request).unwrap(),
        String::new(),
        t(n as i64),
    )
    .unwrap()
}
