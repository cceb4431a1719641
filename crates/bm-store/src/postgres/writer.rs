//! The writer thread of a [`super::PgStore`]: group commit, several writers safe.
//!
//! As on SQLite, every write is a job sent to one thread that owns the writing connection;
//! it runs whatever jobs are queued in one transaction and commits once. What differs is
//! that other replicas write the same database at the same time:
//!
//! - every read a job makes before it writes locks what it reads (`SELECT ... FOR UPDATE`
//!   on the machine and the operation rows), so that "check everything, then write" holds
//!   against other processes too, and claims skip rows another replica has locked;
//! - each job runs under a savepoint: a job that meets a unique violation (another replica
//!   admitted the same request, or registered the same machine, first), a deadlock or a
//!   serialisation failure is rolled back alone and run again, now reading the winner's row,
//!   while the rest of the batch goes on;
//! - revisions of events (and of log lines) are taken at the END of the batch, just before
//!   the commit, from a one-row counter (`UPDATE counters SET value = value + n`): its row
//!   lock is held until the commit, so a later revision can never commit before an earlier
//!   one, and a rolled-back batch takes none (no gap);
//! - the commit `NOTIFY`s the other replicas, whose feeds then read the new rows.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use bm_domain::{
    LogLine, MacAddress, Machine, MachineId, Operation, OperationEvent, OperationId, RequestId,
    Timestamp,
};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Statement};

use super::{Feed, Rows, Target};
use crate::logic::{Holding, Indexed, StoredOp, Tx};
use crate::sqlite::codec as docs;
use crate::{Lease, Renewal, Result, StoreError};

/// How often a job that met a conflict with another writer is run again before its error
/// is returned.
const RETRIES: u32 = 5;

/// What one attempt of a job did.
pub(super) enum Ran {
    /// It met a conflict with another writer: roll it back and run it again.
    Retry,
    /// It ran; its writes are kept when `keep` says so.
    Done { keep: bool },
}

/// Called after the batch's commit with its result.
pub(super) type Reply = Box<dyn FnOnce(Result<(), Arc<StoreError>>) + Send>;

/// A write: attempted (maybe several times) in the batch transaction, then answered.
pub(super) struct Job {
    pub(super) attempt: Box<dyn FnMut(&mut PgTx<'_>) -> Ran + Send>,
    pub(super) reply: Reply,
}

pub(super) enum Command {
    Write(Job),
    Log(LogLine),
}

/// True when `e` is a conflict with another writer that running the job again resolves.
pub(super) fn is_conflict(e: &StoreError) -> bool {
    let StoreError::Backend(b) = e else {
        return false;
    };
    b.downcast_ref::<postgres::Error>()
        .and_then(postgres::Error::code)
        .is_some_and(|c| {
            *c == SqlState::UNIQUE_VIOLATION
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
        })
}

/// Wraps a job's function into attempts and a reply for the caller.
pub(super) fn job<T: Send + 'static>(
    mut f: impl FnMut(&mut PgTx<'_>) -> (Result<T>, bool) + Send + 'static,
    done: tokio::sync::oneshot::Sender<Result<T>>,
) -> Job {
    let slot: Arc<Mutex<Option<Result<T>>>> = Arc::new(Mutex::new(None));
    let result = slot.clone();
    let mut tries = 0;
    let attempt = move |tx: &mut PgTx<'_>| {
        let (r, keep) = f(tx);
        if let Err(e) = &r
            && is_conflict(e)
            && tries < RETRIES
        {
            tries += 1;
            return Ran::Retry;
        }
        let keep = keep && r.is_ok();
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        Ran::Done { keep }
    };
    let reply = move |commit: Result<(), Arc<StoreError>>| {
        let r = result.lock().unwrap_or_else(|e| e.into_inner()).take();
        let out = match (r, commit) {
            (Some(r), Ok(())) => r,
            (Some(Err(e)), Err(_)) if !e.is_transient() => Err(e),
            (_, Err(c)) if matches!(*c, StoreError::Unavailable(_)) => {
                Err(StoreError::Unavailable(Box::new(CommitFailed(c))))
            }
            (_, Err(c)) => Err(StoreError::Backend(Box::new(CommitFailed(c)))),
            (None, Ok(())) => Err(StoreError::Backend("the store job panicked".into())),
        };
        let _ = done.send(out);
    };
    Job {
        attempt: Box::new(attempt),
        reply: Box::new(reply),
    }
}

