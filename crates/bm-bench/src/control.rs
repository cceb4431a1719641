//! The scenarios against the control plane: the fleet, the API under load, watch fan-out,
//! and memory per machine. Each checks the invariants it relies on and fails if one breaks.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use bm_proto::v1 as pb;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use futures::stream::{FuturesUnordered, StreamExt};
use tonic::transport::Channel;

use crate::stats::Latency;

#[derive(Clone)]
pub(crate) struct Clients {
    pub(crate) machines: MachineServiceClient<Channel>,
    pub(crate) operations: OperationServiceClient<Channel>,
}

impl Clients {
    pub(crate) fn new(channel: Channel) -> Clients {
        let big = 64 * 1024 * 1024;
        Clients {
            machines: MachineServiceClient::new(channel.clone()).max_decoding_message_size(big),
            operations: OperationServiceClient::new(channel).max_decoding_message_size(big),
        }
    }
}

pub(crate) fn machine_id(i: u32) -> String {
    format!("m-{i:06}")
}

fn machine(i: u32) -> pb::Machine {
    pb::Machine {
        id: machine_id(i),
        spec: Some(pb::MachineSpec {
            provider: "fake".into(),
            mac_addresses: vec![format!(
                "02:00:00:{:02x}:{:02x}:{:02x}",
                i >> 16 & 0xff,
                i >> 8 & 0xff,
                i & 0xff
            )],
            ssh_endpoint: format!(
                "root@10.{}.{}.{}:22",
                i >> 16 & 0xff,
                i >> 8 & 0xff,
                i & 0xff
            ),
            bmc_endpoint: format!(
                "redfish+https://10.200.{}.{}/redfish/v1/Systems/1",
                i >> 8 & 0xff,
                i & 0xff
            ),
            image: "ubuntu-24.04".into(),
            target_cluster: "bench".into(),
            network_config: String::new(),
        }),
        labels: [
            ("rack".to_owned(), format!("r{}", i % 40)),
            ("bench".to_owned(), "yes".to_owned()),
        ]
        .into(),
        ..Default::default()
    }
}

/// Registers machines `from..to` in batches; returns how long it took.
pub(crate) async fn import(c: &mut Clients, from: u32, to: u32) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut i = from;
    while i < to {
        let end = (i + 1000).min(to);
        let r = c
            .machines
            .import_machines(pb::ImportMachinesRequest {
                machines: (i..end).map(machine).collect(),
                source: "bm-bench".into(),
                validate_only: false,
            })
            .await?
            .into_inner();
        ensure!(
            r.failed_count == 0,
            "import failed for {} rows: {:?}",
            r.failed_count,
            r.results.iter().find(|x| !x.error_message.is_empty())
        );
        i = end;
    }
    Ok(started.elapsed())
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    EnterMaintenance,
    Reimage,
}

/// The outcome of a phase of the fleet run.
#[derive(Debug)]
pub(crate) struct Phase {
    /// From the first request sent to the last operation's end (server clock).
    pub(crate) wall: Duration,
    /// Admission to end, per operation (server clock).
    pub(crate) latency: Latency,
    /// Events committed during the phase.
    pub(crate) events: u64,
    /// Server CPU time used during the phase, over all the servers.
    pub(crate) cpu: Duration,
    /// The same, per server (in the order of the `pids` given).
    pub(crate) cpu_each: Vec<Duration>,
}

fn micros(t: &Option<bm_proto::pbjson_types::Timestamp>) -> i64 {
    t.as_ref()
        .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000)
}

