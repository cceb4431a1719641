//! What the periodic status poll learns from a machine's BMC, and how that changes the
//! machine's conditions: `Reachable` (the BMC answered), `Degraded` (it reports a health
//! problem) and `PoweredOn` (the power state it reports).
//!
//! The poll never runs while an operation of the machine is active (the store refuses the
//! write in the same transaction), so whatever it records is the machine at rest. A power
//! state that differs from the last one the poll saw, with no operation in between, changed
//! outside the control plane (a person at the console, a power failure, a BMC watchdog): it
//! is recorded with the reason [`REASON_POWER_CHANGED_OUTSIDE`], and the store appends a
//! [`MachineEvent`](crate::MachineEvent) of kind
//! [`PowerChanged`](crate::MachineEventKind::PowerChanged) for it.

use std::fmt;

use crate::{ConditionType, Machine, Timestamp};

/// The reason of a `PoweredOn` transition the poll saw with no operation in between.
pub const REASON_POWER_CHANGED_OUTSIDE: &str = "ChangedOutsideOperation";

/// The reason `PoweredOn` gets when an operation ends: the operation may have changed the
/// power, so the next poll's reading is not a change "outside an operation".
pub const REASON_POWER_AFTER_OPERATION: &str = "AfterOperation";

/// A machine's power state as the hardware reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PowerState {
    /// Powered on.
    On,
    /// Powered off.
    Off,
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerState::On => "On",
            PowerState::Off => "Off",
        })
    }
}

/// The health a BMC reports for a system (Redfish `Status.Health`, DMTF's three values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    /// Normal.
    Ok,
    /// A condition that needs attention (a failed fan, a degraded memory module).
    Warning,
    /// A critical condition that needs immediate attention.
    Critical,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Ok => "OK",
            Health::Warning => "Warning",
            Health::Critical => "Critical",
        })
    }
}

/// One reading of a machine's BMC by the status poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The BMC did not answer (or answered with an error): why, for people.
    Unreachable(String),
    /// The BMC answered.
    Answered {
        /// The power state, when the BMC reported one.
        power: Option<PowerState>,
        /// The health, when the BMC reported one.
        health: Option<Health>,
        /// What the BMC said about its health beyond the one word (may be empty).
        detail: String,
    },
}

/// What an [`Observation`] changed on a machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObservationEffect {
    /// Some condition changed (status, reason or message): the record must be written.
    pub changed: bool,
    /// The power state changed with no operation in between: `(before, now)`.
    pub power_changed_outside: Option<(PowerState, PowerState)>,
}

/// Applies a poll's reading to the machine's conditions. Messages carry no times, so that
/// the same reading twice changes nothing (and nothing needs writing).
///
/// - `Reachable`: true when the BMC answered, false with the error otherwise.
/// - `Degraded`: true for a Warning or Critical health, false for OK; left as it was when
///   the BMC answered without a health or did not answer (nothing new is known).
/// - `PoweredOn`: the reported power state; left as it was when none was reported.
pub fn apply_observation(
    machine: &mut Machine,
    observation: &Observation,
    now: Timestamp,
) -> ObservationEffect {
    use ConditionType as C;
    let before = machine.status.conditions.clone();
    let state_before = machine.effective_state();
    let c = &mut machine.status.conditions;
    let mut effect = ObservationEffect::default();
    match observation {
        Observation::Unreachable(why) => {
            c.set(
                C::Reachable,
                false,
                "BmcUnreachable",
                format!("the status poll could not read the BMC: {why}"),
                now,
            );
        }
        Observation::Answered {
            power,
            health,
            detail,
        } => {
            c.set(
                C::Reachable,
                true,
                "BmcAnswered",
                "the BMC answered the status poll",
                now,
            );
            if let Some(health) = health {
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                };
                let (degraded, reason) = match health {
                    Health::Ok => (false, "HealthOK"),
                    Health::Warning => (true, "HealthWarning"),
                    Health::Critical => (true, "HealthCritical"),
                };
                c.set(
                    C::Degraded,
                    degraded,
                    reason,
                    format!("the BMC reports health {health}{detail}"),
                    now,
                );
            }
            if let Some(power) = power {
                let on = *power == PowerState::On;
                let (reason, message) = match c.get(&C::PoweredOn) {
                    Some(prev) if prev.status != on => {
                        let was = if prev.status {
                            PowerState::On
                        } else {
                            PowerState::Off
                        };
                        if prev.reason == REASON_POWER_AFTER_OPERATION {
                            (
                                "Observed".to_owned(),
                                format!("the BMC reports power {power}"),
                            )
                        } else {
                            effect.power_changed_outside = Some((was, *power));
                            (
                                REASON_POWER_CHANGED_OUTSIDE.to_owned(),
                                format!(
                                    "power changed from {was} to {power} outside any operation"
                                ),
                            )
                        }
                    }
                    // Unchanged: keep what the transition said.
                    Some(prev) if prev.reason != REASON_POWER_AFTER_OPERATION => {
                        (prev.reason.clone(), prev.message.clone())
                    }
                    _ => (
                        "Observed".to_owned(),
                        format!("the BMC reports power {power}"),
                    ),
                };
                c.set(C::PoweredOn, on, reason, message, now);
            }
        }
    }
    effect.changed = machine.status.conditions != before;
    if effect.changed {
        machine.track_state(state_before, now);
        machine.updated_at = now;
    }
    effect
}

