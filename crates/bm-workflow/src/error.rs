//! The error type of the engine, and the kinds its errors fall into.
//!
//! Adapters decide how to answer an error from its [`ErrorKind`] alone, so they never look
//! inside the store's or the domain's errors: a new store error is one arm of
//! [`WorkflowError::kind`], and no adapter changes.

use bm_domain::DomainError;
use bm_provider::UnknownProvider;
use bm_store::StoreError;

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The store refused or failed (it carries the domain's refusals too).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The domain's rules refused a value or an operation.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A machine names a provider this server does not have.
    #[error(transparent)]
    UnknownProvider(#[from] UnknownProvider),
    /// The machine's provider refused its spec.
    #[error("provider {provider} cannot drive machine {machine_id}: {message}")]
    ProviderRejected {
        /// The machine.
        machine_id: String,
        /// The provider.
        provider: String,
        /// What is missing or wrong.
        message: String,
    },
    /// The engine is stopping and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A stream ended because the engine is stopping; the client resumes from where it was.
    #[error("the server is shutting down; resume after {after}")]
    StreamInterrupted {
        /// The last item the stream delivered.
        after: ResumePoint,
    },
    /// A watch asked to resume after a revision the store has not reached: it was made
    /// against another store (restored from a backup, or replaced).
    #[error(
        "revision {asked} is beyond the last one ({last}); the store was replaced or restored: watch again from 0 or without a revision"
    )]
    RevisionOutOfRange {
        /// The revision asked for.
        asked: u64,
        /// The last revision.
        last: u64,
    },
    /// An invariant of the engine broke (a bug); the message is for the log.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What kind of failure an error is, by what the caller can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is wrong (a malformed value, an unknown or refusing provider); the caller
    /// fixes the request.
    InvalidInput,
    /// What the request names does not exist.
    NotFound,
    /// The request would create what already exists: a taken machine id or MAC address, an
    /// imported machine that differs, a request id used for another operation.
    AlreadyExists,
    /// The state model's rules refuse it in the current state (wrong phase, busy, blocked,
    /// needs intervention, already ended); the caller changes the state first.
    WrongState,
    /// The server cannot do it now and the same request may work later: it is shutting
    /// down, or its disk is full.
    Unavailable,
    /// The request asks for more than a limit allows.
    LimitExceeded,
    /// The request points past what exists, e.g. a revision the store has not reached.
    OutOfRange,
    /// A fault of the server (corrupt data, a storage failure, a bug); the details are for
    /// the log, not for the caller.
    Internal,
}

impl WorkflowError {
    /// The error of a machine that does not exist; also what a caller gets for a machine
    /// outside its scope, so that the two cannot be told apart.
    pub fn machine_not_found(id: bm_domain::MachineId) -> Self {
        WorkflowError::Store(StoreError::MachineNotFound(id))
    }

    /// The error of an operation that does not exist; also what a caller gets for an
    /// operation of a machine outside its scope.
    pub fn operation_not_found(id: bm_domain::OperationId) -> Self {
        WorkflowError::Store(StoreError::OperationNotFound(id))
    }

    /// The error of a rollout that does not exist; also what a caller gets for a rollout
    /// it may not see.
    pub fn rollout_not_found(id: bm_domain::RolloutId) -> Self {
        WorkflowError::Store(StoreError::RolloutNotFound(id))
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkflowError::Store(s) => store_kind(s),
            WorkflowError::Domain(d) => domain_kind(d),
            WorkflowError::UnknownProvider(_) | WorkflowError::ProviderRejected { .. } => {
                ErrorKind::InvalidInput
            }
            WorkflowError::ShuttingDown | WorkflowError::StreamInterrupted { .. } => {
                ErrorKind::Unavailable
            }
            WorkflowError::RevisionOutOfRange { .. } => ErrorKind::OutOfRange,
            WorkflowError::Internal(_) => ErrorKind::Internal,
        }
    }
}

fn domain_kind(e: &DomainError) -> ErrorKind {
    if e.is_invalid_input() {
        ErrorKind::InvalidInput
    } else {
        ErrorKind::WrongState
    }
}

