//! The event and log streams observers follow: what is stored first, then live, without a
//! gap or a duplicate, with bounded memory per observer.
//!
//! Each stream subscribes to the store's live broadcast *before* reading what is stored, and
//! skips live items it already sent, which makes the hand-over gapless. A subscriber that
//! reads slower than events come does not hold anything up: the broadcast ring moves on, the
//! subscriber is told it lagged, and it reads the missed part back from the store before
//! going live again.
//!
//! # Memory
//!
//! What one stream holds for a reader that does not read is bounded by bytes, not only by
//! batches: its batches hold a share of [`crate::EngineConfig::stream_buffer_bytes`] until
//! the reader drops them, and a stream whose share is used up waits (the broadcast ring
//! moves on meanwhile; it catches up from the store when its reader reads again). Besides
//! that it holds at most the store page it is replaying ([`REPLAY_PAGE`] items). A batch is
//! at most [`MAX_BATCH`] items and [`MAX_BATCH_BYTES`] (or a quarter of the budget), so the
//! budget is exceeded only by a single item larger than it. [`Engine::stream_stats`]
//! reports what every stream holds.

use std::mem::size_of;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bm_domain::{LogLine, OperationEvent, OperationId};
use bm_store::{EventFilter, Store};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{Engine, ResumePoint, WorkflowError};

/// One delivery of a watch stream: events in revision order, or the error that ended it.
pub type EventBatch = Result<Batch<OperationEvent>, WorkflowError>;

/// One delivery of a log stream: lines in sequence order, or the error that ended it.
pub type LogBatch = Result<Batch<LogLine>, WorkflowError>;

/// The most items in one batch.
const MAX_BATCH: usize = 128;
/// A batch ends before it would pass this many bytes, or a quarter of its stream's budget
/// if that is less (it holds at least one item).
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Items read from the store per query while catching up.
const REPLAY_PAGE: usize = 256;

/// Items of a stream, in order. A batch holds its share of its stream's byte budget until
/// it is dropped (or turned into an iterator), so a reader that keeps batches without
/// sending them on keeps its stream waiting.
#[derive(Debug)]
pub struct Batch<T> {
    items: Vec<Arc<T>>,
    _charge: Charge,
}

impl<T> Deref for Batch<T> {
    type Target = [Arc<T>];

    fn deref(&self) -> &[Arc<T>] {
        &self.items
    }
}

impl<T> IntoIterator for Batch<T> {
    type Item = Arc<T>;
    type IntoIter = std::vec::IntoIter<Arc<T>>;

    /// The items; the batch's share of the budget is given back.
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// What the event and log streams hold at one moment, over all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Streams running.
    pub streams: usize,
    /// Bytes of events and log lines sent by the streams and not yet taken by their
    /// readers (an estimate of the memory they hold: the items and their strings).
    pub buffered_bytes: usize,
    /// Streams waiting because their reader does not take what they sent.
    pub waiting_for_readers: usize,
    /// Times, since the engine started, that a stream fell behind the live feed (its
    /// reader was slow, or the feed too fast) and read what it missed back from the store.
    pub catch_ups: u64,
}

/// The live counters behind [`StreamStats`], shared by the engine and its streams.
#[derive(Debug, Default)]
pub(crate) struct StreamGauge {
    streams: AtomicUsize,
    bytes: AtomicUsize,
    waiting: AtomicUsize,
    catch_ups: AtomicU64,
}

