//! Inventory commands: import, list, get, update.

use anyhow::{Context, bail};
use bm_proto::pbjson_types::{self, FieldMask};
use bm_proto::v1 as pb;

use super::{print_json, show};
use crate::connect::Clients;
use crate::flags::{ImportArgs, ListArgs, SortArg, UpdateArgs, api_enum};
use crate::inventory;
use crate::render::{self, Palette};

/// `bmctl list`: every page of the filtered list.
pub(super) async fn list(
    c: &mut Clients,
    args: ListArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let phase = args
        .phase
        .map(|p| api_enum(p, "PHASE_", pb::Phase::from_str_name))
        .transpose()?;
    let state = args
        .state
        .map(|s| api_enum(s, "EFFECTIVE_STATE_", pb::EffectiveState::from_str_name))
        .transpose()?;
    let mut all = list_all(
        c,
        pb::ListMachinesRequest {
            page_size: args.page_size,
            page_token: String::new(),
            phase: phase.map_or(0, |p| p as i32),
            effective_state: state.map_or(0, |s| s as i32),
            label_selector: args.selector.clone().unwrap_or_default(),
        },
    )
    .await?;
    if args.sort == SortArg::Age {
        // Held machines first, oldest first (a missing time sorts as oldest); the listing
        // is by id, and the sort is stable.
        all.sort_by_key(|m| match held_since(m) {
            Some(t) => (0, Some((t.seconds, t.nanos))),
            None if is_held(m) => (0, None),
            None => (1, None),
        });
    }
    show(json, &all, |all| render::machines_table(all, pal))
}

/// Every page of a listing.
async fn list_all(
    c: &mut Clients,
    mut req: pb::ListMachinesRequest,
) -> anyhow::Result<Vec<pb::Machine>> {
    let mut all = Vec::new();
    loop {
        let page = c.machines.list_machines(req.clone()).await?.into_inner();
        all.extend(page.machines);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        req.page_token = page.next_page_token;
    }
}

fn is_held(m: &pb::Machine) -> bool {
    m.effective_state == pb::EffectiveState::Blocked as i32
        || m.effective_state == pb::EffectiveState::Attention as i32
}

/// Since when a BLOCKED or ATTENTION machine has been held (the server says, by the
/// domain's rule).
fn held_since(m: &pb::Machine) -> Option<pbjson_types::Timestamp> {
    m.status.as_ref()?.held_time
}

/// What `bmctl stats` prints as JSON.
#[derive(serde::Serialize)]
struct Stats {
    machines: usize,
    by_effective_state: std::collections::BTreeMap<String, usize>,
    by_phase: std::collections::BTreeMap<String, usize>,
    /// The machine longest in ATTENTION and in BLOCKED.
    oldest: std::collections::BTreeMap<String, Oldest>,
}

#[derive(serde::Serialize)]
struct Oldest {
    machine_id: String,
    since: String,
    seconds: i64,
    reason: String,
    /// The exact time, to compare.
    #[serde(skip)]
    at: (i64, i32),
}

