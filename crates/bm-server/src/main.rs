//! `bm-server`: parses flags, opens the store, wires the providers and the engine, binds
//! the listener and serves until Ctrl+C or SIGTERM. `bm-server backup` copies a store, online.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the binary announces its address (and a new token) on stdout"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bm_provider::ProviderRegistry;
use bm_provider_fake::{FakeConfig, FakeProvider, Timing};
use bm_store::{MemoryStore, OnDamage, SqliteConfig, SqliteStore, Store, StoreError};
use bm_workflow::{Engine, EngineConfig, Netboot, NetbootConfig, StatusPollConfig};
use clap::{Parser, ValueEnum};

/// jemalloc rather than glibc's malloc: the server allocates small objects from many
/// threads, and jemalloc does that faster (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The gRPC server of the bare-metal provisioning control plane.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Something else than serving.
    #[command(subcommand)]
    command: Option<Subcommand>,

    /// Address to listen on (port 0 picks a free port; the address is printed on stdout).
    #[arg(
        long,
        env = "BM_LISTEN",
        default_value = "127.0.0.1:50051",
        conflicts_with = "port"
    )]
    listen: SocketAddr,

    /// Port to listen on at 127.0.0.1 (shorthand for --listen 127.0.0.1:PORT).
    #[arg(long, env = "BM_PORT")]
    port: Option<u16>,

    /// Where the embedded store keeps its data (also for `backup` and `migrate`, before or
    /// after the subcommand).
    #[arg(long, env = "BM_DATA_DIR", default_value = "bm-data", global = true)]
    data_dir: PathBuf,

    /// Which store to use: `sqlite` (the durable embedded one, in --data-dir), `memory`
    /// (lost at exit), or a PostgreSQL database that several servers may share
    /// (`postgres://USER@HOST:PORT/DB`, with `?sslmode=require` or `verify-full` for TLS).
    #[arg(
        long,
        env = "BM_STORE",
        default_value = "sqlite",
        value_parser = store_choice,
        global = true
    )]
    store: StoreChoice,

    /// PostgreSQL: read connections per server (besides one for the writer and one for the
    /// feed of events and log lines).
    #[arg(
        long,
        env = "BM_DB_POOL_SIZE",
        default_value_t = bm_store::PgConfig::new("").pool_size,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000)
    )]
    db_pool_size: usize,

    /// PostgreSQL: the most one statement may run before the database cancels it.
    #[arg(long, env = "BM_DB_STATEMENT_TIMEOUT", default_value = "30s", value_parser = duration)]
    db_statement_timeout: Duration,

    /// Start even if the database fails its integrity check, read-only: reads serve what can
    /// be read, writes are refused, no operation runs (see docs/operations.md).
    #[arg(long, env = "BM_READ_ONLY_ON_CORRUPTION")]
    read_only_on_corruption: bool,

    /// Slow fake hardware, for live presentations (same as --fake-timing slow).
    #[arg(long, env = "BM_SLOW")]
    slow: bool,

    /// Timing of the fake provider.
    #[arg(long, env = "BM_FAKE_TIMING", value_enum, default_value_t = FakeTiming::Normal)]
    fake_timing: FakeTiming,

    /// Chance (0 to 1) that any fake action fails with a transient error.
    #[arg(long, env = "BM_FAKE_FAILURE_RATE", default_value_t = 0.0, value_parser = probability)]
    fake_failure_rate: f64,

    /// Seed of the fake provider's random failures.
    #[arg(long, env = "BM_FAKE_SEED", default_value_t = 0)]
    fake_seed: u64,

    /// Operations running at once, over all machines.
    #[arg(
        long,
        env = "BM_MAX_CONCURRENT_OPERATIONS",
        default_value_t = 512,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    max_concurrent_operations: usize,

    /// How long this server's claim on an operation lasts unless renewed (it renews every
    /// third of it). When a server dies, other servers sharing its database take its
    /// operations up after this long; a shorter lease fails over faster and renews more often.
    #[arg(long, env = "BM_LEASE_DURATION", default_value = "15s", value_parser = lease_duration)]
    lease_duration: Duration,

    /// How often the status poll reads each machine's BMC (power and health sync: the
    /// Reachable, Degraded and PoweredOn conditions), e.g. 5m; 0 turns it off. Each round is
    /// jittered by ±20% and spread over the interval; machines with an active operation, and
    /// blocked ones, are skipped. Every replica sharing a database polls the whole fleet: run
    /// it on one replica, or give each a longer interval.
    #[arg(
        long,
        env = "BM_STATUS_POLL_INTERVAL",
        default_value = "5m",
        value_parser = status_poll_interval
    )]
    status_poll_interval: Duration,

    /// The most BMC readings of the status poll in flight at once (a provider keeps its own
    /// per-BMC limits besides).
    #[arg(
        long,
        env = "BM_STATUS_POLL_CONCURRENCY",
        default_value_t = 64,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096)
    )]
    status_poll_concurrency: usize,

    /// Serve Prometheus metrics (GET /metrics, the text format or OpenMetrics) on this
    /// address, e.g. 127.0.0.1:9464; off by default (docs/observability.md).
    #[arg(long, env = "BM_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// The most BMC hosts whose requests get series of their own in
    /// bm_bmc_request_duration_seconds; requests to the others count as host "other".
    #[arg(long, env = "BM_METRICS_MAX_BMC_HOSTS", default_value_t = bm_server::DEFAULT_MAX_BMC_HOSTS, value_name = "N")]
    metrics_max_bmc_hosts: usize,

    /// Serve the API as JSON and Server-Sent Events on this address, e.g. 127.0.0.1:8443
    /// (POST /api/v1/<Service>/<Method>, GET /api/v1/watch and /api/v1/logs), with the same
    /// TLS and tokens as the gRPC API; off by default (docs/http-api.md).
    #[arg(long, env = "BM_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,

    /// Export traces (a span per gRPC call, operation run, stage attempt and provider call)
    /// over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317; off by default
    /// (docs/observability.md).
    #[arg(long, env = "BM_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// The fraction of new traces exported, from 0 to 1; a call that arrives with a sampled
    /// W3C traceparent is always traced.
    #[arg(
        long,
        env = "BM_OTLP_SAMPLE_RATIO",
        default_value_t = 1.0,
        value_name = "RATIO"
    )]
    otlp_sample_ratio: f64,

    /// Serve network boots (iPXE scripts, the deploy kernel and initrd, check-ins) on this
    /// address, e.g. 0.0.0.0:8080; off by default. With it, reimage's reboot-to-netboot ends
    /// when the deploy environment checks in (docs/netboot.md).
    #[arg(long, env = "BM_BOOT_LISTEN")]
    boot_listen: Option<SocketAddr>,

    /// The URL machines reach the boot service at (what the iPXE script and the deploy
    /// environment's callback use); by default http:// and the --boot-listen address, which
    /// must then not be a wildcard.
    #[arg(long, env = "BM_BOOT_URL")]
    boot_url: Option<String>,

    /// The directory the boot service serves under /boot/files/: the deploy kernel and
    /// initrd, and the images to write.
    #[arg(long, env = "BM_BOOT_DIR", default_value = "boot")]
    boot_dir: PathBuf,

    /// The deploy kernel's file name in --boot-dir.
    #[arg(long, env = "BM_BOOT_KERNEL", default_value = "vmlinuz")]
    boot_kernel: String,

    /// The deploy initrd's file name in --boot-dir.
    #[arg(long, env = "BM_BOOT_INITRD", default_value = "initrd.img")]
    boot_initrd: String,

    /// More kernel arguments for the deploy environment, e.g. "console=ttyS0".
    #[arg(long, env = "BM_BOOT_KERNEL_ARGS", default_value = "")]
    boot_kernel_args: String,

    /// How long reboot-to-netboot waits, after the power cycle, for the deploy environment
    /// to check in (with --boot-listen).
    #[arg(long, env = "BM_NETBOOT_CHECKIN_TIMEOUT", default_value = "10m", value_parser = duration)]
    netboot_checkin_timeout: Duration,

    /// Provider configuration (TOML): a [redfish] section enables the Redfish/SSH provider
    /// for machines with provider "redfish" (credentials, TLS, command templates, limits).
    #[arg(long, env = "BM_PROVIDER_CONFIG")]
    provider_config: Option<PathBuf>,

    /// Connections open at once; more are closed as soon as they are accepted.
    #[arg(
        long,
        env = "BM_MAX_CONNECTIONS",
        default_value_t = bm_server::Limits::default().max_connections,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    max_connections: usize,

    /// Calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(
        long,
        env = "BM_MAX_CONCURRENT_STREAMS",
        default_value_t = bm_server::Limits::default().max_concurrent_streams,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_concurrent_streams: u32,

    /// How long a new connection may take to send the HTTP/2 preface and its SETTINGS.
    #[arg(long, env = "BM_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    handshake_timeout: Duration,

    /// How long a connection may stay open without a call before it is closed.
    #[arg(long, env = "BM_MAX_CONNECTION_IDLE", default_value = "10m", value_parser = duration)]
    max_connection_idle: Duration,

    /// How often an HTTP/2 ping checks that a connection's peer is still there.
    #[arg(long, env = "BM_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration)]
    keepalive_interval: Duration,

    /// How long a ping may go unanswered before its connection is closed.
    #[arg(long, env = "BM_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = duration)]
    keepalive_timeout: Duration,

    /// The largest request message, in bytes; a larger request is refused
    /// (RESOURCE_EXHAUSTED) as soon as its size is known.
    #[arg(
        long,
        env = "BM_MAX_REQUEST_BYTES",
        default_value_t = bm_server::Limits::default().max_request_bytes,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=u64::from(u32::MAX))
    )]
    max_request_bytes: usize,

    /// Streams (watch, logs) open at once through the HTTP gateway, over all callers.
    #[arg(
        long,
        env = "BM_HTTP_MAX_STREAMS",
        default_value_t = bm_server::Limits::default().http_max_streams,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    http_max_streams: usize,

    /// Server streams (WatchOperations, StreamLogs) one principal may hold open at once.
    #[arg(
        long,
        env = "BM_MAX_STREAMS_PER_PRINCIPAL",
        default_value_t = bm_server::Limits::default().max_streams_per_principal,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    max_streams_per_principal: usize,

    /// Operation requests (operator and admin RPCs) one principal may make per second.
    #[arg(
        long,
        env = "BM_OP_RATE_PER_PRINCIPAL",
        default_value_t = bm_server::Limits::default().op_rate_per_principal,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    op_rate_per_principal: u32,

    /// Operation requests one principal may make at once, above the rate.
    #[arg(
        long,
        env = "BM_OP_BURST_PER_PRINCIPAL",
        default_value_t = bm_server::Limits::default().op_burst_per_principal,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    op_burst_per_principal: u32,

    /// Bytes of events or log lines kept for one watcher or log reader that does not read.
    #[arg(
        long,
        env = "BM_STREAM_BUFFER_BYTES",
        default_value_t = EngineConfig::default().stream_buffer_bytes,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..)
    )]
    stream_buffer_bytes: usize,

    /// The process's (soft) open files limit; by default it is raised to the hard limit.
    #[arg(long, env = "BM_OPEN_FILES_LIMIT", value_parser = clap::value_parser!(u64).range(16..))]
    open_files_limit: Option<u64>,

    /// The server's TLS certificate chain (PEM). With --tls-key, the listener speaks TLS.
    /// Re-read on SIGHUP.
    #[arg(long, env = "BM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The server's TLS private key (PEM). Re-read on SIGHUP.
    #[arg(long, env = "BM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign client certificates: clients may authenticate with a
    /// certificate (mutual TLS). Re-read on SIGHUP.
    #[arg(long, env = "BM_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,

    /// The tokens file (TOML): bearer tokens with hashed secrets, roles and expiry, and the
    /// roles of client certificate identities; `bm-server token create` adds tokens.
    /// Re-read on SIGHUP. Without it, on a loopback address, the server uses
    /// DATA_DIR/tokens.toml and writes an admin token to DATA_DIR/admin-token at first start.
    #[arg(long, env = "BM_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,

    /// Accept every caller as an anonymous admin, with or without TLS. Required to listen
    /// on a non-loopback address without TLS and a tokens file. Never on a shared network.
    #[arg(long, env = "BM_INSECURE")]
    insecure: bool,

    /// Log level.
    #[arg(long, env = "BM_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    log_level: LogLevel,

    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, env = "BM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(clap::Subcommand, Debug)]
