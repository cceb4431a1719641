//! `bmctl rollout ...`: start one and follow it live, its status, pause, resume, abort.

use std::io::IsTerminal;

use bm_proto::v1 as pb;

use super::{print_json, show};
use crate::connect::Clients;
use crate::flags::{RolloutCommand, RolloutOp, RolloutStartArgs, api_enum};
use crate::render::{self, Palette};
use crate::stream;

pub(super) async fn run(
    c: &mut Clients,
    cmd: RolloutCommand,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    match cmd {
        RolloutCommand::Start(args) => start(c, args, json, pal).await,
        RolloutCommand::Status {
            rollout: Some(id), ..
        } => {
            let r = c
                .rollouts
                .get_rollout(pb::GetRolloutRequest { rollout_id: id })
                .await?
                .into_inner();
            show(json, &r, |r| render::rollout_detail(r, pal))
        }
        RolloutCommand::Status {
            rollout: None,
            active,
        } => list(c, active, json, pal).await,
        RolloutCommand::Pause { rollout } => {
            let r = c
                .rollouts
                .pause_rollout(pb::PauseRolloutRequest {
                    rollout_id: rollout,
                })
                .await?
                .into_inner();
            show(json, &r, |r| render::rollout_view(r, pal))
        }
        RolloutCommand::Resume { rollout } => {
            let r = c
                .rollouts
                .resume_rollout(pb::ResumeRolloutRequest {
                    rollout_id: rollout,
                })
                .await?
                .into_inner();
            show(json, &r, |r| render::rollout_view(r, pal))
        }
        RolloutCommand::Abort { rollout } => {
            let r = c
                .rollouts
                .abort_rollout(pb::AbortRolloutRequest {
                    rollout_id: rollout,
                })
                .await?
                .into_inner();
            show(json, &r, |r| render::rollout_view(r, pal))
        }
        RolloutCommand::Watch { rollout } => watch(c, rollout, json, pal).await,
    }
}

async fn start(
    c: &mut Clients,
    args: RolloutStartArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let (operation_type, maintenance_reimage) = match args.op {
        RolloutOp::MaintenanceReimage => (0, true),
        RolloutOp::Reimage => (pb::OperationType::Reimage as i32, false),
        RolloutOp::Upgrade => (pb::OperationType::Upgrade as i32, false),
        RolloutOp::Reboot => (pb::OperationType::Reboot as i32, false),
        RolloutOp::NetReconfig => (pb::OperationType::NetReconfig as i32, false),
        RolloutOp::EnterMaintenance => (pb::OperationType::EnterMaintenance as i32, false),
        RolloutOp::ExitMaintenance => (pb::OperationType::ExitMaintenance as i32, false),
    };
    let phase = args
        .phase
        .map(|p| api_enum(p, "PHASE_", pb::Phase::from_str_name))
        .transpose()?;
    let state = args
        .state
        .map(|s| api_enum(s, "EFFECTIVE_STATE_", pb::EffectiveState::from_str_name))
        .transpose()?;
    let req = pb::CreateRolloutRequest {
        target: Some(pb::RolloutTarget {
            label_selector: args.selector,
            phase: phase.map_or(0, |p| p as i32),
            effective_state: state.map_or(0, |s| s as i32),
            machine_ids: args.machines,
        }),
        spec: Some(pb::RolloutSpec {
            operation_type,
            maintenance_reimage,
            max_in_flight: args.max_in_flight,
            failure_budget: args.failure_budget,
            batch_by: args.batch_by.unwrap_or_default(),
            soak: args.soak.map(|d| bm_proto::pbjson_types::Duration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
            }),
            when_busy: if args.wait_busy {
                pb::WhenBusy::Wait
            } else {
                pb::WhenBusy::Skip
            } as i32,
        }),
        request_id: args
            .request_id
            .unwrap_or_else(|| format!("bmctl-{}", ulid::Ulid::generate())),
        note: args.note,
    };
    let r = c.rollouts.create_rollout(req).await?.into_inner();
    if args.no_wait {
        return show(json, &r, |r| render::rollout_view(r, pal));
    }
    if !json {
        outln!(
            "rollout {} over {} machines in {} batches",
            r.id,
            r.machines.len(),
            r.batches.len()
        );
    }
    watch(c, r.id, json, pal).await
}

