//! The single writer thread: group commit.
//!
//! Every write of the store is a job sent to one thread that owns the only writing
//! connection. The thread takes whatever jobs are queued (up to a batch limit), runs them in
//! one transaction, commits once, and only then publishes the events and answers the
//! callers. A batch of a thousand writes from a thousand concurrent operations therefore
//! costs one fsync, not a thousand.
//!
//! Jobs run the store's transaction functions, which check everything before they write
//! (`logic.rs`): a job that fails has written nothing, so the others in its batch commit
//! as if it had not run, without the cost of a savepoint per job. Should a job ever fail
//! after writing (a bug), the whole batch is rolled back and every caller gets an error
//! (the executor retries), rather than committing half a job.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};

use bm_domain::{
    Labels, LogLine, MacAddress, Machine, MachineEvent, MachineId, Operation, OperationEvent,
    OperationId, RequestId, Rollout, RolloutId, Timestamp,
};
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use tokio::sync::broadcast;

use super::codec::{self, OP_COLUMNS};
use super::files::DataDir;
use super::wal::WalWatch;
use crate::condition::ConditionCell;
use crate::logic::{Holding, Indexed, StoredOp, Tx};
use crate::{Lease, Renewal, Result, StoreError, StoredRollout};

/// Why a batch was not committed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommitError {
    /// SQLite failed (an IO error).
    #[error("commit failed")]
    Sqlite(#[from] rusqlite::Error),
    /// A job failed after writing (a bug): nothing of the batch was kept.
    #[error("a store job failed after writing; its batch was rolled back")]
    Poisoned,
    /// SQLite rolled the transaction back by itself (an IO error).
    #[error("the database rolled the batch back")]
    RolledBack,
    /// There was no space for the batch; nothing of it was kept.
    #[error("the data directory's disk is full")]
    DiskFull,
}

/// Called after the batch's commit with its result.
pub(super) type Reply = Box<dyn FnOnce(Result<(), Arc<CommitError>>) + Send>;

/// What a job did in the batch transaction.
pub(super) struct Done {
    /// Whether its writes may be kept.
    pub(super) keep: bool,
    /// What its error says about the storage, if it failed for the storage's sake.
    pub(super) fault: Option<Fault>,
    pub(super) reply: Reply,
}

/// A write: runs in the batch transaction.
pub(super) type Job = Box<dyn FnOnce(&mut SqlTx<'_>) -> Done + Send>;

/// A failure of the storage, as far as the store's condition goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// No space left (SQLITE_FULL).
    DiskFull,
    /// An IO error: a full disk if the filesystem is (nearly) out of space.
    Io,
    /// The database file is damaged.
    Damaged,
}

impl Fault {
    pub(super) fn of(e: &StoreError) -> Option<Fault> {
        match e {
            StoreError::DiskFull => Some(Fault::DiskFull),
            _ => Self::of_code(e.sqlite_code()),
        }
    }

    fn of_sqlite(e: &rusqlite::Error) -> Option<Fault> {
        Self::of_code(e.sqlite_error_code())
    }

    fn of_code(code: Option<ErrorCode>) -> Option<Fault> {
        match code? {
            ErrorCode::DiskFull => Some(Fault::DiskFull),
            ErrorCode::SystemIoFailure => Some(Fault::Io),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => Some(Fault::Damaged),
            _ => None,
        }
    }

    /// The more telling of two faults.
    fn worst(a: Option<Fault>, b: Option<Fault>) -> Option<Fault> {
        let rank = |f: &Option<Fault>| match f {
            None => 0,
            Some(Fault::Io) => 1,
            Some(Fault::DiskFull) => 2,
            Some(Fault::Damaged) => 3,
        };
        if rank(&b) > rank(&a) { b } else { a }
    }
}

/// Below this much free space an IO error while writing counts as a full disk (SQLite
/// reports ENOSPC as SQLITE_FULL when it writes a page, as an IO error when it syncs or
/// grows its shared memory file).
const LOW_SPACE_BYTES: u64 = 8 << 20;

/// True when the filesystem of `dir` has (almost) no space left for this process.
fn out_of_space(dir: &std::path::Path) -> bool {
    rustix::fs::statvfs(dir).is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) < LOW_SPACE_BYTES)
}

pub(super) enum Command {
    Write(Job),
    Log(LogLine),
}

