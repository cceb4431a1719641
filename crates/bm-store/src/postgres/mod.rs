//! The PostgreSQL backend: one database shared by any number of server replicas.
//!
//! Writes go through one writer thread per store that commits in batches, as on SQLite, and
//! run the same transaction functions (`logic.rs`); what several writers on one database
//! need (row locks, a savepoint per job, revisions taken at commit) is in `writer.rs`. Reads
//! run on a small pool of connections on the blocking thread pool. The client is the
//! synchronous `postgres` crate (see docs/ARCHITECTURE.md for why); its calls never run on
//! an async worker thread.
//!
//! Events and log lines reach subscribers through a feed that reads the tables in revision
//! order: after each local commit (its own rows are published straight away when nothing
//! came between), and whenever another replica's commit `NOTIFY`s it, or at the latest
//! every [`POLL`]. The table is the truth; a notification only says "look now". So a
//! subscriber of any replica sees every event of every replica, in revision order, with no
//! gap and no duplicate.
//!
//! Unlike SQLite, opening does not release leases: the other replicas holding them are
//! alive; a dead one's leases expire.

mod schema;
mod tls;
mod writer;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use bm_domain::rules::Outcome;
use bm_domain::{
    LogLine, MacAddress, Machine, MachineEvent, MachineId, MachinePatch, Observation, Operation,
    OperationEvent, OperationId, RequestId, Rollout, RolloutId, Timestamp,
};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, NoTls, Row};
use tokio::sync::{broadcast, oneshot, watch};

use crate::condition::ConditionCell;
use crate::logic::{self, StoredOp, Tx};
use crate::sqlite::codec as docs;
use crate::{
    Admission, BROADCAST_CAPACITY, Claimed, EventFilter, Fence, ImportOutcome, Lease, MachineCount,
    MachineQuery, OperationQuery, Page, Recorded, Renewal, Result, RolloutQuery, SchemaStatus,
    Store, StoreCondition, StoreError, StoredRollout,
};
use writer::{Command, PgTx, Writer};

/// How often a feed reads the tables when no notification came (a notification can be lost
/// with a connection).
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// Settings of a [`PgStore`].
#[derive(Clone, Debug)]
pub struct PgConfig {
    /// The database, as a libpq-style URL (`postgres://USER@HOST:PORT/DB`).
    pub url: String,
    /// Read connections (reads beyond this many wait for one). The store also opens one
    /// connection for its writer and one for its feed.
    pub pool_size: usize,
    /// The most a statement may run before the database cancels it (`None`: no limit).
    pub statement_timeout: Option<Duration>,
    /// The most a transaction of this store may sit idle (`None`: no limit) before the
    /// database ends its session, rolling it back and releasing its row locks. The writer
    /// never waits inside a transaction, so only a stalled process (a frozen VM, SIGSTOP)
    /// reaches it: without it, the locks it holds would keep every other replica from
    /// taking its operations over, long after their leases expired. Servers set it to
    /// their lease duration.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// The most writes committed together.
    pub max_batch: usize,
    /// Told of every commit (metrics); nobody by default.
    pub commit_observer: Option<Arc<dyn crate::CommitObserver>>,
}

impl PgConfig {
    /// Defaults for a database URL.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            pool_size: 4,
            statement_timeout: Some(Duration::from_secs(30)),
            idle_in_transaction_timeout: Some(Duration::from_secs(15)),
            max_batch: 1024,
            commit_observer: None,
        }
    }
}

