//! The engine's shared state: what the front (`engine.rs`, `stream.rs`) and the runner
//! (`executor.rs`) both hold, so that neither reaches into the other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bm_domain::OperationId;
use bm_domain::{LogLine, Timestamp};
use bm_provider::ProviderRegistry;
use bm_store::{Fence, Lease, Store};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{EngineConfig, now};

/// The claim an operation runs under here, shared by its runner and the executor's tasks.
pub(crate) struct Claim {
    /// The executor's id (the lease owner).
    owner: String,
    /// The fencing generation of the claim; a new claim of this executor that directly
    /// follows it (nobody claimed in between) moves it on, and the run goes on under it.
    generation: AtomicU64,
    /// Set when another claim superseded this one: the runner stops and writes nothing
    /// more (its writes would be refused anyway; its log lines are dropped).
    lost: AtomicBool,
    /// When the lease expires as far as this executor knows (unix microseconds): set at the
    /// claim, moved on by each renewal. Past it, another replica may have taken the
    /// operation over: the run logs nothing and calls no provider until a renewal confirms
    /// the claim.
    expires: AtomicI64,
    /// Log lines of the run while the lease was past its expiry: written once a renewal
    /// confirms the claim (the store was unreachable for a while), dropped if it was lost
    /// (this process stalled and another replica took over).
    held: Mutex<Vec<LogLine>>,
    store: std::sync::Arc<dyn Store>,
}

impl Claim {
    pub(crate) fn new(fence: &Fence, expires: Timestamp, store: std::sync::Arc<dyn Store>) -> Self {
        Claim {
            owner: fence.owner.clone(),
            generation: AtomicU64::new(fence.generation),
            lost: AtomicBool::new(false),
            expires: AtomicI64::new(expires.as_unix_micros()),
            held: Mutex::new(Vec::new()),
            store,
        }
    }

    fn held(&self) -> MutexGuard<'_, Vec<LogLine>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a log line of the run, in order: now while the lease is current, once it is
    /// confirmed otherwise, never if it was lost.
    pub(crate) fn log(&self, line: LogLine) {
        let mut held = self.held();
        if self.is_lost() {
            held.clear();
        } else if self.is_current() {
            for l in held.drain(..) {
                self.store.append_log(l);
            }
            self.store.append_log(line);
        } else {
            held.push(line);
        }
    }

    /// The fence the run's writes carry now.
    pub(crate) fn fence(&self) -> Fence {
        Fence {
            owner: self.owner.clone(),
            generation: self.generation(),
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// True while the lease is within its expiry as last known.
    pub(crate) fn is_current(&self) -> bool {
        !self.is_lost() && now().as_unix_micros() < self.expires.load(Ordering::Acquire)
    }

    /// A renewal (or a claim) confirmed the lease until `until`: the lines held meanwhile
    /// are written.
    pub(crate) fn renewed(&self, until: Timestamp) {
        let mut held = self.held();
        self.expires
            .store(until.as_unix_micros(), Ordering::Release);
        if !self.is_lost() {
            for l in held.drain(..) {
                self.store.append_log(l);
            }
        }
    }

    /// A claim of this executor directly followed the run's (the generation is the next
    /// one: nobody claimed in between, so what is stored is what the run wrote): the run
    /// goes on under it. Returns false (and changes nothing) otherwise.
    pub(crate) fn adopt(&self, fence: &Fence, until: Timestamp) -> bool {
        if self.is_lost()
            || fence.owner != self.owner
            || self
                .generation
                .compare_exchange(
                    fence.generation.wrapping_sub(1),
                    fence.generation,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return false;
        }
        self.renewed(until);
        true
    }

    pub(crate) fn mark_lost(&self) {
        let mut held = self.held();
        self.lost.store(true, Ordering::Release);
        held.clear();
    }
}

/// An operation running here.
pub(crate) struct Running {
    /// Fires on an operator's cancel, and when the lease is lost.
    pub(crate) token: CancellationToken,
    /// The claim it runs under.
    pub(crate) claim: Arc<Claim>,
}

impl Running {
    /// Stops the runner for good: its claim is no longer the operation's.
    pub(crate) fn lose(&self) {
        self.claim.mark_lost();
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
    /// Wakes the driver of rollouts: one was created or changed.
    pub(crate) rollouts: Notify,
    /// Counts the writes of rollouts made here, for those who follow them.
    pub(crate) rollout_writes: tokio::sync::watch::Sender<u64>,
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
            rollouts: Notify::new(),
            rollout_writes: tokio::sync::watch::Sender::new(0),
            running: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            streams: std::sync::Arc::default(),
            ids: Mutex::new(ulid::Generator::new()),
        }
    }

    /// A new id (an operation's, a rollout's) for time `t`: monotonic within a millisecond,
    /// so ids sort by creation.
    pub(crate) fn new_ulid(&self, t: Timestamp) -> ulid::Ulid {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        // A monotonic generator only fails after 2^80 ids in one millisecond.
        ids.generate_from_datetime(t.to_system_time())
            .unwrap_or_else(|_| ulid::Ulid::from_datetime(t.to_system_time()))
    }

    /// Tells the followers of rollouts that one was written.
    pub(crate) fn rollout_written(&self) {
        self.rollout_writes.send_modify(|n| *n = n.wrapping_add(1));
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
