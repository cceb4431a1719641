//! How things look: tables, the operation boxes, and the lines of a live follow, as spec
//! 000 shows them. Pure functions from API messages to text, so they are snapshot-tested.

use std::fmt::Write as _;

use anstream::adapter::strip_str;
use anstyle::{AnsiColor, Style};
use bm_proto::pbjson_types::Timestamp;
use bm_proto::v1 as pb;
use unicode_width::UnicodeWidthStr;

/// Colours of the output. `anstream` strips them when stdout is not a terminal or
/// `NO_COLOR` is set, so they are always written.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Palette {
    ok: Style,
    bad: Style,
    warn: Style,
    accent: Style,
    dim: Style,
    bold: Style,
}

impl Palette {
    pub(crate) fn color() -> Self {
        Palette {
            ok: AnsiColor::Green.on_default().bold(),
            bad: AnsiColor::Red.on_default().bold(),
            warn: AnsiColor::Yellow.on_default().bold(),
            accent: AnsiColor::Cyan.on_default(),
            dim: Style::new().dimmed(),
            bold: Style::new().bold(),
        }
    }

    #[cfg(test)]
    pub(crate) fn plain() -> Self {
        Palette {
            ok: Style::new(),
            bad: Style::new(),
            warn: Style::new(),
            accent: Style::new(),
            dim: Style::new(),
            bold: Style::new(),
        }
    }
}

fn paint(style: Style, text: impl std::fmt::Display) -> String {
    format!("{style}{text}{style:#}")
}

/// Local wall-clock time `HH:MM:SS` of a timestamp.
pub(crate) fn clock(t: Option<&Timestamp>) -> String {
    local(t).map_or_else(|| "--:--:--".into(), |d| d.format("%H:%M:%S").to_string())
}

/// Local date and time `YYYY-MM-DD HH:MM:SS` of a timestamp.
pub(crate) fn date_time(t: Option<&Timestamp>) -> String {
    local(t).map_or_else(|| "-".into(), |d| d.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn local(t: Option<&Timestamp>) -> Option<chrono::DateTime<chrono::Local>> {
    let t = t?;
    let utc = chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)?;
    Some(utc.with_timezone(&chrono::Local))
}

fn seconds_between(a: Option<&Timestamp>, b: Option<&Timestamp>) -> Option<f64> {
    let (a, b) = (a?, b?);
    Some((b.seconds - a.seconds) as f64 + f64::from(b.nanos - a.nanos) / 1e9)
}

/// `2.512s`, `0.001s`, `1m05s`.
pub(crate) fn duration(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.3}s")
    } else {
        let s = secs.round() as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// A long duration, coarsely: `45s`, `12m`, `3h05m`, `2d04h`.
pub(crate) fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// An effective state's name without its prefix, e.g. `ATTENTION`.
pub(crate) fn effective_name(s: i32) -> String {
    pb::EffectiveState::try_from(s).map_or_else(
        |_| s.to_string(),
        |s| short(s.as_str_name(), "EFFECTIVE_STATE_"),
    )
}

/// Strips the enum's prefix: `PHASE_FACTORY_READY` -> `FACTORY_READY`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

pub(crate) fn phase(p: i32) -> String {
    pb::Phase::try_from(p).map_or_else(|_| p.to_string(), |p| short(p.as_str_name(), "PHASE_"))
}

pub(crate) fn op_type(t: i32) -> String {
    pb::OperationType::try_from(t).map_or_else(
        |_| t.to_string(),
        |t| short(t.as_str_name(), "OPERATION_TYPE_"),
    )
}

pub(crate) fn op_phase(p: i32) -> String {
    pb::OperationPhase::try_from(p).map_or_else(
        |_| p.to_string(),
        |p| short(p.as_str_name(), "OPERATION_PHASE_"),
    )
}

/// The EFFECTIVE column, with the markers of spec 000.
pub(crate) fn effective(s: i32, pal: &Palette) -> String {
    match pb::EffectiveState::try_from(s) {
        Ok(pb::EffectiveState::Blocked) => paint(pal.bad, "⛔BLOCK"),
        Ok(pb::EffectiveState::Attention) => paint(pal.warn, "⚠ATTN"),
        Ok(pb::EffectiveState::Busy) => paint(pal.accent, "BUSY"),
        Ok(pb::EffectiveState::MaintenanceIdle) => "MAINT".into(),
        Ok(pb::EffectiveState::New) => "NEW".into(),
        Ok(pb::EffectiveState::Idle) => paint(pal.ok, "IDLE"),
        _ => "?".into(),
    }
}

/// The CONDITIONS column: what holds (but reachable and powered on, the normal case), and
/// what is worth a look when it does not: an unreachable machine, one powered off.
pub(crate) fn conditions(m: &pb::Machine) -> String {
    let Some(status) = &m.status else {
        return "-".into();
    };
    let shown: Vec<String> = status
        .conditions
        .iter()
        .filter_map(|c| match (c.status, c.r#type.as_str()) {
            (true, "PoweredOn" | "Reachable") => None,
            (true, t) => Some(format!("{t}=✓")),
            (false, t @ ("Reachable" | "PoweredOn")) => Some(format!("{t}=✗")),
            _ => None,
        })
        .collect();
    if shown.is_empty() {
        "-".into()
    } else {
        shown.join(", ")
    }
}

/// A table with a header row; columns are padded to their widest cell (by display width,
/// so ⚠ and ✓ line up).
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let visible = |s: &str| strip_str(s).to_string().width();
    let mut widths: Vec<usize> = header.iter().map(|h| h.width()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(visible(cell));
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] + 2 - visible(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

pub(crate) fn machines_table(ms: &[pb::Machine], pal: &Palette) -> String {
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            let (phase_, active) = m
                .status
                .as_ref()
                .map_or((0, ""), |s| (s.phase, s.active_operation_id.as_str()));
            vec![
                m.id.clone(),
                phase(phase_),
                effective(m.effective_state, pal),
                conditions(m),
                if active.is_empty() {
                    "-".into()
                } else {
                    active.to_owned()
                },
            ]
        })
        .collect();
    table(
        &["MACHINE", "PHASE", "EFFECTIVE", "CONDITIONS", "ACTIVE OP"],
        &rows,
    )
}