/// The [`Store`] on a PostgreSQL database that several processes may share.
pub struct PgStore {
    writer: Mutex<Option<mpsc::Sender<Command>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Arc<Readers>,
    feed: Arc<Feed>,
    stop: Arc<AtomicBool>,
    condition: Arc<ConditionCell>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

/// An error with its causes, on one line.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// Where and how to connect: the database (with the session's statement timeout) and TLS.
#[derive(Clone)]
pub(crate) struct Target {
    config: postgres::Config,
    tls: tls::Tls,
}

impl Target {
    /// Parses a URL (with libpq's `sslmode` and `sslrootcert`, see `tls.rs`).
    fn parse(
        url: &str,
        timeout: Option<Duration>,
        idle_in_transaction: Option<Duration>,
    ) -> Result<Target> {
        let (rest, mode, root) = tls::split(url)?;
        let mut config = postgres::Config::from_str(&rest).map_err(|e| {
            StoreError::backend(std::io::Error::other(format!(
                "invalid PostgreSQL URL: {}",
                chain(&e)
            )))
        })?;
        config.ssl_mode(match mode {
            tls::Mode::Disable => postgres::config::SslMode::Disable,
            tls::Mode::Prefer => postgres::config::SslMode::Prefer,
            _ => postgres::config::SslMode::Require,
        });
        let settings: Vec<String> = [
            ("statement_timeout", timeout),
            ("idle_in_transaction_session_timeout", idle_in_transaction),
        ]
        .into_iter()
        .filter_map(|(name, t)| t.map(|t| format!("-c {name}={}", t.as_millis().max(1))))
        .collect();
        if !settings.is_empty() {
            config.options(&settings.join(" "));
        }
        config.application_name("bm-server");
        Ok(Target {
            config,
            tls: tls::connector(mode, root.as_deref())?,
        })
    }

    /// Connects, with the session's timeouts set.
    fn connect(&self) -> Result<Client> {
        Ok(match &self.tls.connector {
            Some(c) => self.config.connect(c.clone())?,
            None => self.config.connect(NoTls)?,
        })
    }
}

/// Runs blocking client work on a thread of its own: the synchronous client must not run on
/// an async worker thread.
fn off_runtime<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|_| Err(StoreError::backend(std::io::Error::other("panicked"))))
    })
}

/// Decoding of rows into domain values.
pub(crate) struct Rows;

impl Rows {
    pub(crate) fn machine(r: &Row) -> Result<Machine> {
        let id: String = r.get(0);
        let m: Machine = docs::document("machines", &id, r.get(1), r.get(2))?;
        if m.id.as_str() != id {
            return Err(docs::corrupt_row(
                "machines",
                &id,
                format_args!("the document is of machine {}", m.id),
            ));
        }
        Ok(m)
    }

    /// A rollouts row selected as `id, doc, doc_crc32, version`.
    pub(crate) fn stored_rollout(r: &Row) -> Result<StoredRollout> {
        let id: String = r.get(0);
        let rollout: Rollout = docs::document("rollouts", &id, r.get(1), r.get(2))?;
        if rollout.id.to_string() != id {
            return Err(docs::corrupt_row(
                "rollouts",
                &id,
                format_args!("the document is of rollout {}", rollout.id),
            ));
        }
        let version = u64::try_from(r.get::<_, i64>(3))
            .map_err(|_| docs::corrupt_row("rollouts", &id, "its version is negative"))?;
        Ok(StoredRollout { rollout, version })
    }

    pub(crate) fn stored_op(r: &Row) -> Result<StoredOp> {
        let id: String = r.get(0);
        let op = docs::operation(&id, r.get(1), r.get(2), r.get(3))?;
        let owner: Option<String> = r.get(4);
        let expires: Option<i64> = r.get(5);
        Ok(StoredOp {
            op,
            generation: r.get::<_, i64>(6).cast_unsigned(),
            lease: owner.map(|owner| Lease {
                owner,
                expires_at: Timestamp::from_unix_micros(expires.unwrap_or(0)),
            }),
        })
    }

    pub(crate) fn event(r: &Row) -> Result<OperationEvent> {
        let revision: i64 = r.get(0);
        let bad = |e: &dyn std::fmt::Display| docs::corrupt_row("events", &revision.to_string(), e);
        Ok(OperationEvent {
            revision: revision as u64,
            operation_id: r.get::<_, &str>(1).parse().map_err(|e| bad(&e))?,
            machine_id: MachineId::new(r.get::<_, String>(2)).map_err(|e| bad(&e))?,
            time: Timestamp::from_unix_micros(r.get(3)),
            operation_type: r.get::<_, &str>(4).parse().map_err(|e| bad(&e))?,
            kind: r.get::<_, &str>(5).parse().map_err(|e| bad(&e))?,
            phase: r.get::<_, &str>(6).parse().map_err(|e| bad(&e))?,
            stage: r.get(7),
            attempt: u32::try_from(r.get::<_, i64>(8)).map_err(|e| bad(&e))?,
            message: r.get(9),
        })
    }