enum Subcommand {
    /// Copy the store to a new file while a server may be running on it (SQLite's online
    /// backup); the copy is checked and written 0600. Restore: docs/operations.md.
    /// The store to copy is the one of --data-dir.
    Backup {
        /// The backup file to write; it must not exist.
        #[arg(long)]
        to: PathBuf,
    },
    /// Bring the store's schema up to date (what a server also does when it starts), or with
    /// --check only say whether it is: exit status 0 when current, 1 when migrations are
    /// pending, 2 when the store is newer than this program, 3 when it could not be read.
    Migrate {
        /// Report only; change nothing.
        #[arg(long)]
        check: bool,
    },
    /// Manage bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(clap::Subcommand, Debug)]
enum TokenCommand {
    /// Make a token: prints it once (keep it secret) and appends its hashed entry to the
    /// tokens file. A running server picks it up at its next SIGHUP.
    Create {
        /// The token's name (the principal that the audit trail records).
        name: String,
        /// Its role: viewer, operator or admin.
        #[arg(long, required_unless_present = "grant")]
        role: Option<String>,
        /// Limit the role to the machines this label selector matches, e.g. team=storage.
        #[arg(long, requires = "role")]
        scope: Option<String>,
        /// A further grant, as "ROLE" or "ROLE on SELECTOR"; repeatable.
        #[arg(long)]
        grant: Vec<String>,
        /// When it stops working (RFC 3339, e.g. 2027-01-31T00:00:00Z).
        #[arg(long)]
        expires: Option<String>,
        /// The tokens file.
        #[arg(long, env = "BM_TOKENS_FILE", default_value = "bm-data/tokens.toml")]
        tokens_file: PathBuf,
    },
}

/// The store a server runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StoreChoice {
    Sqlite,
    Memory,
    /// A PostgreSQL URL.
    Postgres(String),
}

