//! `bmctl plans`: what each operation type runs, as the server says.

use bm_proto::v1 as pb;

use super::show;
use crate::connect::Clients;
use crate::render::{self, Palette};

/// `bmctl plans`: every operation type with its stages in order and what it does. Read from
/// the server, so it is true of the server's version, not bmctl's.
pub(super) async fn plans(c: &mut Clients, json: bool, pal: &Palette) -> anyhow::Result<u8> {
    let types = c
        .operations
        .list_operation_types(pb::ListOperationTypesRequest {})
        .await?
        .into_inner();
    show(json, &types, |t| {
        render::plans_table(&t.operation_types, pal)
    })
}