    pub(crate) fn log_line(r: &Row) -> Result<LogLine> {
        let op: &str = r.get(0);
        let sequence: i64 = r.get(1);
        Ok(LogLine {
            operation_id: op
                .parse()
                .map_err(|e| docs::corrupt_row("logs", &format!("{op}/{sequence}"), e))?,
            sequence: sequence as u64,
            time: Timestamp::from_unix_micros(r.get(2)),
            stage: r.get(3),
            tag: r.get(4),
            message: r.get(5),
        })
    }
}

const OP_COLUMNS: &str =
    "id, doc, doc_crc32, cancel_requested, lease_owner, lease_expires, lease_generation";
const EVENT_COLUMNS: &str = "revision, operation_id, machine_id, time, operation_type, kind, phase, stage, attempt, message";
const LOG_COLUMNS: &str = "operation_id, sequence, time, stage, tag, message";

/// Keeps the readable rows of a listing and reports the others.
fn readable<T>(rows: &[Row], f: impl Fn(&Row) -> Result<T>) -> Vec<T> {
    rows.iter()
        .filter_map(|r| match f(r) {
            Ok(v) => Some(v),
            Err(e) => {
                docs::report_unreadable(&e);
                None
            }
        })
        .collect()
}

/// Tells the condition what a call's result says of the database: an error that means it
/// cannot be reached or cannot take writes (down, failing over, out of disk) makes it
/// unreachable; any answer makes it reached again. A statement canceled at the statement
/// timeout says nothing of the database as a whole (one slow listing must not take the
/// server out of a load balancer's rotation).
pub(super) fn note_reach<T>(condition: &ConditionCell, r: &Result<T>) {
    match r {
        Err(e @ StoreError::Unavailable(source)) => {
            let timed_out = source
                .downcast_ref::<postgres::Error>()
                .and_then(postgres::Error::code)
                == Some(&postgres::error::SqlState::QUERY_CANCELED);
            if !timed_out {
                condition.unreachable(&chain(e));
            }
        }
        _ => condition.reached(),
    }
}

/// The read connections.
struct Readers {
    conns: Vec<Mutex<Client>>,
    next: AtomicUsize,
    target: Target,
    /// Told whether the database answered.
    condition: Arc<ConditionCell>,
}

impl Readers {
    /// Runs `f` on a read connection. A connection that the database dropped (it restarted)
    /// is found out by its first use: then `f` runs once more on a new one.
    fn with<T>(&self, f: impl FnMut(&mut Client) -> Result<T>) -> Result<T> {
        let r = self.on_a_connection(f);
        note_reach(&self.condition, &r);
        r
    }

    fn on_a_connection<T>(&self, mut f: impl FnMut(&mut Client) -> Result<T>) -> Result<T> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut conn = (0..n)
            .find_map(|i| self.conns[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| {
                self.conns[start % n]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
            });
        if conn.is_closed() {
            *conn = self.target.connect()?;
            return f(&mut conn);
        }
        match f(&mut conn) {
            Err(StoreError::Unavailable(_)) if conn.is_closed() => {
                *conn = self.target.connect()?;
                f(&mut conn)
            }
            r => r,
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        // Closing a connection blocks, which panics on an async worker thread: there, they
        // are closed on a thread of their own.
        let conns = std::mem::take(&mut self.conns);
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::Builder::new()
                .name("bm-store-pg-close".into())
                .spawn(move || drop(conns));
        }
    }
}

/// Where the feed has published up to.
#[derive(Debug, Default)]
struct Cursor {
    events: u64,
    logs: u64,
}

