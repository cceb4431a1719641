//! Operation commands: start one (and follow it), history, one operation, follow, cancel.

use std::time::Instant;

use bm_proto::v1 as pb;

use super::{print_json, show};
use crate::connect::Clients;
use crate::flags::{OpArgs, OpType, OpsArgs, api_enum};
use crate::follow;
use crate::render::{self, Palette};
use crate::stream;

/// `bmctl ops`: the newest operations, up to `--limit`.
pub(super) async fn list(
    c: &mut Clients,
    args: OpsArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let op_type = args
        .op_type
        .map(|t| api_enum(t, "OPERATION_TYPE_", pb::OperationType::from_str_name))
        .transpose()?;
    let op_phase = args
        .phase
        .map(|p| api_enum(p, "OPERATION_PHASE_", pb::OperationPhase::from_str_name))
        .transpose()?;
    let mut all = Vec::new();
    let mut token = String::new();
    while all.len() < args.limit {
        let page = c
            .operations
            .list_operations(pb::ListOperationsRequest {
                page_size: i32::try_from((args.limit - all.len()).min(1000)).unwrap_or(1000),
                page_token: token,
                machine_id: args.machine.clone().unwrap_or_default(),
                r#type: op_type.map_or(0, |t| t as i32),
                phase: op_phase.map_or(0, |p| p as i32),
            })
            .await?
            .into_inner();
        all.extend(page.operations);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    show(json, &all, |all| render::operations_table(all, pal))
}

/// `bmctl op`.
pub(super) async fn get(
    c: &mut Clients,
    operation: String,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let o = fetch(c, operation).await?;
    show(json, &o, |o| render::operation_detail(o, pal))
}

/// One operation as the server has it now.
async fn fetch(c: &mut Clients, operation: String) -> anyhow::Result<pb::Operation> {
    Ok(c.operations
        .get_operation(pb::GetOperationRequest {
            operation_id: operation,
        })
        .await?
        .into_inner())
}

/// `bmctl follow`: an operation from wherever it is to its end.
pub(super) async fn follow(
    c: &mut Clients,
    operation: String,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let started = Instant::now();
    let op = fetch(c, operation).await?;
    follow_to_end(c, op, started, render::Ended::BeforeFollow, json, pal).await
}

/// `bmctl cancel`.
pub(super) async fn cancel(
    c: &mut Clients,
    operation: String,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let o = c
        .operations
        .cancel_operation(pb::CancelOperationRequest {
            operation_id: operation,
        })
        .await?
        .into_inner();
    show(json, &o, |o| render::operation_detail(o, pal))
}

/// An operation command: starts the operation and, unless `--no-wait`, follows it.
pub(super) async fn start(
    c: &mut Clients,
    kind: OpType,
    a: OpArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let started = Instant::now();
    let (machine_id, note) = (a.machine, a.note);
    let request_id = a
        .request_id
        .unwrap_or_else(|| format!("bmctl-{}", ulid::Ulid::generate()));
    let m = &mut c.machines;
    macro_rules! call {
        ($method:ident, $req:ident) => {
            m.$method(pb::$req {
                machine_id,
                request_id,
                note,
            })
            .await?
            .into_inner()
        };
    }
    let op = match kind {
        OpType::EnterMaintenance => call!(enter_maintenance, EnterMaintenanceRequest),
        OpType::ExitMaintenance => call!(exit_maintenance, ExitMaintenanceRequest),
        OpType::Reimage => call!(reimage, ReimageRequest),
        OpType::Reboot => call!(reboot, RebootRequest),
        OpType::Rma => call!(rma, RmaRequest),
        OpType::Retire => call!(retire, RetireRequest),
        OpType::Upgrade => call!(upgrade, UpgradeRequest),
        OpType::NetReconfig => call!(reconfigure_network, ReconfigureNetworkRequest),
        OpType::ClearIntervention => call!(clear_intervention, ClearInterventionRequest),
        OpType::Readmit => call!(readmit, ReadmitRequest),
    };
    if a.no_wait {
        return show(json, &op, |op| render::operation_detail(op, pal));
    }
    follow_to_end(c, op, started, render::Ended::BeforeRequest, json, pal).await
}

/// Follows an operation to its end: live with both streams and the boxes, or (with
/// `-o json`) silently, printing the operation at the end. The exit code says how it ended.
/// `if_ended` is what the final box says of an operation that had already ended.
async fn follow_to_end(
    c: &mut Clients,
    op: pb::Operation,
    started: Instant,
    if_ended: render::Ended,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    if !json {
        return Ok(follow::run(&mut c.operations, op, started, if_ended, pal).await?);
    }
    let done = if follow::is_terminal(op.phase) {
        op
    } else {
        match follow::follow(&mut c.operations, &op, pal, false).await? {
            follow::Followed::Ended(done) => *done,
            follow::Followed::Interrupted => {
                anstream::eprintln!("{}", follow::interrupted_message(&op.id));
                return Ok(stream::INTERRUPTED);
            }
        }
    };
    print_json(&done)?;
    Ok(follow::exit_code(done.phase))
}
