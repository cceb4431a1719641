//! The SQLite schema, its migrations, and how connections are opened.
//!
//! Machines and operations are JSON documents of the domain types (readable with the
//! `sqlite3` shell) with a CRC-32 of each document, next to the columns that queries filter
//! and sort on; machine labels are also rows of an index table, kept in the transaction that
//! writes the machine; events and log lines, written by the hundred thousand, are plain
//! columns. Migrations are embedded and applied
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
    // 2: an index of machine labels, so that a label selector reads the machines it names
    // rather than the whole fleet (filled from the existing machines' documents; a document
    // that is not valid JSON is left out, to be reported when it is read); and a checksum of
    // each JSON document, so that bytes changed on disk are found when the row is read (rows
    // written before have none until they are next written).
    r#"
    CREATE TABLE machine_labels (
        key        TEXT NOT NULL,
        value      TEXT NOT NULL,
        machine_id TEXT NOT NULL,
        PRIMARY KEY (key, value, machine_id)
    ) WITHOUT ROWID;
    CREATE INDEX machine_labels_by_key ON machine_labels (key, machine_id);
    INSERT INTO machine_labels (key, value, machine_id)
        SELECT l.key, l.value, m.id
        FROM machines AS m, json_each(m.doc, '$.labels') AS l
        WHERE json_valid(m.doc);
    ALTER TABLE machines ADD COLUMN doc_crc32 INTEGER;
    ALTER TABLE operations ADD COLUMN doc_crc32 INTEGER;
    "#,
    // 3: the fencing generation of an operation's lease, bumped at every claim and kept when
    // the lease is cleared, so that a write of an executor whose claim was superseded is
    // refused even when the lease came back to the same owner.
    r#"
    ALTER TABLE operations ADD COLUMN lease_generation INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4: what happened to a machine outside operations (a power change the status poll saw),
    // numbered per machine.
    r#"
    CREATE TABLE machine_events (
        machine_id TEXT NOT NULL,
        sequence   INTEGER NOT NULL,
        time       INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        message    TEXT NOT NULL,
        PRIMARY KEY (machine_id, sequence)
    ) WITHOUT ROWID;
    "#,
    // 5: rollouts, one JSON document each with its version (writes compare and swap on it);
    // creation is idempotent by request id.
    r#"
    CREATE TABLE rollouts (
        id         TEXT PRIMARY KEY NOT NULL,
        request_id TEXT NOT NULL UNIQUE,
        phase      TEXT NOT NULL,
        version    INTEGER NOT NULL,
        doc        TEXT NOT NULL,
        doc_crc32  INTEGER NOT NULL
    );
    CREATE INDEX rollouts_active ON rollouts (id)
        WHERE phase NOT IN ('SUCCEEDED', 'FAILED', 'ABORTED');
    "#,
];

/// How long a connection waits for a lock another one holds (the writer for a checkpoint,
/// a checkpoint for the writer) before it gives up with SQLITE_BUSY.
pub(super) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens a connection with the settings every connection of the store uses. The file must
/// exist (the store creates it, with its permissions, before SQLite sees it).
pub(super) fn open(path: &Path, cache_kib: i64) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
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

/// Opens a connection that cannot write (a damaged store opened read-only, or the source of
/// a backup).
pub(super) fn open_read_only(path: &Path, cache_kib: i64) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch(&format!(
        "PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -{cache_kib};"
    ))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// SQLite's quick integrity check (every page and B-tree is well formed; indexes are not
/// compared with their tables). Returns the problems found, at most a few; none when the
/// database is sound.
pub(super) fn quick_check(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
    let found = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(if found == ["ok"] { Vec::new() } else { found })
}

/// How many migrations the database has seen.
pub(super) fn version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// How many migrations this program knows.
pub(super) fn known_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Applies the migrations the database has not seen yet, in one transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let version = version(conn)?;
    let known = known_version();
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
