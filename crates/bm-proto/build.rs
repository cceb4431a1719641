//! Generates the gRPC code from `proto/` with no system `protoc`: protox (a protobuf compiler
//! in Rust) parses the files into a descriptor set, tonic-prost-build generates from it,
//! and the encoded descriptor set is kept for server reflection. pbjson-build adds serde
//! implementations that follow the canonical proto3 JSON mapping.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("baremetal/v1/baremetal.proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = fds.encode_to_vec();
    std::fs::write(out.join("baremetal_v1_descriptor.bin"), &encoded)?;

    // Well-known types come from pbjson-types, which gives them their canonical JSON form
    // (RFC 3339 timestamps, field masks as strings).
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // Written by hand (src/watch.rs): same wire format, plus events encoded once.
        .extern_path(
            ".baremetal.v1.WatchOperationsResponse",
            "crate::watch::WatchOperationsResponse",
        )
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .exclude([".baremetal.v1.WatchOperationsResponse"])
        .build(&[".baremetal.v1"])?;
    Ok(())
}
