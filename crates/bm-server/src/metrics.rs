//! Prometheus metrics (issue 15): `--metrics-listen ADDR` serves `GET /metrics`.
//!
//! Built on `prometheus-client`, the Prometheus project's own Rust client: it writes
//! OpenMetrics natively, keeps every metric in a registry we own (no process-global state,
//! so each test's server has its own), and types label sets as Rust structs. The executor's
//! work arrives through [`bm_workflow::Telemetry`] (the engine knows nothing of Prometheus);
//! gRPC calls through [`crate::GrpcMetricsLayer`] (`grpc_metrics.rs`, which alone knows the
//! wire); what is a count of the fleet (machines by phase
//! and effective state, operations running, streams) is read when scraped.
//!
//! A scraper that asks for OpenMetrics (`Accept: application/openmetrics-text`) gets it;
//! anything else gets the Prometheus text format 0.0.4. docs/observability.md lists every
//! metric.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bm_domain::{EffectiveState, OperationPhase, OperationType, Phase};
use bm_workflow::{Attempt, Engine, Telemetry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

/// The content type of the Prometheus text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of OpenMetrics.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, from 1 s to about 6 days: how long machines stay BUSY, in ATTENTION or BLOCKED.
fn state_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 20))
}

/// The states whose oldest machine is a gauge: a person must act on them.
const HELD: [EffectiveState; 2] = [EffectiveState::Attention, EffectiveState::Blocked];