/// Publishes committed events and log lines, from every writer, in revision order.
pub(crate) struct Feed {
    cursor: Mutex<Cursor>,
    events: broadcast::Sender<Arc<OperationEvent>>,
    logs: broadcast::Sender<Arc<LogLine>>,
}

/// How many rows the feed reads at a time.
const FEED_CHUNK: i64 = 1000;

impl Feed {
    fn lock(&self) -> MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A local batch committed revisions `first..=last` (0, 0: none) of each stream: they are
    /// published straight away when the feed is just before them, else read from the table
    /// with whatever came before them.
    pub(crate) fn committed(
        &self,
        conn: &mut Client,
        (ev_first, ev_last, events): (u64, u64, Vec<OperationEvent>),
        (lg_first, lg_last, lines): (u64, u64, Vec<(u64, LogLine)>),
    ) {
        let mut cursor = self.lock();
        if ev_last > cursor.events {
            if cursor.events + 1 == ev_first {
                for e in events {
                    let _ = self.events.send(Arc::new(e));
                }
                cursor.events = ev_last;
            } else if let Err(e) = self.read_events(conn, &mut cursor) {
                tracing::warn!(error = %chain(&e), "could not read new events; the feed retries");
            }
        }
        if lg_last > cursor.logs {
            if cursor.logs + 1 == lg_first {
                for (_, l) in lines {
                    let _ = self.logs.send(Arc::new(l));
                }
                cursor.logs = lg_last;
            } else if let Err(e) = self.read_logs(conn, &mut cursor) {
                tracing::warn!(error = %chain(&e), "could not read new log lines; the feed retries");
            }
        }
    }

    /// Reads and publishes whatever was committed after the cursor.
    fn catch_up(&self, conn: &mut Client) -> Result<()> {
        let mut cursor = self.lock();
        self.read_events(conn, &mut cursor)?;
        self.read_logs(conn, &mut cursor)
    }

    fn read_events(&self, conn: &mut Client, cursor: &mut Cursor) -> Result<()> {
        loop {
            let rows = conn.query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE revision > $1 ORDER BY revision LIMIT $2"
                ),
                &[&(cursor.events as i64), &FEED_CHUNK],
            )?;
            for r in &rows {
                cursor.events = r.get::<_, i64>(0) as u64;
                match Rows::event(r) {
                    Ok(e) => {
                        let _ = self.events.send(Arc::new(e));
                    }
                    Err(e) => docs::report_unreadable(&e),
                }
            }
            if (rows.len() as i64) < FEED_CHUNK {
                return Ok(());
            }
        }
    }

    fn read_logs(&self, conn: &mut Client, cursor: &mut Cursor) -> Result<()> {
        loop {
            let rows = conn.query(
                &format!(
                    "SELECT {LOG_COLUMNS}, log_revision FROM logs WHERE log_revision > $1 ORDER BY log_revision LIMIT $2"
                ),
                &[&(cursor.logs as i64), &FEED_CHUNK],
            )?;
            for r in &rows {
                cursor.logs = r.get::<_, i64>(6) as u64;
                match Rows::log_line(r) {
                    Ok(l) => {
                        let _ = self.logs.send(Arc::new(l));
                    }
                    Err(e) => docs::report_unreadable(&e),
                }
            }
            if (rows.len() as i64) < FEED_CHUNK {
                return Ok(());
            }
        }
    }
}

/// The feed's listener: wakes at every other writer's commit, or every [`POLL`], and reads
/// what is new. Reconnects when its connection is lost; stops with the store.
fn listen(target: Target, feed: Weak<Feed>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match target.connect().and_then(|mut c| {
            c.batch_execute("LISTEN bm_store")?;
            Ok(c)
        }) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "the store's feed cannot reach the database; retrying");
                std::thread::sleep(POLL);
                continue;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let Some(feed) = feed.upgrade() else { return };
            if let Err(e) = feed.catch_up(&mut conn) {
                tracing::warn!(error = %chain(&e), "the store's feed failed to read; reconnecting");
                break;
            }
            drop(feed);
            let mut notes = conn.notifications();
            if notes.timeout_iter(POLL).next().is_err() {
                break;
            }
            // Several commits may have notified meanwhile: one read serves them all.
            while let Ok(Some(_)) = notes.iter().next() {}
        }
    }
}

