//! Plans: the steps each operation type runs, in order, with each step's name, timeout and
//! resume policy. Pure: no IO, no async, no provider (`steps.rs` maps a step to provider
//! calls). Internal: clients see only the operation's type, phase and the names of its
//! stages.

use bm_domain::{Operation, OperationType};

/// One step of a plan (what it does to the hardware is in `steps.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum StepKind {
    SetNetboot,
    RebootToNetboot,
    RepaveImage,
    JoinCluster,
    VerifyInCluster,
    Reboot,
    Drain,
    Uncordon,
    Wipe,
    Notify,
    PowerOff,
    ApplyNetConfig,
    VerifyConnectivity,
}

/// What the executor does when it resumes an operation whose step was cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResumePolicy {
    /// Run the step again: it is idempotent.
    Rerun,
    /// Fail the operation for a person to look: running it again blindly is not safe.
    FailForIntervention,
}

impl StepKind {
    pub(crate) const ALL: [StepKind; 13] = [
        StepKind::SetNetboot,
        StepKind::RebootToNetboot,
        StepKind::RepaveImage,
        StepKind::JoinCluster,
        StepKind::VerifyInCluster,
        StepKind::Reboot,
        StepKind::Drain,
        StepKind::Uncordon,
        StepKind::Wipe,
        StepKind::Notify,
        StepKind::PowerOff,
        StepKind::ApplyNetConfig,
        StepKind::VerifyConnectivity,
    ];

    /// The stage name clients see.
    pub(crate) fn name(self) -> &'static str {
        match self {
            StepKind::SetNetboot => "set-netboot",
            StepKind::RebootToNetboot => "reboot-to-netboot",
            StepKind::RepaveImage => "repave-image",
            StepKind::JoinCluster => "join-cluster",
            StepKind::VerifyInCluster => "verify-in-cluster",
            StepKind::Reboot => "reboot",
            StepKind::Drain => "drain",
            StepKind::Uncordon => "uncordon",
            StepKind::Wipe => "wipe",
            StepKind::Notify => "notify",
            StepKind::PowerOff => "power-off",
            StepKind::ApplyNetConfig => "apply-net-config",
            StepKind::VerifyConnectivity => "verify-connectivity",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<StepKind> {
        StepKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the step writes the machine's disk: if an operation stops after such a step
    /// started, the disk no longer holds a known image.
    pub(crate) fn touches_disk(self) -> bool {
        matches!(self, StepKind::RepaveImage | StepKind::Wipe)
    }

    /// Every provider action is idempotent, so an interrupted step normally runs again. A
    /// network change cut off halfway is the exception: it may have left the machine
    /// unreachable on its management address with part of the new configuration applied,
    /// and the executor cannot tell; a person checks the console before it runs again.
    pub(crate) fn resume_policy(self) -> ResumePolicy {
        match self {
            StepKind::ApplyNetConfig => ResumePolicy::FailForIntervention,
            _ => ResumePolicy::Rerun,
        }
    }

    /// How long one attempt may take on real hardware, unless configured otherwise.
    pub(crate) fn default_timeout(self) -> std::time::Duration {
        let minutes = match self {
            StepKind::SetNetboot | StepKind::Notify => 2,
            StepKind::Uncordon | StepKind::VerifyConnectivity => 5,
            StepKind::RebootToNetboot | StepKind::PowerOff | StepKind::ApplyNetConfig => 10,
            StepKind::JoinCluster | StepKind::VerifyInCluster | StepKind::Reboot => 15,
            StepKind::Drain => 30,
            StepKind::RepaveImage => 60,
            StepKind::Wipe => 360,
        };
        std::time::Duration::from_secs(minutes * 60)
    }
}

/// The steps of an operation type, in order.
///
/// Maintenance entry drains the node (a no-op for a machine in no cluster) and exit
/// uncordons it; clearing an intervention and readmitting are bookkeeping with no hardware
/// step (`docs/lifecycle.md` explains why).
pub(crate) fn plan(t: OperationType) -> &'static [StepKind] {
    use StepKind as S;
    match t {
        OperationType::Reimage => &[
            S::SetNetboot,
            S::RebootToNetboot,
            S::RepaveImage,
            S::JoinCluster,
            S::VerifyInCluster,
        ],
        OperationType::Reboot => &[S::Reboot],
        OperationType::EnterMaintenance => &[S::Drain],
        OperationType::ExitMaintenance => &[S::Uncordon],
        OperationType::Rma => &[S::Drain, S::Wipe, S::Notify],
        OperationType::Retire => &[S::Drain, S::Wipe, S::PowerOff],
        OperationType::Upgrade => &[
            S::Drain,
            S::SetNetboot,
            S::RebootToNetboot,
            S::RepaveImage,
            S::JoinCluster,
            S::VerifyInCluster,
        ],
        OperationType::NetReconfig => &[S::ApplyNetConfig, S::VerifyConnectivity],
        OperationType::ClearIntervention | OperationType::Readmit => &[],
    }
}

/// The names of the stages an operation of type `t` runs, in order: the names its
/// `current_stage` and stage record will show. Empty for the bookkeeping types (clearing an
/// intervention, readmitting), which run no hardware step.
///
/// This is what the outside may know of a plan; the steps behind the names stay private.
pub fn stage_names(t: OperationType) -> impl ExactSizeIterator<Item = &'static str> {
    plan(t).iter().map(|k| k.name())
}

