//! The SQLite schema, its migrations, and how connections are opened.
//!
//! Machines and operations are JSON documents of the domain types (readable with the
//! `sqlite3` shell), next to the columns that queries filter and sort on; events and log
//! lines, written by the hundred thousand, are plain columns. Migrations are embedded and applied
//! in order at start; `PRAGMA user_version` records how many ran.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use crate::{Result, StoreError};

/// The migrations, in order. Never edit one that has shipped: add another.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE machines (
        id              TEXT PRIMARY KEY NOT NULL,
        phase           TEXT NOT NULL,
        effective_state TEXT NOT NULL,
        doc             TEXT NOT NULL
    );
    CREATE TABLE machine_macs (
        mac        TEXT PRIMARY KEY NOT NULL,
        machine_id TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX machine_macs_by_machine ON machine_macs (machine_id);

    CREATE TABLE operations (
        id               TEXT PRIMARY KEY NOT NULL,
        machine_id       TEXT NOT NULL,
        type             TEXT NOT NULL,
        phase            TEXT NOT NULL,
        request_id       TEXT NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        lease_owner      TEXT,
        lease_expires    INTEGER,
        doc              TEXT NOT NULL,
        UNIQUE (machine_id, request_id)
    );
    CREATE INDEX operations_by_machine ON operations (machine_id, id);
    -- Claiming looks only at what it can take: active and unheld, or held past its expiry.
    CREATE INDEX operations_unheld ON operations (id)
        WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NULL;
    CREATE INDEX operations_lease_expiry ON operations (lease_expires)
        WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NOT NULL;
    CREATE INDEX operations_by_owner ON operations (lease_owner) WHERE lease_owner IS NOT NULL;

    CREATE TABLE events (
        revision       INTEGER PRIMARY KEY,
        operation_id   TEXT NOT NULL,
        machine_id     TEXT NOT NULL,
        time           INTEGER NOT NULL,
        operation_type TEXT NOT NULL,
        kind           TEXT NOT NULL,
        phase          TEXT NOT NULL,
        stage          TEXT NOT NULL,
        attempt        INTEGER NOT NULL,
        message        TEXT NOT NULL
    );
    CREATE INDEX events_by_operation ON events (operation_id, revision);
    CREATE INDEX events_by_machine ON events (machine_id, revision);

    CREATE TABLE logs (
        operation_id TEXT NOT NULL,
        sequence     INTEGER NOT NULL,
        time         INTEGER NOT NULL,
        stage        TEXT NOT NULL,
        tag          TEXT NOT NULL,
        message      TEXT NOT NULL,
        PRIMARY KEY (operation_id, sequence)
    ) WITHOUT ROWID;
    "#,
];

/// Opens a connection with the settings every connection of the store uses.
pub(super) fn open(path: &Path, cache_kib: i64) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: readers never block the writer. synchronous=FULL: a commit is on disk when it
    // returns (the writer batches commands so that this costs one fsync per batch).
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -{cache_kib};"
    ))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Applies the migrations the database has not seen yet, in one transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: known,
        });
    }
    if version == known {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tracing::info!(version = i + 1, "applied store migration");
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
pub(super) fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}