impl PgStore {
    /// Connects to the database, applies pending migrations (under an advisory lock, so
    /// that replicas starting together are safe), and starts the writer and the feed.
    /// Leases are left as they are: other replicas may hold them.
    ///
    /// # Errors
    ///
    /// [`StoreError::SchemaTooNew`], or a backend error (the database cannot be reached,
    /// the URL is invalid).
    pub fn open(config: PgConfig) -> Result<Self> {
        off_runtime(move || Self::open_blocking(config))
    }

    fn open_blocking(config: PgConfig) -> Result<Self> {
        let target = Target::parse(
            &config.url,
            config.statement_timeout,
            config.idle_in_transaction_timeout,
        )?;
        let mut conn = target.connect()?;
        schema::migrate(&mut conn)?;
        let counters = conn.query("SELECT name, value FROM counters", &[])?;
        let mut cursor = Cursor::default();
        for r in counters {
            match r.get::<_, &str>(0) {
                "events" => cursor.events = r.get::<_, i64>(1) as u64,
                "logs" => cursor.logs = r.get::<_, i64>(1) as u64,
                _ => {}
            }
        }
        let feed = Arc::new(Feed {
            cursor: Mutex::new(cursor),
            events: broadcast::channel(BROADCAST_CAPACITY).0,
            logs: broadcast::channel(BROADCAST_CAPACITY).0,
        });
        let readers = (0..config.pool_size.max(1))
            .map(|_| target.connect().map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        let condition = Arc::new(ConditionCell::new(StoreCondition::Ok));
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            condition: condition.clone(),
            conn,
            target: target.clone(),
            rx,
            max_batch: config.max_batch.max(1),
            feed: feed.clone(),
            stmts: Default::default(),
            unwritten: Vec::new(),
            last_used: std::time::Instant::now(),
            observer: config.commit_observer.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("bm-store-pg-writer".into())
            .spawn(move || writer.run())
            .map_err(StoreError::backend)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (listen_target, listen_feed, listen_stop) =
            (target.clone(), Arc::downgrade(&feed), stop.clone());
        std::thread::Builder::new()
            .name("bm-store-pg-feed".into())
            .spawn(move || listen(listen_target, listen_feed, listen_stop))
            .map_err(StoreError::backend)?;
        Ok(PgStore {
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            readers: Arc::new(Readers {
                conns: readers,
                next: AtomicUsize::new(0),
                target,
                condition: condition.clone(),
            }),
            feed,
            stop,
            condition,
        })
    }

    /// The schema version of the database at `url` and the one this program knows, read
    /// without changing anything.
    ///
    /// # Errors
    ///
    /// A backend error (the database cannot be reached, the URL is invalid).
    pub fn schema_status(url: &str) -> Result<SchemaStatus> {
        let target = Target::parse(url, Some(Duration::from_secs(30)), None)?;
        off_runtime(move || {
            let mut conn = target.connect()?;
            Ok(SchemaStatus {
                found: schema::version(&mut conn)?,
                supported: schema::known_version(),
            })
        })
    }

    /// Commits what is queued, stops the writer thread and waits for it; stops the feed.
    /// Later calls fail with [`StoreError::Closed`].
    pub fn close(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self
            .writer_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
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

    /// Runs `f` in the writer's batch transaction (again, should it meet a conflict with
    /// another writer); keeps its writes when `keep` says so.
    async fn write_with<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut PgTx<'_>) -> (Result<T>, bool) + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Write(writer::job(f, tx)))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn write<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&mut PgTx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_with(move |tx| (f(tx), true)).await
    }

    /// Like [`Self::write`], for a keyed job (see [`writer::Keys`]): `f` reads and writes only
    /// the rows of `keys`.
    async fn write_keyed<T: Send + 'static>(
        &self,
        keys: writer::Keys,
        mut f: impl FnMut(&mut PgTx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let job = writer::job(move |tx| (f(tx), true), tx).keyed(keys);
        self.send(Command::Write(job))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut Client) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(f))
            .await
            .map_err(StoreError::backend)?
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Parameters of a query built at run time.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

#[async_trait]
impl Store for PgStore {
    async fn register_machine(&self, machine: Machine) -> Result<Machine> {
        self.write(move |tx| logic::register(tx, machine.clone()))
            .await
    }

