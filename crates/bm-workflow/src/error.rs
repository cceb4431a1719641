//! The error type of the engine.

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
