//! The store's error type.

use bm_domain::{
    DomainError, MacAddress, MachineId, OperationId, OperationType, RequestId, RolloutId,
};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No machine has that id.
    #[error("machine {0} not found")]
    MachineNotFound(MachineId),
    /// No operation has that id.
    #[error("operation {0} not found")]
    OperationNotFound(OperationId),
    /// No rollout has that id.
    #[error("rollout {0} not found")]
    RolloutNotFound(RolloutId),
    /// A rollout was written by someone else since it was read: read it again, and apply
    /// the change to what it is now.
    #[error(
        "rollout {id} changed since it was read (version {expected}, now {found}); read it again"
    )]
    RolloutChanged {
        /// The rollout.
        id: RolloutId,
        /// The version the write expected.
        expected: u64,
        /// The version stored.
        found: u64,
    },
    /// A machine with that id is registered.
    #[error("machine {0} already exists")]
    MachineExists(MachineId),
    /// A MAC address belongs to another machine.
    #[error("MAC address {mac} already belongs to machine {owner}")]
    MacInUse {
        /// The address.
        mac: MacAddress,
        /// The machine that has it.
        owner: MachineId,
    },
    /// An import row names an existing machine with another spec or other labels.
    #[error(
        "machine {0} already exists with a different spec or labels; change it with UpdateMachine"
    )]
    ImportConflict(MachineId),
    /// A request id was used on the machine before, for an operation of another type.
    #[error(
        "request id {request_id} was already used on machine {machine_id} for {existing_type} operation {existing}; use a new request id"
    )]
    RequestIdReused {
        /// The machine.
        machine_id: MachineId,
        /// The reused key.
        request_id: RequestId,
        /// The operation it was first used for.
        existing: OperationId,
        /// That operation's type.
        existing_type: OperationType,
    },
    /// The executor no longer holds the operation's lease.
    #[error("operation {0} is no longer held by this executor")]
    LeaseLost(OperationId),
    /// The domain's rules refused the change.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Another process uses the data directory.
    #[error("data directory {0} is in use by another process")]
    Locked(String),
    /// The data was written by a newer version of the program.
    #[error(
        "the store has schema version {found}, newer than the {supported} this program knows; run a newer version"
    )]
    SchemaTooNew {
        /// The version found.
        found: i64,
        /// The newest version known.
        supported: i64,
    },
    /// A stored record could not be read back; the message names its table and id.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database file is damaged or missing (found when the store opens).
    #[error(
        "the database {path} is damaged: {detail}; restore it from a backup (see docs/operations.md)"
    )]
    Damaged {
        /// The database file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A write failed because the data directory's disk is full (or the store reached its
    /// size limit). Nothing of it was kept; reads still work, and writes succeed again once
    /// space is freed.
    #[error("the data directory's disk is full; writes succeed again once space is freed")]
    DiskFull,
    /// The store was opened read-only (a damaged database started anyway): it refuses
    /// writes.
    #[error("the store is read-only and takes no writes: {0}")]
    ReadOnly(String),
    /// The database or the filesystem failed.
    #[error("storage failure")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database cannot be reached (it is down or restarting, or the network to it is
    /// cut) or cannot take the call now (failing over, out of disk, past the statement
    /// timeout). Nothing of the call was kept; calls succeed again once it can.
    #[error(
        "the database cannot be reached or cannot take the call now (down, restarting, failing over, out of disk or too slow); calls succeed again once it can"
    )]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store was shut down.
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// A backend failure.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(e))
    }

    /// True when the same call may succeed later without anyone changing the request: the
    /// storage failed ([`StoreError::Backend`]), cannot be reached
    /// ([`StoreError::Unavailable`]) or its disk is full. Writes are atomic, so retrying one
    /// is safe.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Backend(_) | StoreError::Unavailable(_) | StoreError::DiskFull
        )
    }

    /// The SQLite error code inside a backend failure.
    pub(crate) fn sqlite_code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            StoreError::Backend(e) => e
                .downcast_ref::<rusqlite::Error>()
                .and_then(rusqlite::Error::sqlite_error_code),
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::DiskFull,
            _ => StoreError::backend(e),
        }
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        if database_unreachable(&e) {
            StoreError::Unavailable(Box::new(e))
        } else {
            StoreError::backend(e)
        }
    }
}

/// True when a PostgreSQL error says that the server is not there to answer, or cannot
/// take the write now, and that trying again later can succeed: the connection could not be
/// made or was lost, the server is shutting down or starting up, it has no connection slot,
/// its disk is full, it is a standby (after a failover, until the connection reaches the
/// new primary), or the statement ran past the statement timeout.
fn database_unreachable(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    if let Some(code) = e.code() {
        // Class 08: connection exception.
        return code.code().starts_with("08")
            || [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::DISK_FULL,
                SqlState::READ_ONLY_SQL_TRANSACTION,
                SqlState::QUERY_CANCELED,
            ]
            .contains(code);
    }
    if e.is_closed() {
        return true;
    }
    // A failed connect or a broken socket carries the IO error.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}