enum Published {
    Event(OperationEvent),
    Log(LogLine),
}

/// The writer's view of the batch transaction, for one job.
pub(super) struct SqlTx<'a> {
    conn: &'a Connection,
    events: Vec<OperationEvent>,
    /// Whether the job has written anything.
    wrote: bool,
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) rx: Receiver<Command>,
    pub(super) max_batch: usize,
    pub(super) events: broadcast::Sender<Arc<OperationEvent>>,
    pub(super) logs: broadcast::Sender<Arc<LogLine>>,
    pub(super) condition: Arc<ConditionCell>,
    pub(super) wal: WalWatch,
    /// The data directory, for its free space.
    pub(super) dir: PathBuf,
    /// Closed after the connection (see `files.rs`).
    pub(super) _files: Arc<DataDir>,
    /// Told of every commit.
    pub(super) observer: Option<Arc<dyn crate::CommitObserver>>,
}

impl Writer {
    /// Runs until every sender is gone and the queue is drained.
    pub(super) fn run(mut self) {
        while let Ok(first) = self.rx.recv() {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let (size, began) = (batch.len(), std::time::Instant::now());
            let committed = self.run_batch(batch);
            if let Some(observer) = &self.observer {
                observer.batch(size, began.elapsed(), committed);
            }
        }
    }

    /// Runs one batch in one transaction; whether it committed.
    fn run_batch(&mut self, batch: Vec<Command>) -> bool {
        let mut replies = Vec::with_capacity(batch.len());
        // Published after the commit in the order they were written, so a provider's log
        // line reaches subscribers before the event of the step that logged it ends.
        let mut published = Vec::new();
        let mut poisoned = false;
        // The worst storage fault any statement of the batch met.
        let mut fault = None;
        // Whether the batch changes anything (a commit that writes nothing proves no space).
        let mut wrote = false;
        let result = (|| -> Result<(), CommitError> {
            let conn = &self.conn;
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            for cmd in batch {
                match cmd {
                    Command::Log(line) => match insert_log(conn, &line) {
                        Ok(true) => {
                            wrote = true;
                            published.push(Published::Log(line));
                        }
                        Ok(false) => {}
                        Err(e) => {
                            fault = Fault::worst(fault, Fault::of(&e));
                            tracing::warn!(error = %e, operation_id = %line.operation_id, "log line not stored")
                        }
                    },
                    Command::Write(job) => {
                        let mut tx = SqlTx {
                            conn,
                            events: Vec::new(),
                            wrote: false,
                        };
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut tx)));
                        match outcome {
                            Ok(done) => {
                                fault = Fault::worst(fault, done.fault);
                                if done.keep {
                                    wrote |= tx.wrote;
                                    published.extend(tx.events.drain(..).map(Published::Event));
                                } else if tx.wrote {
                                    poisoned = true;
                                }
                                replies.push(done.reply);
                            }
                            // The caller's reply went down with the job (its call ends with
                            // "closed"); the batch may hold half of the job's writes.
                            Err(_) => {
                                tracing::error!("a store job panicked; its batch is rolled back");
                                poisoned = true;
                            }
                        }
                    }
                }
                // SQLite rolls a transaction back by itself on some errors (a full disk);
                // what follows would then commit statement by statement.
                if conn.is_autocommit() {
                    return Err(CommitError::RolledBack);
                }
            }
            if poisoned {
                return Err(CommitError::Poisoned);
            }
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        })();
        let result = result.map_err(|e| {
            if let CommitError::Sqlite(s) = &e {
                fault = Fault::worst(fault, Fault::of_sqlite(s));
            }
            match fault {
                Some(Fault::DiskFull) => CommitError::DiskFull,
                Some(Fault::Io) if out_of_space(&self.dir) => CommitError::DiskFull,
                _ => e,
            }
        });
        match fault {
            Some(Fault::Damaged) => self
                .condition
                .unusable("the database was found damaged while writing"),
            Some(Fault::DiskFull) => self.condition.disk_full(),
            Some(Fault::Io) if out_of_space(&self.dir) => self.condition.disk_full(),
            _ if result.is_ok() && wrote => self.condition.write_committed(),
            _ => {}
        }
        if result.is_ok() {
            self.wal.after_commit(&self.conn);
        }
        let committed = result.is_ok();
        match result {
            Ok(()) => {
                for p in published {
                    match p {
                        Published::Event(e) => {
                            let _ = self.events.send(Arc::new(e));
                        }
                        Published::Log(l) => {
                            let _ = self.logs.send(Arc::new(l));
                        }
                    }
                }
                for r in replies {
                    r(Ok(()));
                }
            }
            Err(e) => {
                if matches!(e, CommitError::DiskFull) {
                    tracing::warn!(
                        "store commit failed for lack of space; the batch is rolled back"
                    );
                } else {
                    tracing::error!(error = %e, "store commit failed; the batch is rolled back");
                }
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                let e = Arc::new(e);
                for r in replies {
                    r(Err(e.clone()));
                }
            }
        }
        committed
    }
}

