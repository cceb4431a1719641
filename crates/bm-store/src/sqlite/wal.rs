//! Keeping the write-ahead log small.
//!
//! Every commit appends to the WAL; checkpoints copy its frames into the database file, and
//! the WAL starts over from its beginning only once every frame was copied *and* no reader
//! still reads an old snapshot from it. A PASSIVE checkpoint never waits, so under a steady
//! load with readers always present it never gets there, and the WAL grew without bound
//! (412 MB for a 32 MB database under ~280 operations/s). The policy:
//!
//! - a checkpointer thread runs a PASSIVE checkpoint every [`TICK`]: it copies frames into the
//!   database file without blocking anyone;
//! - when the WAL is over its limit ([`super::SqliteConfig::wal_limit_bytes`]; the writer
//!   looks at the file's size after each commit), the writer runs a RESTART checkpoint
//!   itself, between two batches. It copies what the checkpointer has not, then waits at most
//!   [`RESTART_WAIT`] for readers of old snapshots (new readers read the database file, so
//!   those finish within milliseconds), and the next commit starts the WAL over. The writer,
//!   not the checkpointer thread, does it because a RESTART needs the write lock, which a
//!   busy writer hands over too rarely for another connection to get it;
//! - `journal_size_limit` (the same limit) makes the writer cut the file back when the WAL
//!   starts over, so that a burst does not leave a large file behind;
//! - a reader that holds an old snapshot for long makes the RESTART give up after its wait;
//!   the writer then tries again only once the WAL has grown by another limit, so a long
//!   reader costs the writer one wait per limit's worth of writes, not one per commit;
//! - when nothing was written for [`IDLE_AFTER`], the checkpointer empties the file with a
//!   TRUNCATE checkpoint.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::wal::CheckpointMode;

/// How often the checkpointer copies committed frames into the database file.
pub(super) const TICK: Duration = Duration::from_millis(250);
/// How long without a new frame before the WAL file is emptied.
pub(super) const IDLE_AFTER: Duration = Duration::from_secs(2);
/// How long a RESTART or TRUNCATE checkpoint waits for the locks it needs (readers of old
/// snapshots, the writer) before it gives up.
pub(super) const RESTART_WAIT: Duration = Duration::from_millis(100);

/// The writer's side of the policy.
#[derive(Debug)]
pub(super) struct WalWatch {
    path: PathBuf,
    limit_bytes: u64,
    /// After a RESTART that gave up waiting for a reader: the size to try again at.
    retry_at: u64,
    /// Dropped with the writer: the checkpointer stops.
    _stop: Sender<()>,
}

impl WalWatch {
    /// The writer's watch over the WAL at `path`, and what the checkpointer thread waits on
    /// to stop.
    pub(super) fn new(path: PathBuf, limit_bytes: u64) -> (WalWatch, Receiver<()>) {
        let (stop, stopped) = std::sync::mpsc::channel();
        let watch = WalWatch {
            path,
            limit_bytes,
            retry_at: 0,
            _stop: stop,
        };
        (watch, stopped)
    }

    /// Called by the writer after each commit: starts the WAL over when it is over its
    /// limit.
    pub(super) fn after_commit(&mut self, conn: &Connection) {
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size <= self.limit_bytes.max(self.retry_at) {
            return;
        }
        let _ = conn.busy_timeout(RESTART_WAIT);
        let started = Instant::now();
        let done = checkpoint(conn, CheckpointMode::RESTART, "RESTART").is_some();
        let _ = conn.busy_timeout(super::schema::BUSY_TIMEOUT);
        self.retry_at = if done || started.elapsed() < RESTART_WAIT / 2 {
            // Done, or refused at once because the checkpointer was copying: next commit.
            0
        } else {
            tracing::debug!(
                wal_bytes = size,
                "a reader holds an old snapshot; the write-ahead log starts over later"
            );
            size.saturating_add(self.limit_bytes)
        };
    }
}

/// Runs a checkpoint; returns the frames in the WAL and how many of them are in the database
/// file, or `None` if it could not run (busy: it is tried again later).
fn checkpoint(conn: &Connection, mode: CheckpointMode, name: &str) -> Option<(i64, i64)> {
    match conn.wal_checkpoint_v2(None::<&str>, mode) {
        Ok((log, done)) => Some((i64::from(log), i64::from(done))),
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
            tracing::trace!(mode = name, "WAL checkpoint busy; trying again later");
            None
        }
        Err(e) => {
            tracing::warn!(mode = name, error = %e, "WAL checkpoint failed; trying again later");
            None
        }
    }
}

/// The checkpointer thread: runs until the writer is gone.
pub(super) fn checkpoint_loop(conn: &Connection, stop: &Receiver<()>) {
    let _ = conn.busy_timeout(RESTART_WAIT);
    let idle_ticks = (IDLE_AFTER.as_millis() / TICK.as_millis()).max(1) as u32;
    let (mut last_frames, mut quiet) = (-1i64, 0u32);
    loop {
        match stop.recv_timeout(TICK) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some((frames, _)) = checkpoint(conn, CheckpointMode::PASSIVE, "PASSIVE") else {
            continue;
        };
        // The WAL's frame count changes with every commit that wrote something (and when it
        // starts over); unchanged for a while means idle.
        if frames == last_frames && frames > 0 {
            quiet += 1;
        } else {
            quiet = 0;
        }
        last_frames = frames;
        if quiet >= idle_ticks && checkpoint(conn, CheckpointMode::TRUNCATE, "TRUNCATE").is_some() {
            tracing::debug!(frames, "write-ahead log emptied while idle");
            (last_frames, quiet) = (0, 0);
        }
    }
}