/// Counts one while it lives.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A batch's share of its stream's budget and of the gauge; given back when dropped.
#[derive(Debug)]
struct Charge {
    bytes: usize,
    gauge: Arc<StreamGauge>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.gauge.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The memory an item holds: the struct, its `Arc` and its strings.
trait Weigh {
    fn weight(&self) -> usize;
}

/// An `Arc`'s two counters.
const ARC_OVERHEAD: usize = 2 * size_of::<usize>();

impl Weigh for OperationEvent {
    fn weight(&self) -> usize {
        size_of::<Self>()
            + ARC_OVERHEAD
            + self.machine_id.as_str().len()
            + self.stage.len()
            + self.message.len()
    }
}

impl Weigh for LogLine {
    fn weight(&self) -> usize {
        size_of::<Self>() + ARC_OVERHEAD + self.stage.len() + self.tag.len() + self.message.len()
    }
}

/// The sending side of one stream: batches bounded by count and bytes, each charged to the
/// stream's budget before it is queued.
struct Sender<T> {
    tx: mpsc::Sender<Result<Batch<T>, WorkflowError>>,
    budget: Arc<Semaphore>,
    max_bytes: usize,
    max_batch_bytes: usize,
    gauge: Arc<StreamGauge>,
}

impl<T: Weigh> Sender<T> {
    fn new(engine: &Engine) -> (Self, mpsc::Receiver<Result<Batch<T>, WorkflowError>>) {
        let config = &engine.inner.config;
        let (tx, rx) = mpsc::channel(config.stream_buffer.max(1));
        // A semaphore counts at most `Semaphore::MAX_PERMITS`, and a batch takes a `u32`.
        let max_bytes = config
            .stream_buffer_bytes
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let sender = Sender {
            tx,
            budget: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
            max_batch_bytes: MAX_BATCH_BYTES.min(max_bytes / 4),
            gauge: engine.inner.streams.clone(),
        };
        (sender, rx)
    }

    /// Counts a catch-up from the store: the stream lagged behind the live feed.
    fn lagged(&self) {
        self.gauge.catch_ups.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends `items` in as many batches as their count and size need; false if the
    /// receiver is gone.
    async fn send(&self, items: impl IntoIterator<Item = Arc<T>>) -> bool {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for item in items {
            let weight = item.weight();
            if !batch.is_empty()
                && (batch.len() == MAX_BATCH || bytes + weight > self.max_batch_bytes)
            {
                if !self.send_batch(std::mem::take(&mut batch), bytes).await {
                    return false;
                }
                bytes = 0;
            }
            batch.push(item);
            bytes += weight;
        }
        batch.is_empty() || self.send_batch(batch, bytes).await
    }

    async fn send_batch(&self, items: Vec<Arc<T>>, bytes: usize) -> bool {
        // A batch larger than the whole budget takes all of it (and goes alone).
        let cost = u32::try_from(bytes.clamp(1, self.max_bytes)).unwrap_or(u32::MAX);
        let permit = match self.budget.clone().try_acquire_many_owned(cost) {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return false,
            Err(TryAcquireError::NoPermits) => {
                let _waiting = Counted::new(&self.gauge.waiting);
                tokio::select! {
                    permit = self.budget.clone().acquire_many_owned(cost) => match permit {
                        Ok(permit) => permit,
                        Err(_) => return false,
                    },
                    () = self.tx.closed() => return false,
                }
            }
        };
        self.gauge.bytes.fetch_add(bytes, Ordering::Relaxed);
        let batch = Batch {
            items,
            _charge: Charge {
                bytes,
                gauge: self.gauge.clone(),
                _permit: permit,
            },
        };
        let slot = match self.tx.try_reserve() {
            Ok(slot) => slot,
            Err(mpsc::error::TrySendError::Closed(())) => return false,
            Err(mpsc::error::TrySendError::Full(())) => {
                let _waiting = Counted::new(&self.gauge.waiting);
                match self.tx.reserve().await {
                    Ok(slot) => slot,
                    Err(_) => return false,
                }
            }
        };
        slot.send(Ok(batch));
        true
    }

    /// Ends the stream with `e` (not charged: it is the last thing sent).
    async fn fail(&self, e: WorkflowError) {
        let _ = self.tx.send(Err(e)).await;
    }

    async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl Engine {
    /// Streams events matching `filter`: with `after` set, the stored ones with a higher
    /// revision first; then live ones. Every event committed after this call returns is
    /// delivered. A stream filtered to one operation ends after that operation's last event;
    /// every stream ends when the receiver is dropped or the engine shuts down.
    ///
    /// # Errors
    ///
    /// The filtered operation does not exist, or a store failure.
    pub async fn watch(
        &self,
        filter: crate::EventFilter,
        after: Option<u64>,
    ) -> Result<mpsc::Receiver<EventBatch>, WorkflowError> {
        let filter: EventFilter = filter.to_store();
        let store = self.inner.store.clone();
        let live = store.subscribe_events();
        // The last revision first, then the operation's state: an operation that ended in
        // between has its last event above `last`, so the live part delivers it.
        let last_revision = store.last_revision().await?;
        if let Some(asked) = after
            && asked > last_revision
        {
            return Err(WorkflowError::RevisionOutOfRange {
                asked,
                last: last_revision,
            });
        }
        // Whether the watched operation had ended before the replay: then the replay holds
        // its last event (or the caller chose to skip past it) and nothing more will come.
        let ended_before = match filter.operation_id {
            Some(id) => !store.get_operation(id).await?.is_active(),
            None => false,
        };
        let last = after.unwrap_or(last_revision);
        let (tx, rx) = Sender::new(self);
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let _running = Counted::new(&tx.gauge.streams);
            let watch = Watch {
                store: &store,
                live,
                tx: &tx,
                shutdown: &shutdown,
            };
            if let Err(e) = watch.run(&filter, last, ended_before).await {
                tx.fail(e).await;
            }
        });
        Ok(rx)
    }