/// One line on what an operation of type `t` does and in which phases it runs, for people
/// (`bmctl plans`). The rules themselves are `bm_domain::rules`; `docs/lifecycle.md` has the
/// whole table.
pub fn describe(t: OperationType) -> &'static str {
    match t {
        OperationType::Reimage => {
            "Netboot, write the spec's image, join the target cluster, verify (MAINTENANCE only)"
        }
        OperationType::Reboot => "Power-cycle the machine (READY or MAINTENANCE)",
        OperationType::EnterMaintenance => {
            "Drain the node and take the machine aside: phase MAINTENANCE"
        }
        OperationType::ExitMaintenance => {
            "Uncordon the node and return the machine to service: phase READY"
        }
        OperationType::Rma => "Drain, wipe, open a repair ticket; ends with RMA (BLOCKED)",
        OperationType::Retire => "Drain, wipe, power off; ends with Retired (BLOCKED)",
        OperationType::Upgrade => "Drain, then reimage with the spec's image (MAINTENANCE only)",
        OperationType::NetReconfig => {
            "Apply the spec's network config, verify connectivity (MAINTENANCE only)"
        }
        OperationType::ClearIntervention => {
            "Record that a failure's cause was fixed: clears NeedsIntervention"
        }
        OperationType::Readmit => {
            "Take back a blocked machine: clears RMA and Retired, phase FACTORY_READY"
        }
    }
}

/// How many leading steps of `plan` the operation has already completed, or `None` when its
/// stage record does not follow the plan (the plan changed between server versions).
pub(crate) fn completed_prefix(plan: &[StepKind], op: &Operation) -> Option<usize> {
    let mut done = 0;
    for (i, stage) in op.stages.iter().enumerate() {
        if plan.get(i).map(|k| k.name()) != Some(stage.name.as_str()) {
            return None;
        }
        if stage.outcome == bm_domain::StageOutcome::Succeeded {
            done = i + 1;
        } else if i + 1 != op.stages.len() {
            // Only the last stage may be unfinished.
            return None;
        }
    }
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_domain::{MachineId, OperationId, RequestId, StageOutcome, Timestamp};

    /// Through the exported function, so that the specification test checks what clients
    /// are told.
    fn names(t: OperationType) -> Vec<&'static str> {
        stage_names(t).collect()
    }

    #[test]
    fn plans_follow_the_specification() {
        assert_eq!(
            names(OperationType::Reimage),
            [
                "set-netboot",
                "reboot-to-netboot",
                "repave-image",
                "join-cluster",
                "verify-in-cluster"
            ]
        );
        assert_eq!(names(OperationType::Reboot), ["reboot"]);
        assert_eq!(names(OperationType::Rma), ["drain", "wipe", "notify"]);
        assert_eq!(
            names(OperationType::Upgrade),
            [
                "drain",
                "set-netboot",
                "reboot-to-netboot",
                "repave-image",
                "join-cluster",
                "verify-in-cluster"
            ]
        );
        assert_eq!(
            names(OperationType::NetReconfig),
            ["apply-net-config", "verify-connectivity"]
        );
        assert!(names(OperationType::ClearIntervention).is_empty());
    }

    #[test]
    fn every_type_has_a_one_line_description() {
        let mut seen = std::collections::HashSet::new();
        for t in OperationType::ALL {
            let d = describe(t);
            assert!(!d.is_empty() && !d.contains('\n'), "{t:?}: {d:?}");
            assert!(seen.insert(d), "{t:?} shares its description");
        }
    }

    #[test]
    fn step_names_round_trip() {
        for k in StepKind::ALL {
            assert_eq!(StepKind::from_name(k.name()), Some(k));
        }
        assert_eq!(StepKind::from_name("nope"), None);
    }

    fn op_with(stages: &[(&str, StageOutcome)]) -> Operation {
        let mut op = Operation::new(
            OperationId::from_parts(1, 1),
            MachineId::new("m").unwrap(),
            OperationType::Reimage,
            RequestId::new("r").unwrap(),
            String::new(),
            Timestamp::EPOCH,
        )
        .unwrap();
        for (name, outcome) in stages {
            op.begin_stage(name, Timestamp::EPOCH);
            if *outcome != StageOutcome::Running {
                op.end_stage(*outcome, None, Timestamp::EPOCH);
            }
        }
        op
    }

    #[test]
    fn completed_prefix_finds_where_to_resume() {
        let p = plan(OperationType::Reimage);
        let s = StageOutcome::Succeeded;
        assert_eq!(completed_prefix(p, &op_with(&[])), Some(0));
        assert_eq!(
            completed_prefix(p, &op_with(&[("set-netboot", s)])),
            Some(1)
        );
        assert_eq!(
            completed_prefix(
                p,
                &op_with(&[
                    ("set-netboot", s),
                    ("reboot-to-netboot", StageOutcome::Running)
                ])
            ),
            Some(1)
        );
        assert_eq!(completed_prefix(p, &op_with(&[("repave-image", s)])), None);
        assert_eq!(
            completed_prefix(
                p,
                &op_with(&[
                    ("set-netboot", StageOutcome::Running),
                    ("reboot-to-netboot", s)
                ])
            ),
            None
        );
    }
}