    async fn import_machines(
        &self,
        machines: Vec<Machine>,
        dry_run: bool,
    ) -> Result<Vec<Result<ImportOutcome>>> {
        self.write_with(move |tx| (logic::import(tx, machines.clone(), dry_run), !dry_run))
            .await
    }

    async fn get_machine(&self, id: &MachineId) -> Result<Machine> {
        let id = id.clone();
        self.read(move |conn| {
            let rows = conn.query(
                "SELECT id, doc, doc_crc32 FROM machines WHERE id = $1",
                &[&id.as_str()],
            )?;
            match rows.first() {
                Some(r) => Rows::machine(r),
                None => Err(StoreError::MachineNotFound(id.clone())),
            }
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
        self.read(move |conn| {
            let rows = conn.query(
                "SELECT sequence, time, kind, message FROM machine_events \
                 WHERE machine_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
                &[&id.as_str(), &after, &limit],
            )?;
            rows.iter()
                .map(|r| {
                    let kind: String = r.get(2);
                    logic::machine_event_row(&id, r.get(0), r.get(1), &kind, r.get(3))
                })
                .collect()
        })
        .await
    }

    async fn machine_by_mac(&self, mac: &MacAddress) -> Result<Option<Machine>> {
        let mac = mac.to_string();
        self.read(move |conn| {
            let rows = conn.query(
                "SELECT m.id, m.doc, m.doc_crc32 FROM machine_macs AS x \
                 JOIN machines AS m ON m.id = x.machine_id WHERE x.mac = $1",
                &[&mac],
            )?;
            rows.first().map(Rows::machine).transpose()
        })
        .await
    }

    async fn unclaimed_operations(&self) -> Result<u64> {
        self.read(|conn| {
            // The WHERE of the partial index operations_unheld, so that it is the one read.
            let row = conn.query_one(
                "SELECT COUNT(*) FROM operations WHERE phase IN ('PENDING', 'RUNNING') AND lease_owner IS NULL",
                &[],
            )?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or_default())
        })
        .await
    }

    async fn machine_counts(&self) -> Result<Vec<MachineCount>> {
        self.read(|conn| {
            let rows = conn.query(
                "SELECT phase, effective_state, COUNT(*) FROM machines GROUP BY phase, effective_state",
                &[],
            )?;
            let mut counts = rows
                .iter()
                .map(|r| logic::machine_count_row(r.get(0), r.get(1), r.get(2)))
                .collect::<Result<Vec<_>>>()?;
            counts.sort();
            Ok(counts)
        })
        .await
    }

    async fn list_machines(&self, q: &MachineQuery) -> Result<Page<Machine>> {
        let q = q.clone();
        self.read(move |conn| {
            // Phase and state are filtered by the database, labels here, reading in id
            // order until the page (and one more, to know there is more) is full.
            let chunk = (q.limit as i64 + 1).clamp(64, 1024);
            let mut after = q.after.as_ref().map(|a| a.as_str().to_owned());
            let mut items = Vec::new();
            loop {
                let mut sql = "SELECT id, doc, doc_crc32 FROM machines WHERE TRUE".to_owned();
                let mut params: Params = Vec::new();
                if let Some(a) = &after {
                    params.push(Box::new(a.clone()));
                    sql.push_str(&format!(" AND id > ${}", params.len()));
                }
                if let Some(p) = q.phase {
                    params.push(Box::new(p.as_str()));
                    sql.push_str(&format!(" AND phase = ${}", params.len()));
                }
                if let Some(s) = q.effective_state {
                    params.push(Box::new(s.as_str()));
                    sql.push_str(&format!(" AND effective_state = ${}", params.len()));
                }
                params.push(Box::new(chunk));
                sql.push_str(&format!(" ORDER BY id LIMIT ${}", params.len()));
                let rows = conn.query(&sql, &refs(&params))?;
                if let Some(last) = rows.last() {
                    after = Some(last.get(0));
                }
                for m in readable(&rows, Rows::machine) {
                    if q.selector.matches(&m.labels) && items.len() <= q.limit {
                        items.push(m);
                    }
                }
                if items.len() > q.limit || (rows.len() as i64) < chunk {
                    break;
                }
            }
            let more = items.len() > q.limit;
            items.truncate(q.limit);
            Ok(Page { items, more })
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
        // Not keyed: a reading that reveals a power change also appends a machine event.
        let (id, observation) = (id.clone(), observation.clone());
        self.write(move |tx| logic::record_observation(tx, &id, &observation, now))
            .await
    }

    async fn admit(&self, operation: Operation) -> Result<Admission> {
        let keys = writer::Keys {
            operations: Vec::new(),
            machines: vec![operation.machine_id.clone()],
            requests: vec![(operation.machine_id.clone(), operation.request_id.clone())],
        };
        self.write_keyed(keys, move |tx| logic::admit(tx, operation.clone()))
            .await
    }

    async fn create_rollout(&self, rollout: Rollout) -> Result<(StoredRollout, bool)> {
        self.write(move |tx| logic::create_rollout(tx, rollout.clone()))
            .await
    }

    async fn get_rollout(&self, id: RolloutId) -> Result<StoredRollout> {
        self.read(move |conn| {
            let rows = conn.query(
                "SELECT id, doc, doc_crc32, version FROM rollouts WHERE id = $1",
                &[&id.to_string()],
            )?;
            match rows.first() {
                Some(r) => Rows::stored_rollout(r),
                None => Err(StoreError::RolloutNotFound(id)),
            }
        })
        .await
    }

    async fn rollout_by_request(&self, request: &RequestId) -> Result<Option<StoredRollout>> {
        let request = request.clone();
        self.read(move |conn| {
            let rows = conn.query(
                "SELECT id, doc, doc_crc32, version FROM rollouts WHERE request_id = $1",
                &[&request.as_str()],
            )?;
            rows.first().map(Rows::stored_rollout).transpose()
        })
        .await
    }

    async fn list_rollouts(&self, q: &RolloutQuery) -> Result<Page<StoredRollout>> {
        let q = q.clone();
        self.read(move |conn| {
            let mut sql = "SELECT id, doc, doc_crc32, version FROM rollouts WHERE TRUE".to_owned();
            let mut params: Params = Vec::new();
            if let Some(b) = q.before {
                params.push(Box::new(b.to_string()));
                sql.push_str(&format!(" AND id < ${}", params.len()));
            }
            if q.active_only {
                sql.push_str(" AND phase NOT IN ('SUCCEEDED', 'FAILED', 'ABORTED')");
            }
            params.push(Box::new(i64::try_from(q.limit).unwrap_or(i64::MAX - 1) + 1));
            sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));
            let rows = conn.query(&sql, &refs(&params))?;
            let mut items = readable(&rows, Rows::stored_rollout);
            let more = items.len() > q.limit;
            items.truncate(q.limit);
            Ok(Page { items, more })
        })
        .await
    }

    async fn save_rollout(&self, rollout: Rollout, version: u64) -> Result<u64> {
        self.write(move |tx| logic::save_rollout(tx, rollout.clone(), version))
            .await
    }

    async fn get_operation(&self, id: OperationId) -> Result<Operation> {
        self.read(move |conn| {
            let rows = conn.query(
                &format!("SELECT {OP_COLUMNS} FROM operations WHERE id = $1"),
                &[&id.to_string()],
            )?;
            match rows.first() {
                Some(r) => Rows::stored_op(r).map(|s| s.op),
                None => Err(StoreError::OperationNotFound(id)),
            }
        })
        .await
    }

    async fn list_operations(&self, q: &OperationQuery) -> Result<Page<Operation>> {
        let q = q.clone();
        self.read(move |conn| {
            let mut sql = format!("SELECT {OP_COLUMNS} FROM operations WHERE TRUE");
            let mut params: Params = Vec::new();
            if let Some(b) = q.before {
                params.push(Box::new(b.to_string()));
                sql.push_str(&format!(" AND id < ${}", params.len()));
            }
            if let Some(m) = &q.machine_id {
                params.push(Box::new(m.as_str().to_owned()));
                sql.push_str(&format!(" AND machine_id = ${}", params.len()));
            }
            if let Some(t) = q.op_type {
                params.push(Box::new(t.as_str()));
                sql.push_str(&format!(" AND type = ${}", params.len()));
            }
            if let Some(p) = q.phase {
                params.push(Box::new(p.as_str()));
                sql.push_str(&format!(" AND phase = ${}", params.len()));
            }
            params.push(Box::new(q.limit as i64 + 1));
            sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));
            let rows = conn.query(&sql, &refs(&params))?;
            let mut items: Vec<Operation> = readable(&rows, Rows::stored_op)
                .into_iter()
                .map(|s| s.op)
                .collect();
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
        let keys = writer::Keys {
            operations: vec![op.id],
            machines: Vec::new(),
            requests: Vec::new(),
        };
        self.write_keyed(keys, move |tx| {
            logic::save_progress(tx, &fence, &op, events.clone())
        })
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
        let keys = writer::Keys {
            operations: vec![operation.id],
            machines: vec![operation.machine_id.clone()],
            requests: Vec::new(),
        };
        self.write_keyed(keys, move |tx| {
            logic::finish(
                tx,
                &fence,
                operation.clone(),
                outcome.clone(),
                events.clone(),
                now,
            )
        })
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
            let limit = limit as i64;
            let rows = match (&filter.operation_id, &filter.machine_id) {
                (Some(op), _) => conn.query(
                    &format!("SELECT {EVENT_COLUMNS} FROM events WHERE operation_id = $2 AND revision > $1 ORDER BY revision LIMIT $3"),
                    &[&after, &op.to_string(), &limit],
                )?,
                (None, Some(m)) => conn.query(
                    &format!("SELECT {EVENT_COLUMNS} FROM events WHERE machine_id = $2 AND revision > $1 ORDER BY revision LIMIT $3"),
                    &[&after, &m.as_str(), &limit],
                )?,
                (None, None) => conn.query(
                    &format!("SELECT {EVENT_COLUMNS} FROM events WHERE revision > $1 ORDER BY revision LIMIT $2"),
                    &[&after, &limit],
                )?,
            };
            Ok(readable(&rows, Rows::event)
                .into_iter()
                .filter(|e| filter.matches(e))
                .collect())
        })
        .await
    }