/// The commit of a batch failed; every write in it was rolled back.
#[derive(Debug, thiserror::Error)]
#[error("the write was not committed")]
pub(super) struct CommitFailed(#[source] pub(super) Arc<StoreError>);

/// A job's view of the batch transaction.
pub(super) struct PgTx<'a> {
    conn: &'a mut Client,
    stmts: &'a mut HashMap<&'static str, Statement>,
    /// Its events, given revisions at the end of the batch.
    events: Vec<OperationEvent>,
}

impl PgTx<'_> {
    fn st(&mut self, sql: &'static str) -> Result<Statement> {
        prepared(self.conn, self.stmts, sql)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>> {
        let st = self.st(sql)?;
        Ok(self.conn.query(&st, params)?)
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let st = self.st(sql)?;
        Ok(self.conn.execute(&st, params)?)
    }
}

fn prepared(
    conn: &mut Client,
    stmts: &mut HashMap<&'static str, Statement>,
    sql: &'static str,
) -> Result<Statement> {
    if let Some(s) = stmts.get(sql) {
        return Ok(s.clone());
    }
    let s = conn.prepare(sql)?;
    stmts.insert(sql, s.clone());
    Ok(s)
}

pub(super) struct Writer {
    pub(super) conn: Client,
    pub(super) target: Target,
    pub(super) rx: Receiver<Command>,
    pub(super) max_batch: usize,
    pub(super) feed: Arc<Feed>,
    pub(super) stmts: HashMap<&'static str, Statement>,
    /// Log lines of a batch whose commit failed because the database could not be reached:
    /// written with the next batch, so that an outage loses none.
    pub(super) unwritten: Vec<LogLine>,
    /// When the connection was last used.
    pub(super) last_used: std::time::Instant,
    /// Told whether the database answered.
    pub(super) condition: Arc<crate::condition::ConditionCell>,
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
            self.run_batch(batch);
        }
    }

    fn reconnect(&mut self) -> Result<()> {
        // A connection the database dropped while idle (it restarted) is found out only by
        // using it: after a quiet second, check it first, so that the batch does not fail.
        let idle = self.last_used.elapsed() > std::time::Duration::from_secs(1);
        if idle
            && !self.conn.is_closed()
            && self
                .conn
                .is_valid(std::time::Duration::from_secs(2))
                .is_err()
        {
            tracing::warn!("the store's database connection was lost while idle; reconnecting");
            self.conn = self.target.connect()?;
            self.stmts.clear();
        }
        self.last_used = std::time::Instant::now();
        if self.conn.is_closed() {
            tracing::warn!("the store's database connection was lost; reconnecting");
            self.conn = self.target.connect()?;
            self.stmts.clear();
        }
        Ok(())
    }

    fn run_batch(&mut self, batch: Vec<Command>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut jobs = Vec::with_capacity(batch.len());
        let mut lines = std::mem::take(&mut self.unwritten);
        for cmd in batch {
            match cmd {
                Command::Write(job) => jobs.push(job),
                Command::Log(line) => lines.push(line),
            }
        }
        let mut events = Vec::new();
        let mut logged = Vec::new();
        let result = (|| -> Result<Option<(u64, u64, u64, u64)>> {
            self.reconnect()?;
            self.conn.batch_execute("BEGIN")?;
            for job in &mut jobs {
                loop {
                    self.conn.batch_execute("SAVEPOINT job")?;
                    let mut tx = PgTx {
                        conn: &mut self.conn,
                        stmts: &mut self.stmts,
                        events: Vec::new(),
                    };
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        (job.attempt)(&mut tx)
                    }));
                    let written = std::mem::take(&mut tx.events);
                    match ran {
                        Ok(Ran::Done { keep: true }) => {
                            events.extend(written);
                            break;
                        }
                        Ok(Ran::Retry) => {
                            self.conn.batch_execute("ROLLBACK TO SAVEPOINT job")?;
                        }
                        Ok(Ran::Done { keep: false }) => {
                            self.conn.batch_execute("ROLLBACK TO SAVEPOINT job")?;
                            break;
                        }
                        Err(_) => {
                            tracing::error!("a store job panicked; its writes are rolled back");
                            self.conn.batch_execute("ROLLBACK TO SAVEPOINT job")?;
                            break;
                        }
                    }
                }
            }
            let mut ranges = None;
            let ev = self.insert_events(&mut events)?;
            let lg = self.insert_logs(&lines, &mut logged)?;
            if ev.is_some() || lg.is_some() {
                self.conn.batch_execute("NOTIFY bm_store")?;
                ranges = Some((
                    ev.map_or(0, |r| r.0),
                    ev.map_or(0, |r| r.1),
                    lg.map_or(0, |r| r.0),
                    lg.map_or(0, |r| r.1),
                ));
            }
            self.conn.batch_execute("COMMIT")?;
            Ok(ranges)
        })();
        for job in jobs {
            replies.push(job.reply);
        }
        match &result {
            Err(e @ StoreError::Unavailable(_)) => self.condition.unreachable(&super::chain(e)),
            _ => self.condition.reached(),
        }
        match result {
            Ok(ranges) => {
                if let Some((ev_first, ev_last, lg_first, lg_last)) = ranges {
                    self.feed.committed(
                        &mut self.conn,
                        (ev_first, ev_last, events),
                        (lg_first, lg_last, logged),
                    );
                }
                for r in replies {
                    r(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %super::chain(&e), "store commit failed; the batch is rolled back");
                if !self.conn.is_closed() {
                    let _ = self.conn.batch_execute("ROLLBACK");
                }
                if !lines.is_empty() {
                    if matches!(e, StoreError::Unavailable(_)) {
                        // Kept for the next batch (the executors' writes retry, so one comes).
                        self.unwritten = lines;
                    } else {
                        tracing::warn!(lines = lines.len(), "log lines dropped");
                    }
                }
                let e = Arc::new(e);
                for r in replies {
                    r(Err(e.clone()));
                }
            }
        }
    }

    /// Takes revisions for `events` and inserts them; returns the range taken.
    fn insert_events(&mut self, events: &mut [OperationEvent]) -> Result<Option<(u64, u64)>> {
        if events.is_empty() {
            return Ok(None);
        }
        let n = events.len() as i64;
        let st = prepared(
            &mut self.conn,
            &mut self.stmts,
            "UPDATE counters SET value = value + $1 WHERE name = 'events' RETURNING value",
        )?;
        let last: i64 = self.conn.query_one(&st, &[&n])?.get(0);
        let first = last - n + 1;
        let mut cols = EventColumns::default();
        for (i, e) in events.iter_mut().enumerate() {
            e.revision = (first + i as i64) as u64;
            cols.push(e);
        }
        let st = prepared(
            &mut self.conn,
            &mut self.stmts,
            "INSERT INTO events
               (revision, operation_id, machine_id, time, operation_type, kind, phase, stage, attempt, message)
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                                  $6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[])",
        )?;
        self.conn.execute(
            &st,
            &[
                &cols.revision,
                &cols.operation_id,
                &cols.machine_id,
                &cols.time,
                &cols.operation_type,
                &cols.kind,
                &cols.phase,
                &cols.stage,
                &cols.attempt,
                &cols.message,
            ],
        )?;
        Ok(Some((first as u64, last as u64)))
    }

    /// Takes revisions for `lines` and inserts those not stored yet (into `inserted`);
    /// returns the range taken.
    fn insert_logs(
        &mut self,
        lines: &[LogLine],
        inserted: &mut Vec<(u64, LogLine)>,
    ) -> Result<Option<(u64, u64)>> {
        if lines.is_empty() {
            return Ok(None);
        }
        let n = lines.len() as i64;
        let st = prepared(
            &mut self.conn,
            &mut self.stmts,
            "UPDATE counters SET value = value + $1 WHERE name = 'logs' RETURNING value",
        )?;
        let last: i64 = self.conn.query_one(&st, &[&n])?.get(0);
        let first = last - n + 1;
        let revs: Vec<i64> = (first..=last).collect();
        let ops: Vec<String> = lines.iter().map(|l| l.operation_id.to_string()).collect();
        let seqs: Vec<i64> = lines.iter().map(|l| l.sequence as i64).collect();
        let times: Vec<i64> = lines.iter().map(|l| l.time.as_unix_micros()).collect();
        let stages: Vec<&str> = lines.iter().map(|l| l.stage.as_str()).collect();
        let tags: Vec<&str> = lines.iter().map(|l| l.tag.as_str()).collect();
        let msgs: Vec<&str> = lines.iter().map(|l| l.message.as_str()).collect();
        let st = prepared(
            &mut self.conn,
            &mut self.stmts,
            "INSERT INTO logs (log_revision, operation_id, sequence, time, stage, tag, message)
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::text[],
                                  $6::text[], $7::text[])
             ON CONFLICT DO NOTHING
             RETURNING log_revision",
        )?;
        let rows = self
            .conn
            .query(&st, &[&revs, &ops, &seqs, &times, &stages, &tags, &msgs])?;
        let mut kept: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        kept.sort_unstable();
        for rev in kept {
            if let Some(line) = lines.get((rev - first) as usize) {
                inserted.push((rev as u64, line.clone()));
            }
        }
        Ok(Some((first as u64, last as u64)))
    }
}