/// Follows a rollout until it ends: the view redrawn in place on a terminal, a line per
/// change otherwise; each failure printed once, as it happens. Every message of the stream
/// is the whole rollout, so after the server went away the stream is opened again and
/// nothing is missed (for up to [`stream::RECONNECT_FOR`]). Exit 1 if it did not succeed.
async fn watch(c: &mut Clients, id: String, json: bool, pal: &Palette) -> anyhow::Result<u8> {
    let tty = !json && std::io::stdout().is_terminal();
    let mut drawn_lines = 0;
    let mut reported = std::collections::HashSet::new();
    let mut last: Option<pb::Rollout> = None;
    let mut last_line = None;
    let mut broken: Option<std::time::Instant> = None;
    'connect: loop {
        let opened = c
            .rollouts
            .watch_rollout(pb::WatchRolloutRequest {
                rollout_id: id.clone(),
            })
            .await;
        let mut messages = match opened {
            Ok(s) => s.into_inner(),
            Err(e) => {
                wait_to_reconnect(&e, &mut broken).await?;
                continue 'connect;
            }
        };
        loop {
            let r = match messages.message().await {
                Ok(Some(r)) => r,
                Ok(None) => break 'connect,
                Err(e) => {
                    wait_to_reconnect(&e, &mut broken).await?;
                    continue 'connect;
                }
            };
            broken = None;
            if last.as_ref() == Some(&r) {
                continue;
            }
            if json {
                print_json(&r)?;
            } else {
                for m in &r.machines {
                    if m.state == "FAILED" && reported.insert(m.machine_id.clone()) {
                        if tty && drawn_lines > 0 {
                            out!("\x1b[{drawn_lines}A\x1b[J");
                            drawn_lines = 0;
                        }
                        outln!("{}", render::rollout_failure(m, pal));
                    }
                }
                if tty {
                    if drawn_lines > 0 {
                        out!("\x1b[{drawn_lines}A\x1b[J");
                    }
                    let view = render::rollout_view(&r, pal);
                    drawn_lines = view.lines().count();
                    out!("{view}");
                } else {
                    // A line when something a reader can see changed.
                    let line = render::rollout_line(&r);
                    if last_line.as_ref() != Some(&line) {
                        outln!("{line}");
                        last_line = Some(line);
                    }
                }
            }
            last = Some(r);
        }
    }
    let Some(r) = last else {
        anyhow::bail!("the watch ended before it sent the rollout");
    };
    if !json && !tty {
        out!("{}", render::rollout_view(&r, pal));
    }
    Ok(u8::from(r.phase() != pb::RolloutPhase::Succeeded))
}

/// After the server went away (`e` says so): waits a moment before the stream is opened
/// again, and gives up [`stream::RECONNECT_FOR`] after the break. Any other error is the
/// command's.
async fn wait_to_reconnect(
    e: &tonic::Status,
    broken: &mut Option<std::time::Instant>,
) -> anyhow::Result<()> {
    if !matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
        return Err(e.clone().into());
    }
    let since = *broken.get_or_insert_with(|| {
        anstream::eprintln!("↻ lost the server ({}); reconnecting...", e.message());
        std::time::Instant::now()
    });
    if since.elapsed() > stream::RECONNECT_FOR {
        anyhow::bail!(
            "the server did not come back within {:?}: {}",
            stream::RECONNECT_FOR,
            e.message()
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    Ok(())
}

async fn list(c: &mut Clients, active: bool, json: bool, pal: &Palette) -> anyhow::Result<u8> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .rollouts
            .list_rollouts(pb::ListRolloutsRequest {
                page_size: 100,
                page_token: token,
                active_only: active,
            })
            .await?
            .into_inner();
        all.extend(page.rollouts);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    show(json, &all, |all| render::rollouts_table(all, pal))
}
