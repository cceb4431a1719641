//! The size of the server's SQLite write-ahead log during a scenario: sampled from the file
//! every 20 ms, so that a log that grows without bound (issue 10: 412 MB under a steady
//! load) shows up as a figure.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Samples the size of one WAL file until [`WalWatch::stop`].
pub(crate) struct WalWatch {
    path: PathBuf,
    peak: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl WalWatch {
    /// Starts sampling `data_dir/baremetal.db-wal`.
    pub(crate) fn start(data_dir: &std::path::Path) -> WalWatch {
        let path = data_dir.join(FILE);
        let peak = Arc::new(AtomicU64::new(size(&path)));
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn({
            let (path, peak) = (path.clone(), peak.clone());
            async move {
                let mut every = tokio::time::interval(Duration::from_millis(20));
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = every.tick() => {
                            peak.fetch_max(size(&path), Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        WalWatch {
            path,
            peak,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops sampling; the largest size seen, in bytes.
    pub(crate) async fn stop(mut self) -> u64 {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.peak.load(Ordering::Relaxed).max(size(&self.path))
    }
}

/// The WAL's file name in the data directory.
const FILE: &str = "baremetal.db-wal";

/// The size of the WAL in `data_dir` now, in bytes.
pub(crate) fn size_in(data_dir: &std::path::Path) -> u64 {
    size(&data_dir.join(FILE))
}

/// The file's size; 0 when it does not exist (no write yet, or emptied and removed).
fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