/// Seconds, from 5 ms to about 45 min: a provider call answers in milliseconds, a reimage
/// takes minutes.
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 20))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    r#type: &'static str,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    r#type: &'static str,
    stage: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    r#type: &'static str,
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: String,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallErrorLabels {
    provider: String,
    action: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BmcLabels {
    provider: String,
    host: String,
    /// `2xx`, `3xx`, `4xx`, `5xx`, `other` for another code, `none` when no answer came.
    status: &'static str,
}

/// The most BMC hosts that get series of their own, unless
/// [`Metrics::with_max_bmc_hosts`] says otherwise; the others count as host `other`.
pub const DEFAULT_MAX_BMC_HOSTS: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MachineLabels {
    phase: &'static str,
    effective_state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    effective_state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    rollout: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutPhaseLabels {
    rollout: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// Seconds, from 1 ms to about 65 s: one HTTP request to a BMC.
fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric of the server, in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    operations_started: Family<TypeLabels, Counter>,
    operations_ended: Family<EndLabels, Counter>,
    operation_duration: Histograms<EndLabels>,
    stage_duration: Histograms<StageLabels>,
    stage_retries: Family<RetryLabels, Counter>,
    provider_calls: Histograms<CallLabels>,
    provider_errors: Family<CallErrorLabels, Counter>,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_duration: Histograms<MethodLabels>,
    bmc_requests: Histograms<BmcLabels>,
    /// The hosts that have series of their own, at most `max_bmc_hosts`.
    bmc_hosts: std::sync::Mutex<std::collections::HashSet<String>>,
    max_bmc_hosts: usize,
    machines: Family<MachineLabels, Gauge>,
    state_time: Histograms<StateLabels>,
    oldest: Family<StateLabels, Gauge>,
    running: Gauge,
    queued: Gauge,
    commit_duration: Histogram,
    commit_batch: Histogram,
    commit_failures: Counter,
    /// When the read gauges were last refreshed: one refresh at a time, shared by the
    /// scrapes that waited for it.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    streams: Gauge,
    stream_buffered_bytes: Gauge,
    streams_waiting: Gauge,
    stream_catch_ups: Counter,
    rollout_machines: Family<RolloutLabels, Gauge>,
    rollout_phase: Family<RolloutPhaseLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bm");
        let m = Metrics {
            operations_started: Family::default(),
            operations_ended: Family::default(),
            operation_duration: Family::new_with_constructor(duration_buckets),
            stage_duration: Family::new_with_constructor(duration_buckets),
            stage_retries: Family::default(),
            provider_calls: Family::new_with_constructor(duration_buckets),
            provider_errors: Family::default(),
            grpc_requests: Family::default(),
            grpc_duration: Family::new_with_constructor(duration_buckets),
            bmc_requests: Family::new_with_constructor(request_buckets),
            bmc_hosts: std::sync::Mutex::default(),
            max_bmc_hosts: DEFAULT_MAX_BMC_HOSTS,
            machines: Family::default(),
            state_time: Family::new_with_constructor(state_buckets),
            oldest: Family::default(),
            running: Gauge::default(),
            queued: Gauge::default(),
            // 100 µs to about 3 s.
            commit_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 1 to 4096 (the SQLite writer's largest batch).
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            commit_failures: Counter::default(),
            refreshed: tokio::sync::Mutex::new(None),
            streams: Gauge::default(),
            stream_buffered_bytes: Gauge::default(),
            streams_waiting: Gauge::default(),
            stream_catch_ups: Counter::default(),
            rollout_machines: Family::default(),
            rollout_phase: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "operations_started",
            "Operations this server started running, by type",
            m.operations_started.clone(),
        );
        registry.register(
            "operations_ended",
            "Operations this server ended, by type and final phase",
            m.operations_ended.clone(),
        );
        registry.register(
            "operation_duration_seconds",
            "From admission to the end, by type and final phase",
            m.operation_duration.clone(),
        );
        registry.register(
            "stage_duration_seconds",
            "From a stage's first attempt to its end, retries included, by operation type, stage and outcome",
            m.stage_duration.clone(),
        );
        registry.register(
            "stage_retries",
            "Failed attempts of a stage that were retried, by operation type and stage",
            m.stage_retries.clone(),
        );
        registry.register(
            "provider_call_duration_seconds",
            "One attempt of a stage in the provider, by provider and action (the stage)",
            m.provider_calls.clone(),
        );
        registry.register(
            "provider_call_errors",
            "Failed provider calls, by provider, action and error kind",
            m.provider_errors.clone(),
        );
        registry.register(
            "grpc_requests",
            "gRPC calls answered, by method and status code (a stream counts when it starts)",
            m.grpc_requests.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "Time to the response's headers, by method",
            m.grpc_duration.clone(),
        );
        registry.register(
            "machines",
            "Machines by phase and effective state (read from the store when scraped)",
            m.machines.clone(),
        );
        registry.register(
            "machine_state_duration_seconds",
            "How long machines stayed BUSY, in ATTENTION or BLOCKED, observed when they left the state",
            m.state_time.clone(),
        );
        registry.register(
            "oldest_machine_age_seconds",
            "How long the machine longest in ATTENTION or BLOCKED has been there (0: none), read when scraped",
            m.oldest.clone(),
        );
        registry.register(
            "executor_running_operations",
            "Operations this server's executor runs now",
            m.running.clone(),
        );
        registry.register(
            "executor_queued_operations",
            "Operations waiting for an executor of any replica: pending, or running without a lease",
            m.queued.clone(),
        );
        registry.register(
            "store_commit_duration_seconds",
            "One commit of the store's writer, from its first statement to the end of the commit",
            m.commit_duration.clone(),
        );
        registry.register(
            "store_commit_batch_size",
            "Writes and log lines one commit carried (the writer groups what waits)",
            m.commit_batch.clone(),
        );
        registry.register(
            "store_commit_failures",
            "Commits that failed and were rolled back",
            m.commit_failures.clone(),
        );
        registry.register(
            "bmc_request_duration_seconds",
            "Requests to BMCs (Redfish), by provider, BMC host (host:port; `other` past the cap of hosts) and HTTP status class (`none`: no answer)",
            m.bmc_requests.clone(),
        );
        registry.register(
            "streams",
            "Event and log streams open now",
            m.streams.clone(),
        );
        registry.register(
            "stream_buffered_bytes",
            "Bytes the streams sent that their readers have not taken yet",
            m.stream_buffered_bytes.clone(),
        );
        registry.register(
            "streams_waiting_for_readers",
            "Streams waiting because their reader does not keep up",
            m.streams_waiting.clone(),
        );
        registry.register(
            "stream_catch_ups",
            "Times a stream fell behind the live feed and read what it missed back from the store",
            m.stream_catch_ups.clone(),
        );
        registry.register(
            "rollout_machines",
            "Machines of each rollout by what happened to them (pending, active, succeeded, failed, skipped, canceled): the active rollouts and the newest ended ones, read when scraped",
            m.rollout_machines.clone(),
        );
        registry.register(
            "rollout_phase",
            "1 for the phase each rollout is in (RUNNING, PAUSED, STOPPING, ABORTING, SUCCEEDED, FAILED, ABORTED), for the same rollouts",
            m.rollout_phase.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Reads what is counted rather than observed (the fleet, the executor, the streams),
    /// unless a refresh that began after this scrape arrived has just ended: concurrent
    /// scrapes share one store read, and each answer is at least as new as its request.
    async fn refresh(&self, engine: &Engine) {
        let asked = Instant::now();
        let mut refreshed = self.refreshed.lock().await;
        if refreshed.is_some_and(|began| began >= asked) {
            return;
        }
        let began = Instant::now();
        self.read_gauges(engine).await;
        *refreshed = Some(began);
    }

    async fn read_gauges(&self, engine: &Engine) {
        match engine.machine_counts().await {
            Ok(counts) => {
                // Every pair, so that a pair no machine is in any more reads 0.
                for phase in Phase::ALL {
                    for state in EffectiveState::ALL {
                        let n = counts
                            .iter()
                            .find(|c| c.phase == phase && c.effective_state == state)
                            .map_or(0, |c| c.machines);
                        let labels = MachineLabels {
                            phase: phase.as_str(),
                            effective_state: state.as_str(),
                        };
                        set(&self.machines.get_or_create(&labels), n);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot count the machines"),
        }
        let now = std::time::SystemTime::now();
        for state in HELD {
            let age = match oldest(engine, state).await {
                Ok(since) => since.map_or(0, |t| {
                    now.duration_since(t.to_system_time())
                        .unwrap_or_default()
                        .as_secs()
                }),
                Err(e) => {
                    tracing::warn!(error = %e, state = state.as_str(), "metrics: cannot list the machines");
                    continue;
                }
            };
            let labels = StateLabels {
                effective_state: state.as_str(),
            };
            set(&self.oldest.get_or_create(&labels), age);
        }
        self.read_rollouts(engine).await;
        set(&self.running, engine.running_operations());
        match engine.queued_operations().await {
            Ok(n) => set(&self.queued, n),
            Err(e) => tracing::warn!(error = %e, "metrics: cannot count the queued operations"),
        }
        let streams = engine.stream_stats();
        set(&self.streams, streams.streams);
        set(&self.stream_buffered_bytes, streams.buffered_bytes);
        set(&self.streams_waiting, streams.waiting_for_readers);
        // The engine counts; the counter follows (refreshes run one at a time).
        let seen = self.stream_catch_ups.get();
        self.stream_catch_ups
            .inc_by(streams.catch_ups.saturating_sub(seen));
    }

    /// The registry in OpenMetrics.
    fn openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Gives at most `max` BMC hosts series of their own; requests to the others count as
    /// host `other`, so that a large fleet does not make a series per BMC.
    #[must_use]
    pub fn with_max_bmc_hosts(mut self, max: usize) -> Self {
        self.max_bmc_hosts = max;
        self
    }

    /// The `host` label of a BMC: its own while the cap allows, else `other`.
    fn bmc_host(&self, host: &str) -> String {
        let mut hosts = self.bmc_hosts.lock().unwrap_or_else(|e| e.into_inner());
        if hosts.contains(host) {
            return host.to_owned();
        }
        if hosts.len() < self.max_bmc_hosts {
            hosts.insert(host.to_owned());
            return host.to_owned();
        }
        "other".to_owned()
    }

    /// Counts one gRPC call.
    pub(crate) fn grpc(&self, method: &str, code: &'static str, took: Duration) {
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method: method.to_owned(),
                code,
            })
            .inc();
        self.grpc_duration
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(took.as_secs_f64());
    }
}

impl Telemetry for Metrics {
    fn operation_started(&self, operation_type: OperationType) {
        self.operations_started
            .get_or_create(&TypeLabels {
                r#type: operation_type.as_str(),
            })
            .inc();
    }

    fn operation_ended(
        &self,
        operation_type: OperationType,
        phase: OperationPhase,
        took: Duration,
    ) {
        let labels = EndLabels {
            r#type: operation_type.as_str(),
            phase: phase.as_str(),
        };
        self.operations_ended.get_or_create(&labels).inc();
        self.operation_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    fn stage_ended(
        &self,
        operation_type: OperationType,
        stage: &'static str,
        succeeded: bool,
        took: Duration,
    ) {
        self.stage_duration
            .get_or_create(&StageLabels {
                r#type: operation_type.as_str(),
                stage,
                outcome: if succeeded { "succeeded" } else { "failed" },
            })
            .observe(took.as_secs_f64());
    }

    fn state_left(&self, state: EffectiveState, stayed: Duration) {
        self.state_time
            .get_or_create(&StateLabels {
                effective_state: state.as_str(),
            })
            .observe(stayed.as_secs_f64());
    }

    fn provider_call(
        &self,
        provider: &str,
        action: &'static str,
        took: Duration,
        error: Option<bm_provider::ErrorKind>,
    ) {
        let call = CallLabels {
            provider: provider.to_owned(),
            action,
        };
        self.provider_calls
            .get_or_create(&call)
            .observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.provider_errors
                .get_or_create(&CallErrorLabels {
                    provider: call.provider,
                    action,
                    kind: kind.as_str(),
                })
                .inc();
        }
    }

    fn attempt(&self, a: &Attempt<'_>) {
        self.provider_call(a.provider, a.stage, a.took, a.error);
        if a.outcome == bm_workflow::AttemptOutcome::Retrying {
            self.stage_retries
                .get_or_create(&RetryLabels {
                    r#type: a.operation_type.as_str(),
                    stage: a.stage,
                })
                .inc();
        }
    }
}

impl bm_provider::RequestObserver for Metrics {
    fn request(&self, provider: &str, host: &str, took: Duration, status: Option<u16>) {
        let status = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            Some(_) => "other",
            None => "none",
        };
        self.bmc_requests
            .get_or_create(&BmcLabels {
                provider: provider.to_owned(),
                host: self.bmc_host(host),
                status,
            })
            .observe(took.as_secs_f64());
    }
}

impl bm_workflow::CommitObserver for Metrics {
    fn batch(&self, size: usize, took: Duration, committed: bool) {
        self.commit_duration.observe(took.as_secs_f64());
        self.commit_batch.observe(size as f64);
        if !committed {
            self.commit_failures.inc();
        }
    }
}

/// Sets a gauge to a count (saturating: a gauge is an i64).
/// Rollouts with series: every active one, and this many of the newest (ended ones stay
/// visible for a while after their end, until newer rollouts push them out).
const ROLLOUTS_SHOWN: usize = 20;

impl Metrics {
    /// The rollouts' gauges: the active rollouts and the newest ones; the series of the
    /// others are dropped.
    async fn read_rollouts(&self, engine: &Engine) {
        let newest = bm_workflow::RolloutQuery {
            before: None,
            limit: ROLLOUTS_SHOWN,
            active_only: false,
        };
        let active = bm_workflow::RolloutQuery {
            limit: 1000,
            active_only: true,
            ..newest.clone()
        };
        let (newest, active) = match (
            engine.list_rollouts(&newest).await,
            engine.list_rollouts(&active).await,
        ) {
            (Ok(n), Ok(a)) => (n.items, a.items),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "metrics: cannot list the rollouts");
                return;
            }
        };
        self.rollout_machines.clear();
        self.rollout_phase.clear();
        let mut seen = std::collections::HashSet::new();
        for r in active.into_iter().chain(newest) {
            if !seen.insert(r.id) {
                continue;
            }
            let id = r.id.to_string();
            let c = r.counts();
            for (state, n) in [
                ("pending", c.pending),
                ("active", c.active),
                ("succeeded", c.succeeded),
                ("failed", c.failed),
                ("skipped", c.skipped),
                ("canceled", c.canceled),
            ] {
                let labels = RolloutLabels {
                    rollout: id.clone(),
                    state,
                };
                set(&self.rollout_machines.get_or_create(&labels), n);
            }
            let labels = RolloutPhaseLabels {
                rollout: id,
                phase: r.phase.as_str(),
            };
            set(&self.rollout_phase.get_or_create(&labels), 1);
        }
    }
}

fn set(gauge: &Gauge, n: impl TryInto<i64>) {
    gauge.set(n.try_into().unwrap_or(i64::MAX));
}

/// Since when the machine longest in `state` (ATTENTION or BLOCKED) has been there: the
/// machines in that state are listed (few, normally), page by page.
async fn oldest(
    engine: &Engine,
    state: EffectiveState,
) -> Result<Option<bm_domain::Timestamp>, bm_workflow::WorkflowError> {
    let mut query = bm_workflow::MachineQuery {
        limit: 1000,
        effective_state: Some(state),
        ..bm_workflow::MachineQuery::default()
    };
    let mut oldest = None;
    loop {
        let page = engine.list_machines(&query).await?;
        oldest = page
            .items
            .iter()
            .filter_map(bm_domain::Machine::held_since)
            .chain(oldest)
            .min();
        match page.items.last() {
            Some(last) if page.more => query.after = Some(last.id.clone()),
            _ => return Ok(oldest),
        }
    }
}

/// The Prometheus text format 0.0.4 from OpenMetrics: the same samples; a counter's family
/// is named with its `_total` suffix, and the OpenMetrics-only lines (`# EOF`, `# UNIT`) go.
fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[derive(Clone)]
struct Scrape {
    metrics: Arc<Metrics>,
    engine: Engine,
}

async fn scrape(State(s): State<Scrape>, headers: HeaderMap) -> Response {
    s.metrics.refresh(&s.engine).await;
    let body = s.metrics.openmetrics();
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, body) = if wants_openmetrics {
        (OPENMETRICS, body)
    } else {
        (TEXT_FORMAT, text_format(&body))
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::VARY, "Accept"),
        ],
        body,
    )
        .into_response()
}

