//! The embedded SQLite backend: the durable default.
//!
//! One data directory holds the database (`baremetal.db`, in WAL mode) and a lock file that
//! keeps a second process out. Writes go through one writer thread that commits in batches
//! (see `writer.rs`); a second thread checkpoints the WAL into the database file; reads run on
//! a small pool of read connections on the blocking thread pool, concurrently with both.
//!
//! Because the lock makes this process the only user of the database, every lease found at
//! start belongs to a process that is gone: they are released at once, so that interrupted
//! operations resume without waiting for their leases to expire.

mod codec;
mod schema;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use async_trait::async_trait;
use bm_domain::rules::Outcome;
use bm_domain::{
    LogLine, Machine, MachineId, MachinePatch, Operation, OperationEvent, OperationId, Timestamp,
};
use rusqlite::{Connection, params_from_iter, types::Value};
use tokio::sync::{broadcast, oneshot};

use crate::logic::{self, Tx};
use crate::{
    Admission, BROADCAST_CAPACITY, EventFilter, ImportOutcome, Lease, MachineQuery, OperationQuery,
    Page, Result, Store, StoreError,
};
use writer::{Command, Job, SqlTx, Writer};

/// Settings of a [`SqliteStore`].
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// The data directory; created if missing.
    pub dir: PathBuf,
    /// Read connections (reads beyond this many wait for one).
    pub read_connections: usize,
    /// The most writes committed together.
    pub max_batch: usize,
    /// Page cache of the writer connection, in KiB (each reader gets a quarter).
    pub cache_kib: i64,
}

impl SqliteConfig {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            dir: dir.into(),
            read_connections: 6,
            max_batch: 4096,
            cache_kib: 16 * 1024,
        }
    }
}

/// The durable [`Store`]: SQLite in a data directory, with group commit.
pub struct SqliteStore {
    writer: Mutex<Option<mpsc::Sender<Command>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropping it stops the checkpointer.
    checkpointer: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    readers: Arc<Readers>,
    events: broadcast::Sender<Arc<OperationEvent>>,
    logs: broadcast::Sender<Arc<LogLine>>,
    path: PathBuf,
    _lock: File,
}

struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        // Try each connection once without waiting, then wait for the next in turn.
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(conn) = self.conns[(start + i) % n].try_lock() {
                return f(&conn);
            }
        }
        let conn = self.conns[start % n]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f(&conn)
    }

    /// Runs `f` on a free connection, or gives it back when none is free (never waits).
    fn try_with<T, F: FnOnce(&Connection) -> Result<T>>(&self, f: F) -> Result<Result<T>, F> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(conn) = self.conns[(start + i) % n].try_lock() {
                return Ok(f(&conn));
            }
        }
        Err(f)
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (or creates) the store in `config.dir`, applies pending migrations and
    /// releases the leases of processes that are gone.
    ///
    /// # Errors
    ///
    /// [`StoreError::Locked`] if another process has the directory open,
    /// [`StoreError::SchemaTooNew`], or a backend error.
    pub fn open(config: SqliteConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.dir).map_err(StoreError::backend)?;
        let lock = File::create(config.dir.join("LOCK")).map_err(StoreError::backend)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(config.dir.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::backend(e)),
        }
        let path = config.dir.join("baremetal.db");
        let mut conn = schema::open(&path, config.cache_kib)?;
        schema::migrate(&mut conn)?;
        // Checkpoints copy the WAL into the database file; a thread of their own does that
        // (see `checkpoint_loop`), so that the writer only appends and commits. The writer's
        // automatic checkpoint stays as a backstop should that thread fall far behind.
        conn.pragma_update(None, "wal_autocheckpoint", 100_000)?;
        let released = conn.execute(
            "UPDATE operations SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner IS NOT NULL",
            [],
        )?;
        if released > 0 {
            tracing::info!(
                operations = released,
                "released leases of a previous run; they resume now"
            );
        }
        let readers = (0..config.read_connections.max(1))
            .map(|_| schema::open(&path, (config.cache_kib / 4).max(1024)).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;

        let events = broadcast::channel(BROADCAST_CAPACITY).0;
        let logs = broadcast::channel(BROADCAST_CAPACITY).0;
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            conn,
            rx,
            max_batch: config.max_batch.max(1),
            events: events.clone(),
            logs: logs.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("bm-store-writer".into())
            .spawn(move || writer.run())
            .map_err(StoreError::backend)?;
        let checkpoint_conn = schema::open(&path, 1024)?;
        let (stop, stopped) = mpsc::channel();
        let checkpointer = std::thread::Builder::new()
            .name("bm-store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoint_conn, &stopped))
            .map_err(StoreError::backend)?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            checkpointer: Mutex::new(Some((stop, checkpointer))),
            readers: Arc::new(Readers {
                conns: readers,
                next: AtomicUsize::new(0),
            }),
            events,
            logs,
            path,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits what is queued, stops the writer thread and waits for it. Later calls fail
    /// with [`StoreError::Closed`].
    pub fn close(&self) {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self
            .writer_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, t)) = checkpointer {
            drop(stop);
            let _ = t.join();
        }
    }

    fn send(&self, cmd: Command) -> Result<()> {
        let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(cmd)
            .map_err(|_| StoreError::Closed)
    }

    /// Runs `f` in the writer's batch transaction; keeps its writes when `keep` says so.
    async fn write_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqlTx<'_>) -> (Result<T>, bool) + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |sql| {
            let (result, keep) = f(sql);
            let keep = keep && result.is_ok();
            let reply: writer::Reply = Box::new(move |commit| {
                let out = match (result, commit) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(StoreError::Backend(Box::new(CommitFailed(e)))),
                    (Ok(v), Ok(())) => Ok(v),
                };
                let _ = tx.send(out);
            });
            (keep, reply)
        });
        self.send(Command::Write(job))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqlTx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_with(move |tx| (f(tx), true)).await
    }

    /// Runs a read that touches a handful of rows (a lookup by primary key) on the calling
    /// thread when a connection is free: it takes tens of microseconds, less than handing it
    /// to the blocking pool. When every connection is busy it goes to the pool, so that an
    /// async worker never waits for a lock.
    async fn read_point<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match self.readers.try_with(f) {
            Ok(r) => r,
            Err(f) => self.read(f).await,
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(f))
            .await
            .map_err(StoreError::backend)?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`] until told to stop.
/// PASSIVE checkpoints never wait for or block the writer or the readers; a commit is
/// durable when the WAL is synced, so checkpoints only bound the WAL's size.
fn checkpoint_loop(conn: &Connection, stop: &mpsc::Receiver<()>) {
    loop {
        match stop.recv_timeout(CHECKPOINT_EVERY) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                }
            }
            _ => return,
        }
    }
}

/// The commit of a batch failed; every write in it was rolled back.
#[derive(Debug, thiserror::Error)]
#[error("the write was not committed")]
struct CommitFailed(#[source] Arc<writer::CommitError>);

#[async_trait]
impl Store for SqliteStore {
    async fn register_machine(&self, machine: Machine) -> Result<Machine> {
        self.write(|tx| logic::register(tx, machine)).await
    }

    async fn import_machines(
        &self,
        machines: Vec<Machine>,
        dry_run: bool,
    ) -> Result<Vec<Result<ImportOutcome>>> {
        self.write_with(move |tx| (logic::import(tx, machines, dry_run), !dry_run))
            .await
    }

    async fn get_machine(&self, id: &MachineId) -> Result<Machine> {
        let id = id.clone();
        self.read_point(move |conn| {
            writer::read_machine(conn, &id)?.ok_or(StoreError::MachineNotFound(id))
        })
        .await
    }

    async fn list_machines(&self, q: &MachineQuery) -> Result<Page<Machine>> {
        let q = q.clone();
        self.read(move |conn| {
            let mut sql = String::from("SELECT id, doc FROM machines WHERE id > ?1");
            let mut args: Vec<Value> = vec![Value::Text(String::new())];
            if let Some(p) = q.phase {
                args.push(Value::Text(p.as_str().into()));
                sql.push_str(&format!(" AND phase = ?{}", args.len()));
            }
            if let Some(s) = q.effective_state {
                args.push(Value::Text(s.as_str().into()));
                sql.push_str(&format!(" AND effective_state = ?{}", args.len()));
            }
            args.push(Value::Integer(0));
            sql.push_str(&format!(" ORDER BY id LIMIT ?{}", args.len()));
            let limit_arg = args.len() - 1;
            // The label selector is applied here, so a sparse selector reads in chunks
            // until the page (plus one, to know whether there is more) is full; without
            // one, the page plus one is all there is to read.
            let chunk = if q.selector.is_empty() {
                q.limit + 1
            } else {
                (q.limit + 1).max(256)
            };
            args[limit_arg] = Value::Integer(chunk as i64);
            let mut cursor = q
                .after
                .as_ref()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default();
            let mut items = Vec::new();
            let mut stmt = conn.prepare_cached(&sql)?;
            loop {
                args[0] = Value::Text(cursor.clone());
                let rows: Vec<(String, String)> = stmt
                    .query_map(params_from_iter(args.iter()), |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let exhausted = rows.len() < chunk;
                for (id, doc) in rows {
                    cursor = id;
                    let m = codec::machine(&doc)?;
                    if q.selector.matches(&m.labels) {
                        items.push(m);
                        if items.len() > q.limit {
                            items.truncate(q.limit);
                            return Ok(Page { items, more: true });
                        }
                    }
                }
                if exhausted {
                    return Ok(Page { items, more: false });
                }
            }
        })
        .await
    }

    async fn update_machine(
        &self,
        id: &MachineId,
        patch: &MachinePatch,
        now: Timestamp,
    ) -> Result<Machine> {
        let (id, patch) = (id.clone(), patch.clone());
        self.write(move |tx| logic::update(tx, &id, &patch, now))
            .await
    }

    async fn admit(&self, operation: Operation) -> Result<Admission> {
        self.write(|tx| logic::admit(tx, operation)).await
    }

    async fn get_operation(&self, id: OperationId) -> Result<Operation> {
        self.read_point(move |conn| {
            writer::read_operation(conn, id)?
                .map(|s| s.op)
                .ok_or(StoreError::OperationNotFound(id))
        })
        .await
    }

    async fn list_operations(&self, q: &OperationQuery) -> Result<Page<Operation>> {
        let q = q.clone();
        self.read(move |conn| {
            let mut sql = String::from("SELECT doc, cancel_requested FROM operations WHERE 1 = 1");
            let mut args: Vec<Value> = Vec::new();
            let mut arg = |sql: &mut String, clause: &str, v: Value| {
                args.push(v);
                sql.push_str(&format!(" AND {clause} ?{}", args.len()));
            };
            if let Some(b) = q.before {
                arg(&mut sql, "id <", Value::Text(b.to_string()));
            }
            if let Some(m) = &q.machine_id {
                arg(&mut sql, "machine_id =", Value::Text(m.as_str().into()));
            }
            if let Some(t) = q.op_type {
                arg(&mut sql, "type =", Value::Text(t.as_str().into()));
            }
            if let Some(p) = q.phase {
                arg(&mut sql, "phase =", Value::Text(p.as_str().into()));
            }
            args.push(Value::Integer(q.limit as i64 + 1));
            sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows: Vec<(String, bool)> = stmt
                .query_map(params_from_iter(args.iter()), |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut items = rows
                .iter()
                .map(|(doc, cancel)| codec::operation(doc, *cancel))
                .collect::<Result<Vec<_>>>()?;
            let more = items.len() > q.limit;
            items.truncate(q.limit);
            Ok(Page { items, more })
        })
        .await
    }

    async fn request_cancel(&self, id: OperationId, now: Timestamp) -> Result<Operation> {
        self.write(move |tx| logic::request_cancel(tx, id, now))
            .await
    }

    async fn claim(&self, lease: &Lease, now: Timestamp, limit: usize) -> Result<Vec<Operation>> {
        let lease = lease.clone();
        self.write(move |tx| logic::claim(tx, &lease, now, limit))
            .await
    }

    async fn renew(&self, lease: &Lease, operations: &[OperationId]) -> Result<Vec<OperationId>> {
        let (lease, ids) = (lease.clone(), operations.to_vec());
        self.write(move |tx| tx.renew_leases(&lease, &ids)).await
    }

    async fn release(&self, owner: &str) -> Result<usize> {
        let owner = owner.to_owned();
        self.write(move |tx| tx.release_leases(&owner)).await
    }

    async fn save_progress(
        &self,
        owner: &str,
        operation: &Operation,
        events: Vec<OperationEvent>,
    ) -> Result<bool> {
        let (owner, op) = (owner.to_owned(), operation.clone());
        self.write(move |tx| logic::save_progress(tx, &owner, &op, events))
            .await
    }

    async fn finish(
        &self,
        owner: &str,
        operation: Operation,
        outcome: Outcome,
        events: Vec<OperationEvent>,
        now: Timestamp,
    ) -> Result<(Operation, Machine)> {
        let owner = owner.to_owned();
        self.write(move |tx| logic::finish(tx, &owner, operation, outcome, events, now))
            .await
    }

    async fn events_after(
        &self,
        after: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<OperationEvent>> {
        let filter = filter.clone();
        self.read(move |conn| {
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            let cols = codec::EVENT_COLUMNS;
            let (sql, key) = match (&filter.operation_id, &filter.machine_id) {
                (Some(op), _) => (
                    format!("SELECT {cols} FROM events WHERE operation_id = ?2 AND revision > ?1 ORDER BY revision LIMIT ?3"),
                    Some(op.to_string()),
                ),
                (None, Some(m)) => (
                    format!("SELECT {cols} FROM events WHERE machine_id = ?2 AND revision > ?1 ORDER BY revision LIMIT ?3"),
                    Some(m.as_str().to_owned()),
                ),
                (None, None) => (
                    format!("SELECT {cols} FROM events WHERE revision > ?1 AND ?2 IS NULL ORDER BY revision LIMIT ?3"),
                    None,
                ),
            };
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(rusqlite::params![after, key, limit as i64], codec::event)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut out = Vec::with_capacity(rows.len());
            for e in rows {
                let e = e?;
                // Both filters apply when both are given.
                if filter.matches(&e) {
                    out.push(e);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn last_revision(&self) -> Result<u64> {
        self.read_point(|conn| {
            let rev: Option<i64> =
                conn.query_row("SELECT MAX(revision) FROM events", [], |r| r.get(0))?;
            Ok(rev.unwrap_or(0) as u64)
        })
        .await
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<OperationEvent>> {
        self.events.subscribe()
    }

    fn append_log(&self, line: LogLine) {
        if self.send(Command::Log(line)).is_err() {
            tracing::warn!("log line dropped: the store is closed");
        }
    }

    async fn logs_after(
        &self,
        operation: OperationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {} FROM logs WHERE operation_id = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3",
                codec::LOG_COLUMNS
            ))?;
            stmt.query_map(
                rusqlite::params![
                    operation.to_string(),
                    i64::try_from(after).unwrap_or(i64::MAX),
                    limit as i64
                ],
                codec::log_line,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .collect()
        })
        .await
    }

    async fn last_log_sequence(&self, operation: OperationId) -> Result<u64> {
        self.read_point(move |conn| {
            let seq: Option<i64> = conn.query_row(
                "SELECT MAX(sequence) FROM logs WHERE operation_id = ?1",
                [operation.to_string()],
                |r| r.get(0),
            )?;
            Ok(seq.unwrap_or(0) as u64)
        })
        .await
    }

    fn subscribe_logs(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.logs.subscribe()
    }

    async fn flush(&self) -> Result<()> {
        self.write(|_| Ok(())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_process_is_kept_out() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
        let second = SqliteStore::open(SqliteConfig::new(dir.path()));
        assert!(matches!(second, Err(StoreError::Locked(_))), "{second:?}");
    }

    #[tokio::test]
    async fn a_job_that_fails_after_writing_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
        let m = Machine::register(
            MachineId::new("m-1").unwrap(),
            bm_domain::MachineSpec {
                provider: "fake".into(),
                ..Default::default()
            },
            bm_domain::Labels::default(),
            Timestamp::EPOCH,
        )
        .unwrap();
        // Breaks the "check, then write" discipline on purpose.
        let m2 = m.clone();
        let r = store
            .write(move |tx| {
                logic::register(tx, m2)?;
                Err::<(), _>(StoreError::Corrupt("failed after writing".into()))
            })
            .await;
        assert!(r.is_err());
        assert!(matches!(
            store.get_machine(&m.id).await,
            Err(StoreError::MachineNotFound(_))
        ));
        // The store goes on working.
        store.register_machine(m.clone()).await.unwrap();
        assert_eq!(store.get_machine(&m.id).await.unwrap(), m);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(SqliteConfig::new(dir.path())).unwrap());
        let conn = Connection::open(dir.path().join("baremetal.db")).unwrap();
        conn.pragma_update(None, "user_version", schema::schema_version() + 1)
            .unwrap();
        drop(conn);
        let err = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
    }
}
