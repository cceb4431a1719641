//! The store conformance suite: every behaviour of the `Store` trait, run against every
//! backend (memory, SQLite, and PostgreSQL on a throwaway cluster), plus what only a durable backend can show (surviving a reopen).

mod conformance;
mod durability;
mod fixtures;
mod golden;
mod postgres;
mod storage;

use std::sync::Arc;

use bm_store::{MemoryStore, PgConfig, PgStore, SqliteConfig, SqliteStore, Store};

/// A backend under test, with whatever must outlive it (a temp dir).
pub(crate) struct Backend {
    pub(crate) store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) fn memory() -> Backend {
    Backend {
        store: Arc::new(MemoryStore::new()),
        _dir: None,
    }
}

pub(crate) fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig::new(dir.path())).unwrap();
    Backend {
        store: Arc::new(store),
        _dir: Some(dir),
    }
}

/// A PostgreSQL store on a new database of the test binary's throwaway cluster.
pub(crate) fn postgres() -> Backend {
    let url = bm_pg_cluster::Cluster::shared().create_database().unwrap();
    Backend {
        store: Arc::new(PgStore::open(PgConfig::new(url)).unwrap()),
        _dir: None,
    }
}

/// Instantiates each conformance test once per backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crate::conformance::$name(crate::memory().store).await;
                }
            )*
        }
        mod sqlite_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::sqlite();
                    crate::conformance::$name(backend.store.clone()).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::postgres();
                    crate::conformance::$name(backend.store.clone()).await;
                }
            )*
        }
    };
}

conformance!(
    register_get_and_conflicts,
    list_machines_pages_and_filters,
    selectors_match_labels_through_every_page,
    import_reports_each_row,
    import_dry_run_writes_nothing,
    update_spec_labels_and_macs,
    admission_is_idempotent,
    concurrent_identical_requests_create_one_operation,
    concurrent_different_requests_admit_one,
    leases_fence_writes,
    a_lease_that_came_back_fences_the_stale_claim,
    cancel_of_a_pending_operation_ends_it,
    cancel_of_a_held_operation_is_seen_by_its_executor,
    finish_applies_effects_and_events,
    list_operations_newest_first,
    events_replay_and_live_agree,
    logs_replay_and_live,
    observations_are_written_when_they_change_something_and_never_under_an_operation,
    a_machine_is_found_by_any_of_its_macs,
    machines_are_counted_by_phase_and_effective_state,
    rollouts_are_created_once_and_written_by_version,
    rollouts_list_newest_first_and_by_activity,
    concurrent_writes_of_a_rollout_keep_one,
);