fn insert_log(conn: &Connection, line: &LogLine) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO logs (operation_id, sequence, time, stage, tag, message)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            line.operation_id.to_string(),
            line.sequence as i64,
            line.time.as_unix_micros(),
            line.stage,
            line.tag,
            line.message
        ])?;
    Ok(n == 1)
}

/// A machine by id, on any connection (the writer's, or a reader's).
pub(super) fn read_machine(conn: &Connection, id: &MachineId) -> Result<Option<Machine>> {
    conn.prepare_cached(&format!(
        "SELECT {} FROM machines WHERE id = ?1",
        codec::MACHINE_COLUMNS
    ))?
    .query_row([id.as_str()], codec::machine)
    .optional()?
    .transpose()
}

/// An operation with its lease by id, on any connection.
pub(super) fn read_operation(conn: &Connection, id: OperationId) -> Result<Option<StoredOp>> {
    conn.prepare_cached(&format!(
        "SELECT {OP_COLUMNS} FROM operations WHERE id = ?1"
    ))?
    .query_row([id.to_string()], codec::stored_op)
    .optional()?
    .transpose()
}

/// A rollouts row by id.
pub(super) fn read_rollout(conn: &Connection, id: RolloutId) -> Result<Option<StoredRollout>> {
    conn.prepare_cached(&format!(
        "SELECT {} FROM rollouts WHERE id = ?1",
        codec::ROLLOUT_COLUMNS
    ))?
    .query_row([id.to_string()], codec::stored_rollout)
    .optional()?
    .transpose()
}

/// The rollouts row created with `request`.
pub(super) fn read_rollout_by_request(
    conn: &Connection,
    request: &RequestId,
) -> Result<Option<StoredRollout>> {
    conn.prepare_cached(&format!(
        "SELECT {} FROM rollouts WHERE request_id = ?1",
        codec::ROLLOUT_COLUMNS
    ))?
    .query_row([request.as_str()], codec::stored_rollout)
    .optional()?
    .transpose()
}