    /// Streams an operation's log lines with a sequence above `after`: the stored ones,
    /// then live ones; it ends once the operation has ended and every line was sent.
    ///
    /// # Errors
    ///
    /// The operation does not exist, or a store failure.
    pub async fn logs(
        &self,
        operation: OperationId,
        after: u64,
    ) -> Result<mpsc::Receiver<LogBatch>, WorkflowError> {
        let store = self.inner.store.clone();
        let lines = store.subscribe_logs();
        let events = store.subscribe_events();
        // Lines are committed before the operation's last event, so if it had ended before
        // the replay, the replay has every line.
        let ended_before = !store.get_operation(operation).await?.is_active();
        let (tx, rx) = Sender::new(self);
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let _running = Counted::new(&tx.gauge.streams);
            let r = stream_logs(
                &store,
                operation,
                after,
                lines,
                events,
                ended_before,
                &tx,
                &shutdown,
            )
            .await;
            if let Err(e) = r {
                tx.fail(e).await;
            }
        });
        Ok(rx)
    }

    /// What the event and log streams hold now, over all of them.
    pub fn stream_stats(&self) -> StreamStats {
        let g = &self.inner.streams;
        StreamStats {
            streams: g.streams.load(Ordering::Relaxed),
            buffered_bytes: g.bytes.load(Ordering::Relaxed),
            waiting_for_readers: g.waiting.load(Ordering::Relaxed),
            catch_ups: g.catch_ups.load(Ordering::Relaxed),
        }
    }
}

/// Where a watch stands: the last revision sent, and whether the watched operation ended.
struct Cursor<'a> {
    filter: &'a EventFilter,
    last: u64,
    ended: bool,
}

impl Cursor<'_> {
    fn take(&mut self, e: Arc<OperationEvent>, batch: &mut Vec<Arc<OperationEvent>>) {
        if e.revision > self.last && self.filter.matches(&e) {
            self.last = e.revision;
            if self.filter.operation_id.is_some() && e.is_terminal() {
                self.ended = true;
            }
            batch.push(e);
        }
    }

    /// Sends what the store has after `last`; false if the receiver is gone.
    async fn replay(
        &mut self,
        store: &Arc<dyn Store>,
        tx: &Sender<OperationEvent>,
    ) -> Result<bool, WorkflowError> {
        loop {
            let page = store
                .events_after(self.last, self.filter, REPLAY_PAGE)
                .await?;
            let full = page.len() == REPLAY_PAGE;
            let mut batch = Vec::with_capacity(page.len());
            for e in page {
                self.take(Arc::new(e), &mut batch);
            }
            if !tx.send(batch).await {
                return Ok(false);
            }
            if !full || self.ended {
                return Ok(true);
            }
        }
    }
}

struct Watch<'a> {
    store: &'a Arc<dyn Store>,
    live: broadcast::Receiver<Arc<OperationEvent>>,
    tx: &'a Sender<OperationEvent>,
    shutdown: &'a CancellationToken,
}