/// Marks the last power reading as taken before an operation that may have changed it, so
/// that the next poll does not report the difference as a change outside an operation.
pub(crate) fn power_seen_before_operation(machine: &mut Machine, what: &str, now: Timestamp) {
    let c = &mut machine.status.conditions;
    if let Some(prev) = c.get(&ConditionType::PoweredOn) {
        let status = prev.status;
        let was = if status { "On" } else { "Off" };
        c.set(
            ConditionType::PoweredOn,
            status,
            REASON_POWER_AFTER_OPERATION,
            format!("last seen {was} before {what}; the next status poll confirms it"),
            now,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Labels, MachineId, MachineSpec};

    fn machine() -> Machine {
        Machine::register(
            MachineId::new("machine-1").unwrap(),
            MachineSpec {
                provider: "fake".into(),
                ..MachineSpec::default()
            },
            Labels::default(),
            Timestamp::EPOCH,
        )
        .unwrap()
    }

    fn answered(power: Option<PowerState>, health: Option<Health>) -> Observation {
        Observation::Answered {
            power,
            health,
            detail: String::new(),
        }
    }

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_system_time(
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        )
    }

    #[test]
    fn the_same_reading_twice_changes_nothing() {
        let mut m = machine();
        let obs = answered(Some(PowerState::On), Some(Health::Warning));
        assert!(apply_observation(&mut m, &obs, at(1)).changed);
        let before = m.clone();
        let effect = apply_observation(&mut m, &obs, at(2));
        assert_eq!(effect, ObservationEffect::default());
        assert_eq!(m, before, "not even updated_at moves");
    }

    #[test]
    fn reachable_follows_whether_the_bmc_answered_and_keeps_what_it_knew() {
        let mut m = machine();
        apply_observation(
            &mut m,
            &answered(Some(PowerState::On), Some(Health::Critical)),
            at(1),
        );
        let c = &m.status.conditions;
        assert!(c.is_true(&ConditionType::Reachable));
        assert!(c.is_true(&ConditionType::Degraded));
        assert_eq!(
            c.get(&ConditionType::Degraded).unwrap().reason,
            "HealthCritical"
        );

        apply_observation(&mut m, &Observation::Unreachable("timed out".into()), at(2));
        let c = &m.status.conditions;
        let r = c.get(&ConditionType::Reachable).unwrap();
        assert!(!r.status);
        assert_eq!(r.reason, "BmcUnreachable");
        assert!(r.message.contains("timed out"), "{}", r.message);
        assert_eq!(r.last_transition_time, at(2));
        // Nothing new is known about health or power: both stay as last seen.
        assert!(c.is_true(&ConditionType::Degraded));
        assert!(c.is_true(&ConditionType::PoweredOn));

        apply_observation(&mut m, &answered(None, Some(Health::Ok)), at(3));
        let c = &m.status.conditions;
        assert!(c.is_true(&ConditionType::Reachable));
        let d = c.get(&ConditionType::Degraded).unwrap();
        assert!(!d.status);
        assert_eq!(
            (d.reason.as_str(), d.last_transition_time),
            ("HealthOK", at(3))
        );
    }

    #[test]
    fn a_power_change_between_polls_is_reported_as_outside_an_operation() {
        let mut m = machine();
        let first = apply_observation(&mut m, &answered(Some(PowerState::On), None), at(1));
        assert_eq!(
            first.power_changed_outside, None,
            "a first reading is no change"
        );
        let effect = apply_observation(&mut m, &answered(Some(PowerState::Off), None), at(2));
        assert_eq!(
            effect.power_changed_outside,
            Some((PowerState::On, PowerState::Off))
        );
        let p = m.status.conditions.get(&ConditionType::PoweredOn).unwrap();
        assert_eq!(
            (p.status, p.reason.as_str(), p.last_transition_time),
            (false, REASON_POWER_CHANGED_OUTSIDE, at(2))
        );
        // The same reading again keeps the transition's reason: no second report.
        let again = apply_observation(&mut m, &answered(Some(PowerState::Off), None), at(3));
        assert_eq!(again, ObservationEffect::default());
    }

    #[test]
    fn a_power_change_across_an_operation_is_not_outside_one() {
        let mut m = machine();
        apply_observation(&mut m, &answered(Some(PowerState::On), None), at(1));
        power_seen_before_operation(&mut m, "retire op-1", at(2));
        let effect = apply_observation(&mut m, &answered(Some(PowerState::Off), None), at(3));
        assert!(effect.changed);
        assert_eq!(effect.power_changed_outside, None);
        let p = m.status.conditions.get(&ConditionType::PoweredOn).unwrap();
        assert_eq!((p.status, p.reason.as_str()), (false, "Observed"));
        // Unchanged after an operation: the reading is confirmed, not a change.
        power_seen_before_operation(&mut m, "reboot op-2", at(4));
        let effect = apply_observation(&mut m, &answered(Some(PowerState::Off), None), at(5));
        assert_eq!(effect.power_changed_outside, None);
        assert_eq!(
            m.status
                .conditions
                .get(&ConditionType::PoweredOn)
                .unwrap()
                .reason,
            "Observed"
        );
    }
}
