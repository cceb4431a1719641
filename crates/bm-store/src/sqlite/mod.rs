//! The embedded SQLite backend: the durable default.
//!
//! One data directory holds the database (`baremetal.db`, in WAL mode), locked by this
//! process (see `files.rs`: permissions, the lock, creation, backups). Writes go through one
//! writer thread that commits in batches (see `writer.rs`); a second thread checkpoints the
//! WAL into the database file and keeps it small (see `wal.rs`); reads run on a small pool of
//! read connections on the blocking thread pool, concurrently with both, and listings stop
//! when their caller goes away (see `list.rs`).
//!
//! At open the database gets SQLite's quick integrity check; a damaged one is refused, or
//! opened read-only if [`SqliteConfig::on_damage`] says so (reads work, writes are refused,
//! nothing runs). Because the lock makes this process the only user of the database, every
//! lease found at start belongs to a process that is gone: they are released at once, so that
//! interrupted operations resume without waiting for their leases to expire.

pub(crate) mod codec;
mod files;
mod list;
mod schema;
mod wal;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use async_trait::async_trait;
use bm_domain::rules::Outcome;
use bm_domain::{
    LogLine, MacAddress, Machine, MachineEvent, MachineId, MachinePatch, Observation, Operation,
    OperationEvent, OperationId, RequestId, Rollout, RolloutId, Timestamp,
};
use rusqlite::{Connection, OptionalExtension, params_from_iter, types::Value};
use tokio::sync::{broadcast, oneshot, watch};

use crate::condition::ConditionCell;
use crate::logic::{self, Tx};
use crate::{
    Admission, BROADCAST_CAPACITY, Claimed, EventFilter, Fence, ImportOutcome, Lease, MachineCount,
    MachineQuery, OperationQuery, Page, Recorded, Renewal, Result, RolloutQuery, Store,
    StoreCondition, StoreError, StoredRollout,
};
use files::DataDir;
pub use files::{BackupReport, backup};
use list::Cancel;
use writer::{Command, Done, Fault, Job, SqlTx, Writer};

/// Settings of a [`SqliteStore`].
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// The data directory; created (0700) if missing.
    pub dir: PathBuf,
    /// Read connections (reads beyond this many wait for one).
    pub read_connections: usize,
    /// The most writes committed together.
    pub max_batch: usize,
    /// Page cache of the writer connection, in KiB (each reader gets a quarter).
    pub cache_kib: i64,
    /// What to do with a database that fails its integrity check at open.
    pub on_damage: OnDamage,
    /// The size of the write-ahead log above which it is checkpointed in full and started
    /// over, in bytes; also what its file is cut back to when it starts over.
    pub wal_limit_bytes: u64,
    /// The most the database file may grow to, in bytes (`None`: as much as the disk holds).
    /// A write past it fails as on a full disk ([`StoreError::DiskFull`]).
    pub max_db_bytes: Option<u64>,
    /// Told of every commit (metrics); nobody by default.
    pub commit_observer: Option<Arc<dyn crate::CommitObserver>>,
}

impl SqliteConfig {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            dir: dir.into(),
            read_connections: 6,
            max_batch: 4096,
            cache_kib: 16 * 1024,
            on_damage: OnDamage::Refuse,
            wal_limit_bytes: 64 << 20,
            max_db_bytes: None,
            commit_observer: None,
        }
    }
}

/// What [`SqliteStore::open`] does with a database that fails its integrity check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnDamage {
    /// Refuse to open it ([`StoreError::Damaged`], saying how to restore a backup).
    #[default]
    Refuse,
    /// Open it read-only: reads serve what can still be read, writes fail with
    /// [`StoreError::ReadOnly`], and the condition is [`StoreCondition::ReadOnly`].
    ReadOnly,
}

/// The durable [`Store`]: SQLite in a data directory, with group commit.
pub struct SqliteStore {
    writer: Mutex<Option<mpsc::Sender<Command>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Stops by itself once the writer thread has stopped.
    checkpointer: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Arc<Readers>,
    events: broadcast::Sender<Arc<OperationEvent>>,
    logs: broadcast::Sender<Arc<LogLine>>,
    condition: Arc<ConditionCell>,
    /// Why writes are refused, when the store was opened read-only.
    read_only: Option<String>,
    path: PathBuf,
}

struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
    condition: Arc<ConditionCell>,
    /// Closed after the connections (see `files.rs`).
    _files: Arc<DataDir>,
}

impl Readers {
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        // Try each connection once without waiting, then wait for the next in turn.
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(mut conn) = self.conns[(start + i) % n].try_lock() {
                return self.watch(f(&mut conn));
            }
        }
        let mut conn = self.conns[start % n]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.watch(f(&mut conn))
    }

    /// Runs `f` on a free connection, or gives it back when none is free (never waits).
    fn try_with<T, F: FnOnce(&Connection) -> Result<T>>(&self, f: F) -> Result<Result<T>, F> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(conn) = self.conns[(start + i) % n].try_lock() {
                return Ok(self.watch(f(&conn)));
            }
        }
        Err(f)
    }

    /// A read that finds the database damaged makes the store unusable.
    fn watch<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && Fault::of(e) == Some(Fault::Damaged)
        {
            self.condition
                .unusable("the database was found damaged while reading");
        }
        r
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
    /// Opens (or creates) the store in `config.dir`, checks the database's integrity,
    /// applies pending migrations and releases the leases of processes that are gone.
    ///
    /// # Errors
    ///
    /// [`StoreError::Locked`] if another process has the directory open,
    /// [`StoreError::Damaged`] if the database is empty, missing beside its write-ahead log,
    /// or fails the integrity check (unless [`OnDamage::ReadOnly`]),
    /// [`StoreError::SchemaTooNew`], or a backend error.
    pub fn open(config: SqliteConfig) -> Result<Self> {
        let files = Arc::new(DataDir::open(&config.dir)?);
        let path = files.db().to_owned();
        let damaged = |detail: String| StoreError::Damaged {
            path: path.display().to_string(),
            detail,
        };
        let (conn, problems) = match schema::open(&path, config.cache_kib) {
            Ok(conn) => match schema::quick_check(&conn) {
                Ok(problems) => (Some(conn), problems),
                Err(e) if Fault::of(&e) == Some(Fault::Damaged) => (None, vec![chain(&e)]),
                Err(e) => return Err(e),
            },
            Err(e) if Fault::of(&e) == Some(Fault::Damaged) => (None, vec![chain(&e)]),
            Err(e) => return Err(e),
        };
        files.warn_if_exposed();
        let mut conn = match conn {
            Some(conn) if problems.is_empty() => conn,
            _ => {
                let detail = format!("it failed the integrity check ({})", summary(&problems));
                return match config.on_damage {
                    OnDamage::Refuse => Err(damaged(detail)),
                    OnDamage::ReadOnly => Self::open_read_only(&config, files, detail),
                };
            }
        };
        schema::migrate(&mut conn)?;
        // Checkpoints are the checkpointer's job (see `wal.rs`), so that the writer only
        // appends and commits.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(
            None,
            "journal_size_limit",
            i64::try_from(config.wal_limit_bytes).unwrap_or(i64::MAX),
        )?;
        if let Some(max) = config.max_db_bytes {
            let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = i64::try_from(max).unwrap_or(i64::MAX) / page;
            conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
        }
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
        let condition = Arc::new(ConditionCell::new(StoreCondition::Ok));
        let readers = (0..config.read_connections.max(1))
            .map(|_| schema::open(&path, (config.cache_kib / 4).max(1024)).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;

        let events = broadcast::channel(BROADCAST_CAPACITY).0;
        let logs = broadcast::channel(BROADCAST_CAPACITY).0;
        let (tx, rx) = mpsc::channel();
        let (wal, stopped) = wal::WalWatch::new(files::wal_path(&path), config.wal_limit_bytes);
        let writer = Writer {
            conn,
            rx,
            max_batch: config.max_batch.max(1),
            events: events.clone(),
            logs: logs.clone(),
            condition: condition.clone(),
            wal,
            dir: config.dir.clone(),
            _files: files.clone(),
            observer: config.commit_observer.clone(),
        };
        let checkpoint_conn = schema::open(&path, 1024)?;
        let thread = std::thread::Builder::new()
            .name("bm-store-writer".into())
            .spawn(move || writer.run())
            .map_err(StoreError::backend)?;
        let checkpoint_files = files.clone();
        let checkpointer = std::thread::Builder::new()
            .name("bm-store-checkpoint".into())
            .spawn(move || {
                wal::checkpoint_loop(&checkpoint_conn, &stopped);
                drop(checkpoint_conn);
                drop(checkpoint_files);
            })
            .map_err(StoreError::backend)?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            checkpointer: Mutex::new(Some(checkpointer)),
            readers: Arc::new(Readers {
                conns: readers,
                next: AtomicUsize::new(0),
                condition: condition.clone(),
                _files: files,
            }),
            events,
            logs,
            condition,
            read_only: None,
            path,
        })
    }

    /// Opens a damaged store for reading only: no writer, no checkpointer, leases left as
    /// they are.
    fn open_read_only(config: &SqliteConfig, files: Arc<DataDir>, detail: String) -> Result<Self> {
        let path = files.db().to_owned();
        let damaged = |detail: String| StoreError::Damaged {
            path: path.display().to_string(),
            detail,
        };
        let cache = (config.cache_kib / 4).max(1024);
        let probe = schema::open_read_only(&path, cache)
            .and_then(|c| schema::version(&c))
            .map_err(|e| {
                damaged(format!(
                    "{detail}; it cannot be read at all ({})",
                    chain(&e)
                ))
            })?;
        if probe != schema::known_version() {
            return Err(damaged(format!(
                "{detail}; it has schema version {probe} and this program needs {}, and a damaged store is not upgraded, so it cannot be opened read-only either",
                schema::known_version()
            )));
        }
        let readers = (0..config.read_connections.max(1))
            .map(|_| schema::open_read_only(&path, cache).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        tracing::warn!(
            path = %path.display(),
            damage = %detail,
            "the store is open read-only: reads serve what can be read, writes are refused; restore the database from a backup (see docs/operations.md)"
        );
        // Clients see this: no path, no detail (those are in the log).
        let why = "its database failed the integrity check when the server started; an operator must restore it from a backup".to_owned();
        let condition = Arc::new(ConditionCell::new(StoreCondition::ReadOnly(why.clone())));
        Ok(SqliteStore {
            writer: Mutex::new(None),
            writer_thread: Mutex::new(None),
            checkpointer: Mutex::new(None),
            readers: Arc::new(Readers {
                conns: readers,
                next: AtomicUsize::new(0),
                condition: condition.clone(),
                _files: files,
            }),
            events: broadcast::channel(BROADCAST_CAPACITY).0,
            logs: broadcast::channel(BROADCAST_CAPACITY).0,
            condition,
            read_only: Some(why),
            path,
        })
    }

    /// The schema version of the store in `dir` and the one this program knows, read
    /// without changing anything (a directory without a database has version 0).
    ///
    /// # Errors
    ///
    /// A backend error (the database cannot be read).
    pub fn schema_status(dir: &Path) -> Result<crate::SchemaStatus> {
        let path = dir.join(files::DB_FILE);
        let found = if path.exists() {
            schema::version(&schema::open_read_only(&path, 1024)?)?
        } else {
            0
        };
        Ok(crate::SchemaStatus {
            found,
            supported: schema::known_version(),
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
        // It stops once the writer is gone.
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = checkpointer {
            let _ = t.join();
        }
    }

    fn send(&self, cmd: Command) -> Result<()> {
        if let Some(why) = &self.read_only {
            return Err(StoreError::ReadOnly(why.clone()));
        }
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
            let fault = result.as_ref().err().and_then(Fault::of);
            let reply: writer::Reply = Box::new(move |commit| {
                let out = match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), Ok(())) => Err(e),
                    (_, Err(c)) if matches!(*c, writer::CommitError::DiskFull) => {
                        Err(StoreError::DiskFull)
                    }
                    (Err(e), Err(_)) => Err(e),
                    (Ok(_), Err(c)) => Err(StoreError::Backend(Box::new(CommitFailed(c)))),
                };
                let _ = tx.send(out);
            });
            Done { keep, fault, reply }
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
        tokio::task::spawn_blocking(move || readers.with(|conn| f(conn)))
            .await
            .map_err(StoreError::backend)?
    }

    /// A read that may take long (a listing): it stops as soon as this call's future is
    /// dropped, at the next row or by interrupting its SQLite statement.
    async fn scan<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &Cancel) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let cancel = Cancel::default();
        let _cancel_when_dropped = cancel.guard();
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(|conn| cancel.run(conn, f)))
            .await
            .map_err(StoreError::backend)?
    }
}

