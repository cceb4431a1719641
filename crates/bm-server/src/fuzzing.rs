//! Entry points for the fuzz targets in `fuzz/` and for the replay of their corpus in the
//! tests (issue 11). Not part of the API: hidden from the docs, and nothing here is meant
//! to be called by anything else.
//!
//! The conversions that validate a request live in private modules (`convert.rs`,
//! `paging.rs`); exposing them would widen the API for every user of the crate. This facade
//! exposes instead a few functions that take bytes or text, run exactly what a handler runs
//! before it calls the engine, and check what must hold for any input: no panic, and a
//! refusal is always INVALID_ARGUMENT with a message that names the field. A broken
//! invariant panics, which is what a fuzzer reports as a crash.

use bm_proto::v1 as pb;
use prost::Message;

use crate::convert::{self, StartOperation};
use crate::error::ApiError;
use crate::machines::MAX_IMPORT_ROWS;
use crate::paging;

/// The RPCs whose requests [`request`] takes, in the order its `rpc` argument indexes.
pub const RPCS: [&str; 21] = [
    "RegisterMachine",
    "ImportMachines",
    "GetMachine",
    "ListMachines",
    "UpdateMachine",
    "EnterMaintenance",
    "ExitMaintenance",
    "Reimage",
    "Reboot",
    "Rma",
    "Retire",
    "Upgrade",
    "ReconfigureNetwork",
    "ClearIntervention",
    "Readmit",
    "GetOperation",
    "ListOperations",
    "CancelOperation",
    "WatchOperations",
    "StreamLogs",
    "ListOperationTypes",
];

/// Why a request was refused before it reached the engine.
#[derive(Debug)]
pub enum Refused {
    /// The bytes are not a message of the request's type (tonic answers INVALID_ARGUMENT).
    Decode(prost::DecodeError),
    /// A field does not convert; the message names it.
    Invalid(String),
}

