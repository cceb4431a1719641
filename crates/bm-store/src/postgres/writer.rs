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
//! - except keyed jobs (see [`Keys`]: admissions and the executors' fenced writes), which
//!   run first in the batch, together: one savepoint, one locking read and one write-back
//!   per table for all of them (plus one lookup of the admissions' request ids), the jobs
//!   themselves in memory against the locked rows (undone there when they fail); should
//!   that fail, they run again job by job as above;
//! - revisions of events (and of log lines) are taken at the END of the batch, just before
//!   the commit, from a one-row counter (`UPDATE counters SET value = value + n`): its row
//!   lock is held until the commit, so a later revision can never commit before an earlier
//!   one, and a rolled-back batch takes none (no gap);
//! - the commit `NOTIFY`s the other replicas, whose feeds then read the new rows.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use bm_domain::{
    LogLine, MacAddress, Machine, MachineEvent, MachineId, Operation, OperationEvent, OperationId,
    RequestId, Rollout, RolloutId, Timestamp,
};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Statement};

use super::{Feed, Rows, Target};
use crate::logic::{Holding, Indexed, StoredOp, Tx};
use crate::sqlite::codec as docs;
use crate::{Claimed, Lease, Renewal, Result, StoreError, StoredRollout};

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
    /// For a keyed job, the rows it reads and writes (see [`Keys`]).
    pub(super) keys: Option<Keys>,
}

impl Job {
    /// Declares the job keyed: it reads and writes only these rows, and only through
    /// [`Tx::holding`], [`Tx::operation`], [`Tx::machine`], [`Tx::operation_by_request`],
    /// [`Tx::put_operation`], [`Tx::put_machine`] with [`Indexed::Unchanged`] and
    /// [`Tx::append_event`], writing only machines it has read (an operation it has not
    /// read is a new one).
    pub(super) fn keyed(mut self, keys: Keys) -> Job {
        self.keys = Some(keys);
        self
    }
}

/// The rows of a keyed job. Consecutive keyed jobs of a batch run as a segment: their rows
/// are locked and read with one statement per table, the jobs run against those rows in
/// memory, and what they wrote is written back with one statement per table.
#[derive(Clone, Debug, Default)]
pub(super) struct Keys {
    pub(super) operations: Vec<OperationId>,
    pub(super) machines: Vec<MachineId>,
    /// Operations looked up by request id ([`Tx::operation_by_request`]), on machines of
    /// `machines` (locked before the lookup).
    pub(super) requests: Vec<(MachineId, RequestId)>,
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
        keys: None,
    }
}

