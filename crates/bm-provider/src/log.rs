//! Where provider actions send their progress lines.

use std::fmt;
use std::sync::Arc;

type WriteFn = dyn Fn(&str, &str) + Send + Sync;

/// Receives a provider's progress lines as they happen, each with a short tag naming the
/// action (`repave`, `bmc`, `kubeadm`, ...). Cheap to clone; never blocks.
#[derive(Clone)]
pub struct LogSink {
    write: Arc<WriteFn>,
}

impl LogSink {
    /// A sink that calls `write(tag, message)` for each line. `write` must not block.
    pub fn new(write: impl Fn(&str, &str) + Send + Sync + 'static) -> Self {
        LogSink {
            write: Arc::new(write),
        }
    }

    /// A sink that drops every line.
    pub fn discard() -> Self {
        LogSink::new(|_, _| {})
    }

    /// Logs one line.
    pub fn line(&self, tag: &str, message: impl AsRef<str>) {
        (self.write)(tag, message.as_ref());
    }
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogSink")
    }
}
