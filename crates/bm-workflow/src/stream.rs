//! The event and log streams observers follow: what is stored first, then live, without a
//! gap or a duplicate, with bounded memory per observer.
//!
//! Each stream subscribes to the store's live broadcast *before* reading what is stored, and
//! skips live items it already sent, which makes the hand-over gapless. A subscriber that
//! reads slower than events come does not hold anything up: the broadcast ring moves on, the
//! subscriber is told it lagged, and it reads the missed part back from the store before
//! going live again. Its own buffer holds [`crate::EngineConfig::stream_buffer`] batches.

use std::sync::Arc;

use bm_domain::{LogLine, OperationEvent, OperationId};
use bm_store::{EventFilter, Store};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{Engine, ResumePoint, WorkflowError};

/// One delivery of a watch stream: events in revision order, or the error that ended it.
pub type EventBatch = Result<Vec<Arc<OperationEvent>>, WorkflowError>;

/// One delivery of a log stream: lines in sequence order, or the error that ended it.
pub type LogBatch = Result<Vec<Arc<LogLine>>, WorkflowError>;

/// The most items in one batch.
const MAX_BATCH: usize = 128;
/// Items read from the store per query while catching up.
const REPLAY_PAGE: usize = 1000;

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
        let (tx, rx) = mpsc::channel(self.inner.config.stream_buffer.max(1));
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let watch = Watch {
                store: &store,
                live,
                tx: &tx,
                shutdown: &shutdown,
            };
            if let Err(e) = watch.run(&filter, last, ended_before).await {
                let _ = tx.send(Err(e)).await;
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
        let (tx, rx) = mpsc::channel(self.inner.config.stream_buffer.max(1));
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
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
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(rx)
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
        tx: &mpsc::Sender<EventBatch>,
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
            if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
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
    tx: &'a mpsc::Sender<EventBatch>,
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
            if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
            if lagged && !cursor.replay(store, tx).await? {
                return Ok(());
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
    tx: &mpsc::Sender<LogBatch>,
) -> Result<bool, WorkflowError> {
    loop {
        let page = store.logs_after(operation, *last, REPLAY_PAGE).await?;
        let full = page.len() == REPLAY_PAGE;
        if let Some(l) = page.last() {
            *last = l.sequence;
        }
        if !page.is_empty()
            && tx
                .send(Ok(page.into_iter().map(Arc::new).collect()))
                .await
                .is_err()
        {
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
    tx: &mpsc::Sender<LogBatch>,
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
                    if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
                        return Ok(());
                    }
                    if lagged && !replay_logs(store, operation, &mut last, tx).await? {
                        return Ok(());
                    }
                }
                Err(RecvError::Lagged(_)) => {
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