impl Tx for SqlTx<'_> {
    fn machine(&mut self, id: &MachineId) -> Result<Option<Machine>> {
        read_machine(self.conn, id)
    }

    fn put_machine(&mut self, m: &Machine, indexed: Indexed<'_>) -> Result<()> {
        let (doc, crc) = codec::to_json(m)?;
        self.wrote = true;
        self.conn
            .prepare_cached(
                "INSERT INTO machines (id, phase, effective_state, doc, doc_crc32)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET
                   phase = ?2, effective_state = ?3, doc = ?4, doc_crc32 = ?5",
            )?
            .execute(params![
                m.id.as_str(),
                m.status.phase.as_str(),
                m.effective_state().as_str(),
                doc,
                crc
            ])?;
        let no_labels = Labels::default();
        let (old_macs, old_labels) = match indexed {
            Indexed::New => (Some(&[][..]), Some(&no_labels)),
            Indexed::Unchanged => (None, None),
            Indexed::Was { macs, labels } => (
                (macs != m.spec.mac_addresses.as_slice()).then_some(macs),
                (*labels != m.labels).then_some(labels),
            ),
        };
        if let Some(old) = old_labels {
            let mut delete = self.conn.prepare_cached(
                "DELETE FROM machine_labels WHERE key = ?1 AND value = ?2 AND machine_id = ?3",
            )?;
            for (k, v) in old.iter() {
                if m.labels.get(k) != Some(v) {
                    delete.execute(params![k, v, m.id.as_str()])?;
                }
            }
            let mut insert = self.conn.prepare_cached(
                "INSERT OR IGNORE INTO machine_labels (key, value, machine_id) VALUES (?1, ?2, ?3)",
            )?;
            for (k, v) in m.labels.iter() {
                if old.get(k) != Some(v) {
                    insert.execute(params![k, v, m.id.as_str()])?;
                }
            }
        }
        if let Some(old) = old_macs {
            let mut delete = self
                .conn
                .prepare_cached("DELETE FROM machine_macs WHERE mac = ?1 AND machine_id = ?2")?;
            for mac in old {
                delete.execute(params![mac.to_string(), m.id.as_str()])?;
            }
            let mut insert = self
                .conn
                .prepare_cached("INSERT INTO machine_macs (mac, machine_id) VALUES (?1, ?2)")?;
            for mac in &m.spec.mac_addresses {
                insert.execute(params![mac.to_string(), m.id.as_str()])?;
            }
        }
        Ok(())
    }

    fn mac_owner(&mut self, mac: &MacAddress) -> Result<Option<MachineId>> {
        let owner: Option<String> = self
            .conn
            .prepare_cached("SELECT machine_id FROM machine_macs WHERE mac = ?1")?
            .query_row([mac.to_string()], |r| r.get(0))
            .optional()?;
        owner
            .map(|o| MachineId::new(o).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    fn operation(&mut self, id: OperationId) -> Result<Option<StoredOp>> {
        read_operation(self.conn, id)
    }

    fn holding(&mut self, id: OperationId) -> Result<Option<Holding>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT phase IN ('PENDING', 'RUNNING'), cancel_requested, lease_owner, lease_expires,
                        lease_generation
                 FROM operations WHERE id = ?1",
            )?
            .query_row([id.to_string()], |r| {
                let owner: Option<String> = r.get(2)?;
                let expires: Option<i64> = r.get(3)?;
                let generation: i64 = r.get(4)?;
                Ok(Holding {
                    active: r.get(0)?,
                    cancel_requested: r.get(1)?,
                    generation: generation.cast_unsigned(),
                    lease: owner.map(|owner| Lease {
                        owner,
                        expires_at: Timestamp::from_unix_micros(expires.unwrap_or(0)),
                    }),
                })
            })
            .optional()?)
    }

    fn operation_by_request(
        &mut self,
        machine: &MachineId,
        request: &RequestId,
    ) -> Result<Option<Operation>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {OP_COLUMNS} FROM operations WHERE machine_id = ?1 AND request_id = ?2"
            ))?
            .query_row([machine.as_str(), request.as_str()], codec::stored_op)
            .optional()?
            .transpose()?
            .map(|s| s.op))
    }

    fn put_operation(
        &mut self,
        op: &Operation,
        lease: Option<&Lease>,
        generation: u64,
    ) -> Result<()> {
        let (doc, crc) = codec::to_json(op)?;
        self.wrote = true;
        self.conn
            .prepare_cached(
                "INSERT INTO operations
                   (id, machine_id, type, phase, request_id, cancel_requested, lease_owner, lease_expires, doc, doc_crc32,
                    lease_generation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (id) DO UPDATE SET
                   phase = ?4, cancel_requested = ?6, lease_owner = ?7, lease_expires = ?8,
                   doc = ?9, doc_crc32 = ?10, lease_generation = ?11",
            )?
            .execute(params![
                op.id.to_string(),
                op.machine_id.as_str(),
                op.op_type.as_str(),
                op.phase.as_str(),
                op.request_id.as_str(),
                op.cancel_requested,
                lease.map(|l| l.owner.as_str()),
                lease.map(|l| l.expires_at.as_unix_micros()),
                doc,
                crc,
                generation.cast_signed()
            ])?;
        Ok(())
    }

    fn claimable(&mut self, now: Timestamp, limit: usize) -> Result<Vec<StoredOp>> {
        // Two indexed queries, so that the operations this and other executors hold are
        // never walked: the unheld ones (oldest first), then those whose lease expired. Rows
        // are stepped through until `limit` readable ones are found, so an unreadable record
        // never takes the place of a good one.
        let mut out = Vec::new();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {OP_COLUMNS} FROM operations
             WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NULL
             ORDER BY id"
        ))?;
        take_readable(stmt.query_map([], codec::stored_op)?, limit, &mut out)?;
        if out.len() < limit {
            let mut stmt = self.conn.prepare_cached(&format!(
                "SELECT {OP_COLUMNS} FROM operations
                 WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NOT NULL AND lease_expires < ?1
                 ORDER BY lease_expires"
            ))?;
            let rows = stmt.query_map(params![now.as_unix_micros()], codec::stored_op)?;
            take_readable(rows, limit, &mut out)?;
        }
        Ok(out)
    }

    fn renew_leases(&mut self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<Renewal> {
        self.wrote = true;
        let mut renew = self.conn.prepare_cached(
            "UPDATE operations SET lease_expires = ?3
             WHERE id = ?1 AND lease_owner = ?2 AND lease_generation = ?4
               AND phase IN ('PENDING', 'RUNNING')
             RETURNING cancel_requested",
        )?;
        let mut renewal = Renewal::default();
        for &(id, generation) in held {
            let cancel: Option<bool> = renew
                .query_row(
                    params![
                        id.to_string(),
                        lease.owner,
                        lease.expires_at.as_unix_micros(),
                        generation.cast_signed()
                    ],
                    |r| r.get(0),
                )
                .optional()?;
            match cancel {
                None => renewal.lost.push(id),
                Some(true) => renewal.canceled.push(id),
                Some(false) => {}
            }
        }
        Ok(renewal)
    }

    fn release_leases(&mut self, owner: &str) -> Result<usize> {
        self.wrote = true;
        Ok(self
            .conn
            .prepare_cached(
                "UPDATE operations SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner = ?1",
            )?
            .execute([owner])?)
    }

    fn append_machine_event(&mut self, event: MachineEvent) -> Result<()> {
        self.wrote = true;
        self.conn
            .prepare_cached(
                "INSERT INTO machine_events (machine_id, sequence, time, kind, message)
                 SELECT ?1, COALESCE(MAX(sequence), 0) + 1, ?2, ?3, ?4
                 FROM machine_events WHERE machine_id = ?1",
            )?
            .execute(params![
                event.machine_id.as_str(),
                event.time.as_unix_micros(),
                event.kind.as_str(),
                event.message
            ])?;
        Ok(())
    }

    fn rollout(&mut self, id: RolloutId) -> Result<Option<StoredRollout>> {
        read_rollout(self.conn, id)
    }

    fn rollout_by_request(&mut self, request: &RequestId) -> Result<Option<StoredRollout>> {
        read_rollout_by_request(self.conn, request)
    }

    fn put_rollout(&mut self, rollout: &Rollout, version: u64) -> Result<()> {
        let (doc, crc) = codec::to_json(rollout)?;
        self.wrote = true;
        self.conn
            .prepare_cached(
                "INSERT INTO rollouts (id, request_id, phase, version, doc, doc_crc32)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET
                   phase = ?3, version = ?4, doc = ?5, doc_crc32 = ?6",
            )?
            .execute(params![
                rollout.id.to_string(),
                rollout.request_id.as_str(),
                rollout.phase.as_str(),
                i64::try_from(version).unwrap_or(i64::MAX),
                doc,
                crc
            ])?;
        Ok(())
    }

    fn append_event(&mut self, mut event: OperationEvent) -> Result<()> {
        self.wrote = true;
        self.conn
            .prepare_cached(
                "INSERT INTO events
                   (operation_id, machine_id, time, operation_type, kind, phase, stage, attempt, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                event.operation_id.to_string(),
                event.machine_id.as_str(),
                event.time.as_unix_micros(),
                event.operation_type.as_str(),
                event.kind.as_str(),
                event.phase.as_str(),
                event.stage,
                event.attempt,
                event.message
            ])?;
        event.revision = self.conn.last_insert_rowid() as u64;
        self.events.push(event);
        Ok(())
    }
}

/// Moves readable operations from `rows` into `out` until it holds `limit`. One unreadable
/// record must not stop every other operation from being taken up: it is skipped and stays
/// where it is, for a person to look at.
fn take_readable(
    rows: impl Iterator<Item = rusqlite::Result<Result<StoredOp>>>,
    limit: usize,
    out: &mut Vec<StoredOp>,
) -> Result<()> {
    for row in rows {
        if out.len() >= limit {
            break;
        }
        if let Some(op) = codec::skip_unreadable(row)? {
            out.push(op);
        }
    }
    Ok(())
}
