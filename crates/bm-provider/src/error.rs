//! The error every provider action returns.

use std::error::Error as StdError;
use std::time::Duration;

/// What kind of failure, which decides whether the engine retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A retry may help: a timeout, a busy BMC, a server error.
    Transient,
    /// The machine or its BMC did not answer. A retry may help (for minutes: the engine's
    /// retry budget for unavailable services); if none does, the machine is marked not
    /// Reachable.
    Unreachable,
    /// The BMC (or another service the action needs) answered that it is unavailable for
    /// now, or did not answer in time: it is rebooting itself, updating its firmware,
    /// overloaded (HTTP 503, a timeout). Retried with backoff for minutes (the engine's
    /// retry budget), after [`ProviderError::retry_after`] when the service said when.
    Unavailable,
    /// A retry will not help until a person changes something: bad credentials, a wrong
    /// system path, an unsupported action, a missing field in the spec.
    Permanent,
    /// The action stopped because its cancellation token fired.
    Canceled,
}

impl ErrorKind {
    /// The name metrics and logs use, e.g. `unreachable`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Canceled => "canceled",
        }
    }
}

/// Why a provider action did not succeed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    kind: ErrorKind,
    message: String,
    retry_after: Option<Duration>,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl ProviderError {
    /// An error of `kind` with a message for people.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }

    /// A failure a retry may fix.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    /// The machine or its BMC did not answer.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unreachable, message)
    }

    /// A service that is unavailable for now (a rebooting or busy BMC).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// A failure no retry will fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }

    /// The action was canceled.
    pub fn canceled() -> Self {
        Self::new(ErrorKind::Canceled, "canceled")
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Says when a retry may succeed, as the service did (HTTP `Retry-After`).
    #[must_use]
    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// When a retry may succeed, if the service said: the engine waits at least this long.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True when another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Transient | ErrorKind::Unreachable | ErrorKind::Unavailable
        )
    }

    /// The message, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}
