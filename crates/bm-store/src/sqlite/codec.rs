//! Rows to domain values and back.
//!
//! A row that cannot be read back is reported with its table and id: the error says which
//! record to look at, and lists skip it (see [`skip_unreadable`]) rather than fail whole.
//! JSON documents carry a CRC-32 (`doc_crc32`), checked at every read, so that bytes changed
//! on disk do not silently change a value; rows written before the column existed have none
//! and are read unchecked.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bm_domain::{
    LogLine, Machine, MachineId, Operation, OperationEvent, OperationType, Rollout, Timestamp,
};
use rusqlite::Row;

use crate::logic::StoredOp;
use crate::{Lease, Result, StoreError, StoredRollout};

/// A record of `table` with primary key `id` cannot be read back.
pub(crate) fn corrupt_row(table: &str, id: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{table} row {id:?}: {why}"))
}

/// The checksum stored next to a JSON document.
pub(super) fn checksum(doc: &str) -> i64 {
    i64::from(crc32fast::hash(doc.as_bytes()))
}

/// Decodes a JSON document of `table` after checking it against its checksum.
pub(crate) fn document<T: serde::de::DeserializeOwned>(
    table: &str,
    id: &str,
    doc: &str,
    crc: Option<i64>,
) -> Result<T> {
    if let Some(crc) = crc
        && crc != checksum(doc)
    {
        return Err(corrupt_row(
            table,
            id,
            "the document does not match its checksum (changed on disk)",
        ));
    }
    serde_json::from_str(doc)
        .map_err(|e| corrupt_row(table, id, format_args!("invalid document: {e}")))
}

/// The columns of a machines row, in the order [`machine`] reads them.
pub(super) const MACHINE_COLUMNS: &str = "id, doc, doc_crc32";

/// Reads a machines row selected with [`MACHINE_COLUMNS`].
pub(super) fn machine(row: &Row<'_>) -> rusqlite::Result<Result<Machine>> {
    let id: String = row.get(0)?;
    let doc: String = row.get(1)?;
    let crc: Option<i64> = row.get(2)?;
    Ok(
        document::<Machine>("machines", &id, &doc, crc).and_then(|m| {
            if m.id.as_str() == id {
                Ok(m)
            } else {
                Err(corrupt_row(
                    "machines",
                    &id,
                    format_args!("the document is of machine {}", m.id),
                ))
            }
        }),
    )
}

/// The columns of a rollouts row, in the order [`stored_rollout`] reads them.
pub(super) const ROLLOUT_COLUMNS: &str = "id, doc, doc_crc32, version";

/// Reads a rollouts row selected with [`ROLLOUT_COLUMNS`].
pub(super) fn stored_rollout(row: &Row<'_>) -> rusqlite::Result<Result<StoredRollout>> {
    let id: String = row.get(0)?;
    let doc: String = row.get(1)?;
    let crc: Option<i64> = row.get(2)?;
    let version: i64 = row.get(3)?;
    Ok(
        document::<Rollout>("rollouts", &id, &doc, crc).and_then(|rollout| {
            if rollout.id.to_string() != id {
                return Err(corrupt_row(
                    "rollouts",
                    &id,
                    format_args!("the document is of rollout {}", rollout.id),
                ));
            }
            let version = u64::try_from(version)
                .map_err(|_| corrupt_row("rollouts", &id, "its version is negative"))?;
            Ok(StoredRollout { rollout, version })
        }),
    )
}

/// The columns of an operations row, in the order [`stored_op`] reads them.
pub(super) const OP_COLUMNS: &str =
    "id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation";

/// Reads an operations row selected with [`OP_COLUMNS`].
pub(super) fn stored_op(row: &Row<'_>) -> rusqlite::Result<Result<StoredOp>> {
    let id: String = row.get(0)?;
    let doc: String = row.get(1)?;
    let crc: Option<i64> = row.get(2)?;
    let cancel: bool = row.get(3)?;
    let owner: Option<String> = row.get(4)?;
    let expires: Option<i64> = row.get(5)?;
    let generation: i64 = row.get(6)?;
    Ok(operation(&id, &doc, crc, cancel).map(|op| StoredOp {
        op,
        lease: owner.map(|owner| Lease {
            owner,
            expires_at: Timestamp::from_unix_micros(expires.unwrap_or(0)),
        }),
        generation: generation.cast_unsigned(),
    }))
}

