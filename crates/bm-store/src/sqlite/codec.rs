//! Rows to domain values and back.

use bm_domain::{LogLine, Machine, Operation, OperationEvent, Timestamp};
use rusqlite::Row;

use crate::logic::StoredOp;
use crate::{Lease, Result};

pub(super) fn machine(doc: &str) -> Result<Machine> {
    Ok(serde_json::from_str(doc)?)
}

pub(super) fn operation(doc: &str, cancel_requested: bool) -> Result<Operation> {
    let mut op: Operation = serde_json::from_str(doc)?;
    // The column is the truth: an operator's request may have come in after the executor
    // last wrote the document.
    op.cancel_requested = cancel_requested;
    Ok(op)
}

/// Columns: doc, cancel_requested, lease_owner, lease_expires.
pub(super) fn stored_op(row: &Row<'_>) -> rusqlite::Result<Result<StoredOp>> {
    let doc: String = row.get(0)?;
    let cancel: bool = row.get(1)?;
    let owner: Option<String> = row.get(2)?;
    let expires: Option<i64> = row.get(3)?;
    Ok(operation(&doc, cancel).map(|op| StoredOp {
        op,
        lease: owner.map(|owner| Lease {
            owner,
            expires_at: Timestamp::from_unix_micros(expires.unwrap_or(0)),
        }),
    }))
}

pub(super) fn event(revision: i64, doc: &str) -> Result<OperationEvent> {
    let mut e: OperationEvent = serde_json::from_str(doc)?;
    e.revision = revision as u64;
    Ok(e)
}

pub(super) fn log_line(doc: &str) -> Result<LogLine> {
    Ok(serde_json::from_str(doc)?)
}

pub(super) fn to_json(v: &impl serde::Serialize) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}
