//! `bmctl version`: bmctl's version, and whether the server checks who calls.

use bm_proto::v1 as pb;

use super::print_json;
use crate::connect::Clients;

/// The response header of a server started with `--insecure` (bm-server's
/// `INSECURE_HEADER`): every answer carries it, with what it means.
const INSECURE_HEADER: &str = "bm-insecure";

/// `bmctl version`: asks the server a harmless question and reads, from its answer or its
/// refusal, whether it runs with `--insecure`.
pub(super) async fn version(c: &mut Clients, json: bool) -> anyhow::Result<u8> {
    let metadata = match c
        .operations
        .list_operation_types(pb::ListOperationTypesRequest {})
        .await
    {
        Ok(r) => r.metadata().clone(),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) =>
        {
            s.metadata().clone()
        }
        Err(s) => return Err(s.into()),
    };
    let insecure = metadata
        .get(INSECURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bmctl = env!("CARGO_PKG_VERSION");
    if json {
        print_json(&serde_json::json!({
            "bmctl": bmctl,
            "server_insecure": insecure.is_some(),
        }))?;
        return Ok(0);
    }
    outln!("bmctl {bmctl}");
    match insecure {
        Some(what) => outln!("server: INSECURE (--insecure): {what}"),
        None => outln!("server: authentication required (not --insecure)"),
    }
    Ok(0)
}