impl StoreChoice {
    /// Where the store is, for the schema commands (memory has no schema).
    fn location(&self, data_dir: &std::path::Path) -> Option<bm_store::StoreUrl> {
        match self {
            StoreChoice::Sqlite => Some(bm_store::StoreUrl::Sqlite(data_dir.to_owned())),
            StoreChoice::Memory => None,
            StoreChoice::Postgres(url) => Some(bm_store::StoreUrl::Postgres(url.clone())),
        }
    }
}

fn store_choice(s: &str) -> Result<StoreChoice, String> {
    match s {
        "sqlite" => Ok(StoreChoice::Sqlite),
        "memory" => Ok(StoreChoice::Memory),
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(StoreChoice::Postgres(url.to_owned()))
        }
        other => Err(format!(
            "{other:?} is not a store: write sqlite, memory or postgres://USER@HOST:PORT/DB"
        )),
    }
}

/// A database URL without its password, for logs and messages.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    // The last '@' ends the user info: a password may contain one.
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{user}@{host}")
        }
        None => authority.to_owned(),
    };
    // libpq also takes the password (and the client key's) as parameters.
    let query = query.map(|q| {
        let pairs: Vec<String> = q
            .split('&')
            .map(|pair| {
                let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                if key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword") {
                    format!("{key}=REDACTED")
                } else {
                    pair.to_owned()
                }
            })
            .collect();
        format!("?{}", pairs.join("&"))
    });
    format!("{scheme}://{authority}{path}{}", query.unwrap_or_default())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FakeTiming {
    Normal,
    Slow,
    Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, and spans to the OTLP collector when `tracer` is given.
fn init_tracing(
    level: LogLevel,
    format: LogFormat,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let level = match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    };
    // Our crates at the chosen level; dependencies one step quieter unless RUST_LOG says.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "warn,bm_server={level},bm_workflow={level},bm_store={level},bm_provider_fake={level}"
        ))
    });
    // Colour only for a person at a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    // The traces keep their spans whatever the log level: they have a filter of their own.
    // They take our spans, and of the log events only warnings and errors (as span events):
    // the rest is in the log, and each event costs the exporter.
    let traces = tracer.map(|tracer| {
        let ours = |target: &str| {
            // Our crates' (the server, the engine, the providers, the store) and the
            // trace-only spans' (`bm_workflow::TRACE_TARGET`).
            target.starts_with("bm_")
        };
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
                let level = if meta.is_span() {
                    tracing::Level::INFO
                } else {
                    tracing::Level::WARN
                };
                ours(meta.target()) && *meta.level() <= level
            }))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .init();
}

