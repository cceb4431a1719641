//! `effective_state` against a reference model, exhaustively over phase x every
//! true/false/absent assignment of the known conditions x active operation.

use bm_domain::{ConditionType, Conditions, EffectiveState, Phase, Timestamp, effective_state};
use proptest::prelude::*;

/// The reference: every state whose trigger holds is a candidate, and the first candidate
/// in the specification's order wins. Written as a table rather than an if-chain, so that
/// it does not share its shape with the implementation.
fn reference(phase: Phase, c: &Conditions, active: bool) -> EffectiveState {
    let t = |ty: ConditionType| c.is_true(&ty);
    let table = [
        (
            t(ConditionType::Retired) || t(ConditionType::Rma),
            EffectiveState::Blocked,
        ),
        (
            t(ConditionType::NeedsIntervention),
            EffectiveState::Attention,
        ),
        (active, EffectiveState::Busy),
        (phase == Phase::Maintenance, EffectiveState::MaintenanceIdle),
        (phase == Phase::FactoryReady, EffectiveState::New),
        (true, EffectiveState::Idle),
    ];
    table
        .into_iter()
        .find(|(hit, _)| *hit)
        .map(|(_, s)| s)
        .unwrap()
}

#[test]
fn agrees_with_reference_over_every_combination() {
    let known = ConditionType::KNOWN;
    let combos = 3usize.pow(known.len() as u32);
    let mut seen = std::collections::BTreeSet::new();
    for phase in Phase::ALL {
        for active in [false, true] {
            for mut code in 0..combos {
                let mut c = Conditions::new();
                for ty in &known {
                    match code % 3 {
                        0 => {}
                        1 => c.set(ty.clone(), true, "R", "", Timestamp::EPOCH),
                        _ => c.set(ty.clone(), false, "R", "", Timestamp::EPOCH),
                    }
                    code /= 3;
                }
                let got = effective_state(phase, &c, active);
                assert_eq!(
                    got,
                    reference(phase, &c, active),
                    "{phase} {c:?} active={active}"
                );
                seen.insert(got);
            }
        }
    }
    assert_eq!(
        seen.len(),
        EffectiveState::ALL.len(),
        "every state is reachable"
    );
}

proptest! {
    /// Conditions the control plane does not interpret never change the effective state.
    #[test]
    fn unknown_conditions_do_not_matter(
        phase in super::strategies::phase(),
        c in super::strategies::conditions(),
        active in any::<bool>(),
        name in "X[A-Za-z0-9]{0,10}",
        status in any::<bool>(),
    ) {
        let before = effective_state(phase, &c, active);
        let mut with = c.clone();
        with.set(name.parse().unwrap(), status, "R", "", Timestamp::EPOCH);
        prop_assert_eq!(effective_state(phase, &with, active), before);
        prop_assert_eq!(before, reference(phase, &c, active));
    }
}