/// The commit of a batch failed; every write in it was rolled back.
#[derive(Debug, thiserror::Error)]
#[error("the write was not committed")]
pub(super) struct CommitFailed(#[source] pub(super) Arc<StoreError>);

/// The rows of a segment of keyed jobs, locked (`FOR UPDATE`) until the commit, as the
/// segment's jobs have left them so far. `None`: no such row.
#[derive(Default)]
struct Cache {
    operations: HashMap<OperationId, Option<StoredOp>>,
    machines: HashMap<MachineId, Option<Machine>>,
    /// The operation of each request id looked up (read after its machine was locked).
    requests: HashMap<(MachineId, RequestId), Option<Operation>>,
    /// Rows written by a job that ended well, to write back.
    dirty_operations: BTreeSet<OperationId>,
    /// Of those, the operations that are new rows.
    new_operations: BTreeSet<OperationId>,
    dirty_machines: BTreeSet<MachineId>,
    /// A statement run for a job of the segment failed: the transaction may be aborted, so
    /// the segment is run again the old way.
    broken: bool,
}

/// What one keyed job wrote, kept apart until it ends well (then it goes into the
/// [`Cache`]; otherwise it is dropped, which undoes it).
#[derive(Default)]
struct Pending {
    operations: HashMap<OperationId, StoredOp>,
    machines: HashMap<MachineId, Machine>,
    /// Of `operations`, those that were no row before.
    new_operations: BTreeSet<OperationId>,
}

/// A job's view of the batch transaction.
pub(super) struct PgTx<'a> {
    conn: &'a mut Client,
    stmts: &'a mut HashMap<&'static str, Statement>,
    /// Its events, given revisions at the end of the batch.
    events: Vec<OperationEvent>,
    /// For a keyed job, its segment's rows; its reads and writes go there, not to the
    /// database.
    cache: Option<&'a mut Cache>,
    /// For a keyed job, what it wrote.
    pending: Pending,
    /// The machine row [`Tx::operation_by_request`] locked, read with the lock: the
    /// admission's next read of it, which follows at once, needs no statement of its own.
    locked_machine: Option<(MachineId, Option<postgres::Row>)>,
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
        let r = self
            .st(sql)
            .and_then(|st| Ok(self.conn.query(&st, params)?));
        if r.is_err()
            && let Some(c) = self.cache.as_deref_mut()
        {
            c.broken = true;
        }
        r
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let st = self.st(sql)?;
        Ok(self.conn.execute(&st, params)?)
    }

    /// Refuses what a keyed job must not do.
    fn eager_only(&self, what: &str) -> Result<()> {
        if self.cache.is_some() {
            return Err(StoreError::Backend(
                format!("a keyed store job cannot {what}").into(),
            ));
        }
        Ok(())
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

    /// Runs one batch in one transaction; whether it committed.
    fn run_batch(&mut self, batch: Vec<Command>) -> bool {
        let mut replies = Vec::with_capacity(batch.len());
        let mut jobs = Vec::with_capacity(batch.len());
        let mut lines = std::mem::take(&mut self.unwritten);
        for cmd in batch {
            match cmd {
                Command::Write(job) => jobs.push(job),
                Command::Log(line) => lines.push(line),
            }
        }
        // Keyed jobs first, as one segment. Any order of a batch's jobs is one the callers
        // could have seen: none of them has been answered yet (answers follow the commit),
        // so none was waiting for another; each caller's own jobs keep their order.
        jobs.sort_by_key(|j| j.keys.is_none());
        let mut events = Vec::new();
        let mut logged = Vec::new();
        let result = (|| -> Result<Option<(u64, u64, u64, u64)>> {
            self.reconnect()?;
            self.conn.batch_execute("BEGIN")?;
            let mut i = 0;
            while i < jobs.len() {
                if jobs[i].keys.is_some() {
                    let end = (i..jobs.len())
                        .find(|&k| jobs[k].keys.is_none())
                        .unwrap_or(jobs.len());
                    self.run_segment(&mut jobs[i..end], &mut events)?;
                    i = end;
                } else {
                    self.run_eager(&mut jobs[i], &mut events)?;
                    i += 1;
                }
            }
            let mut ranges = None;
            let ev = self.insert_events(&mut events)?;
            let lg = self.insert_logs(&lines, &mut logged)?;
            if ev.is_some() || lg.is_some() {
                ranges = Some((
                    ev.map_or(0, |r| r.0),
                    ev.map_or(0, |r| r.1),
                    lg.map_or(0, |r| r.0),
                    lg.map_or(0, |r| r.1),
                ));
                // One round trip for both.
                self.conn.batch_execute("NOTIFY bm_store; COMMIT")?;
            } else {
                self.conn.batch_execute("COMMIT")?;
            }
            Ok(ranges)
        })();
        for job in jobs {
            replies.push(job.reply);
        }
        super::note_reach(&self.condition, &result);
        let committed = result.is_ok();
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
        committed
    }

    /// Runs a job under a savepoint of its own, its reads and writes as statements: again
    /// (after rolling it back) when it meets a conflict with another writer.
    fn run_eager(&mut self, job: &mut Job, events: &mut Vec<OperationEvent>) -> Result<()> {
        loop {
            self.conn.batch_execute("SAVEPOINT job")?;
            let mut tx = PgTx {
                conn: &mut self.conn,
                stmts: &mut self.stmts,
                events: Vec::new(),
                cache: None,
                pending: Pending::default(),
                locked_machine: None,
            };
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.attempt)(&mut tx)));
            let written = std::mem::take(&mut tx.events);
            match ran {
                Ok(Ran::Done { keep: true }) => {
                    events.extend(written);
                    return Ok(());
                }
                Ok(Ran::Retry) => {
                    self.conn.batch_execute("ROLLBACK TO SAVEPOINT job")?;
                }
                Ok(Ran::Done { keep: false }) => {
                    self.conn.batch_execute("ROLLBACK TO SAVEPOINT job")?;
                    return Ok(());
                }
                Err(_) => {
                    tracing::error!("a store job panicked; its writes are rolled back");
                    self.conn.batch_execute("ROLLBACK TO SAVEPOINT job")?;
                    return Ok(());
                }
            }
        }
    }

    /// Runs consecutive keyed jobs together (see [`Keys`]): their rows locked and read at
    /// once, under a savepoint; the jobs run in memory, one after the other, each seeing
    /// what the earlier ones wrote; the rows they changed written back at once. Should any
    /// of that fail (a conflict with another writer while locking, an unreadable row), it
    /// is rolled back to the savepoint and the jobs run again one by one, each under its own
    /// savepoint, as other jobs do.
    fn run_segment(&mut self, jobs: &mut [Job], events: &mut Vec<OperationEvent>) -> Result<()> {
        self.conn.batch_execute("SAVEPOINT segment")?;
        match self.try_segment(jobs) {
            Ok(written) => {
                events.extend(written);
                return Ok(());
            }
            Err(e) if self.conn.is_closed() => return Err(e),
            Err(e) => {
                if is_conflict(&e) {
                    tracing::debug!(error = %super::chain(&e), "keyed store jobs met another writer; running them one by one");
                } else {
                    tracing::warn!(error = %super::chain(&e), "keyed store jobs failed together; running them one by one");
                }
                self.conn.batch_execute("ROLLBACK TO SAVEPOINT segment")?;
            }
        }
        for job in jobs {
            self.run_eager(job, events)?;
        }
        Ok(())
    }

    /// Runs a segment in memory and writes it back; returns its events.
    fn try_segment(&mut self, jobs: &mut [Job]) -> Result<Vec<OperationEvent>> {
        let mut ops = BTreeSet::new();
        let mut machines = BTreeSet::new();
        let mut requests = BTreeSet::new();
        for keys in jobs.iter().filter_map(|j| j.keys.as_ref()) {
            ops.extend(keys.operations.iter().map(ToString::to_string));
            machines.extend(keys.machines.iter().map(|m| m.as_str().to_owned()));
            requests.extend(
                keys.requests
                    .iter()
                    .map(|(m, r)| (m.as_str().to_owned(), r.as_str().to_owned())),
            );
        }
        let mut cache = Cache::default();
        // Operations first, then machines, each in id order: the order in which a job run
        // alone locks them.
        if !ops.is_empty() {
            let ids: Vec<String> = ops.into_iter().collect();
            let st = prepared(
                &mut self.conn,
                &mut self.stmts,
                "SELECT id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation
                 FROM operations WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            )?;
            for row in self.conn.query(&st, &[&ids])? {
                let s = Rows::stored_op(&row)?;
                cache.operations.insert(s.op.id, Some(s));
            }
        }
        if !machines.is_empty() {
            let ids: Vec<String> = machines.into_iter().collect();
            let st = prepared(
                &mut self.conn,
                &mut self.stmts,
                "SELECT id, doc, doc_crc32 FROM machines WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            )?;
            for row in self.conn.query(&st, &[&ids])? {
                let m = Rows::machine(&row)?;
                cache.machines.insert(m.id.clone(), Some(m));
            }
        }
        if !requests.is_empty() {
            // After the machines' locks, as an admission run alone looks it up: an admission
            // of another replica on the same machine has committed by now, or waits.
            let (on, ids): (Vec<String>, Vec<String>) = requests.into_iter().unzip();
            let st = prepared(
                &mut self.conn,
                &mut self.stmts,
                "SELECT id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation
                 FROM operations
                 WHERE (machine_id, request_id) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
            )?;
            for row in self.conn.query(&st, &[&on, &ids])? {
                let s = Rows::stored_op(&row)?;
                cache.requests.insert(
                    (s.op.machine_id.clone(), s.op.request_id.clone()),
                    Some(s.op),
                );
            }
        }
        for keys in jobs.iter().filter_map(|j| j.keys.as_ref()) {
            for key in &keys.requests {
                cache.requests.entry(key.clone()).or_insert(None);
            }
            for id in &keys.operations {
                cache.operations.entry(*id).or_insert(None);
            }
            for id in &keys.machines {
                cache.machines.entry(id.clone()).or_insert(None);
            }
        }
        let mut events = Vec::new();
        for job in jobs.iter_mut() {
            let mut tx = PgTx {
                conn: &mut self.conn,
                stmts: &mut self.stmts,
                events: Vec::new(),
                cache: Some(&mut cache),
                pending: Pending::default(),
                locked_machine: None,
            };
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.attempt)(&mut tx)));
            let written = std::mem::take(&mut tx.events);
            let pending = std::mem::take(&mut tx.pending);
            drop(tx);
            if cache.broken {
                return Err(StoreError::Backend(
                    "a statement of a keyed store job failed".into(),
                ));
            }
            match ran {
                Ok(Ran::Done { keep: true }) => {
                    events.extend(written);
                    for (id, s) in pending.operations {
                        if pending.new_operations.contains(&id) {
                            cache.new_operations.insert(id);
                        }
                        cache.requests.insert(
                            (s.op.machine_id.clone(), s.op.request_id.clone()),
                            Some(s.op.clone()),
                        );
                        cache.operations.insert(id, Some(s));
                        cache.dirty_operations.insert(id);
                    }
                    for (id, m) in pending.machines {
                        cache.dirty_machines.insert(id.clone());
                        cache.machines.insert(id, Some(m));
                    }
                }
                Ok(Ran::Retry) => {
                    // Only a statement meets a conflict, and none failed: not expected.
                    return Err(StoreError::Backend(
                        "a keyed store job asked to be run again".into(),
                    ));
                }
                // Its writes, kept apart, are dropped.
                Ok(Ran::Done { keep: false }) => {}
                Err(_) => {
                    tracing::error!("a store job panicked; its writes are rolled back");
                }
            }
        }
        self.write_back(&cache)?;
        Ok(events)
    }

    /// Writes the rows a segment changed (they exist and are locked by this transaction, or
    /// are new operations).
    fn write_back(&mut self, cache: &Cache) -> Result<()> {
        if !cache.dirty_operations.is_empty() {
            // Updates first: an operation ended here frees its machine for one admitted here.
            let (mut old, mut new) = (OperationColumns::default(), OperationColumns::default());
            for id in &cache.dirty_operations {
                if let Some(Some(s)) = cache.operations.get(id) {
                    let cols = if cache.new_operations.contains(id) {
                        &mut new
                    } else {
                        &mut old
                    };
                    cols.push(&s.op, s.lease.as_ref(), s.generation)?;
                }
            }
            if !old.id.is_empty() {
                old.update(&mut self.conn, &mut self.stmts)?;
            }
            if !new.id.is_empty() {
                new.insert(&mut self.conn, &mut self.stmts)?;
            }
        }
        if !cache.dirty_machines.is_empty() {
            let (mut ids, mut phases, mut states, mut docs_, mut crcs) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for id in &cache.dirty_machines {
                if let Some(Some(m)) = cache.machines.get(id) {
                    let (doc, crc) = docs::to_json(m)?;
                    ids.push(m.id.as_str().to_owned());
                    phases.push(m.status.phase.as_str());
                    states.push(m.effective_state().as_str());
                    docs_.push(doc);
                    crcs.push(crc);
                }
            }
            let st = prepared(
                &mut self.conn,
                &mut self.stmts,
                "UPDATE machines AS m SET
                   phase = u.phase, effective_state = u.effective_state, doc = u.doc,
                   doc_crc32 = u.doc_crc32
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                   AS u (id, phase, effective_state, doc, doc_crc32)
                 WHERE m.id = u.id",
            )?;
            let n = self
                .conn
                .execute(&st, &[&ids, &phases, &states, &docs_, &crcs])?;
            if n != ids.len() as u64 {
                return Err(StoreError::Backend(
                    format!("{n} of {} machines written back", ids.len()).into(),
                ));
            }
        }
        Ok(())
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

/// Operations as columns, for one `UNNEST` update.
#[derive(Default)]
struct OperationColumns {
    id: Vec<String>,
    machine_id: Vec<String>,
    op_type: Vec<&'static str>,
    request_id: Vec<String>,
    phase: Vec<&'static str>,
    cancel_requested: Vec<bool>,
    lease_owner: Vec<Option<String>>,
    lease_expires: Vec<Option<i64>>,
    doc: Vec<String>,
    crc: Vec<i64>,
    generation: Vec<i64>,
}

impl OperationColumns {
    /// The columns `put_operation` writes to an existing row.
    fn push(&mut self, op: &Operation, lease: Option<&Lease>, generation: u64) -> Result<()> {
        let (doc, crc) = docs::to_json(op)?;
        self.id.push(op.id.to_string());
        self.machine_id.push(op.machine_id.as_str().to_owned());
        self.op_type.push(op.op_type.as_str());
        self.request_id.push(op.request_id.as_str().to_owned());
        self.phase.push(op.phase.as_str());
        self.cancel_requested.push(op.cancel_requested);
        self.lease_owner.push(lease.map(|l| l.owner.clone()));
        self.lease_expires
            .push(lease.map(|l| l.expires_at.as_unix_micros()));
        self.doc.push(doc);
        self.crc.push(crc);
        self.generation.push(generation.cast_signed());
        Ok(())
    }

    /// Inserts the rows, new operations, with one statement.
    fn insert(
        &self,
        conn: &mut Client,
        stmts: &mut HashMap<&'static str, Statement>,
    ) -> Result<()> {
        let st = prepared(
            conn,
            stmts,
            "INSERT INTO operations
               (id, machine_id, type, phase, request_id, cancel_requested, lease_owner, lease_expires,
                doc, doc_crc32, lease_generation)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::bool[], $7::text[], $8::bigint[], $9::text[], $10::bigint[],
                                  $11::bigint[])",
        )?;
        conn.execute(
            &st,
            &[
                &self.id,
                &self.machine_id,
                &self.op_type,
                &self.phase,
                &self.request_id,
                &self.cancel_requested,
                &self.lease_owner,
                &self.lease_expires,
                &self.doc,
                &self.crc,
                &self.generation,
            ],
        )?;
        Ok(())
    }

    /// Writes the rows, which exist and are locked by this transaction, with one statement.
    fn update(
        &self,
        conn: &mut Client,
        stmts: &mut HashMap<&'static str, Statement>,
    ) -> Result<()> {
        let st = prepared(
            conn,
            stmts,
            "UPDATE operations AS o SET
               phase = u.phase, cancel_requested = u.cancel_requested,
               lease_owner = u.lease_owner, lease_expires = u.lease_expires,
               doc = u.doc, doc_crc32 = u.doc_crc32, lease_generation = u.lease_generation
             FROM UNNEST($1::text[], $2::text[], $3::bool[], $4::text[], $5::bigint[],
                         $6::text[], $7::bigint[], $8::bigint[])
               AS u (id, phase, cancel_requested, lease_owner, lease_expires, doc, doc_crc32,
                     lease_generation)
             WHERE o.id = u.id",
        )?;
        let n = conn.execute(
            &st,
            &[
                &self.id,
                &self.phase,
                &self.cancel_requested,
                &self.lease_owner,
                &self.lease_expires,
                &self.doc,
                &self.crc,
                &self.generation,
            ],
        )?;
        if n != self.id.len() as u64 {
            return Err(StoreError::Backend(
                format!("{n} of {} operations written back", self.id.len()).into(),
            ));
        }
        Ok(())
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
        if let Some(m) = self.pending.machines.get(id) {
            return Ok(Some(m.clone()));
        }
        if let Some(m) = self.cache.as_deref().and_then(|c| c.machines.get(id)) {
            return Ok(m.clone());
        }
        if let Some((locked, row)) = self.locked_machine.take()
            && locked == *id
        {
            return row.as_ref().map(Rows::machine).transpose();
        }
        // Locked until the commit: what is checked here stays true until it is written.
        let rows = self.query(
            "SELECT id, doc, doc_crc32 FROM machines WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )?;
        let m = rows.first().map(Rows::machine).transpose()?;
        if let Some(c) = self.cache.as_deref_mut() {
            // A row the job did not declare: read (and locked) now, kept with the others.
            c.machines.insert(id.clone(), m.clone());
        }
        Ok(m)
    }

    fn put_machine(&mut self, m: &Machine, indexed: Indexed<'_>) -> Result<()> {
        self.locked_machine = None;
        if let Some(c) = self.cache.as_deref() {
            if !matches!(indexed, Indexed::Unchanged) {
                return self.eager_only("change a machine's indexes");
            }
            if self.pending.machines.contains_key(&m.id)
                || c.machines.get(&m.id).is_some_and(Option::is_some)
            {
                self.pending.machines.insert(m.id.clone(), m.clone());
                return Ok(());
            }
            return self.eager_only("write a machine it has not read");
        }
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
        self.eager_only("read the MAC index")?;
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
        if let Some(s) = self.pending.operations.get(&id) {
            return Ok(Some(s.clone()));
        }
        if let Some(s) = self.cache.as_deref().and_then(|c| c.operations.get(&id)) {
            return Ok(s.clone());
        }
        let rows = self.query(
            "SELECT id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation
             FROM operations WHERE id = $1 FOR UPDATE",
            &[&id.to_string()],
        )?;
        let s = rows.first().map(Rows::stored_op).transpose()?;
        if let Some(c) = self.cache.as_deref_mut() {
            c.operations.insert(id, s.clone());
        }
        Ok(s)
    }

    fn holding(&mut self, id: OperationId) -> Result<Option<Holding>> {
        if self.cache.is_some() {
            // The row as locked (or as an earlier job of the segment left it): the same
            // columns the statement below reads.
            return Ok(self.operation(id)?.map(|s| Holding {
                active: s.op.is_active(),
                cancel_requested: s.op.cancel_requested,
                generation: s.generation,
                lease: s.lease,
            }));
        }
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
        if let Some(c) = self.cache.as_deref() {
            let key = (machine.clone(), request.clone());
            if let Some(s) = self
                .pending
                .operations
                .values()
                .find(|s| s.op.machine_id == key.0 && s.op.request_id == key.1)
            {
                return Ok(Some(s.op.clone()));
            }
            return match c.requests.get(&key) {
                Some(found) => Ok(found.clone()),
                None => self
                    .eager_only("look up a request it did not declare")
                    .map(|()| None),
            };
        }
        // The machine's row is locked first: a replica admitting on the same machine waits
        // here until the other commits, and then finds its operation.
        let locked = self.query(
            "SELECT id, doc, doc_crc32 FROM machines WHERE id = $1 FOR UPDATE",
            &[&machine.as_str()],
        )?;
        self.locked_machine = Some((machine.clone(), locked.into_iter().next()));
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
        if let Some(c) = self.cache.as_deref() {
            if self.pending.operations.contains_key(&op.id)
                || c.operations.get(&op.id).is_some_and(Option::is_some)
            {
                self.pending.operations.insert(
                    op.id,
                    StoredOp {
                        op: op.clone(),
                        lease: lease.cloned(),
                        generation,
                    },
                );
                return Ok(());
            }
            // No such row (as far as the job knows): a new one, inserted at the write-back
            // (where a row that exists after all fails the segment, which then runs job by
            // job).
            self.pending.new_operations.insert(op.id);
            self.pending.operations.insert(
                op.id,
                StoredOp {
                    op: op.clone(),
                    lease: lease.cloned(),
                    generation,
                },
            );
            return Ok(());
        }
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
        self.eager_only("claim")?;
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

    fn put_claimed(&mut self, claimed: &[Claimed], lease: &Lease) -> Result<()> {
        self.eager_only("claim")?;
        if claimed.is_empty() {
            return Ok(());
        }
        // The rows were locked by `claimable`, and a claim changes only their lease: one
        // statement writes the leases of all (the documents stay as they are).
        let ids: Vec<String> = claimed.iter().map(|c| c.operation.id.to_string()).collect();
        let generations: Vec<i64> = claimed
            .iter()
            .map(|c| c.fence.generation.cast_signed())
            .collect();
        let n = self.execute(
            "UPDATE operations AS o SET
               lease_owner = $3, lease_expires = $4, lease_generation = u.generation
             FROM UNNEST($1::text[], $2::bigint[]) AS u (id, generation)
             WHERE o.id = u.id",
            &[
                &ids,
                &generations,
                &lease.owner,
                &lease.expires_at.as_unix_micros(),
            ],
        )?;
        if n as usize != claimed.len() {
            return Err(StoreError::Backend(
                format!("{n} of {} claimed operations written", claimed.len()).into(),
            ));
        }
        Ok(())
    }

    fn renew_leases(&mut self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<Renewal> {
        self.eager_only("renew leases")?;
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
        self.eager_only("release leases")?;
        Ok(self.execute(
            "UPDATE operations SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner = $1",
            &[&owner],
        )? as usize)
    }

    fn append_event(&mut self, event: OperationEvent) -> Result<()> {
        self.events.push(event);
        Ok(())
    }

    fn rollout(&mut self, id: RolloutId) -> Result<Option<StoredRollout>> {
        self.eager_only("read a rollout")?;
        // Locked until the commit: the version compared is the one overwritten.
        let rows = self.query(
            "SELECT id, doc, doc_crc32, version FROM rollouts WHERE id = $1 FOR UPDATE",
            &[&id.to_string()],
        )?;
        rows.first().map(Rows::stored_rollout).transpose()
    }

    fn rollout_by_request(&mut self, request: &RequestId) -> Result<Option<StoredRollout>> {
        self.eager_only("read a rollout")?;
        // Two creations with one request id at once: the second insert meets the unique
        // index, its job runs again, and finds the first one here.
        let rows = self.query(
            "SELECT id, doc, doc_crc32, version FROM rollouts WHERE request_id = $1",
            &[&request.as_str()],
        )?;
        rows.first().map(Rows::stored_rollout).transpose()
    }

    fn put_rollout(&mut self, rollout: &Rollout, version: u64) -> Result<()> {
        self.eager_only("write a rollout")?;
        let (doc, crc) = docs::to_json(rollout)?;
        self.execute(
            "INSERT INTO rollouts (id, request_id, phase, version, doc, doc_crc32)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET
               phase = EXCLUDED.phase, version = EXCLUDED.version, doc = EXCLUDED.doc,
               doc_crc32 = EXCLUDED.doc_crc32",
            &[
                &rollout.id.to_string(),
                &rollout.request_id.as_str(),
                &rollout.phase.as_str(),
                &i64::try_from(version).unwrap_or(i64::MAX),
                &doc,
                &crc,
            ],
        )?;
        Ok(())
    }

    fn append_machine_event(&mut self, event: MachineEvent) -> Result<()> {
        self.eager_only("append a machine event")?;
        // The machine's row, written in this transaction, is locked: its events are numbered
        // one writer at a time.
        self.execute(
            "INSERT INTO machine_events (machine_id, sequence, time, kind, message)
             SELECT $1, COALESCE(MAX(sequence), 0) + 1, $2, $3, $4
             FROM machine_events WHERE machine_id = $1",
            &[
                &event.machine_id.as_str(),
                &event.time.as_unix_micros(),
                &event.kind.as_str(),
                &event.message,
            ],
        )?;
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

#[cfg(test)]
mod tests {
    //! Batches put together by hand, to run keyed jobs next to the others in one
    //! transaction (the store's own batches depend on timing).

    use bm_domain::rules::Outcome;
    use bm_domain::{
        EventKind, Labels, MachineSpec, OperationPhase, OperationType, Phase, RequestId,
    };
    use tokio::sync::oneshot;

    use super::*;
    use crate::logic;
    use crate::postgres::{PgConfig, PgStore};
    use crate::{EventFilter, Fence, Store};

    fn t(micros: i64) -> Timestamp {
        Timestamp::from_unix_micros(1_800_000_000_000_000 + micros)
    }

    fn machine(id: &str, n: u8) -> Machine {
        let mut m = Machine::register(
            MachineId::new(id).unwrap(),
            MachineSpec {
                provider: "fake".into(),
                mac_addresses: vec![format!("02:00:00:00:00:{n:02x}").parse().unwrap()],
                ssh_endpoint: format!("root@10.0.0.{n}:22"),
                image: "ubuntu-24.04".into(),
                target_cluster: "prod".into(),
                ..MachineSpec::default()
            },
            Labels::default(),
            t(0),
        )
        .unwrap();
        m.status.phase = Phase::Maintenance;
        m
    }

    fn reimage(machine: &str, n: u64) -> Operation {
        Operation::new(
            OperationId::from_parts(1_800_000_000_000 + n, u128::from(n)),
            MachineId::new(machine).unwrap(),
            OperationType::Reimage,
            RequestId::new("r").unwrap(),
            String::new(),
            t(n as i64),
        )
        .unwrap()
    }

    /// A job of the batch and where its answer arrives.
    fn push<T: Send + 'static>(
        batch: &mut Vec<Command>,
        keys: Option<Keys>,
        mut f: impl FnMut(&mut PgTx<'_>) -> Result<T> + Send + 'static,
    ) -> oneshot::Receiver<Result<T>> {
        let (tx, rx) = oneshot::channel();
        let job = job(move |tx| (f(tx), true), tx);
        batch.push(Command::Write(match keys {
            Some(k) => job.keyed(k),
            None => job,
        }));
        rx
    }

    fn op_keys(op: &Operation, with_machine: bool) -> Option<Keys> {
        Some(Keys {
            operations: vec![op.id],
            machines: if with_machine {
                vec![op.machine_id.clone()]
            } else {
                Vec::new()
            },
            requests: Vec::new(),
        })
    }

    fn admit_keys(op: &Operation) -> Option<Keys> {
        Some(Keys {
            operations: Vec::new(),
            machines: vec![op.machine_id.clone()],
            requests: vec![(op.machine_id.clone(), op.request_id.clone())],
        })
    }

    /// Runs `batch` on a writer of its own on the store's database, as one transaction.
    fn run(store: &PgStore, url: &str, batch: Vec<Command>) {
        let feed = store.feed.clone();
        let condition = store.condition.clone();
        let url = url.to_owned();
        std::thread::spawn(move || {
            let target = Target::parse(&url, None, None).unwrap();
            let mut writer = Writer {
                conn: target.connect().unwrap(),
                target,
                rx: std::sync::mpsc::channel().1,
                max_batch: 1024,
                feed,
                stmts: HashMap::new(),
                unwritten: Vec::new(),
                last_used: std::time::Instant::now(),
                condition,
                observer: None,
            };
            writer.run_batch(batch);
        })
        .join()
        .unwrap();
    }

    /// Where the stored row of `id` stands: phase, lease owner, lease expiry, generation.
    async fn row(
        store: &PgStore,
        id: OperationId,
    ) -> (String, Option<String>, Option<i64>, i64, String) {
        store
            .read(move |conn| {
                let r = conn.query_one(
                    "SELECT phase, lease_owner, lease_expires, lease_generation, doc
                     FROM operations WHERE id = $1",
                    &[&id.to_string()],
                )?;
                Ok((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            })
            .await
            .unwrap()
    }

    /// A segment that cannot run together (here: a row whose document does not read back)
    /// is rolled back and run job by job, as any other job: the jobs still succeed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keyed_jobs_that_fail_together_run_one_by_one() {
        let url = bm_pg_cluster::Cluster::shared().create_database().unwrap();
        let store = PgStore::open(PgConfig::new(&url)).unwrap();
        let mut ops = Vec::new();
        for (n, id) in ["m-a", "m-b"].into_iter().enumerate() {
            store.register_machine(machine(id, n as u8)).await.unwrap();
            ops.push(
                store
                    .admit(reimage(id, n as u64 + 1))
                    .await
                    .unwrap()
                    .operation,
            );
        }
        let lease = Lease {
            owner: "exec-1".into(),
            expires_at: t(1_000),
        };
        let fence = store.claim(&lease, t(10), 10).await.unwrap()[0]
            .fence
            .clone();
        let (a, b) = (ops[0].clone(), ops[1].clone());
        // a's document no longer matches its checksum: reading it fails, but a fenced write
        // reads only its lease columns, and overwrites it.
        let id = a.id.to_string();
        store
            .read(move |conn| {
                conn.execute(
                    "UPDATE operations SET doc_crc32 = doc_crc32 + 1 WHERE id = $1",
                    &[&id],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let mut batch = Vec::new();
        let mut replies = Vec::new();
        for o in [&a, &b] {
            let (f, o, e) = (
                fence.clone(),
                o.clone(),
                vec![OperationEvent::new(o, EventKind::StageStarted, "", t(30))],
            );
            replies.push(push(&mut batch, op_keys(&o, false), move |tx| {
                logic::save_progress(tx, &f, &o, e.clone())
            }));
        }
        run(&store, &url, batch);
        for r in replies {
            assert!(!r.await.unwrap().unwrap());
        }
        assert_eq!(store.get_operation(a.id).await.unwrap(), a);
        let events = store
            .events_after(2, &EventFilter::default(), 100)
            .await
            .unwrap();
        let seen: Vec<OperationId> = events.iter().map(|e| e.operation_id).collect();
        assert_eq!(seen, vec![a.id, b.id]);
        store.close();
    }

    /// Keyed jobs share one read and one write per table, yet each is fenced and undone on
    /// its own, sees what the keyed jobs before it wrote, and the eager jobs of the batch
    /// (renewals) run after them and are not undone by their write-back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keyed_jobs_in_a_mixed_batch() {
        let url = bm_pg_cluster::Cluster::shared().create_database().unwrap();
        let store = PgStore::open(PgConfig::new(&url)).unwrap();
        let mut ops = Vec::new();
        for (n, id) in ["m-a", "m-b", "m-c"].into_iter().enumerate() {
            store.register_machine(machine(id, n as u8)).await.unwrap();
            let o = reimage(id, n as u64 + 1);
            ops.push(store.admit(o).await.unwrap().operation);
        }
        let lease = |expires| Lease {
            owner: "exec-1".into(),
            expires_at: t(expires),
        };
        let claimed = store.claim(&lease(1_000), t(10), 10).await.unwrap();
        assert_eq!(claimed.len(), 3);
        let fence = Fence {
            owner: "exec-1".into(),
            generation: claimed[0].fence.generation,
        };
        assert!(claimed.iter().all(|c| c.fence == fence));
        let running: Vec<Operation> = ops
            .iter()
            .map(|o| {
                let mut o = o.clone();
                o.start(t(20)).unwrap();
                o.begin_stage("wipe", t(20));
                o
            })
            .collect();
        let (a, b, c) = (running[0].clone(), running[1].clone(), running[2].clone());
        let c_before = row(&store, c.id).await;
        let held: Vec<(OperationId, u64)> = ops.iter().map(|o| (o.id, fence.generation)).collect();
        let stale = Fence {
            owner: "exec-1".into(),
            generation: fence.generation - 1,
        };
        let other = Fence {
            owner: "exec-2".into(),
            generation: fence.generation,
        };
        let progress = |o: &Operation, msg: &str| {
            vec![OperationEvent::new(o, EventKind::StageStarted, msg, t(30))]
        };

        let mut batch = Vec::new();
        let (l, h) = (lease(2_000), held.clone());
        let renew_1 = push(&mut batch, None, move |tx| tx.renew_leases(&l, &h));
        let (f, o, e) = (stale.clone(), a.clone(), progress(&a, "stale"));
        let stale_a = push(&mut batch, op_keys(&a, false), move |tx| {
            logic::save_progress(tx, &f, &o, e.clone())
        });
        let (f, o, e) = (fence.clone(), b.clone(), progress(&b, "b first"));
        let save_b = push(&mut batch, op_keys(&b, false), move |tx| {
            logic::save_progress(tx, &f, &o, e.clone())
        });
        let (f, o, e) = (fence.clone(), a.clone(), progress(&a, "a last"));
        let finish_a = push(&mut batch, op_keys(&a, true), move |tx| {
            logic::finish(tx, &f, o.clone(), Outcome::Succeeded, e.clone(), t(40))
        });
        // Admissions: on a's machine, freed by the job before; again with b's request id;
        // on c's machine, busy.
        let mut a2 = reimage("m-a", 10);
        a2.request_id = RequestId::new("r2").unwrap();
        let o = a2.clone();
        let admit_a2 = push(&mut batch, admit_keys(&a2), move |tx| {
            logic::admit(tx, o.clone())
        });
        let b_again = reimage("m-b", 11);
        let o = b_again.clone();
        let admit_b_again = push(&mut batch, admit_keys(&b_again), move |tx| {
            logic::admit(tx, o.clone())
        });
        let mut c2 = reimage("m-c", 12);
        c2.request_id = RequestId::new("r2").unwrap();
        let o = c2.clone();
        let admit_c2 = push(&mut batch, admit_keys(&c2), move |tx| {
            logic::admit(tx, o.clone())
        });
        // Writes c and its machine, then panics: nothing of it may stay.
        let (f, o) = (fence.clone(), c.clone());
        let panics_c = push(&mut batch, op_keys(&c, true), move |tx| -> Result<()> {
            logic::finish(tx, &f, o.clone(), Outcome::Succeeded, vec![], t(40))?;
            panic!("the job fails after writing");
        });
        let (l, h) = (lease(3_000), held.clone());
        let renew_2 = push(&mut batch, None, move |tx| tx.renew_leases(&l, &h));
        let (f, o, e) = (fence.clone(), b.clone(), progress(&b, "b again"));
        let save_b_again = push(&mut batch, op_keys(&b, false), move |tx| {
            logic::save_progress(tx, &f, &o, e.clone())
        });
        let (f, o, e) = (other, c.clone(), progress(&c, "not mine"));
        let other_c = push(&mut batch, op_keys(&c, false), move |tx| {
            logic::save_progress(tx, &f, &o, e.clone())
        });
        run(&store, &url, batch);

        // The keyed jobs ran first, together; then the renewals, in their order.
        let renewal = renew_1.await.unwrap().unwrap();
        assert_eq!(renewal.lost, vec![a.id], "a ended before the first renewal");
        assert!(matches!(stale_a.await.unwrap(), Err(StoreError::LeaseLost(id)) if id == a.id));
        assert!(!save_b.await.unwrap().unwrap());
        let (done, m) = finish_a.await.unwrap().unwrap();
        assert_eq!(done.phase, OperationPhase::Succeeded);
        let admitted = admit_a2.await.unwrap().unwrap();
        assert!(admitted.created);
        assert_eq!(admitted.operation, a2);
        let admitted = admit_b_again.await.unwrap().unwrap();
        assert!(!admitted.created);
        assert_eq!(admitted.operation.id, b.id);
        assert!(admit_c2.await.unwrap().is_err(), "c's machine is busy");
        assert!(panics_c.await.unwrap().is_err());
        let renewal = renew_2.await.unwrap().unwrap();
        assert_eq!(
            renewal.lost,
            vec![a.id],
            "a ended before the second renewal"
        );
        assert!(save_b_again.await.unwrap().is_ok());
        assert!(matches!(other_c.await.unwrap(), Err(StoreError::LeaseLost(id)) if id == c.id));

        // a: ended, lease cleared, generation kept; its machine says so.
        let ra = row(&store, a.id).await;
        assert_eq!(
            (ra.0.as_str(), ra.1, ra.2, ra.3),
            ("SUCCEEDED", None, None, fence.generation.cast_signed())
        );
        assert_eq!(
            store
                .get_machine(&a.machine_id)
                .await
                .unwrap()
                .status
                .active_operation_id,
            Some(a2.id)
        );
        assert_eq!(m.status.active_operation_id, None);
        assert_eq!(store.get_operation(a.id).await.unwrap(), done);
        assert_eq!(store.get_operation(a2.id).await.unwrap(), a2);
        let r2 = row(&store, a2.id).await;
        assert_eq!(
            (r2.0.as_str(), r2.1, r2.2, r2.3),
            ("PENDING", None, None, 0)
        );
        assert!(matches!(
            store.get_operation(c2.id).await,
            Err(StoreError::OperationNotFound(_))
        ));
        // b: written twice, then renewed twice: the lease as the second renewal left it.
        let rb = row(&store, b.id).await;
        assert_eq!(
            (rb.0.as_str(), rb.1.as_deref(), rb.2),
            ("RUNNING", Some("exec-1"), Some(t(3_000).as_unix_micros()))
        );
        assert_eq!(store.get_operation(b.id).await.unwrap(), b);
        // c: renewed, nothing else.
        let rc = row(&store, c.id).await;
        assert_eq!(rc.2, Some(t(3_000).as_unix_micros()));
        assert_eq!(
            (rc.0, rc.1, rc.3, rc.4),
            (c_before.0, c_before.1, c_before.3, c_before.4)
        );
        assert_eq!(
            store.get_machine(&c.machine_id).await.unwrap().status.phase,
            machine("m-c", 2).status.phase
        );
        assert!(
            store
                .get_machine(&c.machine_id)
                .await
                .unwrap()
                .status
                .active_operation_id
                .is_some()
        );

        // Events of the kept jobs only, in the order of the jobs, numbered on.
        let events = store
            .events_after(3, &EventFilter::default(), 100)
            .await
            .unwrap();
        let seen: Vec<(OperationId, EventKind, &str)> = events
            .iter()
            .map(|e| (e.operation_id, e.kind, e.message.as_str()))
            .collect();
        assert_eq!(
            seen,
            vec![
                (b.id, EventKind::StageStarted, "b first"),
                (a.id, EventKind::StageStarted, "a last"),
                (a.id, EventKind::PhaseChanged, ""),
                (a2.id, EventKind::Created, ""),
                (b.id, EventKind::StageStarted, "b again"),
            ]
        );
        let revisions: Vec<u64> = events.iter().map(|e| e.revision).collect();
        assert_eq!(revisions, vec![4, 5, 6, 7, 8]);
        store.close();
    }
}