/// The providers a configuration file enables, by their sections.
const PROVIDER_SECTIONS: [&str; 1] = ["redfish"];

/// Registers the providers configured in `path`.
fn register_configured(
    providers: &mut ProviderRegistry,
    path: &std::path::Path,
    witness: Option<Arc<Netboot>>,
    observer: Option<Arc<dyn bm_provider::RequestObserver>>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the provider configuration {}", path.display()))?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    for section in doc.keys() {
        anyhow::ensure!(
            PROVIDER_SECTIONS.contains(&section.as_str()),
            "{}: unknown section [{section}]; the sections are {}",
            path.display(),
            PROVIDER_SECTIONS.map(|s| format!("[{s}]")).join(", ")
        );
    }
    if doc.contains_key("redfish") {
        let config = bm_provider_redfish::RedfishConfig::from_toml(&text)
            .with_context(|| format!("{}: in [redfish]", path.display()))?;
        let mut provider = bm_provider_redfish::RedfishProvider::new(config)
            .with_context(|| format!("{}: in [redfish]", path.display()))?;
        if let Some(witness) = witness {
            // A deploy environment's check-in proves a warm reset the BMC cannot show.
            provider = provider.with_boot_witness(witness);
        }
        if let Some(observer) = observer {
            provider = provider.with_request_observer(observer);
        }
        providers.register(Arc::new(provider));
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl+C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received Ctrl+C"),
        () = term => tracing::info!("received SIGTERM"),
    }
}

/// Who may call: `--insecure`, the `--tokens-file`, or on loopback the local admin token.
fn auth(args: &Args, addr: SocketAddr) -> anyhow::Result<bm_server::Auth> {
    if args.insecure {
        tracing::warn!(
            "--insecure: every caller is an anonymous admin; no authentication, no authorization"
        );
        return Ok(bm_server::Auth::insecure());
    }
    if let Some(path) = &args.tokens_file {
        let auth = bm_server::Auth::from_file(path).context("loading the tokens file")?;
        tracing::info!(path = %path.display(), "tokens file loaded; SIGHUP re-reads it");
        return Ok(auth);
    }
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "refusing to listen on {addr} without authentication: give --tokens-file (see docs/security.md), or --insecure to serve anyone (never on a shared network)"
    );
    // Loopback without a tokens file: a local admin token, made once, kept in the data
    // directory where bmctl finds it (like k3s's kubeconfig).
    let dir = &args.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tokens = dir.join("tokens.toml");
    let token_file = dir.join("admin-token");
    if !tokens.exists() {
        let token =
            bm_server::create_token(&tokens, "local-admin", &["admin".to_owned()], None, true)?;
        bm_server::write_private(&token_file, format!("{token}\n").as_bytes())
            .with_context(|| format!("writing {}", token_file.display()))?;
        tracing::info!(token = %token_file.display(), "wrote a local admin token (bmctl finds it there)");
    }
    let auth = bm_server::Auth::from_file(&tokens).context("loading the tokens file")?;
    tracing::info!(tokens = %tokens.display(), token = %token_file.display(), "loopback: the local admin token is in the data directory; SIGHUP re-reads the tokens file");
    Ok(auth)
}

/// Re-reads the TLS material and the tokens file at each SIGHUP; a bad file is logged and
/// the old material stays in use.
fn reload_on_sighup(tls: Option<Arc<bm_server::Tls>>, auth: Arc<bm_server::Auth>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: TLS files will not be reloaded");
                return;
            }
        };
        while hup.recv().await.is_some() {
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(()) => {
                        tracing::info!("SIGHUP: TLS material reloaded; new connections use it")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: TLS material NOT reloaded, the previous one stays in use")
                    }
                }
            }
            match auth.reload() {
                Ok(()) => tracing::info!("SIGHUP: tokens file reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: tokens file NOT reloaded, the previous tokens stay in force")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (tls, auth);
}

/// A duration such as `10s`, `500ms` or `10m`; zero is refused (it would disable nothing
/// and close everything).
fn duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than zero".to_owned()),
        Err(e) => Err(format!("{e}; write e.g. 500ms, 10s or 10m")),
    }
}

