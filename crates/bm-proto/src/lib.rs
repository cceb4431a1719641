//! The gRPC contract of the bare-metal control plane, generated from
//! `proto/baremetal/v1/baremetal.proto` at build time.
//!
//! # API boundary
//!
//! This crate is the SDK: its types are what clients compile against, so they change only
//! with the proto file, compatibly. Plans, step kinds and provider details are deliberately
//! absent. Only the adapters (`bm-server`, `bm-cli`) depend on it; the domain, the store,
//! the workflow engine and the providers know nothing of it, which is why a new provider
//! crate never needs a change here.

/// Package `baremetal.v1`: messages, enums, and the clients and servers of
/// `MachineService` and `OperationService`.
pub mod v1 {
    #![allow(
        missing_docs,
        reason = "generated code; the proto file documents every item"
    )]
    #![allow(unreachable_pub, reason = "generated code")]
    #![allow(clippy::all, reason = "generated code")]
    tonic::include_proto!("baremetal.v1");
    include!(concat!(env!("OUT_DIR"), "/baremetal.v1.serde.rs"));
    pub use crate::watch::WatchOperationsResponse;
}

mod watch;

/// The well-known protobuf types the API uses (`Timestamp`, `FieldMask`), with their
/// canonical JSON form.
pub use pbjson_types;

/// The canonical name of a gRPC status code, e.g. `NOT_FOUND`, as gRPC tools print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The encoded `FileDescriptorSet` of the API (with its imports), for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/baremetal_v1_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_describes_every_service() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let file = fds
            .file
            .iter()
            .find(|f| f.package() == "baremetal.v1")
            .expect("baremetal.v1 is in the set");
        let services: Vec<&str> = file.service.iter().map(|s| s.name()).collect();
        assert_eq!(
            services,
            ["MachineService", "OperationService", "RolloutService"]
        );
        // Imports are included, so reflection clients can resolve google.protobuf types.
        assert!(
            fds.file
                .iter()
                .any(|f| f.name() == "google/protobuf/timestamp.proto")
        );
    }

    #[test]
    fn json_follows_the_proto3_mapping() {
        let op = super::v1::Operation {
            id: "op-1".into(),
            r#type: super::v1::OperationType::Reimage.into(),
            create_time: Some(pbjson_types::Timestamp {
                seconds: 1_795_437_965,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(json["type"], "OPERATION_TYPE_REIMAGE");
        assert_eq!(json["createTime"], "2026-11-23T12:46:05+00:00");
        assert_eq!(json["id"], "op-1");
    }
}