/// Starts `kind` on every machine `0..n` with at most `in_flight` requests outstanding and
/// waits until every operation has ended; every one must succeed.
///
/// `servers` are replicas of one store: request `i` goes to `servers[i % len]` (round robin);
/// the first one is watched and lists the outcome. `pids` are the processes whose CPU time
/// the phase reports (summed).
pub(crate) async fn run_phase(
    servers: &[Clients],
    pids: &[u32],
    n: u32,
    kind: Kind,
    in_flight: usize,
    tag: &str,
) -> anyhow::Result<Phase> {
    ensure!(!servers.is_empty(), "no server to run the phase on");
    let mut c = servers[0].clone();
    let cpu_of = |pids: &[u32]| {
        pids.iter()
            .map(|pid| crate::procs::cpu(*pid))
            .collect::<anyhow::Result<Vec<Duration>>>()
    };
    // Watch everything from now on, to know when the phase is over and how many durable state
    // changes (events) it made.
    let mut watch = c
        .operations
        .watch_operations(pb::WatchOperationsRequest {
            after_revision: None,
            ..Default::default()
        })
        .await?
        .into_inner();
    let cpu0 = cpu_of(pids)?;
    let t0 = SystemTime::now();
    let started = Instant::now();
    let mut submitted: HashSet<String> = HashSet::with_capacity(n as usize);
    let mut ended: HashSet<String> = HashSet::with_capacity(n as usize);
    let (mut min_rev, mut max_rev) = (u64::MAX, 0u64);
    let mut pending = FuturesUnordered::new();
    let start = |mut c: Clients, i: u32| async move {
        let machine_id = machine_id(i);
        let request_id = format!("{tag}-{i}");
        let op = match kind {
            Kind::EnterMaintenance => c
                .machines
                .enter_maintenance(pb::EnterMaintenanceRequest {
                    machine_id,
                    request_id,
                    note: String::new(),
                })
                .await?
                .into_inner(),
            Kind::Reimage => c
                .machines
                .reimage(pb::ReimageRequest {
                    machine_id,
                    request_id,
                    note: String::new(),
                })
                .await?
                .into_inner(),
        };
        Ok::<_, tonic::Status>(op.id)
    };
    let mut next = 0u32;
    let replica = |i: u32| servers[i as usize % servers.len()].clone();
    while next < n && pending.len() < in_flight {
        pending.push(start(replica(next), next));
        next += 1;
    }
    loop {
        if pending.is_empty()
            && submitted.len() == n as usize
            && submitted.iter().all(|id| ended.contains(id))
        {
            break;
        }
        tokio::select! {
            Some(r) = pending.next(), if !pending.is_empty() => {
                submitted.insert(r.context("starting an operation")?);
                if next < n {
                    pending.push(start(replica(next), next));
                    next += 1;
                }
            }
            batch = watch.message() => {
                let batch = batch?.context("the watch stream ended")?;
                for e in batch.events {
                    min_rev = min_rev.min(e.revision);
                    max_rev = max_rev.max(e.revision);
                    if e.r#type == pb::EventType::PhaseChanged as i32 {
                        match e.phase() {
                            pb::OperationPhase::Succeeded => { ended.insert(e.operation_id); }
                            pb::OperationPhase::Failed | pb::OperationPhase::Canceled => {
                                bail!("operation {} on {} ended {:?}: {}", e.operation_id, e.machine_id, e.phase(), e.message)
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the phase did not end within 10 minutes"
        );
    }
    let cpu_each: Vec<Duration> = cpu_of(pids)?
        .into_iter()
        .zip(cpu0)
        .map(|(now, before)| now.saturating_sub(before))
        .collect();
    // Latencies and the end from the server's own timestamps.
    let wanted = match kind {
        Kind::EnterMaintenance => pb::OperationType::EnterMaintenance,
        Kind::Reimage => pb::OperationType::Reimage,
    };
    let mut samples = Vec::with_capacity(n as usize);
    let mut last_end = 0i64;
    let mut token = String::new();
    loop {
        let page = c
            .operations
            .list_operations(pb::ListOperationsRequest {
                page_size: 1000,
                page_token: token,
                r#type: wanted.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        for o in &page.operations {
            if submitted.contains(&o.id) {
                let (created, end) = (micros(&o.create_time), micros(&o.end_time));
                samples.push(Duration::from_micros((end - created).max(0) as u64));
                last_end = last_end.max(end);
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ensure!(
        samples.len() == n as usize,
        "found {} of {n} operations in the history",
        samples.len()
    );
    let t0_micros = t0.duration_since(SystemTime::UNIX_EPOCH)?.as_micros() as i64;
    Ok(Phase {
        wall: Duration::from_micros((last_end - t0_micros).max(0) as u64),
        latency: Latency::of(&mut samples),
        events: if max_rev >= min_rev {
            max_rev - min_rev + 1
        } else {
            0
        },
        cpu: cpu_each.iter().sum(),
        cpu_each,
    })
}

/// Every machine `0..n` must be in MAINTENANCE, provisioned, in its cluster, idle.
pub(crate) async fn check_fleet(c: &mut Clients, n: u32) -> anyhow::Result<()> {
    let mut token = String::new();
    let mut seen = 0u32;
    loop {
        let page = c
            .machines
            .list_machines(pb::ListMachinesRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        for m in &page.machines {
            let status = m.status.as_ref().context("machine without status")?;
            let cond = |t: &str| status.conditions.iter().any(|c| c.r#type == t && c.status);
            ensure!(
                status.phase() == pb::Phase::Maintenance,
                "{} is in {:?}",
                m.id,
                status.phase()
            );
            ensure!(
                cond("Provisioned") && cond("InCustomerCluster"),
                "{} is not provisioned",
                m.id
            );
            ensure!(
                status.active_operation_id.is_empty(),
                "{} still has operation {}",
                m.id,
                status.active_operation_id
            );
            ensure!(
                m.effective_state() == pb::EffectiveState::MaintenanceIdle,
                "{} is {:?}",
                m.id,
                m.effective_state()
            );
            seen += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ensure!(seen == n, "listed {seen} machines, expected {n}");
    Ok(())
}

/// Sequential GetMachine round trips over random machines of `0..n`.
pub(crate) async fn get_sequential(
    c: &mut Clients,
    n: u32,
    calls: usize,
) -> anyhow::Result<Latency> {
    let mut samples = Vec::with_capacity(calls);
    let mut x = 0x2545_f491_u64;
    for i in 0..calls + calls / 10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = machine_id((x % u64::from(n)) as u32);
        let t = Instant::now();
        let m = c
            .machines
            .get_machine(pb::GetMachineRequest {
                machine_id: id.clone(),
            })
            .await?
            .into_inner();
        ensure!(m.id == id, "asked for {id}, got {}", m.id);
        if i >= calls / 10 {
            samples.push(t.elapsed());
        }
    }
    Ok(Latency::of(&mut samples))
}

/// GetMachine calls per second with `in_flight` outstanding on one channel.
pub(crate) async fn get_throughput(
    c: &Clients,
    n: u32,
    in_flight: usize,
    run_for: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let call = |mut c: Clients, i: u64| async move {
        c.machines
            .get_machine(pb::GetMachineRequest {
                machine_id: machine_id((i % u64::from(n)) as u32),
            })
            .await
    };
    let mut pending = FuturesUnordered::new();
    let mut i = 0u64;
    for _ in 0..in_flight {
        pending.push(call(c.clone(), i * 7919));
        i += 1;
    }
    let mut done = 0u64;
    while let Some(r) = pending.next().await {
        r?;
        done += 1;
        if started.elapsed() < run_for {
            pending.push(call(c.clone(), i * 7919));
            i += 1;
        }
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// Lists every machine, `page` per call; returns the time and the count.
pub(crate) async fn list_all(c: &mut Clients, page: i32) -> anyhow::Result<(Duration, usize)> {
    let started = Instant::now();
    let mut token = String::new();
    let mut count = 0;
    loop {
        let r = c
            .machines
            .list_machines(pb::ListMachinesRequest {
                page_size: page,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        count += r.machines.len();
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    Ok((started.elapsed(), count))
}

/// What the watchers of the fan-out scenario saw.
#[derive(Debug)]
pub(crate) struct FanOut {
    pub(crate) watchers: usize,
    pub(crate) events_each: usize,
    pub(crate) delivery: Latency,
    pub(crate) wall: Duration,
}

/// `watchers` subscribers watch everything while machines `0..n` are reimaged again; each
/// must receive every event of the phase, in revision order, without a gap.
pub(crate) async fn fan_out(
    endpoint: &str,
    c: &mut Clients,
    server_pid: u32,
    watchers: usize,
    n: u32,
) -> anyhow::Result<FanOut> {
    // Watchers spread over several connections, as separate dashboards would be.
    let per_channel = 100;
    let mut channels = Vec::new();
    for _ in 0..watchers.div_ceil(per_channel) {
        channels.push(Channel::from_shared(endpoint.to_owned())?.connect().await?);
    }
    let mut streams = Vec::with_capacity(watchers);
    for w in 0..watchers {
        let mut ops = OperationServiceClient::new(channels[w / per_channel].clone())
            .max_decoding_message_size(64 << 20);
        let s = ops
            .watch_operations(pb::WatchOperationsRequest {
                after_revision: None,
                ..Default::default()
            })
            .await?
            .into_inner();
        streams.push(s);
    }
    let started = Instant::now();
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(w, mut s)| {
            tokio::spawn(async move {
                let mut revisions: Vec<u64> = Vec::new();
                let mut latencies = Vec::new();
                let mut terminal = 0u32;
                while terminal < n {
                    let batch = tokio::time::timeout(Duration::from_secs(300), s.message())
                        .await
                        .map_err(|_| anyhow::anyhow!("watcher {w} received nothing for 300 s"))??
                        .ok_or_else(|| anyhow::anyhow!("watcher {w}: stream ended"))?;
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)?
                        .as_micros() as i64;
                    for e in batch.events {
                        if revisions.len().is_multiple_of(16) {
                            latencies
                                .push(Duration::from_micros((now - micros(&e.time)).max(0) as u64));
                        }
                        if e.r#type == pb::EventType::PhaseChanged as i32
                            && e.phase() == pb::OperationPhase::Succeeded
                        {
                            terminal += 1;
                        }
                        revisions.push(e.revision);
                    }
                }
                Ok::<_, anyhow::Error>((revisions, latencies))
            })
        })
        .collect();
    let phase = run_phase(
        std::slice::from_ref(c),
        &[server_pid],
        n,
        Kind::Reimage,
        512,
        "fanout",
    )
    .await?;
    let mut all_latencies = Vec::new();
    let mut reference: Option<Vec<u64>> = None;
    for (w, t) in tasks.into_iter().enumerate() {
        let (revisions, latencies) = t.await??;
        ensure!(
            revisions.windows(2).all(|p| p[1] == p[0] + 1),
            "watcher {w} saw a gap or a reordering"
        );
        match &reference {
            None => reference = Some(revisions),
            Some(r) => ensure!(
                *r == revisions,
                "watcher {w} saw other events than watcher 0"
            ),
        }
        all_latencies.extend(latencies);
    }
    let events_each = reference.map_or(0, |r| r.len());
    ensure!(
        events_each as u64 >= phase.events,
        "watchers saw {events_each} events, the phase made {}",
        phase.events
    );
    Ok(FanOut {
        watchers,
        events_each,
        delivery: Latency::of(&mut all_latencies),
        wall: started.elapsed(),
    })
}

/// What a rollout over the fleet took.
pub(crate) struct RolloutRun {
    /// From its creation to its end.
    pub(crate) wall: Duration,
    /// The server's CPU time meanwhile.
    pub(crate) cpu: Duration,
}

/// Reimages the `n` machines in MAINTENANCE as one rollout, at most 1,000 in flight, and
/// follows it (WatchRollout) to its end; it must succeed on every machine.
pub(crate) async fn rollout(addr: &str, pid: u32, n: u32) -> anyhow::Result<RolloutRun> {
    use bm_proto::v1::rollout_service_client::RolloutServiceClient;
    let channel = crate::connect(addr).await?;
    let mut rollouts =
        RolloutServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let cpu0 = crate::procs::cpu(pid)?;
    let started = Instant::now();
    let r = rollouts
        .create_rollout(pb::CreateRolloutRequest {
            target: Some(pb::RolloutTarget {
                phase: pb::Phase::Maintenance.into(),
                ..Default::default()
            }),
            spec: Some(pb::RolloutSpec {
                operation_type: pb::OperationType::Reimage.into(),
                max_in_flight: "1000".into(),
                failure_budget: "1%".into(),
                ..Default::default()
            }),
            request_id: "bench-rollout".into(),
            note: "bm-bench".into(),
        })
        .await?
        .into_inner();
    ensure!(
        r.machines.len() == n as usize,
        "the rollout targets {} machines, not {n}",
        r.machines.len()
    );
    let mut watch = rollouts
        .watch_rollout(pb::WatchRolloutRequest {
            rollout_id: r.id.clone(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(r) = watch.message().await? {
        last = Some(r);
    }
    let wall = started.elapsed();
    let cpu = crate::procs::cpu(pid)?.saturating_sub(cpu0);
    let end = last.context("the rollout's watch sent nothing")?;
    let c = end.counts.unwrap_or_default();
    ensure!(
        end.phase() == pb::RolloutPhase::Succeeded && c.succeeded == n as i32,
        "the rollout ended {:?} with {c:?}",
        end.phase()
    );
    Ok(RolloutRun { wall, cpu })
}

/// Makes the first `n` machines exist and be in MAINTENANCE: imports those past
/// `registered` and puts them in maintenance unless `entered` says they are, and moves both
/// on.
pub(crate) async fn in_maintenance(
    c: &mut Clients,
    pid: u32,
    n: u32,
    (registered, entered): (&mut u32, &mut u32),
    in_flight: usize,
) -> anyhow::Result<()> {
    if *registered < n {
        import(c, *registered, n).await?;
        *registered = n;
    }
    if *entered < n {
        run_phase(
            std::slice::from_ref(c),
            &[pid],
            n,
            Kind::EnterMaintenance,
            in_flight,
            "enter",
        )
        .await?;
        *entered = n;
    }
    Ok(())
}