/// `bmctl stats`.
pub(super) async fn stats(c: &mut Clients, json: bool) -> anyhow::Result<u8> {
    let all = list_all(
        c,
        pb::ListMachinesRequest {
            page_size: 1000,
            ..Default::default()
        },
    )
    .await?;
    let now = chrono::Utc::now().timestamp();
    let mut stats = Stats {
        machines: all.len(),
        by_effective_state: Default::default(),
        by_phase: Default::default(),
        oldest: Default::default(),
    };
    for m in &all {
        let state = render::effective_name(m.effective_state);
        *stats.by_effective_state.entry(state.clone()).or_default() += 1;
        let phase = m.status.as_ref().map_or(0, |s| s.phase);
        *stats.by_phase.entry(render::phase(phase)).or_default() += 1;
        let (Some(since), Some(status)) = (held_since(m), m.status.as_ref()) else {
            continue;
        };
        let at = (since.seconds, since.nanos);
        let older = stats.oldest.get(&state).is_none_or(|o| at < o.at);
        if older {
            let reason = status
                .conditions
                .iter()
                .find(|c| c.status && c.last_transition_time == Some(since))
                .map(|c| format!("{}: {}", c.r#type, c.message))
                .unwrap_or_default();
            stats.oldest.insert(
                state,
                Oldest {
                    machine_id: m.id.clone(),
                    since: render::date_time(Some(&since)),
                    seconds: now - since.seconds,
                    reason,
                    at,
                },
            );
        }
    }
    show(json, &stats, render_stats)
}

fn render_stats(s: &Stats) -> String {
    let mut out = format!("{} machines\n\nEFFECTIVE STATE    MACHINES\n", s.machines);
    for (state, n) in &s.by_effective_state {
        out.push_str(&format!("{state:<18} {n}\n"));
    }
    out.push_str("\nPHASE              MACHINES\n");
    for (phase, n) in &s.by_phase {
        out.push_str(&format!("{phase:<18} {n}\n"));
    }
    for state in ["BLOCKED", "ATTENTION"] {
        match s.oldest.get(state) {
            Some(o) => out.push_str(&format!(
                "\nlongest in {state}: {} for {} (since {}; {})",
                o.machine_id,
                render::age(o.seconds),
                o.since,
                o.reason
            )),
            None => out.push_str(&format!("\nnothing in {state}")),
        }
    }
    out
}

/// `bmctl get`.
pub(super) async fn get(
    c: &mut Clients,
    machine: String,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let m = c
        .machines
        .get_machine(pb::GetMachineRequest {
            machine_id: machine,
        })
        .await?
        .into_inner();
    show(json, &m, |m| render::machine_detail(m, pal))
}

pub(super) async fn events(
    c: &mut Clients,
    machine: String,
    after: u64,
    json: bool,
) -> anyhow::Result<u8> {
    let r = c
        .machines
        .list_machine_events(pb::ListMachineEventsRequest {
            machine_id: machine,
            after_sequence: after,
            page_size: 0,
        })
        .await?
        .into_inner();
    show(json, &r.events, |events| render::machine_events(events))
}

/// One row of an import's report.
struct ImportResult {
    /// The line of the inventory file; 0 for generated machines.
    line: usize,
    machine_id: String,
    /// The row's MAC addresses, space-separated.
    mac: String,
    /// CREATED, UNCHANGED or FAILED.
    outcome: String,
    failed: bool,
    /// `CODE: message`, or empty.
    error: String,
}

/// Rows per import request (the server takes up to 10,000).
const IMPORT_BATCH: usize = 1000;

/// `bmctl import`: generated fake machines or an inventory file, in batches.
pub(super) async fn import(
    c: &mut Clients,
    args: ImportArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    // (line, machine) rows; line 0 means generated.
    let (rows, local_errors, source) = match &args.file {
        None => {
            let n = args
                .count
                .expect("clap requires a count (1 to 65535) when there is no file");
            if !json {
                outln!("Importing {n} fake machines...");
            }
            let rows: Vec<inventory::Row> = (1..=n)
                .map(|i| inventory::Row {
                    line: 0,
                    machine: pb::Machine {
                        id: format!("machine-{i}"),
                        spec: Some(pb::MachineSpec {
                            provider: "fake".into(),
                            mac_addresses: vec![format!(
                                "02:00:00:00:{:02x}:{:02x}",
                                i >> 8,
                                i & 0xff
                            )],
                            ssh_endpoint: format!("root@10.0.{}.{}:22", i >> 8, i & 0xff),
                            image: args.image.clone(),
                            target_cluster: args.cluster.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                })
                .collect();
            (rows, Vec::new(), format!("bmctl import {n}"))
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let name = path.to_string_lossy().into_owned();
            let (rows, errors) = inventory::parse(&name, &text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (rows, errors, name)
        }
    };

    let mut report: Vec<ImportResult> = local_errors
        .iter()
        .map(|e| ImportResult {
            line: e.line,
            machine_id: "-".to_owned(),
            mac: "-".to_owned(),
            outcome: "FAILED".to_owned(),
            failed: true,
            error: e.message.clone(),
        })
        .collect();
    let mut failed = local_errors.len();
    let (mut created, mut unchanged) = (0, 0);
    for chunk in rows.chunks(IMPORT_BATCH) {
        let resp = c
            .machines
            .import_machines(pb::ImportMachinesRequest {
                machines: chunk.iter().map(|r| r.machine.clone()).collect(),
                source: source.clone(),
                validate_only: args.dry_run,
            })
            .await?
            .into_inner();
        created += resp.created_count;
        unchanged += resp.unchanged_count;
        failed += resp.failed_count as usize;
        for r in resp.results {
            let row = usize::try_from(r.index).ok().and_then(|i| chunk.get(i));
            let line = row.map_or(0, |r| r.line);
            let mac = row
                .and_then(|r| r.machine.spec.as_ref())
                .map(|s| s.mac_addresses.join(" "))
                .unwrap_or_default();
            let outcome = pb::ImportOutcome::try_from(r.outcome).map_or_else(
                |_| "?".into(),
                |o| {
                    o.as_str_name()
                        .trim_start_matches("IMPORT_OUTCOME_")
                        .to_owned()
                },
            );
            // The server names the row by its index in the batch; the LINE column says where.
            let message = r
                .error_message
                .strip_prefix(&format!("machines[{}].", r.index))
                .or_else(|| {
                    r.error_message
                        .strip_prefix(&format!("machines[{}]", r.index))
                })
                .unwrap_or(&r.error_message);
            let error = if r.error_code.is_empty() {
                String::new()
            } else {
                format!("{}: {message}", r.error_code)
            };
            report.push(ImportResult {
                line,
                machine_id: r.machine_id,
                mac,
                outcome,
                failed: r.outcome == pb::ImportOutcome::Failed as i32,
                error,
            });
        }
    }
    report.sort_by_key(|r| r.line);
    if json {
        let rows: Vec<serde_json::Value> = report
            .iter()
            .map(|r| {
                serde_json::json!({"line": r.line, "machineId": r.machine_id, "macAddresses": r.mac, "outcome": r.outcome, "error": r.error})
            })
            .collect();
        print_json(&serde_json::json!({
            "created": created, "unchanged": unchanged, "failed": failed, "dryRun": args.dry_run, "rows": rows
        }))?;
    } else {
        const SHOWN: usize = 20;
        let from_file = args.file.is_some();
        // Show failures first, then the first rows.
        let mut shown: Vec<&ImportResult> = report.iter().filter(|r| r.failed).collect();
        shown.extend(report.iter().filter(|r| !r.failed));
        let rows: Vec<Vec<String>> = shown
            .iter()
            .take(SHOWN.max(failed))
            .map(|r| {
                let mut row = vec![
                    r.machine_id.clone(),
                    r.mac.clone(),
                    r.outcome.clone(),
                    if r.error.is_empty() {
                        "-".into()
                    } else {
                        r.error.clone()
                    },
                ];
                if from_file {
                    row.insert(0, r.line.to_string());
                }
                row
            })
            .collect();
        let header: &[&str] = if from_file {
            &["LINE", "MACHINE_ID", "MAC", "RESULT", "ERROR"]
        } else {
            &["MACHINE_ID", "MAC", "RESULT", "ERROR"]
        };
        out!("{}", render::table(header, &rows));
        if shown.len() > rows.len() {
            outln!("... and {} more", shown.len() - rows.len());
        }
        let verb = if args.dry_run {
            "Would import"
        } else {
            "Imported"
        };
        let summary =
            format!("{verb}: {created} created, {unchanged} already present, {failed} failed");
        if failed > 0 {
            outln!("{}", render::warn(&summary, pal));
        } else {
            outln!("{summary}");
        }
    }
    Ok(u8::from(failed > 0))
}

/// `bmctl update`: only the fields given.
pub(super) async fn update(
    c: &mut Clients,
    a: UpdateArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    // Only the fields named are sent, each with its own path (one per label), so that the
    // server applies them to the machine as it is: concurrent updates of other fields and
    // other labels are kept.
    let mut spec = pb::MachineSpec::default();
    let mut paths = Vec::new();
    let mut set = |path: &str, field: &mut String, v: Option<String>| {
        if let Some(v) = v {
            *field = v;
            paths.push(path.to_owned());
        }
    };
    set("spec.image", &mut spec.image, a.image);
    set("spec.target_cluster", &mut spec.target_cluster, a.cluster);
    set("spec.ssh_endpoint", &mut spec.ssh_endpoint, a.ssh);
    set("spec.bmc_endpoint", &mut spec.bmc_endpoint, a.bmc);
    set("spec.provider", &mut spec.provider, a.provider);
    if let Some(file) = &a.network_config {
        spec.network_config = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
                .context("reading the network config from standard input")?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        paths.push("spec.network_config".into());
    }
    if !a.macs.is_empty() {
        spec.mac_addresses = a.macs;
        paths.push("spec.mac_addresses".into());
    }
    let mut labels = std::collections::HashMap::new();
    for (k, v) in a.labels {
        paths.push(format!("labels.{k}"));
        labels.insert(k, v);
    }
    for k in a.remove_labels {
        paths.push(format!("labels.{k}"));
    }
    if paths.is_empty() {
        bail!(
            "nothing to change: give --image, --cluster, --ssh, --bmc, --provider, --mac, --network-config, --label or --remove-label"
        );
    }
    let m = c
        .machines
        .update_machine(pb::UpdateMachineRequest {
            machine: Some(pb::Machine {
                id: a.machine,
                spec: Some(spec),
                labels,
                ..Default::default()
            }),
            update_mask: Some(FieldMask { paths }),
        })
        .await?
        .into_inner();
    show(json, &m, |m| render::machine_detail(m, pal))
}
