//! The one place where errors become gRPC statuses.
//!
//! Handlers return `Result<_, ApiError>` and use `?`; `From<ApiError> for Status` picks
//! the code (from the engine's [`ErrorKind`], never from the store's or the domain's error
//! variants) and the log level. Internal failures are logged here with their cause and reach
//! the client only as "internal error": storage paths and SQL never leak.

use bm_workflow::{ErrorKind, ResumePoint, WorkflowError};
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
    /// The caller did not authenticate; the message says what is missing.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not make this call; the message names the role (and scope) needed.
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit against abuse was hit (`quota.rs`): the message names the limit and its flag.
    #[error("{message}")]
    Exhausted {
        /// What was refused, the limit and its flag.
        message: String,
        /// When a retry may succeed; sent as a `google.rpc.RetryInfo` too.
        retry_after: Option<std::time::Duration>,
    },
    /// An invariant of the server broke (a bug); the message is for the log.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        ApiError::Invalid(msg.into())
    }

    /// The status code this error maps to.
    pub(crate) fn code(&self) -> Code {
        match self {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Exhausted { .. } => Code::ResourceExhausted,
            ApiError::Workflow(w) => kind_code(w.kind()),
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

/// The status code of each kind of engine error.
fn kind_code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidInput => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::WrongState => Code::FailedPrecondition,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::LimitExceeded => Code::ResourceExhausted,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::Internal => Code::Internal,
    }
}

/// An UNAVAILABLE status. A stream cut off by a shutdown names the request field that
/// resumes it: in the message for people, and in a `google.rpc.ErrorInfo` for programs
/// (AIP-193), so that a client that was sent nothing yet still resumes without a gap.
fn unavailable(e: &ApiError) -> Status {
    match e {
        ApiError::Workflow(WorkflowError::StreamInterrupted { after }) => {
            let (field, value) = match after {
                ResumePoint::Revision(r) => ("after_revision", r),
                ResumePoint::Sequence(s) => ("after_sequence", s),
            };
            let info = tonic_types::ErrorDetails::with_error_info(
                "SERVER_SHUTTING_DOWN",
                "baremetal.v1",
                [(field.to_owned(), value.to_string())],
            );
            let message = format!("the server is shutting down; resume with {field}={value}");
            <Status as tonic_types::StatusExt>::with_error_details(
                Code::Unavailable,
                bounded(message),
                info,
            )
        }
        _ => Status::unavailable(bounded(e.to_string())),
    }
}

/// The longest status message, in bytes. The message travels in a response header, and
/// clients refuse large headers (grpc-java's limit is 8 KiB, and the message is
/// percent-encoded on the way); every quoted input is a short [`bm_domain::snippet`] already,
/// this is the backstop for messages that quote many of them.
pub(crate) const MAX_MESSAGE_BYTES: usize = 1024;

/// `msg`, cut at a character boundary to at most [`MAX_MESSAGE_BYTES`].
fn bounded(mut msg: String) -> String {
    if msg.len() > MAX_MESSAGE_BYTES {
        const MORE: &str = "… (message cut)";
        let mut end = MAX_MESSAGE_BYTES - MORE.len();
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
        msg.push_str(MORE);
    }
    msg
}

/// A handler's result as tonic wants it.
pub(crate) fn respond<T>(r: Result<T, ApiError>) -> Result<tonic::Response<T>, Status> {
    r.map(tonic::Response::new).map_err(Status::from)
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        if let ApiError::Exhausted {
            message,
            retry_after: Some(after),
        } = &e
        {
            // The delay for programs (AIP-193), beside the message for people.
            let info = tonic_types::ErrorDetails::with_retry_info(Some(*after));
            return <Status as tonic_types::StatusExt>::with_error_details(
                Code::ResourceExhausted,
                bounded(message.clone()),
                info,
            );
        }
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
                unavailable(&e)
            }
            _ => {
                tracing::debug!(code = ?code, error = %e, "request refused");
                Status::new(code, bounded(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn each_kind_has_its_own_code() {
        let kinds = [
            ErrorKind::InvalidInput,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::WrongState,
            ErrorKind::Unavailable,
            ErrorKind::LimitExceeded,
            ErrorKind::OutOfRange,
            ErrorKind::Internal,
        ];
        let codes: std::collections::HashSet<Code> = kinds.into_iter().map(kind_code).collect();
        assert_eq!(codes.len(), kinds.len(), "two kinds share a code");
        assert!(!codes.contains(&Code::Ok) && !codes.contains(&Code::Unknown));
    }

    /// The store's and the domain's errors reach a client through their kind; the API tests
    /// (`tests/it/api.rs`) show each of them with its code. These are the server's own.
    #[test]
    fn codes() {
        check(
            WorkflowError::ProviderRejected {
                machine_id: "m-1".into(),
                provider: "redfish".into(),
                message: "bmc_endpoint is required".into(),
            }
            .into(),
            Code::InvalidArgument,
            "provider redfish cannot drive machine m-1: bmc_endpoint is required",
        );
        check(
            ApiError::invalid("page_token is invalid"),
            Code::InvalidArgument,
            "page_token",
        );
        check(
            WorkflowError::RevisionOutOfRange { asked: 9, last: 3 }.into(),
            Code::OutOfRange,
            "revision 9 is beyond the last one (3)",
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
            WorkflowError::ShuttingDown.into(),
            Code::Unavailable,
            "shutting down",
        );
    }

    #[test]
    fn a_cut_stream_says_where_to_resume_in_an_error_info() {
        use tonic_types::StatusExt;
        let s = Status::from(ApiError::from(WorkflowError::StreamInterrupted {
            after: ResumePoint::Revision(41),
        }));
        let info = s.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "SERVER_SHUTTING_DOWN");
        assert_eq!(info.domain, "baremetal.v1");
        assert_eq!(
            info.metadata.get("after_revision").map(String::as_str),
            Some("41")
        );
    }

    #[test]
    fn a_limit_hit_is_resource_exhausted_and_says_when_to_retry() {
        use tonic_types::StatusExt;
        let s = Status::from(ApiError::Exhausted {
            message: "too fast (--op-rate-per-principal); retry in 20ms".into(),
            retry_after: Some(std::time::Duration::from_millis(20)),
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("--op-rate-per-principal"), "{s:?}");
        let retry = s.get_details_retry_info().expect("a RetryInfo");
        assert_eq!(
            retry.retry_delay,
            Some(std::time::Duration::from_millis(20))
        );
        let s = Status::from(ApiError::Exhausted {
            message: "too big (--max-request-bytes)".into(),
            retry_after: None,
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.get_details_retry_info().is_none());
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let s = Status::from(ApiError::invalid(format!("x: {}", "é".repeat(5000))));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            s.message().len()
        );
        assert!(s.message().ends_with("… (message cut)"), "{}", s.message());
    }

    #[test]
    fn internal_details_never_reach_the_client() {
        for e in [
            ApiError::Internal("disk /var/lib/secret is full".into()),
            WorkflowError::Internal("disk /var/lib/secret is full".into()).into(),
        ] {
            let s = Status::from(e);
            assert_eq!(s.code(), Code::Internal);
            assert!(!s.message().contains("secret"), "{}", s.message());
        }
    }
}