    async fn last_revision(&self) -> Result<u64> {
        self.read(|conn| {
            let v: i64 = conn
                .query_one("SELECT value FROM counters WHERE name = 'events'", &[])?
                .get(0);
            Ok(v as u64)
        })
        .await
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<OperationEvent>> {
        self.feed.events.subscribe()
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
            let rows = conn.query(
                &format!("SELECT {LOG_COLUMNS} FROM logs WHERE operation_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3"),
                &[
                    &operation.to_string(),
                    &i64::try_from(after).unwrap_or(i64::MAX),
                    &(limit as i64),
                ],
            )?;
            Ok(readable(&rows, Rows::log_line))
        })
        .await
    }

    async fn last_log_sequence(&self, operation: OperationId) -> Result<u64> {
        self.read(move |conn| {
            let seq: Option<i64> = conn
                .query_one(
                    "SELECT MAX(sequence) FROM logs WHERE operation_id = $1",
                    &[&operation.to_string()],
                )?
                .get(0);
            Ok(seq.unwrap_or(0) as u64)
        })
        .await
    }

    fn subscribe_logs(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.feed.logs.subscribe()
    }

    async fn flush(&self) -> Result<()> {
        self.write(|_| Ok(())).await
    }

    fn condition(&self) -> StoreCondition {
        self.condition.get()
    }

    fn watch_condition(&self) -> watch::Receiver<StoreCondition> {
        self.condition.watch()
    }
}