/// Every store error, by kind. No wildcard: a new variant does not compile until it has its
/// arm here. Patterns are written `{ .. }` so that a variant gaining fields keeps its arm.
#[allow(
    clippy::unneeded_struct_pattern,
    reason = "`{ .. }` matches a variant whatever its fields, now or later"
)]
fn store_kind(e: &StoreError) -> ErrorKind {
    match e {
        StoreError::Domain(d) => domain_kind(d),
        StoreError::MachineNotFound { .. }
        | StoreError::OperationNotFound { .. }
        | StoreError::RolloutNotFound { .. } => ErrorKind::NotFound,
        // Someone else wrote the rollout meanwhile: read it again and retry.
        StoreError::RolloutChanged { .. } => ErrorKind::Unavailable,
        StoreError::MachineExists { .. }
        | StoreError::MacInUse { .. }
        | StoreError::ImportConflict { .. }
        | StoreError::RequestIdReused { .. } => ErrorKind::AlreadyExists,
        StoreError::Closed { .. }
        | StoreError::DiskFull { .. }
        | StoreError::Unavailable { .. } => ErrorKind::Unavailable,
        // A damaged database started read-only: writes wait for a restore.
        StoreError::ReadOnly { .. } => ErrorKind::WrongState,
        // The engine handles a lost lease itself; one that reached a caller is a bug.
        StoreError::LeaseLost { .. }
        | StoreError::Locked { .. }
        | StoreError::SchemaTooNew { .. }
        | StoreError::Corrupt { .. }
        | StoreError::Damaged { .. }
        | StoreError::Backend { .. } => ErrorKind::Internal,
    }
}

impl WorkflowError {
    /// The domain refusal inside, wherever it came from.
    pub fn as_domain(&self) -> Option<&DomainError> {
        match self {
            WorkflowError::Domain(d) | WorkflowError::Store(StoreError::Domain(d)) => Some(d),
            _ => None,
        }
    }
}

/// Where a stream that ended early resumes: after the last item it delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumePoint {
    /// After this event revision (a watch).
    Revision(u64),
    /// After this log line sequence number (a log stream).
    Sequence(u64),
}

impl std::fmt::Display for ResumePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResumePoint::Revision(r) => write!(f, "revision {r}"),
            ResumePoint::Sequence(s) => write!(f, "log line {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_domain::{MachineId, OperationId, OperationPhase};

    #[test]
    fn every_error_has_the_kind_its_caller_can_act_on() {
        let m = MachineId::new("m-1").unwrap();
        let op = OperationId::from_parts(1, 1);
        let busy = DomainError::Busy {
            machine_id: m.clone(),
            active: op,
        };
        let cases: Vec<(WorkflowError, ErrorKind)> = vec![
            (
                DomainError::invalid("MAC address", "x", "bad").into(),
                ErrorKind::InvalidInput,
            ),
            (busy.into(), ErrorKind::WrongState),
            (
                StoreError::Domain(DomainError::AlreadyEnded {
                    operation_id: op,
                    phase: OperationPhase::Succeeded,
                })
                .into(),
                ErrorKind::WrongState,
            ),
            (
                StoreError::Domain(DomainError::invalid("note", "", "too long")).into(),
                ErrorKind::InvalidInput,
            ),
            (
                StoreError::MachineNotFound(m.clone()).into(),
                ErrorKind::NotFound,
            ),
            (
                StoreError::OperationNotFound(op).into(),
                ErrorKind::NotFound,
            ),
            (
                StoreError::MachineExists(m.clone()).into(),
                ErrorKind::AlreadyExists,
            ),
            (
                StoreError::ImportConflict(m.clone()).into(),
                ErrorKind::AlreadyExists,
            ),
            (StoreError::DiskFull.into(), ErrorKind::Unavailable),
            (
                StoreError::ReadOnly("the database is damaged".into()).into(),
                ErrorKind::WrongState,
            ),
            (StoreError::Closed.into(), ErrorKind::Unavailable),
            (WorkflowError::ShuttingDown, ErrorKind::Unavailable),
            (
                WorkflowError::StreamInterrupted {
                    after: ResumePoint::Revision(3),
                },
                ErrorKind::Unavailable,
            ),
            (
                WorkflowError::RevisionOutOfRange { asked: 9, last: 3 },
                ErrorKind::OutOfRange,
            ),
            (
                WorkflowError::ProviderRejected {
                    machine_id: "m-1".into(),
                    provider: "redfish".into(),
                    message: "no BMC".into(),
                },
                ErrorKind::InvalidInput,
            ),
            (StoreError::LeaseLost(op).into(), ErrorKind::Internal),
            (
                StoreError::Corrupt("row m-1".into()).into(),
                ErrorKind::Internal,
            ),
            (
                StoreError::backend(std::io::Error::other("EIO")).into(),
                ErrorKind::Internal,
            ),
            (WorkflowError::Internal("x".into()), ErrorKind::Internal),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
        }
    }

    #[test]
    fn a_full_disk_says_so() {
        let e = WorkflowError::from(StoreError::DiskFull);
        assert!(
            e.to_string()
                .starts_with("the data directory's disk is full"),
            "{e}"
        );
    }
}
