//! The PostgreSQL schema and its migrations.
//!
//! Migrations are embedded, versioned in a one-row `schema_version` table, and applied at
//! open in one transaction that first takes a transaction-scoped advisory lock: replicas
//! starting at once apply them one after the other, and the later ones find nothing to do.
//! A database whose version is newer than this program knows is refused.
//!
//! The tables mirror SQLite's (JSON documents of the domain types with a CRC-32, next to the
//! columns queries filter on), with what several writers need: a partial unique index that
//! allows one active operation per machine, and a one-row-per-stream `counters` table from
//! which each committing transaction takes its revisions last (see `writer.rs`).

use postgres::Client;

use crate::{Result, StoreError};

/// The advisory lock key of migrations ("bm-store" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x626d_2d73_746f_7265;

/// The migrations, in order. Never edit one that has shipped: add another.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE machines (
        id              TEXT PRIMARY KEY,
        phase           TEXT NOT NULL,
        effective_state TEXT NOT NULL,
        doc             TEXT NOT NULL,
        doc_crc32       BIGINT
    );
    CREATE TABLE machine_macs (
        mac        TEXT PRIMARY KEY,
        machine_id TEXT NOT NULL
    );
    CREATE INDEX machine_macs_by_machine ON machine_macs (machine_id);

    CREATE TABLE operations (
        id               TEXT PRIMARY KEY,
        machine_id       TEXT NOT NULL,
        type             TEXT NOT NULL,
        phase            TEXT NOT NULL,
        request_id       TEXT NOT NULL,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        lease_owner      TEXT,
        lease_expires    BIGINT,
        lease_generation BIGINT NOT NULL DEFAULT 0,
        doc              TEXT NOT NULL,
        doc_crc32        BIGINT,
        UNIQUE (machine_id, request_id)
    );
    CREATE INDEX operations_by_machine ON operations (machine_id, id);
    -- The database's own guard of the domain's rule: one active operation per machine.
    CREATE UNIQUE INDEX operations_one_active ON operations (machine_id)
        WHERE phase IN ('PENDING', 'RUNNING');
    CREATE INDEX operations_unheld ON operations (id)
        WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NULL;
    CREATE INDEX operations_lease_expiry ON operations (lease_expires)
        WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NOT NULL;
    CREATE INDEX operations_by_owner ON operations (lease_owner) WHERE lease_owner IS NOT NULL;

    CREATE TABLE events (
        revision       BIGINT PRIMARY KEY,
        operation_id   TEXT NOT NULL,
        machine_id     TEXT NOT NULL,
        time           BIGINT NOT NULL,
        operation_type TEXT NOT NULL,
        kind           TEXT NOT NULL,
        phase          TEXT NOT NULL,
        stage          TEXT NOT NULL,
        attempt        BIGINT NOT NULL,
        message        TEXT NOT NULL
    );
    CREATE INDEX events_by_operation ON events (operation_id, revision);
    CREATE INDEX events_by_machine ON events (machine_id, revision);

    CREATE TABLE logs (
        operation_id TEXT NOT NULL,
        sequence     BIGINT NOT NULL,
        time         BIGINT NOT NULL,
        stage        TEXT NOT NULL,
        tag          TEXT NOT NULL,
        message      TEXT NOT NULL,
        -- The order lines were committed in, across every writer: how other replicas'
        -- subscribers follow them.
        log_revision BIGINT NOT NULL UNIQUE,
        PRIMARY KEY (operation_id, sequence)
    );

    -- The last revision given out per stream; its row lock orders committers.
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    );
    INSERT INTO counters (name, value) VALUES ('events', 0), ('logs', 0);
    "#,
    // 2: what happened to a machine outside operations (a power change the status poll saw),
    // numbered per machine.
    r#"
    CREATE TABLE machine_events (
        machine_id TEXT NOT NULL,
        sequence   BIGINT NOT NULL,
        time       BIGINT NOT NULL,
        kind       TEXT NOT NULL,
        message    TEXT NOT NULL,
        PRIMARY KEY (machine_id, sequence)
    );
    "#,
    // 3: rollouts, one JSON document each with its version (writes compare and swap on it,
    // under the row's lock); creation is idempotent by request id.
    r#"
    CREATE TABLE rollouts (
        id         TEXT PRIMARY KEY,
        request_id TEXT NOT NULL UNIQUE,
        phase      TEXT NOT NULL,
        version    BIGINT NOT NULL,
        doc        TEXT NOT NULL,
        doc_crc32  BIGINT NOT NULL
    );
    CREATE INDEX rollouts_active ON rollouts (id)
        WHERE phase NOT IN ('SUCCEEDED', 'FAILED', 'ABORTED');
    "#,
];

/// How many migrations this program knows.
pub(crate) fn known_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// The version the database is at (0 if it has no schema yet), read without changing it.
pub(crate) fn version(conn: &mut Client) -> Result<i64> {
    let exists: bool = conn
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = conn.query_opt("SELECT version FROM schema_version", &[])?;
    Ok(row.map_or(0, |r| r.get(0)))
}

/// Applies the migrations the database has not seen yet, in one transaction, under an
/// advisory lock.
pub(crate) fn migrate(conn: &mut Client) -> Result<()> {
    let known = known_version();
    let mut tx = conn.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let found: Option<i64> = tx
        .query_opt("SELECT version FROM schema_version", &[])?
        .map(|r| r.get(0));
    let found = found.unwrap_or(0);
    if found > known {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: known,
        });
    }
    if found == known {
        return Ok(());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql)?;
        tracing::info!(version = i + 1, "applied store migration");
    }
    tx.execute("DELETE FROM schema_version", &[])?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES ($1)",
        &[&known],
    )?;
    tx.commit()?;
    Ok(())
}