pub(crate) fn operation(
    id: &str,
    doc: &str,
    crc: Option<i64>,
    cancel_requested: bool,
) -> Result<Operation> {
    let mut op: Operation = document("operations", id, doc, crc)?;
    if op.id.to_string() != id {
        return Err(corrupt_row(
            "operations",
            id,
            format_args!("the document is of operation {}", op.id),
        ));
    }
    // The column is the truth: an operator's request may have come in after the executor
    // last wrote the document.
    op.cancel_requested = cancel_requested;
    Ok(op)
}

/// The columns of an events row, in the order [`EVENT_COLUMNS`] selects them.
pub(super) const EVENT_COLUMNS: &str = "revision, operation_id, machine_id, time, operation_type, kind, phase, stage, attempt, message";

/// Reads an events row selected with [`EVENT_COLUMNS`].
pub(super) fn event(row: &Row<'_>) -> rusqlite::Result<Result<OperationEvent>> {
    let revision: i64 = row.get(0)?;
    let operation_id: String = row.get(1)?;
    let machine_id: String = row.get(2)?;
    let time: i64 = row.get(3)?;
    let operation_type: String = row.get(4)?;
    let kind: String = row.get(5)?;
    let phase: String = row.get(6)?;
    let stage: String = row.get(7)?;
    let attempt: u32 = row.get(8)?;
    let message: String = row.get(9)?;
    let bad = |e: &dyn std::fmt::Display| corrupt_row("events", &revision.to_string(), e);
    Ok((|| {
        Ok(OperationEvent {
            revision: revision as u64,
            time: Timestamp::from_unix_micros(time),
            operation_id: operation_id.parse().map_err(|e| bad(&e))?,
            machine_id: MachineId::new(machine_id).map_err(|e| bad(&e))?,
            operation_type: operation_type
                .parse::<OperationType>()
                .map_err(|e| bad(&e))?,
            kind: kind.parse().map_err(|e| bad(&e))?,
            phase: phase.parse().map_err(|e| bad(&e))?,
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
        .map_err(|e| corrupt_row("logs", &format!("{operation_id}/{sequence}"), e))
        .map(|operation_id| LogLine {
            operation_id,
            sequence: sequence as u64,
            time: Timestamp::from_unix_micros(time),
            stage,
            tag,
            message,
        }))
}

/// A document and its checksum, for writing.
pub(crate) fn to_json(v: &impl serde::Serialize) -> Result<(String, i64)> {
    let doc = serde_json::to_string(v)?;
    let crc = checksum(&doc);
    Ok((doc, crc))
}

/// Keeps the readable rows of a listing and reports the others: one damaged record must not
/// hide every other one. Storage errors (not a bad record) still fail the listing.
pub(super) fn skip_unreadable<T>(row: rusqlite::Result<Result<T>>) -> Result<Option<T>> {
    match row? {
        Ok(v) => Ok(Some(v)),
        Err(e @ StoreError::Corrupt(_)) => {
            report_unreadable(&e);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// How many unreadable rows are logged per second; the rest are counted and the count is
/// logged with the next line let through.
const REPORTS_PER_SECOND: u64 = 10;

/// Logs a record that cannot be read, at error level, rate-limited: a listing that pages over
/// many damaged rows must not flood the log.
pub(crate) fn report_unreadable(e: &StoreError) {
    static SECOND: AtomicI64 = AtomicI64::new(0);
    static IN_SECOND: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if SECOND.swap(now, Ordering::Relaxed) != now {
        IN_SECOND.store(0, Ordering::Relaxed);
    }
    if IN_SECOND.fetch_add(1, Ordering::Relaxed) < REPORTS_PER_SECOND {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::error!(error = %e, suppressed_since_last = suppressed, "skipping a stored record that cannot be read; restore it from a backup or fix it by hand");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}
