//! Rows to domain values and back.

use bm_domain::{LogLine, Machine, MachineId, Operation, OperationEvent, OperationType, Timestamp};
use rusqlite::Row;

use crate::logic::StoredOp;
use crate::{Lease, Result, StoreError};

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

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The columns of an events row, in the order [`EVENT_COLUMNS`] selects them.
pub(super) const EVENT_COLUMNS: &str = "revision, operation_id, machine_id, time, operation_type, kind, phase, stage, attempt, message";

/// Reads an events row selected with [`EVENT_COLUMNS`].
pub(super) fn event(row: &Row<'_>) -> rusqlite::Result<Result<OperationEvent>> {
    let operation_id: String = row.get(1)?;
    let machine_id: String = row.get(2)?;
    let operation_type: String = row.get(4)?;
    let kind: String = row.get(5)?;
    let phase: String = row.get(6)?;
    let revision: i64 = row.get(0)?;
    let time: i64 = row.get(3)?;
    let stage: String = row.get(7)?;
    let attempt: u32 = row.get(8)?;
    let message: String = row.get(9)?;
    Ok((|| {
        Ok(OperationEvent {
            revision: revision as u64,
            time: Timestamp::from_unix_micros(time),
            operation_id: operation_id.parse().map_err(corrupt)?,
            machine_id: MachineId::new(machine_id).map_err(corrupt)?,
            operation_type: operation_type.parse::<OperationType>().map_err(corrupt)?,
            kind: kind.parse().map_err(corrupt)?,
            phase: phase.parse().map_err(corrupt)?,
            stage,
            attempt,
            message,
        })
    })())
}

/// The columns of a logs row, in the order [`LOG_COLUMNS`] selects them.
pub(super) const LOG_COLUMNS: &str = "operation_id, sequence, time, stage, tag, message";

/// Reads a logs row selected with [`LOG_COLUMNS`].
pub(super) fn log_line(row: &Row<'_>) -> rusqlite::Result<Result<LogLine>> {
    let operation_id: String = row.get(0)?;
    let sequence: i64 = row.get(1)?;
    let time: i64 = row.get(2)?;
    let (stage, tag, message): (String, String, String) = (row.get(3)?, row.get(4)?, row.get(5)?);
    Ok(operation_id
        .parse()
        .map_err(corrupt)
        .map(|operation_id| LogLine {
            operation_id,
            sequence: sequence as u64,
            time: Timestamp::from_unix_micros(time),
            stage,
            tag,
            message,
        }))
}

pub(super) fn to_json(v: &impl serde::Serialize) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}