/// An error with its causes, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// The problems an integrity check found, on one bounded line.
fn summary(problems: &[String]) -> String {
    let mut s = problems
        .iter()
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("; ");
    if s.len() > 400 {
        let mut cut = 400;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
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

    async fn machine_events(
        &self,
        id: &MachineId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MachineEvent>> {
        let id = id.clone();
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_point(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT sequence, time, kind, message FROM machine_events
                 WHERE machine_id = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3",
            )?;
            let rows = st.query_map(rusqlite::params![id.as_str(), after, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?, r.get(3)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (sequence, time, kind, message) = row?;
                out.push(logic::machine_event_row(
                    &id, sequence, time, &kind, message,
                )?);
            }
            Ok(out)
        })
        .await
    }

    async fn machine_by_mac(&self, mac: &MacAddress) -> Result<Option<Machine>> {
        let mac = mac.to_string();
        self.read_point(move |conn| {
            let owner: Option<String> = conn
                .prepare_cached("SELECT machine_id FROM machine_macs WHERE mac = ?1")?
                .query_row([&mac], |r| r.get(0))
                .optional()?;
            match owner {
                None => Ok(None),
                Some(id) => {
                    let id = MachineId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    writer::read_machine(conn, &id)
                }
            }
        })
        .await
    }

    async fn unclaimed_operations(&self) -> Result<u64> {
        self.read(|conn| {
            // The WHERE of the partial index operations_unheld, so that it is the one read.
            let n: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM operations WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NULL",
                )?
                .query_row([], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or_default())
        })
        .await
    }

    async fn machine_counts(&self) -> Result<Vec<MachineCount>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT phase, effective_state, COUNT(*) FROM machines GROUP BY phase, effective_state",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
            })?;
            let mut counts = Vec::new();
            for row in rows {
                let (phase, state, n) = row?;
                counts.push(logic::machine_count_row(&phase, &state, n)?);
            }
            counts.sort();
            Ok(counts)
        })
        .await
    }

    async fn list_machines(&self, q: &MachineQuery) -> Result<Page<Machine>> {
        let q = q.clone();
        self.scan(move |conn, cancel| {
            let listing = list::machines(conn, &q, cancel)?;
            tracing::debug!(
                rows_read = listing.rows_read,
                listed = listing.page.items.len(),
                "listed machines"
            );
            Ok(listing.page)
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

    async fn record_observation(
        &self,
        id: &MachineId,
        observation: &Observation,
        now: Timestamp,
    ) -> Result<Recorded> {
        let (id, observation) = (id.clone(), observation.clone());
        self.write(move |tx| logic::record_observation(tx, &id, &observation, now))
            .await
    }

    async fn admit(&self, operation: Operation) -> Result<Admission> {
        self.write(|tx| logic::admit(tx, operation)).await
    }

    async fn create_rollout(&self, rollout: Rollout) -> Result<(StoredRollout, bool)> {
        self.write(|tx| logic::create_rollout(tx, rollout)).await
    }

    async fn get_rollout(&self, id: RolloutId) -> Result<StoredRollout> {
        self.read_point(move |conn| {
            writer::read_rollout(conn, id)?.ok_or(StoreError::RolloutNotFound(id))
        })
        .await
    }

    async fn rollout_by_request(&self, request: &RequestId) -> Result<Option<StoredRollout>> {
        let request = request.clone();
        self.read_point(move |conn| writer::read_rollout_by_request(conn, &request))
            .await
    }

    async fn list_rollouts(&self, q: &RolloutQuery) -> Result<Page<StoredRollout>> {
        let q = q.clone();
        self.scan(move |conn, _cancel| {
            let mut sql = format!(
                "SELECT {} FROM rollouts WHERE 1 = 1",
                codec::ROLLOUT_COLUMNS
            );
            let mut args: Vec<Value> = Vec::new();
            if let Some(b) = q.before {
                args.push(Value::Text(b.to_string()));
                sql.push_str(&format!(" AND id < ?{}", args.len()));
            }
            if q.active_only {
                sql.push_str(" AND phase NOT IN ('SUCCEEDED', 'FAILED', 'ABORTED')");
            }
            args.push(Value::Integer(
                i64::try_from(q.limit).unwrap_or(i64::MAX - 1) + 1,
            ));
            sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut items = Vec::new();
            for row in stmt.query_map(params_from_iter(args.iter()), codec::stored_rollout)? {
                if let Some(r) = codec::skip_unreadable(row)? {
                    items.push(r);
                }
            }
            let more = items.len() > q.limit;
            items.truncate(q.limit);
            Ok(Page { items, more })
        })
        .await
    }

    async fn save_rollout(&self, rollout: Rollout, version: u64) -> Result<u64> {
        self.write(move |tx| logic::save_rollout(tx, rollout, version))
            .await
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
        self.scan(move |conn, cancel| {
            let mut sql = format!("SELECT {} FROM operations WHERE 1 = 1", codec::OP_COLUMNS);
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
            let mut items = Vec::new();
            for row in stmt.query_map(params_from_iter(args.iter()), codec::stored_op)? {
                cancel.check()?;
                if let Some(s) = codec::skip_unreadable(row)? {
                    items.push(s.op);
                }
            }
            let more = items.len() > q.limit;
            items.truncate(q.limit);
            Ok(Page { items, more })
        })
        .await
    }

    async fn request_cancel(
        &self,
        id: OperationId,
        by: bm_domain::Actor,
        now: Timestamp,
    ) -> Result<Operation> {
        self.write(move |tx| logic::request_cancel(tx, id, by.clone(), now))
            .await
    }

    async fn claim(&self, lease: &Lease, now: Timestamp, limit: usize) -> Result<Vec<Claimed>> {
        let lease = lease.clone();
        self.write(move |tx| logic::claim(tx, &lease, now, limit))
            .await
    }

    async fn renew(&self, lease: &Lease, held: &[(OperationId, u64)]) -> Result<Renewal> {
        let (lease, held) = (lease.clone(), held.to_vec());
        self.write(move |tx| tx.renew_leases(&lease, &held)).await
    }

    async fn release(&self, owner: &str) -> Result<usize> {
        let owner = owner.to_owned();
        self.write(move |tx| tx.release_leases(&owner)).await
    }

    async fn save_progress(
        &self,
        fence: &Fence,
        operation: &Operation,
        events: Vec<OperationEvent>,
    ) -> Result<bool> {
        let (fence, op) = (fence.clone(), operation.clone());
        self.write(move |tx| logic::save_progress(tx, &fence, &op, events))
            .await
    }

    async fn finish(
        &self,
        fence: &Fence,
        operation: Operation,
        outcome: Outcome,
        events: Vec<OperationEvent>,
        now: Timestamp,
    ) -> Result<(Operation, Machine)> {
        let fence = fence.clone();
        self.write(move |tx| logic::finish(tx, &fence, operation, outcome, events, now))
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
            let mut out = Vec::new();
            for row in stmt.query_map(rusqlite::params![after, key, limit as i64], codec::event)? {
                // Both filters apply when both are given.
                if let Some(e) = codec::skip_unreadable(row)?
                    && filter.matches(&e)
                {
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
        if let Err(e) = self.send(Command::Log(line)) {
            tracing::warn!(error = %e, "log line dropped");
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
            let rows = stmt.query_map(
                rusqlite::params![
                    operation.to_string(),
                    i64::try_from(after).unwrap_or(i64::MAX),
                    limit as i64
                ],
                codec::log_line,
            )?;
            let mut out = Vec::new();
            for row in rows {
                out.extend(codec::skip_unreadable(row)?);
            }
            Ok(out)
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
        if self.read_only.is_some() {
            return Ok(());
        }
        self.write(|_| Ok(())).await
    }

    fn condition(&self) -> StoreCondition {
        self.condition.get()
    }

    fn watch_condition(&self) -> watch::Receiver<StoreCondition> {
        self.condition.watch()
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

    fn fleet(
        n: usize,
        labels: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
    ) -> Vec<Machine> {
        (0..n)
            .map(|i| {
                Machine::register(
                    MachineId::new(format!("m-{i:05}")).unwrap(),
                    bm_domain::MachineSpec {
                        provider: "fake".into(),
                        mac_addresses: vec![
                            format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256)
                                .parse()
                                .unwrap(),
                        ],
                        ..Default::default()
                    },
                    bm_domain::Labels::from_pairs(labels(i)).unwrap(),
                    Timestamp::EPOCH,
                )
                .unwrap()
            })
            .collect()
    }

    /// A selector with an equality reads the machines the index names, up to the page; one
    /// with only negative requirements reads machines in order until the page is full.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_selected_page_reads_its_matches_not_the_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
        let machines = fleet(3000, |i| {
            if i % 100 == 7 {
                vec![("pick", "yes"), ("rack", "r1")]
            } else {
                vec![("rack", "r1")]
            }
        });
        store.import_machines(machines, false).await.unwrap();
        let read = |selector: &str, limit: usize, phase: Option<bm_domain::Phase>| {
            let q = MachineQuery {
                limit,
                phase,
                selector: selector.parse().unwrap(),
                ..MachineQuery::default()
            };
            let l = store
                .readers
                .with(|conn| list::machines(conn, &q, &Cancel::default()))
                .unwrap();
            (l.page.items.len(), l.page.more, l.rows_read)
        };
        // 30 machines have pick=yes.
        assert_eq!(read("pick=yes", 5, None), (5, true, 6));
        assert_eq!(read("pick in (yes,no),rack!=r2", 5, None), (5, true, 6));
        assert_eq!(read("pick", 50, None), (30, false, 30));
        assert_eq!(
            read("pick", 50, Some(bm_domain::Phase::Maintenance)),
            (0, false, 30)
        );
        // Only negative requirements: no index to use, but still only up to the page.
        assert_eq!(read("!pick", 5, None), (5, true, 6));
        // Without the index every one of the 3000 would have been read to find the 30.
        assert_eq!(read("rack!=r2,pick=yes", 100, None).2, 30);
    }

    /// Dropping a listing's future cancels its blocking read: the flag its loops check is
    /// set, and a SQLite statement running for it is interrupted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_a_listing_stops_its_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
        store
            .import_machines(fleet(500, |_| vec![("rack", "r1")]), false)
            .await
            .unwrap();

        // A scan whose caller went away stops at its next row.
        let (started, started_rx) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let (done, done_rx) = std::sync::mpsc::channel();
        let listing = store.scan(move |conn, cancel| {
            started.send(()).unwrap();
            go_rx.recv().unwrap();
            let q = MachineQuery {
                limit: 1000,
                selector: "!absent".parse().unwrap(),
                ..MachineQuery::default()
            };
            let r = list::machines(conn, &q, cancel).map(|l| l.rows_read);
            done.send(format!("{r:?}")).unwrap();
            r
        });
        let mut listing = Box::pin(listing);
        tokio::select! {
            biased;
            r = &mut listing => panic!("the read ended early: {r:?}"),
            () = async { tokio::task::spawn_blocking(move || started_rx.recv().unwrap()).await.unwrap() } => {}
        }
        drop(listing);
        go.send(()).unwrap();
        let outcome = tokio::task::spawn_blocking(move || done_rx.recv().unwrap())
            .await
            .unwrap();
        // Stopped by the check between rows, or by SQLite's progress handler in the query.
        assert!(
            outcome.contains("Abandoned") || outcome.contains("OperationInterrupted"),
            "{outcome}"
        );

        // A statement running when the caller goes away is interrupted.
        let (started, started_rx) = std::sync::mpsc::channel();
        let (done, done_rx) = std::sync::mpsc::channel();
        let endless = store.scan(move |conn, _| {
            started.send(()).unwrap();
            let r = conn.query_row(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c",
                [],
                |r| r.get::<_, i64>(0),
            );
            done.send(r.map_err(|e| e.sqlite_error_code())).unwrap();
            Ok(())
        });
        let mut endless = Box::pin(endless);
        tokio::select! {
            biased;
            r = &mut endless => panic!("the endless statement ended: {r:?}"),
            () = async { tokio::task::spawn_blocking(move || started_rx.recv().unwrap()).await.unwrap() } => {}
        }
        drop(endless);
        let outcome = tokio::task::spawn_blocking(move || {
            done_rx.recv_timeout(std::time::Duration::from_secs(120))
        })
        .await
        .unwrap()
        .expect("the statement was not interrupted");
        assert_eq!(
            outcome,
            Err(Some(rusqlite::ErrorCode::OperationInterrupted))
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(SqliteConfig::new(dir.path())).unwrap());
        let conn = Connection::open(dir.path().join("baremetal.db")).unwrap();
        conn.pragma_update(None, "user_version", schema::known_version() + 1)
            .unwrap();
        drop(conn);
        let err = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
    }
}