/// The status poll's interval: 0 (off), or at least a second.
fn status_poll_interval(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let d = duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{s} is shorter than 1s; write 0 to turn the poll off"
        ));
    }
    Ok(d)
}

/// A lease duration: long enough that renewals (every third of it) are not lost to a busy
/// moment, short enough that a dead server's operations are taken up within the hour.
fn lease_duration(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) {
        return Err(format!("{s} is outside 1s..1h"));
    }
    Ok(d)
}

/// Sets the soft open files limit to `wanted`, or raises it to the hard limit: every
/// connection takes a file descriptor, and distributions start services with a soft limit
/// of 1024. Returns the limit in force.
fn set_open_files_limit(wanted: Option<u64>) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).context("reading the open files limit")?;
    let target = match wanted {
        Some(n) if n > hard => anyhow::bail!(
            "--open-files-limit {n} is above the hard limit {hard}; raise the hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit) or ask for less"
        ),
        Some(n) => n,
        None => hard,
    };
    if target != soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)
            .with_context(|| format!("setting the open files limit to {target}"))?;
        tracing::info!(from = soft, to = target, hard, "open files limit set");
    }
    Ok(target)
}

/// Descriptors kept for what is not a client connection: the store, providers' sockets to
/// BMCs and SSH, the runtime.
const RESERVED_FILES: u64 = 256;

/// A chance, from 0 to 1.
fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a number from 0 to 1")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Subcommand::Token(TokenCommand::Create {
        name,
        role,
        scope,
        grant,
        expires,
        tokens_file,
    })) = &args.command
    {
        let mut grants = grant.clone();
        if let Some(role) = role {
            grants.insert(
                0,
                match scope {
                    Some(scope) => format!("{role} on {scope}"),
                    None => role.clone(),
                },
            );
        }
        let token = bm_server::create_token(tokens_file, name, &grants, expires.as_deref(), false)?;
        eprintln!(
            "token {name:?} added to {}; send SIGHUP to a running bm-server to load it. The token (shown only now):",
            tokens_file.display()
        );
        println!("{token}");
        return Ok(());
    }
    // One worker per core; a small blocking pool (store scans), since every extra thread
    // may get an allocator arena of its own and keep its memory.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .context("starting the runtime")?;
    // This process's id: the engine's lease owner and the traces' service instance.
    let instance = EngineConfig::default().owner;
    let otlp = match &args.otlp_endpoint {
        Some(endpoint) => Some(
            bm_server::Otlp::start(
                &bm_server::OtlpConfig {
                    endpoint: endpoint.clone(),
                    sample_ratio: args.otlp_sample_ratio,
                    instance: instance.clone(),
                },
                runtime.handle().clone(),
            )
            .context("configuring the export of traces")?,
        ),
        None => None,
    };
    let (otlp, tracer) = otlp.unzip();
    init_tracing(args.log_level, args.log_format, tracer);
    if let Some(Subcommand::Backup { to }) = &args.command {
        return backup(&args.data_dir, to);
    }
    if let Some(Subcommand::Migrate { check }) = &args.command {
        let (store, data_dir) = (&args.store, &args.data_dir);
        // Its own status for a store that could not be read: 1 means "migrations pending",
        // and a script must not take replicas down because the database did not answer.
        let code = migrate(store, data_dir, *check).unwrap_or_else(|e| {
            eprintln!("Error: {e:#}");
            3
        });
        std::process::exit(code);
    }
    let result = runtime.block_on(run(args, instance));
    if let Some(otlp) = otlp {
        // The runtime's workers still run: they carry the last export.
        otlp.shutdown();
    }
    result
}

/// `bm-server migrate [--check]`; returns the exit status.
fn migrate(store: &StoreChoice, data_dir: &std::path::Path, check: bool) -> anyhow::Result<i32> {
    let Some(location) = store.location(data_dir) else {
        anyhow::bail!(
            "the memory store has no schema: name a sqlite data directory or a postgres:// URL"
        );
    };
    let shown = match &location {
        bm_store::StoreUrl::Sqlite(dir) => dir.display().to_string(),
        bm_store::StoreUrl::Postgres(url) => redacted(url),
    };
    let status = bm_store::schema_status(&location)
        .with_context(|| format!("reading the schema version of {shown}"))?;
    let (found, supported) = (status.found, status.supported);
    if status.is_newer() {
        println!(
            "{shown}: schema version {found} is newer than the {supported} this bm-server knows; run a newer bm-server"
        );
        return Ok(2);
    }
    if status.is_current() {
        println!("{shown}: schema version {found}, current");
        return Ok(0);
    }
    if check {
        println!(
            "{shown}: schema version {found}, {} migration(s) pending to reach {supported}; `bm-server migrate` applies them (a starting server does too)",
            supported - found
        );
        return Ok(1);
    }
    // Opening applies the migrations, under the store's lock.
    match &location {
        bm_store::StoreUrl::Sqlite(dir) => SqliteStore::open(SqliteConfig::new(dir))
            .with_context(|| format!("migrating {shown}"))?
            .close(),
        bm_store::StoreUrl::Postgres(url) => {
            bm_store::PgStore::open(bm_store::PgConfig::new(url.clone()))
                .with_context(|| format!("migrating {shown}"))?
                .close();
        }
    }
    println!("{shown}: migrated from schema version {found} to {supported}");
    Ok(0)
}

