//! The status poll (power and health sync) over a big fleet: the engine and the SQLite store
//! the server runs, in this process, with the instant fake provider as every BMC.
//!
//! The poll has no API to start a round or report one (it runs inside the engine on its
//! interval), so this scenario drives the engine directly: rounds back to back, unpaced, at
//! the server's default concurrency. The figures are the cost of the control plane's side
//! (listing, one reading per machine, the writes of what changed); real BMCs answer in
//! tens to hundreds of milliseconds, which the interval and the concurrency absorb.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use bm_domain::{Labels, MacAddress, Machine, MachineId, MachineSpec, Timestamp};
use bm_provider::ProviderRegistry;
use bm_provider_fake::{FakeConfig, FakeProvider, LABEL_BMC, LABEL_HEALTH, Timing};
use bm_store::{SqliteConfig, SqliteStore, Store};
use bm_workflow::{Engine, EngineConfig, PollRound, StatusPollConfig};

use crate::procs;
use crate::stats::{Row, fmt_count, fmt_duration};

/// One machine in 100 reports a Warning, one in 1,000 has an unreachable BMC.
fn machine(n: u32, now: Timestamp) -> anyhow::Result<Machine> {
    let mut labels = Vec::new();
    if n % 100 == 7 {
        labels.push((LABEL_HEALTH, "warning"));
    }
    if n % 1000 == 13 {
        labels.push((LABEL_BMC, "unreachable"));
    }
    let b = n.to_be_bytes();
    let mac: MacAddress = format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Machine::register(
        MachineId::new(format!("poll-{n:06}"))?,
        MachineSpec {
            provider: "fake".into(),
            mac_addresses: vec![mac],
            bmc_endpoint: format!("redfish+https://10.{}.{}.{}", b[1], b[2], b[3]),
            image: "ubuntu-24.04".into(),
            ..MachineSpec::default()
        },
        Labels::from_pairs(labels)?,
        now,
    )?)
}

/// Registers `n` machines and times two rounds: the first, where every reading changes the
/// machine (a fresh fleet), and the second, the steady state, where nothing does.
pub(crate) async fn run(work: &std::path::Path, n: u32, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(work.join("poll")))?);
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    let mut next = 0;
    while next < n {
        let batch = (next..(next + 1000).min(n))
            .map(|i| machine(i, now))
            .collect::<anyhow::Result<Vec<_>>>()?;
        next += u32::try_from(batch.len())?;
        for r in store.import_machines(batch, false).await? {
            r?;
        }
    }
    let mut providers = ProviderRegistry::new();
    providers.register(Arc::new(FakeProvider::new(FakeConfig {
        timing: Timing::Instant,
        ..FakeConfig::default()
    })));
    let concurrency = StatusPollConfig::default().concurrency;
    let engine = Engine::new(
        store.clone(),
        providers,
        EngineConfig {
            status_poll: StatusPollConfig {
                concurrency,
                ..StatusPollConfig::default()
            },
            ..EngineConfig::default()
        },
    );
    let pid = std::process::id();
    let unreachable = (0..n).filter(|i| i % 1000 == 13).count() as u64;
    let degraded = (0..n).filter(|i| i % 100 == 7).count() as u64;
    for (what, changes) in [
        ("first round (every machine changes)", u64::from(n)),
        ("steady round (nothing changes)", 0),
    ] {
        let cpu = procs::cpu(pid)?;
        let started = Instant::now();
        let round = engine.poll_status_once().await?;
        let took = started.elapsed();
        let cpu = procs::cpu(pid)?.saturating_sub(cpu);
        store.flush().await?;
        let want = PollRound {
            polled: u64::from(n),
            changed: changes,
            unreachable,
            degraded,
            ..PollRound::default()
        };
        ensure!(round == want, "{what}: {round:?}, wanted {want:?}");
        rows.push(
            Row::new(
                "poll",
                format!(
                    "status poll of {} machines, {what}, {concurrency} in flight",
                    fmt_count(f64::from(n))
                ),
                fmt_duration(took),
            )
            .vs(format!(
                "{} readings/s, {:.2} cores",
                fmt_count(f64::from(n) / took.as_secs_f64()),
                cpu.as_secs_f64() / took.as_secs_f64()
            ))
            .target(if changes == 0 {
                "≤ 1% of a core at a 5 min interval"
            } else {
                ""
            }),
        );
        if changes == 0 {
            // What the steady state costs on the default interval.
            let share = cpu.as_secs_f64() / Duration::from_secs(300).as_secs_f64();
            rows.push(Row::new(
                "poll",
                "CPU share of the steady poll at the default 5 min interval",
                format!("{:.2}% of one core", share * 100.0),
            ));
        }
    }
    let (rss, _) = procs::rss(pid)?;
    rows.push(Row::new(
        "poll",
        "bench process RSS after the rounds",
        format!("{:.1} MiB", rss as f64 / 1048576.0),
    ));
    engine.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