/// A conversion's error must be INVALID_ARGUMENT with a message that names something.
fn refused(e: ApiError) -> Refused {
    assert!(
        matches!(e, ApiError::Invalid(_)),
        "a conversion failed with {:?}, not INVALID_ARGUMENT: {e}",
        e.code()
    );
    let message = e.to_string();
    assert!(
        message.contains(':'),
        "a refusal that names no field: {message:?}"
    );
    Refused::Invalid(message)
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, Refused> {
    M::decode(bytes).map_err(Refused::Decode)
}

fn start<M: Message + Default + StartOperation>(bytes: &[u8]) -> Result<(), Refused> {
    decode::<M>(bytes)?
        .into_operation_request()
        .map(drop)
        .map_err(refused)
}

/// Decodes `bytes` as the request of `RPCS[rpc % RPCS.len()]` and runs the conversions and
/// checks its handler runs before it calls the engine.
///
/// # Errors
///
/// [`Refused`] for a request the server refuses without asking the engine.
///
/// # Panics
///
/// On a broken invariant: a conversion that panics, or that fails with another code than
/// INVALID_ARGUMENT, or a listing whose page token does not resume where it should.
pub fn request(rpc: usize, bytes: &[u8]) -> Result<(), Refused> {
    match RPCS[rpc % RPCS.len()] {
        "RegisterMachine" => {
            let req: pb::RegisterMachineRequest = decode(bytes)?;
            let m = req
                .machine
                .ok_or_else(|| refused(ApiError::invalid("machine: is required")))?;
            convert::new_machine("machine", &m).map_err(refused)?;
        }
        "ImportMachines" => {
            let req: pb::ImportMachinesRequest = decode(bytes)?;
            if req.machines.len() > MAX_IMPORT_ROWS {
                return Err(refused(ApiError::invalid("machines: too many rows")));
            }
            let (import, early) = convert::import_request(&req);
            assert_eq!(early.len(), req.machines.len(), "one result per row");
            let failed = early.iter().filter(|e| e.is_some()).count();
            assert_eq!(import.machines.len() + failed, req.machines.len());
            // Each row's refusal is INVALID_ARGUMENT, like a request's.
            early.into_iter().flatten().for_each(|e| drop(refused(e)));
        }
        "GetMachine" => {
            let req: pb::GetMachineRequest = decode(bytes)?;
            convert::machine_id("machine_id", &req.machine_id).map_err(refused)?;
        }
        "ListMachines" => {
            let req: pb::ListMachinesRequest = decode(bytes)?;
            let (query, filters) = convert::machine_query(&req).map_err(refused)?;
            assert!(query.limit >= 1 && query.limit <= paging::MAX_PAGE_SIZE);
            // The next page's token resumes after the last machine, with the same filters.
            let token = paging::encode("machines", "m-1", &filters);
            let next = pb::ListMachinesRequest {
                page_token: token,
                ..req
            };
            let (next, _) = convert::machine_query(&next).map_err(refused)?;
            assert_eq!(next.after.map(|id| id.to_string()).as_deref(), Some("m-1"));
        }
        "UpdateMachine" => {
            let req: pb::UpdateMachineRequest = decode(bytes)?;
            convert::machine_update(&req).map_err(refused)?;
        }
        "EnterMaintenance" => start::<pb::EnterMaintenanceRequest>(bytes)?,
        "ExitMaintenance" => start::<pb::ExitMaintenanceRequest>(bytes)?,
        "Reimage" => start::<pb::ReimageRequest>(bytes)?,
        "Reboot" => start::<pb::RebootRequest>(bytes)?,
        "Rma" => start::<pb::RmaRequest>(bytes)?,
        "Retire" => start::<pb::RetireRequest>(bytes)?,
        "Upgrade" => start::<pb::UpgradeRequest>(bytes)?,
        "ReconfigureNetwork" => start::<pb::ReconfigureNetworkRequest>(bytes)?,
        "ClearIntervention" => start::<pb::ClearInterventionRequest>(bytes)?,
        "Readmit" => start::<pb::ReadmitRequest>(bytes)?,
        "GetOperation" => {
            let req: pb::GetOperationRequest = decode(bytes)?;
            convert::operation_id("operation_id", &req.operation_id).map_err(refused)?;
        }
        "ListOperations" => {
            let req: pb::ListOperationsRequest = decode(bytes)?;
            let (query, filters) = convert::operation_query(&req).map_err(refused)?;
            assert!(query.limit >= 1 && query.limit <= paging::MAX_PAGE_SIZE);
            let last = "op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM";
            let next = pb::ListOperationsRequest {
                page_token: paging::encode("operations", last, &filters),
                ..req
            };
            let (next, _) = convert::operation_query(&next).map_err(refused)?;
            assert_eq!(next.before.map(|id| id.to_string()).as_deref(), Some(last));
        }
        "CancelOperation" => {
            let req: pb::CancelOperationRequest = decode(bytes)?;
            convert::cancel_request(&req).map_err(refused)?;
        }
        "WatchOperations" => {
            let req: pb::WatchOperationsRequest = decode(bytes)?;
            convert::watch_request(&req).map_err(refused)?;
        }
        "StreamLogs" => {
            let req: pb::StreamLogsRequest = decode(bytes)?;
            convert::operation_id("operation_id", &req.operation_id).map_err(refused)?;
        }
        "ListOperationTypes" => {
            decode::<pb::ListOperationTypesRequest>(bytes)?;
            assert!(!convert::operation_types().is_empty());
        }
        other => unreachable!("{other} is in RPCS but has no conversion"),
    }
    Ok(())
}

/// Parses `text` as a ListMachines label selector; one that parses keeps its text (so that
/// page tokens carry it) and can be matched against any labels.
///
/// # Errors
///
/// The parser's message for a selector the server refuses.
///
/// # Panics
///
/// On a broken invariant.
pub fn label_selector(text: &str) -> Result<(), String> {
    let list = |selector: String| pb::ListMachinesRequest {
        label_selector: selector,
        ..Default::default()
    };
    let (query, _) =
        convert::machine_query(&list(text.to_owned())).map_err(|e| match refused(e) {
            Refused::Invalid(m) => m,
            Refused::Decode(e) => e.to_string(),
        })?;
    let selector = query.selector;
    let (again, _) = convert::machine_query(&list(selector.to_string()))
        .expect("a selector's text parses again");
    let again = again.selector;
    assert_eq!(again.to_string(), selector.to_string());
    let labels = [
        std::collections::HashMap::new(),
        [("rack", "r1"), ("zone", "a")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    ];
    for l in &labels {
        let l = convert::labels_from("labels", l).expect("valid labels");
        assert_eq!(selector.matches(&l), again.matches(&l));
    }
    Ok(())
}

/// Runs an UpdateMachine of a valid machine with `paths` as its field mask (one path a
/// line of `text`).
///
/// # Errors
///
/// The refusal, which names the mask or the field.
///
/// # Panics
///
/// On a broken invariant: a refusal that is not INVALID_ARGUMENT, or an accepted mask whose
/// paths are not the ones sent.
pub fn field_mask(text: &str) -> Result<(), Refused> {
    let paths: Vec<String> = text.split('\n').map(str::to_owned).collect();
    let req = pb::UpdateMachineRequest {
        machine: Some(pb::Machine {
            id: "m-1".into(),
            spec: Some(pb::MachineSpec {
                provider: "fake".into(),
                mac_addresses: vec!["02:00:00:00:00:01".into()],
                ssh_endpoint: "root@10.0.0.1:22".into(),
                image: "ubuntu-24.04".into(),
                target_cluster: "prod".into(),
                ..Default::default()
            }),
            labels: [("rack".to_owned(), "r1".to_owned())].into(),
            ..Default::default()
        }),
        update_mask: Some(bm_proto::pbjson_types::FieldMask {
            paths: paths.clone(),
        }),
    };
    let (update, named) = convert::machine_update(&req).map_err(refused)?;
    assert_eq!(named, paths, "the paths logged are the paths sent");
    assert_eq!(update.id.to_string(), "m-1");
    Ok(())
}

/// Decodes `token` as a page token of both listings, and checks that a token made from
/// `token` as a key (and as filters) resumes after that key, with those filters only.
///
/// # Errors
///
/// The refusal of `token` as a machines token.
///
/// # Panics
///
/// On a broken invariant.
pub fn page_token(token: &str) -> Result<(), String> {
    // Keys are machine or operation ids.
    if convert::machine_id("key", token).is_ok() {
        let made = paging::encode("machines", token, token);
        assert_eq!(
            paging::decode(&made, "machines", token)
                .expect("a token made for these filters")
                .as_deref(),
            Some(token)
        );
        assert!(paging::decode(&made, "operations", token).is_err());
        assert!(paging::decode(&made, "machines", &format!("{token}x")).is_err());
    }
    if let Err(e) = paging::decode(token, "operations", "") {
        drop(refused(e));
    }
    paging::decode(token, "machines", "")
        .map(drop)
        .map_err(|e| match refused(e) {
            Refused::Invalid(m) => m,
            Refused::Decode(e) => e.to_string(),
        })
}