/// The metrics endpoint: `GET /metrics`.
pub fn router(metrics: Arc<Metrics>, engine: Engine) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scrape { metrics, engine })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counter_families_with_total_and_drops_eof() {
        let m = Metrics::new();
        m.operation_started(OperationType::Reimage);
        m.operation_started(OperationType::Reimage);
        let om = m.openmetrics();
        assert!(
            om.contains("# TYPE bm_operations_started counter\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = text_format(&om);
        assert!(
            text.contains("# TYPE bm_operations_started_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP bm_operations_started_total Operations"),
            "{text}"
        );
        assert!(
            text.contains("bm_operations_started_total{type=\"REIMAGE\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn bmc_hosts_past_the_cap_count_as_other() {
        use bm_provider::RequestObserver;
        let m = Metrics::new().with_max_bmc_hosts(2);
        let ms = Duration::from_millis(3);
        m.request("redfish", "10.0.0.1:443", ms, Some(200));
        m.request("redfish", "10.0.0.2:443", ms, Some(503));
        m.request("redfish", "10.0.0.3:443", ms, Some(200));
        m.request("redfish", "10.0.0.4:443", ms, None);
        // A host that has its series keeps it.
        m.request("redfish", "10.0.0.1:443", ms, Some(404));
        let om = m.openmetrics();
        let count = |host: &str, status: &str| {
            let line = format!(
                "bm_bmc_request_duration_seconds_count{{provider=\"redfish\",host=\"{host}\",status=\"{status}\"}} "
            );
            om.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .map(|v| v.parse::<u64>().unwrap())
        };
        assert_eq!(count("10.0.0.1:443", "2xx"), Some(1), "{om}");
        assert_eq!(count("10.0.0.1:443", "4xx"), Some(1), "{om}");
        assert_eq!(count("10.0.0.2:443", "5xx"), Some(1), "{om}");
        assert_eq!(count("other", "2xx"), Some(1), "{om}");
        assert_eq!(count("other", "none"), Some(1), "{om}");
        assert!(!om.contains("10.0.0.3"), "{om}");
        assert!(!om.contains("10.0.0.4"), "{om}");
    }
}
