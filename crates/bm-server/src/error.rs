//! The one place where errors become gRPC statuses.
//!
//! Handlers return `Result<_, ApiError>` and use `?`; `From<ApiError> for Status` picks
//! the code and the log level. Internal failures are logged here with their cause and reach
//! the client only as "internal error": storage paths and SQL never leak.

use bm_domain::DomainError;
pub(crate) use bm_proto::code_name;
use bm_store::StoreError;
use bm_workflow::{ResumePoint, WorkflowError};
use tonic::{Code, Status};

/// An error of a request, before it becomes a [`Status`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The request is malformed: a field that cannot be converted, a bad page token or
    /// field mask. The message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The engine refused or failed.
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
}

impl ApiError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        ApiError::Invalid(msg.into())
    }

    /// The status code this error maps to.
    pub(crate) fn code(&self) -> Code {
        match self {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::Workflow(w) => workflow_code(w),
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        ApiError::Workflow(WorkflowError::Domain(e))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Workflow(WorkflowError::Store(e))
    }
}

fn domain_code(e: &DomainError) -> Code {
    if e.is_invalid_input() {
        Code::InvalidArgument
    } else {
        Code::FailedPrecondition
    }
}

fn workflow_code(e: &WorkflowError) -> Code {
    match e {
        WorkflowError::Domain(d) => domain_code(d),
        WorkflowError::UnknownProvider(_) | WorkflowError::ProviderRejected { .. } => {
            Code::InvalidArgument
        }
        WorkflowError::ShuttingDown | WorkflowError::StreamInterrupted { .. } => Code::Unavailable,
        WorkflowError::RevisionOutOfRange { .. } => Code::OutOfRange,
        WorkflowError::Store(s) => match s {
            StoreError::Domain(d) => domain_code(d),
            StoreError::MachineNotFound(_) | StoreError::OperationNotFound(_) => Code::NotFound,
            StoreError::MachineExists(_)
            | StoreError::MacInUse { .. }
            | StoreError::ImportConflict(_)
            | StoreError::RequestIdReused { .. } => Code::AlreadyExists,
            StoreError::Closed | StoreError::DiskFull => Code::Unavailable,
            StoreError::ReadOnly(_) => Code::FailedPrecondition,
            StoreError::LeaseLost(_)
            | StoreError::Locked(_)
            | StoreError::SchemaTooNew { .. }
            | StoreError::Corrupt(_)
            | StoreError::Damaged { .. }
            | StoreError::Backend(_) => Code::Internal,
        },
    }
}

/// The message of an UNAVAILABLE status: a stream cut off by a shutdown names the request
/// field that resumes it.
fn unavailable_message(e: &ApiError) -> String {
    match e {
        ApiError::Workflow(WorkflowError::StreamInterrupted { after }) => {
            let resume = match after {
                ResumePoint::Revision(r) => format!("after_revision={r}"),
                ResumePoint::Sequence(s) => format!("after_sequence={s}"),
            };
            format!("the server is shutting down; resume with {resume}")
        }
        _ => e.to_string(),
    }
}

/// A handler's result as tonic wants it.
pub(crate) fn respond<T>(r: Result<T, ApiError>) -> Result<tonic::Response<T>, Status> {
    r.map(tonic::Response::new).map_err(Status::from)
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = e.code();
        match code {
            Code::Internal => {
                // The cause chain goes to the log, never to the client.
                let mut chain = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    chain.push_str(": ");
                    chain.push_str(&s.to_string());
                    source = s.source();
                }
                tracing::error!(error = %chain, "internal error");
                Status::internal("internal error; the server log has the details")
            }
            Code::Unavailable => {
                tracing::warn!(error = %e, "request refused");
                Status::unavailable(unavailable_message(&e))
            }
            _ => {
                tracing::debug!(code = ?code, error = %e, "request refused");
                Status::new(code, e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_domain::{MachineId, OperationId, OperationPhase};

    fn check(e: ApiError, code: Code, contains: &str) {
        let s = Status::from(e);
        assert_eq!(s.code(), code, "{s:?}");
        assert!(
            s.message().contains(contains),
            "{:?} lacks {contains:?}",
            s.message()
        );
    }

    #[test]
    fn codes() {
        let m = MachineId::new("m-1").unwrap();
        let op = OperationId::from_parts(1, 1);
        check(
            StoreError::MachineNotFound(m.clone()).into(),
            Code::NotFound,
            "machine m-1 not found",
        );
        check(
            DomainError::Busy {
                machine_id: m.clone(),
                active: op,
            }
            .into(),
            Code::FailedPrecondition,
            &op.to_string(),
        );
        check(
            StoreError::Domain(DomainError::AlreadyEnded {
                operation_id: op,
                phase: OperationPhase::Succeeded,
            })
            .into(),
            Code::FailedPrecondition,
            "already ended",
        );
        check(
            DomainError::invalid("MAC address", "x", "bad").into(),
            Code::InvalidArgument,
            "MAC",
        );
        check(
            StoreError::MachineExists(m).into(),
            Code::AlreadyExists,
            "already exists",
        );
        check(
            ApiError::invalid("page_token is invalid"),
            Code::InvalidArgument,
            "page_token",
        );
        check(
            WorkflowError::StreamInterrupted {
                after: ResumePoint::Sequence(7),
            }
            .into(),
            Code::Unavailable,
            "resume with after_sequence=7",
        );
        check(
            StoreError::DiskFull.into(),
            Code::Unavailable,
            "the data directory's disk is full",
        );
        check(
            StoreError::ReadOnly("the database is damaged; restore it".into()).into(),
            Code::FailedPrecondition,
            "read-only",
        );
    }

    #[test]
    fn internal_details_never_reach_the_client() {
        let e: ApiError =
            StoreError::backend(std::io::Error::other("disk /var/lib/secret is full")).into();
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"), "{}", s.message());
    }
}