/// `bmctl plans`: each operation type, its stages in order, and under them what it does.
pub(crate) fn plans_table(types: &[pb::OperationTypeInfo], pal: &Palette) -> String {
    let mut rows = Vec::with_capacity(2 * types.len());
    for t in types {
        let stages = if t.stages.is_empty() {
            "(no hardware step)".to_owned()
        } else {
            t.stages.join(" → ")
        };
        rows.push(vec![op_type(t.r#type), stages]);
        rows.push(vec![String::new(), paint(pal.dim, &t.description)]);
    }
    table(&["TYPE", "STAGES"], &rows)
}

pub(crate) fn operations_table(ops: &[pb::Operation], pal: &Palette) -> String {
    let rows: Vec<Vec<String>> = ops
        .iter()
        .map(|o| {
            let took = seconds_between(o.start_time.as_ref(), o.end_time.as_ref())
                .map_or_else(|| "-".into(), duration);
            vec![
                o.id.clone(),
                o.machine_id.clone(),
                op_type(o.r#type),
                phase_marker(o.phase, pal),
                if o.current_stage.is_empty() {
                    "-".into()
                } else {
                    o.current_stage.clone()
                },
                date_time(o.create_time.as_ref()),
                took,
                o.request_id.clone(),
                actor(o.requested_by.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "OPERATION",
            "MACHINE",
            "TYPE",
            "PHASE",
            "STAGE",
            "CREATED",
            "DURATION",
            "REQUEST ID",
            "BY",
        ],
        &rows,
    )
}

fn phase_marker(p: i32, pal: &Palette) -> String {
    let name = op_phase(p);
    match pb::OperationPhase::try_from(p) {
        Ok(pb::OperationPhase::Succeeded) => paint(pal.ok, format!("✓ {name}")),
        Ok(pb::OperationPhase::Failed) => paint(pal.bad, format!("✗ {name}")),
        Ok(pb::OperationPhase::Canceled) => paint(pal.warn, format!("⊘ {name}")),
        _ => paint(pal.accent, name),
    }
}

/// `bmctl events`: a machine's events, oldest first.
pub(crate) fn machine_events(events: &[pb::MachineEvent]) -> String {
    if events.is_empty() {
        return "No events: nothing happened to the machine outside operations.\n".into();
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.sequence.to_string(),
                date_time(e.time.as_ref()),
                pb::MachineEventType::try_from(e.r#type).map_or_else(
                    |_| e.r#type.to_string(),
                    |t| short(t.as_str_name(), "MACHINE_EVENT_TYPE_"),
                ),
                e.message.clone(),
            ]
        })
        .collect();
    table(&["SEQ", "TIME", "TYPE", "MESSAGE"], &rows)
}

/// The detailed view of one machine.
pub(crate) fn machine_detail(m: &pb::Machine, pal: &Palette) -> String {
    let spec = m.spec.clone().unwrap_or_default();
    let status = m.status.clone().unwrap_or_default();
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mut labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let mut out = String::new();
    let mut field = |k: &str, v: String| {
        let _ = writeln!(out, "{:<14}{v}", format!("{k}:"));
    };
    field("Machine", paint(pal.bold, &m.id));
    field("Phase", phase(status.phase));
    field("Effective", effective(m.effective_state, pal));
    if status.state_time.is_some() {
        field("State since", date_time(status.state_time.as_ref()));
    }
    field("Active op", or_dash(&status.active_operation_id));
    field("Provider", or_dash(&spec.provider));
    field("MACs", or_dash(&spec.mac_addresses.join(", ")));
    field("SSH", or_dash(&spec.ssh_endpoint));
    field("BMC", or_dash(&spec.bmc_endpoint));
    field("Image", or_dash(&spec.image));
    field("Cluster", or_dash(&spec.target_cluster));
    field(
        "Network",
        match spec.network_config.lines().count() {
            0 => "-".into(),
            1 => spec.network_config.clone(),
            n => format!(
                "{} ... ({n} lines; -o json shows it all)",
                spec.network_config.lines().next().unwrap_or("")
            ),
        },
    );
    field("Labels", or_dash(&labels.join(", ")));
    field("Registered", date_time(m.create_time.as_ref()));
    field("Updated", date_time(m.update_time.as_ref()));
    if status.conditions.is_empty() {
        out.push_str("Conditions: none\n");
    } else {
        out.push_str("Conditions:\n");
        let rows: Vec<Vec<String>> = status
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.r#type.clone(),
                    if c.status {
                        "True".into()
                    } else {
                        "False".into()
                    },
                    c.reason.clone(),
                    date_time(c.last_transition_time.as_ref()),
                    c.message.clone(),
                ]
            })
            .collect();
        for line in table(&["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], &rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// The detailed view of one operation.
/// Who did something: `name (method)`, or `-` for records from before the audit trail.
pub(crate) fn actor(a: Option<&pb::Actor>) -> String {
    a.filter(|a| !a.name.is_empty())
        .map_or_else(|| "-".to_owned(), |a| format!("{} ({})", a.name, a.method))
}

pub(crate) fn operation_detail(o: &pb::Operation, pal: &Palette) -> String {
    let mut out = String::new();
    let mut field = |k: &str, v: String| {
        let _ = writeln!(out, "{:<12}{v}", format!("{k}:"));
    };
    field("Operation", paint(pal.bold, &o.id));
    field("Machine", o.machine_id.clone());
    field("Type", op_type(o.r#type));
    field("Phase", phase_marker(o.phase, pal));
    field("Request ID", o.request_id.clone());
    field("Requested by", actor(o.requested_by.as_ref()));
    if o.canceled_by.is_some() {
        field("Canceled by", actor(o.canceled_by.as_ref()));
    }
    if !o.note.is_empty() {
        field("Note", o.note.clone());
    }
    if !o.trace_id.is_empty() {
        field("Trace ID", o.trace_id.clone());
    }
    field("Created", date_time(o.create_time.as_ref()));
    field("Started", date_time(o.start_time.as_ref()));
    field("Ended", date_time(o.end_time.as_ref()));
    if !o.error.is_empty() {
        field("Error", paint(pal.bad, &o.error));
    }
    if o.cancel_requested {
        field("Cancel", "requested".into());
    }
    if o.stages.is_empty() {
        out.push_str("Stages: none\n");
    } else {
        out.push_str("Stages:\n");
        let rows: Vec<Vec<String>> = o
            .stages
            .iter()
            .map(|s| {
                let outcome = pb::StageOutcome::try_from(s.outcome)
                    .map_or_else(|_| "?".into(), |x| short(x.as_str_name(), "STAGE_OUTCOME_"));
                vec![
                    s.name.clone(),
                    outcome,
                    s.attempts.to_string(),
                    s.interruptions.to_string(),
                    seconds_between(s.start_time.as_ref(), s.end_time.as_ref())
                        .map_or_else(|| "-".into(), duration),
                    if s.last_error.is_empty() {
                        "-".into()
                    } else {
                        s.last_error.clone()
                    },
                ]
            })
            .collect();
        let t = table(
            &[
                "STAGE",
                "OUTCOME",
                "ATTEMPTS",
                "INTERRUPTED",
                "DURATION",
                "LAST ERROR",
            ],
            &rows,
        );
        for line in t.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

const RULE: &str = "─────────────────────────────────────────────────────────────";

/// The box that opens a follow: which operation, on which machine, for which request.
pub(crate) fn header_box(o: &pb::Operation, pal: &Palette) -> String {
    format!(
        "┌{RULE}\n│ Operation: {}\n│ Machine: {}\n│ Type: {}\n│ Request ID: {}\n└{RULE}\n",
        paint(pal.bold, &o.id),
        o.machine_id,
        op_type(o.r#type),
        o.request_id
    )
}

/// Whether the operation had ended before the follow began, and why that is worth saying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It ended while this call followed it.
    Live,
    /// An operation command's request id returned an operation that had already ended:
    /// the request was a replay and nothing ran again.
    BeforeRequest,
    /// `bmctl follow` of an operation that had already ended.
    BeforeFollow,
}

/// The box that closes a follow: the outcome, how long this call took, and the stages.
pub(crate) fn final_box(
    o: &pb::Operation,
    waited_secs: f64,
    ended: Ended,
    pal: &Palette,
) -> String {
    let done = o
        .stages
        .iter()
        .filter(|s| s.outcome == pb::StageOutcome::Succeeded as i32)
        .count();
    let mut out = format!("┌{RULE}\n│ {}\n", phase_marker(o.phase, pal));
    if !o.error.is_empty() {
        let _ = writeln!(out, "│ Error: {}", o.error);
    }
    let _ = writeln!(out, "│ Duration: {}", duration(waited_secs));
    // A replay took no time of the operation's: its run time would read as this request's.
    if let Some(took) = seconds_between(o.start_time.as_ref(), o.end_time.as_ref())
        && ended != Ended::BeforeRequest
    {
        let _ = writeln!(out, "│ Operation time: {}", duration(took));
    }
    let _ = writeln!(out, "│ Stages: {done} completed");
    match ended {
        Ended::Live => {}
        Ended::BeforeRequest => {
            let _ = writeln!(
                out,
                "│ Already ended before this request: nothing ran again"
            );
        }
        Ended::BeforeFollow => {
            let _ = writeln!(out, "│ Already ended before this follow");
        }
    }
    let _ = writeln!(out, "└{RULE}");
    out
}

/// The lines one event adds to a follow: the event itself (`[HH:MM:SS] Step X started`)
/// and, for stages, the step marker (`→ X...`, `✓ X`).
pub(crate) fn event_lines(e: &pb::OperationEvent, pal: &Palette) -> Vec<String> {
    let at = paint(pal.dim, format!("[{}]", clock(e.time.as_ref())));
    let stage = &e.stage;
    match pb::EventType::try_from(e.r#type) {
        Ok(pb::EventType::StageStarted) => {
            let retry = if e.attempt > 1 {
                format!(" (attempt {})", e.attempt)
            } else {
                String::new()
            };
            vec![
                format!("{at} Step {stage} started{retry}"),
                paint(pal.accent, format!("→ {stage}...")),
            ]
        }
        Ok(pb::EventType::StageSucceeded) => vec![
            format!("{at} Step {stage} succeeded"),
            format!("  {}", paint(pal.ok, format!("✓ {stage}"))),
        ],
        Ok(pb::EventType::StageRetrying) => vec![
            format!(
                "{at} Step {stage} attempt {} failed: {}",
                e.attempt, e.message
            ),
            format!(
                "  {}",
                paint(pal.warn, format!("↻ {stage} will be retried"))
            ),
        ],
        Ok(pb::EventType::StageFailed) => vec![
            format!("{at} Step {stage} failed: {}", e.message),
            format!("  {}", paint(pal.bad, format!("✗ {stage}"))),
        ],
        Ok(pb::EventType::CancelRequested) => vec![format!("{at} Cancel requested")],
        Ok(pb::EventType::PhaseChanged) => {
            let why = if e.message.is_empty() {
                String::new()
            } else {
                format!(" ({})", e.message)
            };
            vec![format!("{at} Operation {}{why}", op_phase(e.phase))]
        }
        Ok(pb::EventType::Created) => vec![format!("{at} Operation created")],
        _ => vec![format!("{at} event {}", e.r#type)],
    }
}

/// A warning line (a summary with failures in it).
pub(crate) fn warn(text: &str, pal: &Palette) -> String {
    paint(pal.warn, text)
}

/// A line about the follow itself (a reconnect), set apart from the operation's lines.
pub(crate) fn notice(text: &str, pal: &Palette) -> String {
    paint(pal.warn, format!("↻ {text}"))
}

/// One provider log line: `│ [repave] Writing image...`.
pub(crate) fn log_line(l: &pb::LogLine, pal: &Palette) -> String {
    format!(
        "{} {}",
        paint(pal.dim, "│"),
        paint(pal.dim, format!("[{}] {}", l.tag, l.message))
    )
}

/// One line of `bmctl watch`.
pub(crate) fn watch_line(e: &pb::OperationEvent, pal: &Palette) -> String {
    let what = match pb::EventType::try_from(e.r#type) {
        Ok(pb::EventType::StageStarted) => format!("{} started (attempt {})", e.stage, e.attempt),
        Ok(pb::EventType::StageSucceeded) => format!("{} succeeded", e.stage),
        Ok(pb::EventType::StageRetrying) => format!("{} retrying: {}", e.stage, e.message),
        Ok(pb::EventType::StageFailed) => format!("{} failed: {}", e.stage, e.message),
        Ok(pb::EventType::CancelRequested) => "cancel requested".into(),
        Ok(pb::EventType::Created) => "created".into(),
        Ok(pb::EventType::PhaseChanged) => {
            let p = phase_marker(e.phase, pal);
            if e.message.is_empty() {
                p
            } else {
                format!("{p} ({})", e.message)
            }
        }
        _ => format!("event {}", e.r#type),
    };
    format!(
        "{} {} {} {} {} {what}",
        paint(pal.dim, format!("[{}]", clock(e.time.as_ref()))),
        paint(pal.dim, format!("#{}", e.revision)),
        e.operation_id,
        e.machine_id,
        op_type(e.operation_type),
    )
}

// ---- rollouts ---------------------------------------------------------------------------

fn rollout_phase(r: &pb::Rollout, pal: &Palette) -> String {
    let name = short(r.phase().as_str_name(), "ROLLOUT_PHASE_");
    match r.phase() {
        pb::RolloutPhase::Succeeded => paint(pal.ok, name),
        pb::RolloutPhase::Failed | pb::RolloutPhase::Aborted => paint(pal.bad, name),
        pb::RolloutPhase::Stopping | pb::RolloutPhase::Aborting | pb::RolloutPhase::Paused => {
            paint(pal.warn, name)
        }
        _ => paint(pal.accent, name),
    }
}

/// What a rollout does to each machine, in words.
fn rollout_action(r: &pb::Rollout) -> String {
    match &r.spec {
        Some(s) if s.maintenance_reimage => "MAINTENANCE_REIMAGE".into(),
        Some(s) => op_type(s.operation_type),
        None => "-".into(),
    }
}

/// `[#####.....]`: `done` of `total`, `width` wide.
fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// The counts of a rollout, on one line.
fn rollout_counts(r: &pb::Rollout) -> String {
    let c = r.counts.unwrap_or_default();
    format!(
        "{} succeeded, {} failed (stops at {}), {} skipped, {} in flight (at most {}), {} pending{}",
        c.succeeded,
        c.failed,
        r.failure_limit,
        c.skipped,
        c.active,
        r.max_in_flight,
        c.pending,
        if c.canceled > 0 {
            format!(", {} canceled", c.canceled)
        } else {
            String::new()
        }
    )
}

/// One line per change, for a log or a pipe.
pub(crate) fn rollout_line(r: &pb::Rollout) -> String {
    format!(
        "{} {}: batch {}/{}: {}",
        r.id,
        short(r.phase().as_str_name(), "ROLLOUT_PHASE_"),
        r.batch + 1,
        r.batches.len().max(1),
        rollout_counts(r)
    )
}

/// A failure, as it happens.
pub(crate) fn rollout_failure(m: &pb::RolloutMachine, pal: &Palette) -> String {
    format!(
        "{} {}: {}",
        paint(pal.bad, "FAILED"),
        m.machine_id,
        if m.reason.is_empty() { "-" } else { &m.reason }
    )
}

/// The live view: the rollout, its counts, and a progress bar per batch.
pub(crate) fn rollout_view(r: &pb::Rollout, pal: &Palette) -> String {
    let mut out = format!(
        "{} {} {} over {} machines\n  {}\n",
        paint(pal.bold, &r.id),
        rollout_phase(r, pal),
        rollout_action(r),
        r.machines.len(),
        rollout_counts(r)
    );
    if let Some(until) = &r.soak_until {
        out.push_str(&format!("  soaking until {}\n", clock(Some(until))));
    }
    let label = r.spec.as_ref().map_or("", |s| s.batch_by.as_str());
    for (i, value) in r.batches.iter().enumerate() {
        let of: Vec<_> = r
            .machines
            .iter()
            .filter(|m| usize::try_from(m.batch).ok() == Some(i))
            .collect();
        if of.is_empty() {
            continue;
        }
        let count = |state: &str| of.iter().filter(|m| m.state == state).count();
        let done = of
            .iter()
            .filter(|m| !matches!(m.state.as_str(), "PENDING" | "ACTIVE"))
            .count();
        let name = match (label, value.as_str()) {
            ("", _) => "all".to_owned(),
            (key, "") => format!("(no {key})"),
            (key, v) => format!("{key}={v}"),
        };
        let current = if usize::try_from(r.batch).ok() == Some(i) && r.end_time.is_none() {
            "▶"
        } else {
            " "
        };
        out.push_str(&format!(
            "  {current} {name:<16} {} {done}/{} done, {} active, {} failed, {} skipped\n",
            bar(done, of.len(), 20),
            of.len(),
            count("ACTIVE"),
            count("FAILED"),
            count("SKIPPED"),
        ));
    }
    out
}

/// `bmctl rollout status ID`: the view, then every machine that is not simply done.
pub(crate) fn rollout_detail(r: &pb::Rollout, pal: &Palette) -> String {
    let mut out = rollout_view(r, pal);
    out.push_str(&format!(
        "  created {} by {}{}\n",
        date_time(r.create_time.as_ref()),
        actor(r.created_by.as_ref()),
        if r.note.is_empty() {
            String::new()
        } else {
            format!(": {}", r.note)
        }
    ));
    let rows: Vec<Vec<String>> = r
        .machines
        .iter()
        .filter(|m| m.state != "SUCCEEDED" && m.state != "PENDING")
        .map(|m| {
            vec![
                m.machine_id.clone(),
                match m.state.as_str() {
                    "FAILED" => paint(pal.bad, &m.state),
                    "SKIPPED" | "CANCELED" => paint(pal.warn, &m.state),
                    _ => paint(pal.accent, &m.state),
                },
                m.operation_ids
                    .last()
                    .cloned()
                    .unwrap_or_else(|| "-".into()),
                if m.reason.is_empty() {
                    "-".into()
                } else {
                    m.reason.clone()
                },
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&table(&["MACHINE", "STATE", "OPERATION", "REASON"], &rows));
    }
    out
}

/// `bmctl rollout status`: the rollouts, newest first.
pub(crate) fn rollouts_table(all: &[pb::Rollout], pal: &Palette) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|r| {
            let c = r.counts.unwrap_or_default();
            vec![
                r.id.clone(),
                rollout_phase(r, pal),
                rollout_action(r),
                format!(
                    "{}/{}",
                    c.succeeded + c.failed + c.skipped + c.canceled,
                    c.pending + c.active + c.succeeded + c.failed + c.skipped + c.canceled
                ),
                c.failed.to_string(),
                date_time(r.create_time.as_ref()),
                actor(r.created_by.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "ROLLOUT", "PHASE", "ACTION", "DONE", "FAILED", "CREATED", "BY",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp {
            seconds: secs,
            nanos,
        })
    }

    fn machine(
        id: &str,
        phase: pb::Phase,
        state: pb::EffectiveState,
        conds: &[(&str, bool)],
        active: &str,
    ) -> pb::Machine {
        pb::Machine {
            id: id.into(),
            status: Some(pb::MachineStatus {
                phase: phase.into(),
                conditions: conds
                    .iter()
                    .map(|(t, s)| pb::Condition {
                        r#type: (*t).into(),
                        status: *s,
                        ..Default::default()
                    })
                    .collect(),
                active_operation_id: active.into(),
                state_time: None,
                held_time: None,
            }),
            effective_state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn machine_table_matches_spec_000() {
        use pb::{EffectiveState as E, Phase as P};
        let ms = [
            machine(
                "machine-1",
                P::Ready,
                E::Idle,
                &[("InCustomerCluster", true), ("Provisioned", true)],
                "",
            ),
            machine("machine-2", P::Maintenance, E::MaintenanceIdle, &[], ""),
            machine(
                "machine-3",
                P::Maintenance,
                E::Busy,
                &[],
                "op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM",
            ),
            machine(
                "machine-4",
                P::Ready,
                E::Attention,
                &[("NeedsIntervention", true), ("Reachable", false)],
                "",
            ),
            machine(
                "machine-6",
                P::Ready,
                E::Idle,
                &[("Degraded", true), ("PoweredOn", true), ("Reachable", true)],
                "",
            ),
            machine(
                "machine-7",
                P::Maintenance,
                E::MaintenanceIdle,
                &[("PoweredOn", false), ("Reachable", true)],
                "",
            ),
            machine(
                "machine-5",
                P::Ready,
                E::Blocked,
                &[("RMA", true), ("Provisioned", false)],
                "",
            ),
        ];
        insta::assert_snapshot!(machines_table(&ms, &Palette::plain()), @r"
        MACHINE    PHASE        EFFECTIVE  CONDITIONS                          ACTIVE OP
        machine-1  READY        IDLE       InCustomerCluster=✓, Provisioned=✓  -
        machine-2  MAINTENANCE  MAINT      -                                   -
        machine-3  MAINTENANCE  BUSY       -                                   op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM
        machine-4  READY        ⚠ATTN      NeedsIntervention=✓, Reachable=✗    -
        machine-6  READY        IDLE       Degraded=✓                          -
        machine-7  MAINTENANCE  MAINT      PoweredOn=✗                         -
        machine-5  READY        ⛔BLOCK    RMA=✓                               -
        ");
    }

    #[test]
    fn colours_do_not_break_alignment() {
        let ms = [
            machine("a", pb::Phase::Ready, pb::EffectiveState::Idle, &[], ""),
            machine("b", pb::Phase::Ready, pb::EffectiveState::Blocked, &[], ""),
        ];
        let coloured = strip_str(&machines_table(&ms, &Palette::color())).to_string();
        assert_eq!(coloured, machines_table(&ms, &Palette::plain()));
    }

    fn op(phase: pb::OperationPhase, stages: &[(&str, pb::StageOutcome)]) -> pb::Operation {
        pb::Operation {
            id: "op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM".into(),
            machine_id: "machine-2".into(),
            r#type: pb::OperationType::Reimage.into(),
            phase: phase.into(),
            request_id: "demo-idempotent-123".into(),
            start_time: ts(100, 0),
            end_time: ts(102, 512_000_000),
            stages: stages
                .iter()
                .map(|(n, o)| pb::Stage {
                    name: (*n).into(),
                    outcome: (*o).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn boxes_match_spec_000() {
        use pb::StageOutcome::Succeeded as S;
        let o = op(
            pb::OperationPhase::Succeeded,
            &[
                ("set-netboot", S),
                ("reboot-to-netboot", S),
                ("repave-image", S),
                ("join-cluster", S),
                ("verify-in-cluster", S),
            ],
        );
        let pal = Palette::plain();
        insta::assert_snapshot!(header_box(&o, &pal), @r"
        ┌─────────────────────────────────────────────────────────────
        │ Operation: op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM
        │ Machine: machine-2
        │ Type: REIMAGE
        │ Request ID: demo-idempotent-123
        └─────────────────────────────────────────────────────────────
        ");
        insta::assert_snapshot!(final_box(&o, 2.53, Ended::Live, &pal), @r"
        ┌─────────────────────────────────────────────────────────────
        │ ✓ SUCCEEDED
        │ Duration: 2.530s
        │ Operation time: 2.512s
        │ Stages: 5 completed
        └─────────────────────────────────────────────────────────────
        ");
        insta::assert_snapshot!(final_box(&o, 0.001, Ended::BeforeRequest, &pal), @r"
        ┌─────────────────────────────────────────────────────────────
        │ ✓ SUCCEEDED
        │ Duration: 0.001s
        │ Stages: 5 completed
        │ Already ended before this request: nothing ran again
        └─────────────────────────────────────────────────────────────
        ");
        insta::assert_snapshot!(final_box(&o, 0.004, Ended::BeforeFollow, &pal), @r"
        ┌─────────────────────────────────────────────────────────────
        │ ✓ SUCCEEDED
        │ Duration: 0.004s
        │ Operation time: 2.512s
        │ Stages: 5 completed
        │ Already ended before this follow
        └─────────────────────────────────────────────────────────────
        ");
        let mut failed = op(
            pb::OperationPhase::Failed,
            &[
                ("set-netboot", S),
                ("repave-image", pb::StageOutcome::Failed),
            ],
        );
        failed.error = "repave-image: injected failure of repave (call 3)".into();
        insta::assert_snapshot!(final_box(&failed, 1.0, Ended::Live, &pal), @r"
        ┌─────────────────────────────────────────────────────────────
        │ ✗ FAILED
        │ Error: repave-image: injected failure of repave (call 3)
        │ Duration: 1.000s
        │ Operation time: 2.512s
        │ Stages: 1 completed
        └─────────────────────────────────────────────────────────────
        ");
    }

    #[test]
    fn live_lines_interleave_as_spec_000_shows() {
        let pal = Palette::plain();
        // Times are rendered in local time; the test only looks at the text after them.
        let ev = |t: pb::EventType, stage: &str, attempt: i32, msg: &str| pb::OperationEvent {
            r#type: t.into(),
            stage: stage.into(),
            attempt,
            message: msg.into(),
            time: ts(0, 0),
            ..Default::default()
        };
        let mut lines = Vec::new();
        lines.extend(event_lines(
            &ev(pb::EventType::StageStarted, "repave-image", 1, ""),
            &pal,
        ));
        lines.push(log_line(
            &pb::LogLine {
                tag: "repave".into(),
                message: "Writing image to /dev/sda: 50%".into(),
                ..Default::default()
            },
            &pal,
        ));
        lines.extend(event_lines(
            &ev(pb::EventType::StageRetrying, "repave-image", 1, "disk busy"),
            &pal,
        ));
        lines.extend(event_lines(
            &ev(pb::EventType::StageStarted, "repave-image", 2, ""),
            &pal,
        ));
        lines.extend(event_lines(
            &ev(pb::EventType::StageSucceeded, "repave-image", 2, ""),
            &pal,
        ));
        let text: Vec<String> = lines
            .iter()
            .map(|l| match l.find("] ") {
                Some(i) if l.starts_with('[') => format!("[HH:MM:SS] {}", &l[i + 2..]),
                _ => l.clone(),
            })
            .collect();
        insta::assert_snapshot!(text.join("\n"), @r"
        [HH:MM:SS] Step repave-image started
        → repave-image...
        │ [repave] Writing image to /dev/sda: 50%
        [HH:MM:SS] Step repave-image attempt 1 failed: disk busy
          ↻ repave-image will be retried
        [HH:MM:SS] Step repave-image started (attempt 2)
        → repave-image...
        [HH:MM:SS] Step repave-image succeeded
          ✓ repave-image
        ");
    }

    #[test]
    fn plans_list_the_stages_in_order() {
        let types = [
            pb::OperationTypeInfo {
                r#type: pb::OperationType::Reimage.into(),
                stages: vec![
                    "set-netboot".into(),
                    "reboot-to-netboot".into(),
                    "repave-image".into(),
                ],
                description: "Netboot and write the image".into(),
            },
            pb::OperationTypeInfo {
                r#type: pb::OperationType::ClearIntervention.into(),
                stages: vec![],
                description: "Clears NeedsIntervention".into(),
            },
        ];
        insta::assert_snapshot!(plans_table(&types, &Palette::plain()), @r"
        TYPE                STAGES
        REIMAGE             set-netboot → reboot-to-netboot → repave-image
                            Netboot and write the image
        CLEAR_INTERVENTION  (no hardware step)
                            Clears NeedsIntervention
        ");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0.0012), "0.001s");
        assert_eq!(duration(65.2), "1m05s");
    }
}
