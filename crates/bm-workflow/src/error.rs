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
