//! The engine's shared state: what the front (`engine.rs`, `stream.rs`) and the runner
//! (`executor.rs`) both hold, so that neither reaches into the other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bm_domain::OperationId;
use bm_provider::ProviderRegistry;
use bm_store::{Lease, Store};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{EngineConfig, now};

/// An operation running here.
pub(crate) struct Running {
    /// Fires on an operator's cancel, and when the lease is lost.
    pub(crate) token: CancellationToken,
    /// The fencing generation of the claim it runs under.
    pub(crate) generation: u64,
    /// Set when a renewal found that another claim superseded this one: the runner stops
    /// and writes nothing more (its writes would be refused anyway; its log lines are
    /// dropped).
    pub(crate) lost: Arc<AtomicBool>,
    /// When its lease expires as far as this executor knows (unix microseconds): set at the
    /// claim, moved on by each renewal. Past it, another replica may have taken the
    /// operation over: the run logs nothing and calls no provider until a renewal confirms
    /// the claim.
    pub(crate) expires: Arc<AtomicI64>,
}

impl Running {
    /// Stops the runner for good: its claim is no longer the operation's.
    pub(crate) fn lose(&self) {
        self.lost.store(true, Ordering::Relaxed);
        self.token.cancel();
    }
}

/// The state every clone of an engine and every executor task shares.
pub(crate) struct Inner {
    pub(crate) store: std::sync::Arc<dyn Store>,
    pub(crate) providers: ProviderRegistry,
    pub(crate) config: EngineConfig,
    /// Wakes the dispatcher: new work was admitted or capacity freed.
    pub(crate) wake: Notify,
    /// The operations running here, with the claim each runs under.
    pub(crate) running: Mutex<HashMap<OperationId, Running>>,
    /// Fires on shutdown; every operation's token is a child of it.
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// What the event and log streams hold.
    pub(crate) streams: std::sync::Arc<crate::stream::StreamGauge>,
    /// Ids of admitted operations: monotonic within a millisecond, so they sort by
    /// admission.
    pub(crate) ids: Mutex<ulid::Generator>,
}

impl Inner {
    pub(crate) fn new(
        store: std::sync::Arc<dyn Store>,
        providers: ProviderRegistry,
        config: EngineConfig,
    ) -> Self {
        Inner {
            store,
            providers,
            config,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            streams: std::sync::Arc::default(),
            ids: Mutex::new(ulid::Generator::new()),
        }
    }

    pub(crate) fn running(&self) -> MutexGuard<'_, HashMap<OperationId, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lease(&self) -> Lease {
        Lease {
            owner: self.config.owner.clone(),
            expires_at: now().saturating_add(self.config.lease_duration),
        }
    }
}
