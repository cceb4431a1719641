//! Phase (intent) and effective state (the computed, truthful view).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{ConditionType, Conditions, DomainError};

/// What the operator intends the machine to be doing. Only operations change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// Imported, never provisioned.
    FactoryReady,
    /// In active management; workloads possible.
    Ready,
    /// Taken aside; disruptive operations allowed.
    Maintenance,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Phase; 3] = [Phase::FactoryReady, Phase::Ready, Phase::Maintenance];

    /// The name as the API writes it, e.g. `FACTORY_READY`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::FactoryReady => "FACTORY_READY",
            Phase::Ready => "READY",
            Phase::Maintenance => "MAINTENANCE",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| DomainError::invalid("phase", s, "unknown phase"))
    }
}

/// The combined view of a machine shown to people: computed on read, never stored as truth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EffectiveState {
    /// Retired or RMA: nothing but re-admission runs.
    Blocked,
    /// An operation failed; a person must fix the cause and clear the condition.
    Attention,
    /// An operation is pending or running.
    Busy,
    /// In maintenance with nothing running.
    MaintenanceIdle,
    /// Imported, never provisioned, nothing running.
    New,
    /// Ready with nothing running.
    Idle,
}

impl EffectiveState {
    /// Every effective state, in precedence order.
    pub const ALL: [EffectiveState; 6] = [
        EffectiveState::Blocked,
        EffectiveState::Attention,
        EffectiveState::Busy,
        EffectiveState::MaintenanceIdle,
        EffectiveState::New,
        EffectiveState::Idle,
    ];

    /// The name as the API writes it, e.g. `MAINTENANCE_IDLE`.
    pub fn as_str(self) -> &'static str {
        match self {
            EffectiveState::Blocked => "BLOCKED",
            EffectiveState::Attention => "ATTENTION",
            EffectiveState::Busy => "BUSY",
            EffectiveState::MaintenanceIdle => "MAINTENANCE_IDLE",
            EffectiveState::New => "NEW",
            EffectiveState::Idle => "IDLE",
        }
    }
}

impl fmt::Display for EffectiveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EffectiveState {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EffectiveState::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| DomainError::invalid("effective state", s, "unknown effective state"))
    }
}

/// The effective state of a machine, by the precedence of the specification:
///
/// 1. `Retired` or `RMA` true → [`EffectiveState::Blocked`]
/// 2. `NeedsIntervention` true → [`EffectiveState::Attention`]
/// 3. an active (pending or running) operation → [`EffectiveState::Busy`]
/// 4. phase `MAINTENANCE` → [`EffectiveState::MaintenanceIdle`]
/// 5. phase `FACTORY_READY` → [`EffectiveState::New`]
/// 6. otherwise → [`EffectiveState::Idle`]
pub fn effective_state(
    phase: Phase,
    conditions: &Conditions,
    has_active_operation: bool,
) -> EffectiveState {
    if ConditionType::BLOCKING
        .iter()
        .any(|t| conditions.is_true(t))
    {
        EffectiveState::Blocked
    } else if conditions.is_true(&ConditionType::NeedsIntervention) {
        EffectiveState::Attention
    } else if has_active_operation {
        EffectiveState::Busy
    } else {
        match phase {
            Phase::Maintenance => EffectiveState::MaintenanceIdle,
            Phase::FactoryReady => EffectiveState::New,
            Phase::Ready => EffectiveState::Idle,
        }
    }
}