/// `bm-server backup`.
fn backup(data_dir: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    let report = bm_store::backup(data_dir, to).with_context(|| {
        format!(
            "backing up the store in {} to {}",
            data_dir.display(),
            to.display()
        )
    })?;
    println!(
        "backed up {} to {}: {} bytes, {} machines, {} operations, events up to revision {}, schema version {}; the copy passed its integrity check",
        data_dir.display(),
        report.path.display(),
        report.bytes,
        report.machines,
        report.operations,
        report.last_revision,
        report.schema_version
    );
    Ok(())
}

async fn run(args: Args, instance: String) -> anyhow::Result<()> {
    let open_files = set_open_files_limit(args.open_files_limit)?;
    if open_files < args.max_connections as u64 + RESERVED_FILES {
        tracing::warn!(
            open_files,
            max_connections = args.max_connections,
            "the open files limit is below --max-connections plus {RESERVED_FILES} for the store and providers: accepting will fail (EMFILE) before the connection limit is reached"
        );
    }
    let metrics = args.metrics_listen.map(|_| {
        Arc::new(bm_server::Metrics::new().with_max_bmc_hosts(args.metrics_max_bmc_hosts))
    });
    let commit_observer = metrics
        .clone()
        .map(|m| m as Arc<dyn bm_store::CommitObserver>);
    let store: Arc<dyn Store> = match &args.store {
        StoreChoice::Sqlite => {
            let config = SqliteConfig {
                commit_observer: commit_observer.clone(),
                on_damage: if args.read_only_on_corruption {
                    OnDamage::ReadOnly
                } else {
                    OnDamage::Refuse
                },
                ..SqliteConfig::new(&args.data_dir)
            };
            let store = match SqliteStore::open(config) {
                Ok(store) => store,
                Err(e @ StoreError::Damaged { .. }) => anyhow::bail!(
                    "opening the store in {}: {e}. To serve what can still be read, read-only, start with --read-only-on-corruption",
                    args.data_dir.display()
                ),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("opening the store in {}", args.data_dir.display())
                    });
                }
            };
            tracing::info!(path = %store.path().display(), condition = %store.condition(), "store opened");
            Arc::new(store)
        }
        StoreChoice::Memory => {
            tracing::warn!("memory store: nothing survives this process");
            Arc::new(MemoryStore::new())
        }
        StoreChoice::Postgres(url) => {
            let config = bm_store::PgConfig {
                commit_observer: commit_observer.clone(),
                pool_size: args.db_pool_size,
                statement_timeout: Some(args.db_statement_timeout),
                // A stalled replica's open transaction must not hold its rows past its
                // leases: the others could not take its operations over.
                idle_in_transaction_timeout: Some(args.lease_duration),
                ..bm_store::PgConfig::new(url.clone())
            };
            let store = bm_store::PgStore::open(config)
                .with_context(|| format!("opening the store {}", redacted(url)))?;
            tracing::info!(database = %redacted(url), condition = %store.condition(), "store opened");
            Arc::new(store)
        }
    };

    let addr = match args.port {
        Some(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        None => args.listen,
    };
    let auth = Arc::new(auth(&args, addr)?);

    let timing = match (args.slow, args.fake_timing) {
        (true, _) | (false, FakeTiming::Slow) => Timing::Slow,
        (false, FakeTiming::Normal) => Timing::Normal,
        (false, FakeTiming::Instant) => Timing::Instant,
    };
    let mut providers = ProviderRegistry::new();
    providers.register(Arc::new(FakeProvider::new(FakeConfig {
        timing,
        failure_rate: args.fake_failure_rate,
        seed: args.fake_seed,
    })));

    let netboot = args.boot_listen.map(|_| {
        Arc::new(Netboot::new(NetbootConfig {
            checkin_timeout: args.netboot_checkin_timeout,
            ..NetbootConfig::default()
        }))
    });
    if let Some(path) = &args.provider_config {
        let observer = metrics
            .clone()
            .map(|m| m as Arc<dyn bm_provider::RequestObserver>);
        register_configured(&mut providers, path, netboot.clone(), observer)?;
    }

    let config = EngineConfig {
        max_concurrent_operations: args.max_concurrent_operations,
        lease_duration: args.lease_duration,
        // Expired leases of dead replicas are looked for this often.
        poll_interval: (args.lease_duration / 4).min(EngineConfig::default().poll_interval),
        stream_buffer_bytes: args.stream_buffer_bytes,
        status_poll: StatusPollConfig {
            interval: (!args.status_poll_interval.is_zero()).then_some(args.status_poll_interval),
            concurrency: args.status_poll_concurrency,
            ..StatusPollConfig::default()
        },
        netboot: netboot.clone(),
        telemetry: match &metrics {
            Some(m) => m.clone(),
            None => Arc::new(bm_workflow::NoTelemetry),
        },
        trace_links: if args.otlp_endpoint.is_some() {
            Arc::new(bm_server::OtelTraceLinks)
        } else {
            Arc::new(bm_workflow::NoTraceLinks)
        },
        owner: instance,
        ..EngineConfig::default()
    };
    tracing::info!(owner = %config.owner, providers = ?providers, "starting engine");
    let engine = Engine::new(store, providers, config);
    engine.start();

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "listening");
    println!("bm-server listening on {local}");

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = bm_server::Tls::load(bm_server::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.client_ca.clone(),
            })
            .context("loading the TLS material")?;
            tracing::info!(cert = %cert.display(), mutual = tls.mutual(), "TLS on; SIGHUP re-reads the certificate, key and client CA");
            Some(Arc::new(tls))
        }
        _ => None,
    };
    anyhow::ensure!(
        addr.ip().is_loopback() || args.insecure || tls.is_some(),
        "refusing to listen on {addr} without TLS: give --tls-cert and --tls-key (and --tokens-file), or --insecure to serve anyone in plaintext (never on a shared network)"
    );
    reload_on_sighup(tls.clone(), auth.clone());
    let tls_on = tls.is_some();

    let deps = bm_server::Deps {
        engine,
        shutdown_grace: Duration::from_secs(5),
        limits: bm_server::Limits {
            max_connections: args.max_connections,
            max_concurrent_streams: args.max_concurrent_streams,
            handshake_timeout: args.handshake_timeout,
            max_connection_idle: args.max_connection_idle,
            keepalive_interval: args.keepalive_interval,
            keepalive_timeout: args.keepalive_timeout,
            max_request_bytes: args.max_request_bytes,
            max_streams_per_principal: args.max_streams_per_principal,
            op_rate_per_principal: args.op_rate_per_principal,
            op_burst_per_principal: args.op_burst_per_principal,
            http_max_streams: args.http_max_streams,
        },
        tls,
        auth,
        metrics: metrics.clone(),
        traced: args.otlp_endpoint.is_some(),
    };
    let engine = deps.engine.clone();
    // Ends the boot service and the metrics endpoint once the API has stopped.
    let (side_stop, side_stopped) = tokio::sync::watch::channel(false);
    let stopped = || {
        let mut rx = side_stopped.clone();
        async move {
            let _ = rx.changed().await;
        }
    };
    let metrics_server = match (args.metrics_listen, metrics) {
        (Some(addr), Some(metrics)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics on http://{}/metrics", listener.local_addr()?);
            let app = bm_server::metrics_router(metrics, engine.clone());
            Some(tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped())
                    .into_future(),
            ))
        }
        _ => None,
    };
    let boot = match (args.boot_listen, netboot) {
        (Some(boot_addr), Some(netboot)) => {
            let listener = tokio::net::TcpListener::bind(boot_addr)
                .await
                .with_context(|| format!("binding the boot service to {boot_addr}"))?;
            let bound = listener.local_addr()?;
            let base_url = match &args.boot_url {
                Some(url) => url.trim_end_matches('/').to_owned(),
                None if bound.ip().is_unspecified() => anyhow::bail!(
                    "--boot-listen {boot_addr} listens on every address: give --boot-url, the URL machines reach it at (e.g. http://10.0.0.1:{})",
                    bound.port()
                ),
                None => format!("http://{bound}"),
            };
            let svc = bm_server::BootService {
                engine,
                netboot,
                dir: args.boot_dir.clone(),
                kernel: args.boot_kernel.clone(),
                initrd: args.boot_initrd.clone(),
                kernel_args: args.boot_kernel_args.clone(),
                base_url,
            };
            Some(tokio::spawn(bm_server::serve_boot(
                listener,
                svc,
                stopped(),
            )))
        }
        _ => None,
    };
    let http = match args.http_listen {
        Some(http_addr) => {
            anyhow::ensure!(
                http_addr.ip().is_loopback() || args.insecure || tls_on,
                "refusing to serve the HTTP API on {http_addr} without TLS: give --tls-cert and --tls-key, or --insecure (never on a shared network)"
            );
            let http = tokio::net::TcpListener::bind(http_addr)
                .await
                .with_context(|| format!("binding the HTTP API to {http_addr}"))?;
            let scheme = if tls_on { "https" } else { "http" };
            tracing::info!(addr = %http.local_addr()?, "HTTP API on {scheme}://{}/api/v1", http.local_addr()?);
            Some(http)
        }
        None => None,
    };
    let served = bm_server::serve_with_gateway(listener, http, shutdown_signal(), deps).await;
    let _ = side_stop.send(true);
    for (what, task) in [
        ("the boot service", boot),
        ("the metrics endpoint", metrics_server),
    ] {
        let Some(task) = task else { continue };
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "{what} failed"),
            Err(e) => tracing::error!(error = %e, "{what} panicked"),
        }
    }
    served.context("serving")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("bm-server").chain(args.iter().copied()))
    }

    #[test]
    fn the_store_is_sqlite_memory_or_a_postgres_url() {
        assert_eq!(parse(&[]).unwrap().store, StoreChoice::Sqlite);
        assert_eq!(
            parse(&["--store", "memory"]).unwrap().store,
            StoreChoice::Memory
        );
        let url = "postgres://bm@db.example:5432/fleet?sslmode=verify-full";
        assert_eq!(
            parse(&["--store", url]).unwrap().store,
            StoreChoice::Postgres(url.into())
        );
        let err = parse(&["--store", "mysql://x"]).unwrap_err().to_string();
        assert!(err.contains("postgres://USER@HOST:PORT/DB"), "{err}");
        // The store is named before or after the subcommand alike.
        for args in [
            ["migrate", "--check", "--store", url],
            ["--store", url, "migrate", "--check"],
        ] {
            let m = parse(&args).unwrap();
            assert!(
                matches!(m.command, Some(Subcommand::Migrate { check: true })),
                "{args:?}"
            );
            assert_eq!(m.store, StoreChoice::Postgres(url.into()), "{args:?}");
        }
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("postgres://bm:s3cret@db:5432/fleet"),
            "postgres://bm@db:5432/fleet"
        );
        assert_eq!(redacted("postgres://db/fleet"), "postgres://db/fleet");
        assert_eq!(
            redacted("postgres://bm:p@ss@db/fleet?sslmode=require&password=s3cret&sslpassword=k"),
            "postgres://bm@db/fleet?sslmode=require&password=REDACTED&sslpassword=REDACTED"
        );
        assert_eq!(
            redacted("postgresql://db:5432?user=bm&Password=x"),
            "postgresql://db:5432?user=bm&Password=REDACTED"
        );
    }

    #[test]
    fn status_poll_interval_is_on_by_default_and_zero_turns_it_off() {
        assert_eq!(
            parse(&[]).unwrap().status_poll_interval,
            Duration::from_secs(300)
        );
        assert_eq!(
            parse(&["--status-poll-interval", "0"])
                .unwrap()
                .status_poll_interval,
            Duration::ZERO
        );
        assert_eq!(
            parse(&["--status-poll-interval", "30s"])
                .unwrap()
                .status_poll_interval,
            Duration::from_secs(30)
        );
        for bad in ["10ms", "often", "-1s"] {
            assert!(parse(&["--status-poll-interval", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn lease_duration_is_bounded() {
        assert_eq!(parse(&[]).unwrap().lease_duration, Duration::from_secs(15));
        assert_eq!(
            parse(&["--lease-duration", "2s"]).unwrap().lease_duration,
            Duration::from_secs(2)
        );
        for bad in ["500ms", "2h", "0s", "soon"] {
            let err = parse(&["--lease-duration", bad]).unwrap_err().to_string();
            assert!(err.contains("--lease-duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn backup_is_a_subcommand_and_serving_stays_the_default() {
        let serve = parse(&["--data-dir", "d"]).unwrap();
        assert!(serve.command.is_none());
        assert!(!serve.read_only_on_corruption);
        for args in [
            ["backup", "--data-dir", "d", "--to", "f.db"],
            ["--data-dir", "d", "backup", "--to", "f.db"],
        ] {
            let b = parse(&args).unwrap();
            let Some(Subcommand::Backup { to }) = b.command else {
                panic!("{b:?}");
            };
            assert_eq!(
                (b.data_dir, to),
                (PathBuf::from("d"), PathBuf::from("f.db"))
            );
        }
        assert!(
            parse(&["backup", "--data-dir", "d"]).is_err(),
            "--to is required"
        );
        assert!(
            parse(&["--read-only-on-corruption"])
                .unwrap()
                .read_only_on_corruption
        );
    }

    #[test]
    fn out_of_range_flags_are_refused_before_anything_starts() {
        assert!(parse(&["--max-concurrent-operations", "0"]).is_err());
        assert!(parse(&["--fake-failure-rate", "1.5"]).is_err());
        assert!(parse(&["--fake-failure-rate", "NaN"]).is_err());
        let ok = parse(&[
            "--max-concurrent-operations",
            "1",
            "--fake-failure-rate",
            "0.25",
        ])
        .unwrap();
        assert_eq!(
            (ok.max_concurrent_operations, ok.fake_failure_rate),
            (1, 0.25)
        );
    }

    #[test]
    fn limits_have_defaults_and_durations_read_like_durations() {
        let d = parse(&[]).unwrap();
        let defaults = bm_server::Limits::default();
        assert_eq!(d.max_connections, defaults.max_connections);
        assert_eq!(d.max_concurrent_streams, defaults.max_concurrent_streams);
        assert_eq!(d.handshake_timeout, defaults.handshake_timeout);
        assert_eq!(d.max_connection_idle, defaults.max_connection_idle);
        assert_eq!(d.keepalive_interval, defaults.keepalive_interval);
        assert_eq!(d.keepalive_timeout, defaults.keepalive_timeout);
        assert_eq!(d.open_files_limit, None);
        assert_eq!(d.max_request_bytes, defaults.max_request_bytes);
        assert_eq!(
            d.max_streams_per_principal,
            defaults.max_streams_per_principal
        );
        assert_eq!(d.op_rate_per_principal, defaults.op_rate_per_principal);
        assert_eq!(d.op_burst_per_principal, defaults.op_burst_per_principal);
        assert_eq!(d.http_max_streams, defaults.http_max_streams);
        let ok = parse(&[
            "--handshake-timeout",
            "250ms",
            "--max-connection-idle",
            "2m",
        ])
        .unwrap();
        assert_eq!(ok.handshake_timeout, Duration::from_millis(250));
        assert_eq!(ok.max_connection_idle, Duration::from_secs(120));
        for bad in [
            &["--handshake-timeout", "0s"][..],
            &["--handshake-timeout", "soon"],
            &["--max-concurrent-streams", "0"],
            &["--max-connections", "0"],
            &["--open-files-limit", "3"],
            &["--max-request-bytes", "10"],
            &["--max-request-bytes", "5000000000"],
            &["--max-streams-per-principal", "0"],
            &["--op-rate-per-principal", "0"],
            &["--op-burst-per-principal", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
