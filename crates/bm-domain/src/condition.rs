//! Conditions: boolean facts about a machine, each with the reason it last changed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{DomainError, Timestamp};

/// The type of a condition: the known types of the specification, or another one.
///
/// Other types let providers and operators attach facts the control plane does not
/// interpret (e.g. `FirmwareOutdated`); they never affect the effective state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ConditionType {
    /// Taken out of the fleet for good. Blocks the machine.
    Retired,
    /// Sent back for repair or replacement. Blocks the machine.
    Rma,
    /// An operation failed after its retries; a person must look.
    NeedsIntervention,
    /// The machine is a node of its target cluster.
    InCustomerCluster,
    /// The machine's disk holds the image of its spec.
    Provisioned,
    /// The last operation was canceled by an operator (expected, not an error).
    OperationCanceled,
    /// The machine answered the last time the control plane tried to reach it.
    Reachable,
    /// The machine works with reduced capacity.
    Degraded,
    /// The BMC last reported the machine powered on (set by the status poll).
    PoweredOn,
    /// A condition type the control plane does not interpret.
    Other(String),
}

impl ConditionType {
    /// Every type the control plane interprets, in display order.
    pub const KNOWN: [ConditionType; 9] = [
        ConditionType::Retired,
        ConditionType::Rma,
        ConditionType::NeedsIntervention,
        ConditionType::InCustomerCluster,
        ConditionType::Provisioned,
        ConditionType::OperationCanceled,
        ConditionType::Reachable,
        ConditionType::Degraded,
        ConditionType::PoweredOn,
    ];

    /// The types that block a machine: while one is true, only re-admission may start on it
    /// (spec 000: the machine is `BLOCKED`).
    pub const BLOCKING: [ConditionType; 2] = [ConditionType::Rma, ConditionType::Retired];

    /// The type's name, e.g. `NeedsIntervention`.
    pub fn as_str(&self) -> &str {
        match self {
            ConditionType::Retired => "Retired",
            ConditionType::Rma => "RMA",
            ConditionType::NeedsIntervention => "NeedsIntervention",
            ConditionType::InCustomerCluster => "InCustomerCluster",
            ConditionType::Provisioned => "Provisioned",
            ConditionType::OperationCanceled => "OperationCanceled",
            ConditionType::Reachable => "Reachable",
            ConditionType::Degraded => "Degraded",
            ConditionType::PoweredOn => "PoweredOn",
            ConditionType::Other(s) => s,
        }
    }
}

impl fmt::Display for ConditionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConditionType {
    type Err = DomainError;

    /// Known names map to their variant; any other UpperCamelCase name of 1 to 63 ASCII
    /// letters and digits becomes [`ConditionType::Other`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(known) = ConditionType::KNOWN.iter().find(|k| k.as_str() == s) {
            return Ok(known.clone());
        }
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_uppercase())
            && s.chars().all(|c| c.is_ascii_alphanumeric());
        if ok {
            Ok(ConditionType::Other(s.to_owned()))
        } else {
            Err(DomainError::invalid(
                "condition type",
                s,
                "must be 1-63 ASCII letters and digits in UpperCamelCase, e.g. FirmwareOutdated",
            ))
        }
    }
}

impl TryFrom<String> for ConditionType {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ConditionType> for String {
    fn from(t: ConditionType) -> String {
        t.as_str().to_owned()
    }
}

/// One condition of a machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// What the condition is about.
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// Whether it holds.
    pub status: bool,
    /// A one-word machine-readable cause, e.g. `OperationFailed`.
    pub reason: String,
    /// A sentence for people.
    pub message: String,
    /// When `status` last changed (not when the condition was last written).
    pub last_transition_time: Timestamp,
}

/// The conditions of a machine, at most one per type, ordered by type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Condition>", into = "Vec<Condition>")]
pub struct Conditions(Vec<Condition>);

impl Conditions {
    /// No conditions.
    pub fn new() -> Self {
        Conditions::default()
    }

    /// The condition of that type, if it was ever set.
    pub fn get(&self, t: &ConditionType) -> Option<&Condition> {
        self.0.iter().find(|c| &c.type_ == t)
    }