impl Watch<'_> {
    async fn run(
        mut self,
        filter: &EventFilter,
        last: u64,
        ended_before: bool,
    ) -> Result<(), WorkflowError> {
        let (store, tx) = (self.store, self.tx);
        let mut cursor = Cursor {
            filter,
            last,
            ended: false,
        };
        if !cursor.replay(store, tx).await? || cursor.ended || ended_before {
            return Ok(());
        }
        loop {
            let first = tokio::select! {
                r = self.live.recv() => r,
                () = tx.closed() => return Ok(()),
                () = self.shutdown.cancelled() => {
                    return Err(WorkflowError::StreamInterrupted {
                        after: ResumePoint::Revision(cursor.last),
                    });
                }
            };
            let mut batch = Vec::new();
            let mut lagged = false;
            match first {
                Ok(e) => cursor.take(e, &mut batch),
                Err(RecvError::Lagged(_)) => lagged = true,
                Err(RecvError::Closed) => return Ok(()),
            }
            while !lagged && batch.len() < MAX_BATCH {
                match self.live.try_recv() {
                    Ok(e) => cursor.take(e, &mut batch),
                    Err(TryRecvError::Lagged(_)) => lagged = true,
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            if !tx.send(batch).await {
                return Ok(());
            }
            if lagged {
                tx.lagged();
                if !cursor.replay(store, tx).await? {
                    return Ok(());
                }
            }
            if cursor.ended {
                return Ok(());
            }
        }
    }
}

async fn replay_logs(
    store: &Arc<dyn Store>,
    operation: OperationId,
    last: &mut u64,
    tx: &Sender<LogLine>,
) -> Result<bool, WorkflowError> {
    loop {
        let page = store.logs_after(operation, *last, REPLAY_PAGE).await?;
        let full = page.len() == REPLAY_PAGE;
        if let Some(l) = page.last() {
            *last = l.sequence;
        }
        if !tx.send(page.into_iter().map(Arc::new)).await {
            return Ok(false);
        }
        if !full {
            return Ok(true);
        }
    }
}

#[allow(clippy::too_many_arguments, reason = "one private call site")]
async fn stream_logs(
    store: &Arc<dyn Store>,
    operation: OperationId,
    after: u64,
    mut lines: broadcast::Receiver<Arc<LogLine>>,
    mut events: broadcast::Receiver<Arc<OperationEvent>>,
    ended_before: bool,
    tx: &Sender<LogLine>,
    shutdown: &CancellationToken,
) -> Result<(), WorkflowError> {
    let mut last = after;
    if !replay_logs(store, operation, &mut last, tx).await? || ended_before {
        return Ok(());
    }
    loop {
        tokio::select! {
            r = lines.recv() => match r {
                Ok(l) => {
                    let mut batch = Vec::new();
                    let mut take = |l: Arc<LogLine>, batch: &mut Vec<Arc<LogLine>>| {
                        if l.operation_id == operation && l.sequence > last {
                            last = l.sequence;
                            batch.push(l);
                        }
                    };
                    take(l, &mut batch);
                    let mut lagged = false;
                    while batch.len() < MAX_BATCH {
                        match lines.try_recv() {
                            Ok(l) => take(l, &mut batch),
                            Err(TryRecvError::Lagged(_)) => { lagged = true; break }
                            Err(_) => break,
                        }
                    }
                    if !tx.send(batch).await {
                        return Ok(());
                    }
                    if lagged {
                        tx.lagged();
                        if !replay_logs(store, operation, &mut last, tx).await? {
                            return Ok(());
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    tx.lagged();
                    if !replay_logs(store, operation, &mut last, tx).await? {
                        return Ok(());
                    }
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            r = events.recv() => {
                let ended = match r {
                    Ok(e) => e.operation_id == operation && e.is_terminal(),
                    Err(RecvError::Lagged(_)) => !store.get_operation(operation).await?.is_active(),
                    Err(RecvError::Closed) => true,
                };
                if ended {
                    // Whatever was committed with or before the last event.
                    replay_logs(store, operation, &mut last, tx).await?;
                    return Ok(());
                }
            }
            () = tx.closed() => return Ok(()),
            () = shutdown.cancelled() => {
                return Err(WorkflowError::StreamInterrupted {
                    after: ResumePoint::Sequence(last),
                });
            }
        }
    }
}