/// Events as columns, for one `UNNEST` insert.
#[derive(Default)]
struct EventColumns {
    revision: Vec<i64>,
    operation_id: Vec<String>,
    machine_id: Vec<String>,
    time: Vec<i64>,
    operation_type: Vec<&'static str>,
    kind: Vec<&'static str>,
    phase: Vec<&'static str>,
    stage: Vec<String>,
    attempt: Vec<i64>,
    message: Vec<String>,
}

impl EventColumns {
    fn push(&mut self, e: &OperationEvent) {
        self.revision.push(e.revision as i64);
        self.operation_id.push(e.operation_id.to_string());
        self.machine_id.push(e.machine_id.as_str().to_owned());
        self.time.push(e.time.as_unix_micros());
        self.operation_type.push(e.operation_type.as_str());
        self.kind.push(e.kind.as_str());
        self.phase.push(e.phase.as_str());
        self.stage.push(e.stage.clone());
        self.attempt.push(i64::from(e.attempt));
        self.message.push(e.message.clone());
    }
}

impl Tx for PgTx<'_> {
    fn machine(&mut self, id: &MachineId) -> Result<Option<Machine>> {
        // Locked until the commit: what is checked here stays true until it is written.
        let rows = self.query(
            "SELECT id, doc, doc_crc32 FROM machines WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )?;
        rows.first().map(Rows::machine).transpose()
    }

    fn put_machine(&mut self, m: &Machine, indexed: Indexed<'_>) -> Result<()> {
        let (doc, crc) = docs::to_json(m)?;
        self.execute(
            "INSERT INTO machines (id, phase, effective_state, doc, doc_crc32)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET
               phase = $2, effective_state = $3, doc = $4, doc_crc32 = $5",
            &[
                &m.id.as_str(),
                &m.status.phase.as_str(),
                &m.effective_state().as_str(),
                &doc,
                &crc,
            ],
        )?;
        let old_macs = match indexed {
            Indexed::New => Some(&[][..]),
            Indexed::Unchanged => None,
            Indexed::Was { macs, .. } => (macs != m.spec.mac_addresses.as_slice()).then_some(macs),
        };
        if let Some(old) = old_macs {
            for mac in old {
                self.execute(
                    "DELETE FROM machine_macs WHERE mac = $1 AND machine_id = $2",
                    &[&mac.to_string(), &m.id.as_str()],
                )?;
            }
            for mac in &m.spec.mac_addresses {
                self.execute(
                    "INSERT INTO machine_macs (mac, machine_id) VALUES ($1, $2)",
                    &[&mac.to_string(), &m.id.as_str()],
                )?;
            }
        }
        Ok(())
    }

    fn mac_owner(&mut self, mac: &MacAddress) -> Result<Option<MachineId>> {
        let rows = self.query(
            "SELECT machine_id FROM machine_macs WHERE mac = $1",
            &[&mac.to_string()],
        )?;
        rows.first()
            .map(|r| {
                MachineId::new(r.get::<_, String>(0))
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .transpose()
    }

    fn operation(&mut self, id: OperationId) -> Result<Option<StoredOp>> {
        let rows = self.query(
            "SELECT id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation
             FROM operations WHERE id = $1 FOR UPDATE",
            &[&id.to_string()],
        )?;
        rows.first().map(Rows::stored_op).transpose()
    }

    fn holding(&mut self, id: OperationId) -> Result<Option<Holding>> {
        // Locked: a claim by another replica waits for this write, or this write sees it.
        let rows = self.query(
            "SELECT phase IN ('PENDING', 'RUNNING'), cancel_requested, lease_owner, lease_expires,
                    lease_generation
             FROM operations WHERE id = $1 FOR UPDATE",
            &[&id.to_string()],
        )?;
        Ok(rows.first().map(|r| {
            let owner: Option<String> = r.get(2);
            let expires: Option<i64> = r.get(3);
            Holding {
                active: r.get(0),
                cancel_requested: r.get(1),
                generation: r.get::<_, i64>(4).cast_unsigned(),
                lease: owner.map(|owner| Lease {
                    owner,
                    expires_at: Timestamp::from_unix_micros(expires.unwrap_or(0)),
                }),
            }
        }))
    }

    fn operation_by_request(
        &mut self,
        machine: &MachineId,
        request: &RequestId,
    ) -> Result<Option<Operation>> {
        // The machine's row is locked first: a replica admitting on the same machine waits
        // here until the other commits, and then finds its operation.
        self.query(
            "SELECT 1 FROM machines WHERE id = $1 FOR UPDATE",
            &[&machine.as_str()],
        )?;
        let rows = self.query(
            "SELECT id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation
             FROM operations WHERE machine_id = $1 AND request_id = $2",
            &[&machine.as_str(), &request.as_str()],
        )?;
        Ok(rows.first().map(Rows::stored_op).transpose()?.map(|s| s.op))
    }

    fn put_operation(
        &mut self,
        op: &Operation,
        lease: Option<&Lease>,
        generation: u64,
    ) -> Result<()> {
        let (doc, crc) = docs::to_json(op)?;
        self.execute(
            "INSERT INTO operations
               (id, machine_id, type, phase, request_id, cancel_requested, lease_owner, lease_expires, doc, doc_crc32,
                lease_generation)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET
               phase = $4, cancel_requested = $6, lease_owner = $7, lease_expires = $8,
               doc = $9, doc_crc32 = $10, lease_generation = $11",
            &[
                &op.id.to_string(),
                &op.machine_id.as_str(),
                &op.op_type.as_str(),
                &op.phase.as_str(),
                &op.request_id.as_str(),
                &op.cancel_requested,
                &lease.map(|l| l.owner.as_str()),
                &lease.map(|l| l.expires_at.as_unix_micros()),
                &doc,
                &crc,
                &generation.cast_signed(),
            ],
        )?;
        Ok(())
    }

    fn claimable(&mut self, now: Timestamp, limit: usize) -> Result<Vec<StoredOp>> {
        // Rows another replica is claiming or writing are skipped, not waited for.
        let mut out = Vec::new();
        let lim = limit as i64;
        let rows = self.query(
            "SELECT id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation
             FROM operations
             WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NULL
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&lim],
        )?;
        take_readable(&rows, limit, &mut out);
        if out.len() < limit {
            let rows = self.query(
                "SELECT id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation
                 FROM operations
                 WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NOT NULL
                   AND lease_expires < $1
                 ORDER BY lease_expires LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&now.as_unix_micros(), &lim],
            )?;
            take_readable(&rows, limit, &mut out);
        }
        Ok(out)
    }

    fn renew_leases(&mut self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<Renewal> {
        let ids: Vec<String> = held.iter().map(|(id, _)| id.to_string()).collect();
        let generations: Vec<i64> = held.iter().map(|(_, g)| g.cast_signed()).collect();
        let rows = self.query(
            "UPDATE operations AS o SET lease_expires = $4
             FROM UNNEST($1::text[], $2::bigint[]) AS h (id, generation)
             WHERE o.id = h.id AND o.lease_generation = h.generation AND o.lease_owner = $3
               AND o.phase IN ('PENDING', 'RUNNING')
             RETURNING o.id, o.lease_generation, o.cancel_requested",
            &[
                &ids,
                &generations,
                &lease.owner,
                &lease.expires_at.as_unix_micros(),
            ],
        )?;
        let renewed: HashMap<(String, i64), bool> = rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        // In the order asked, as the other backends answer.
        let mut renewal = Renewal::default();
        for (((id, _), key), generation) in held.iter().zip(ids).zip(generations) {
            match renewed.get(&(key, generation)) {
                None => renewal.lost.push(*id),
                Some(true) => renewal.canceled.push(*id),
                Some(false) => {}
            }
        }
        Ok(renewal)
    }

    fn release_leases(&mut self, owner: &str) -> Result<usize> {
        Ok(self.execute(
            "UPDATE operations SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner = $1",
            &[&owner],
        )? as usize)
    }

    fn append_event(&mut self, event: OperationEvent) -> Result<()> {
        self.events.push(event);
        Ok(())
    }
}

/// Moves readable operations into `out` until it holds `limit`; an unreadable one is
/// reported and left where it is.
fn take_readable(rows: &[postgres::Row], limit: usize, out: &mut Vec<StoredOp>) {
    for row in rows {
        if out.len() >= limit {
            break;
        }
        match Rows::stored_op(row) {
            Ok(s) => out.push(s),
            Err(e) => docs::report_unreadable(&e),
        }
    }
}