    /// True when the condition is present with status true; absent means false.
    pub fn is_true(&self, t: &ConditionType) -> bool {
        self.get(t).is_some_and(|c| c.status)
    }

    /// Sets a condition. The transition time moves only when the status changes (or the
    /// condition is new); reason and message are always replaced.
    pub fn set(
        &mut self,
        t: ConditionType,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
        now: Timestamp,
    ) {
        let (reason, message) = (reason.into(), message.into());
        match self.0.binary_search_by(|c| c.type_.cmp(&t)) {
            Ok(i) => {
                let c = &mut self.0[i];
                if c.status != status {
                    c.status = status;
                    c.last_transition_time = now;
                }
                c.reason = reason;
                c.message = message;
            }
            Err(i) => self.0.insert(
                i,
                Condition {
                    type_: t,
                    status,
                    reason,
                    message,
                    last_transition_time: now,
                },
            ),
        }
    }

    /// Sets a condition to false if it is present and true; an absent condition stays
    /// absent (it was never known to hold, so there is nothing to clear).
    pub fn clear(
        &mut self,
        t: &ConditionType,
        reason: impl Into<String>,
        message: impl Into<String>,
        now: Timestamp,
    ) {
        if self.is_true(t) {
            self.set(t.clone(), false, reason, message, now);
        }
    }

    /// The conditions, ordered by type.
    pub fn iter(&self) -> impl Iterator<Item = &Condition> {
        self.0.iter()
    }

    /// The number of conditions present.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no condition was ever set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<Vec<Condition>> for Conditions {
    type Error = DomainError;

    /// Accepts conditions in any order; two of one type are refused.
    fn try_from(mut v: Vec<Condition>) -> Result<Self, Self::Error> {
        v.sort_by(|a, b| a.type_.cmp(&b.type_));
        if let Some(w) = v.windows(2).find(|w| w[0].type_ == w[1].type_) {
            return Err(DomainError::invalid(
                "conditions",
                w[0].type_.as_str(),
                "a condition type appears twice",
            ));
        }
        Ok(Conditions(v))
    }
}

impl From<Conditions> for Vec<Condition> {
    fn from(c: Conditions) -> Self {
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_unix_micros(1_000);
    const T1: Timestamp = Timestamp::from_unix_micros(2_000);

    #[test]
    fn same_status_keeps_transition_time() {
        let mut c = Conditions::new();
        c.set(ConditionType::Reachable, true, "Probed", "answered", T0);
        c.set(
            ConditionType::Reachable,
            true,
            "Rebooted",
            "answered again",
            T1,
        );
        let r = c.get(&ConditionType::Reachable).unwrap();
        assert_eq!(r.last_transition_time, T0);
        assert_eq!(r.reason, "Rebooted");
        c.set(ConditionType::Reachable, false, "Timeout", "no answer", T1);
        assert_eq!(
            c.get(&ConditionType::Reachable)
                .unwrap()
                .last_transition_time,
            T1
        );
    }

    #[test]
    fn clear_leaves_absent_conditions_absent() {
        let mut c = Conditions::new();
        c.clear(&ConditionType::OperationCanceled, "Succeeded", "", T0);
        assert!(c.is_empty());
        c.set(ConditionType::OperationCanceled, true, "Canceled", "", T0);
        c.clear(&ConditionType::OperationCanceled, "Succeeded", "", T1);
        assert!(!c.is_true(&ConditionType::OperationCanceled));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn condition_types_parse() {
        for t in ConditionType::KNOWN {
            assert_eq!(t.as_str().parse::<ConditionType>().unwrap(), t);
        }
        assert_eq!(
            "FirmwareOutdated".parse::<ConditionType>().unwrap(),
            ConditionType::Other("FirmwareOutdated".into())
        );
        for bad in ["", "lower", "Has Space", "Dash-ed"] {
            assert!(bad.parse::<ConditionType>().is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicate_types_are_refused() {
        let c = Condition {
            type_: ConditionType::Rma,
            status: true,
            reason: String::new(),
            message: String::new(),
            last_transition_time: T0,
        };
        assert!(Conditions::try_from(vec![c.clone(), c]).is_err());
    }
}
