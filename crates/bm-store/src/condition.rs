//! The store's condition, for health checks: whether it takes writes, and why not.

use std::fmt;

use tokio::sync::watch;

/// What a store can do now. Cheap to read ([`crate::Store::condition`]); every change is
/// published ([`crate::Store::watch_condition`]) and logged by the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreCondition {
    /// Reads and writes work.
    #[default]
    Ok,
    /// Writes fail because the data directory's disk is full (or the store reached its size
    /// limit); reads work. Writes succeed again by themselves once space is freed, and the
    /// condition goes back to [`StoreCondition::Ok`] at the first write that commits.
    DiskFull,
    /// The store was opened read-only on purpose (its database failed the integrity check
    /// and was started anyway): reads work, writes are refused.
    ReadOnly(String),
    /// The store cannot serve (its database was found damaged while running); a restart
    /// checks it and refuses to start or starts it read-only.
    Unusable(String),
    /// The store's database server cannot be reached or cannot take writes (a PostgreSQL
    /// store: down, failing over, out of disk): calls fail with
    /// [`crate::StoreError::Unavailable`] until it answers again, and the
    /// condition goes back to [`StoreCondition::Ok`] at the first read or write that
    /// reaches it.
    Unreachable(String),
}

impl StoreCondition {
    /// True unless the store is unusable: reads work.
    pub fn serves_reads(&self) -> bool {
        !matches!(
            self,
            StoreCondition::Unusable(_) | StoreCondition::Unreachable(_)
        )
    }

    /// True when writes are expected to work.
    pub fn takes_writes(&self) -> bool {
        matches!(self, StoreCondition::Ok)
    }
}

impl fmt::Display for StoreCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreCondition::Ok => f.write_str("ok"),
            StoreCondition::DiskFull => f.write_str("the data directory's disk is full"),
            StoreCondition::ReadOnly(why) => write!(f, "read-only: {why}"),
            StoreCondition::Unusable(why) => write!(f, "unusable: {why}"),
            StoreCondition::Unreachable(why) => write!(f, "the database is unreachable: {why}"),
        }
    }
}

/// The condition as a backend keeps it: set from the writer and the readers, watched by the
/// server's health service.
#[derive(Debug)]
pub(crate) struct ConditionCell(watch::Sender<StoreCondition>);

impl ConditionCell {
    pub(crate) fn new(initial: StoreCondition) -> Self {
        ConditionCell(watch::Sender::new(initial))
    }

    pub(crate) fn get(&self) -> StoreCondition {
        self.0.borrow().clone()
    }

    pub(crate) fn watch(&self) -> watch::Receiver<StoreCondition> {
        self.0.subscribe()
    }

    /// A write failed for lack of space. Logged once per episode.
    pub(crate) fn disk_full(&self) {
        let changed = self.0.send_if_modified(|c| {
            let was_ok = *c == StoreCondition::Ok;
            if was_ok {
                *c = StoreCondition::DiskFull;
            }
            was_ok
        });
        if changed {
            tracing::error!(
                "the data directory's disk is full: writes fail until space is freed; reads go on"
            );
        }
    }

    /// A write committed: a full disk has space again.
    pub(crate) fn write_committed(&self) {
        let changed = self.0.send_if_modified(|c| {
            let was_full = *c == StoreCondition::DiskFull;
            if was_full {
                *c = StoreCondition::Ok;
            }
            was_full
        });
        if changed {
            tracing::info!("the data directory has space again: writes work");
        }
    }

    /// The store found itself damaged; it stays unusable until a restart checks it. A store
    /// opened read-only because it is damaged stays read-only: finding more damage is
    /// expected there, and the reads that still work go on.
    pub(crate) fn unusable(&self, why: &str) {
        let changed = self.0.send_if_modified(|c| {
            let first = matches!(c, StoreCondition::Ok | StoreCondition::DiskFull);
            if first {
                *c = StoreCondition::Unusable(why.to_owned());
            }
            first
        });
        if changed {
            tracing::error!(
                reason = why,
                "the store is unusable; restart the server: it checks the database and refuses to start or starts read-only"
            );
        }
    }

    /// The database could not be reached. Logged once per episode.
    pub(crate) fn unreachable(&self, why: &str) {
        let changed = self.0.send_if_modified(|c| {
            let first = matches!(c, StoreCondition::Ok | StoreCondition::DiskFull);
            if first {
                *c = StoreCondition::Unreachable(why.to_owned());
            }
            first
        });
        if changed {
            tracing::error!(
                reason = why,
                "the store's database is unreachable: requests fail with UNAVAILABLE and operations wait until it answers"
            );
        }
    }

    /// A read or a write reached the database. Called after every one: only a
    /// store that was unreachable takes the watch's write lock.
    pub(crate) fn reached(&self) {
        if !matches!(*self.0.borrow(), StoreCondition::Unreachable(_)) {
            return;
        }
        let changed = self.0.send_if_modified(|c| {
            let was = matches!(c, StoreCondition::Unreachable(_));
            if was {
                *c = StoreCondition::Ok;
            }
            was
        });
        if changed {
            tracing::info!("the store's database answers again");
        }
    }
}
